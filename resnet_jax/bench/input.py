"""Input-pipeline throughput and resume latency, against torchvision and the train step.

  python -m resnet_jax.bench.input --dataset folder:/data/cifar10 --batch_size 128 \
      --train_step_model resnet20
  python -m resnet_jax.bench.input --dataset folder:/data/photos --batch_size 64 \
      --preset imagenet --image_size 224
  python -m resnet_jax.bench.input --dataset tiny:1281167 --batch_size 256 --batches 0 \
      --resume_at 0,0.5,0.99

Times the train pipeline alone (read, decode, augment, batch to uint8; no device) as
train.py builds it, on this machine's cores. In the same run it can also time:
  - torchvision's ImageFolder + DataLoader doing the equivalent transforms on the same
    files with one worker per core (`folder:` datasets, when torch and torchvision import);
  - the train step of `--train_step_model` on batches of the same size, i.e. how many
    images per second training would consume if input were free;
  - how long a resumed stream takes to its first batch at fractions of an epoch.
`tiny:N` is a synthetic dataset of N tiny PNG records, prepared once into --data_dir, for
measuring resume latency at ImageNet's record count without ImageNet's bytes.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

try:  # before TensorFlow: importing torch after it crashes the process (seen: segfault)
  import torch
  import torchvision
except ImportError:
  torch = torchvision = None
import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402
from PIL import Image  # noqa: E402

from resnet_jax import cli
from resnet_jax import data
from resnet_jax.bench import benchmark_config, write_json
from resnet_jax.data.image_folder import quiet_builder

TINY_PREFIX = "tiny:"


@dataclasses.dataclass(frozen=True)
class PipelineRate:
  """Images per second over `batches` timed batches, after `warmup_batches` untimed ones."""
  first_batch_s: float  # from building the stream to its first batch
  images_per_sec: float
  images_per_sec_per_core: float


@dataclasses.dataclass(frozen=True)
class InputResult:
  dataset: str
  train_examples: int
  preset: str
  image_size: int
  batch_size: int
  cores: int
  ours: PipelineRate | None
  torchvision: PipelineRate | None  # None: not run (not a folder, or torch not installed)
  ratio_to_torchvision: float | None  # ours / torchvision, same files, same cores
  train_step_model: str | None
  train_step_images_per_sec: float | None
  ratio_to_train_step: float | None  # ours / what the train step consumes
  resume_first_batch_s: dict[str, float]  # fraction of the epoch → seconds to first batch
  shuffle_buffer: int


def available_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_stream(make_stream, *, local_batch: int, batches: int, warmup_batches: int,
                cores: int) -> PipelineRate:
  """Builds a stream of batches and times it: first batch, then `batches` after warm-up."""
  start = time.perf_counter()
  stream = make_stream()
  next(stream)
  first_batch_s = time.perf_counter() - start
  for _ in range(warmup_batches):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  rate = batches * local_batch / (time.perf_counter() - start)
  return PipelineRate(first_batch_s, rate, rate / cores)


def torchvision_stream(root: str, *, preset: str, image_size: int, batch_size: int,
                       workers: int, seed: int) -> Iterator:
  """torchvision's ImageFolder + DataLoader with the transforms of our preset, uint8 out."""
  from torchvision import datasets, transforms

  if preset == "imagenet":
    augment = [transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
               transforms.RandomHorizontalFlip()]
  else:  # cifar / translate: resize, pad-and-crop, flip
    augment = [transforms.Resize((image_size, image_size)),
               transforms.RandomCrop(image_size, padding=max(1, image_size // 8))]
    augment += [transforms.RandomHorizontalFlip()] if preset == "cifar" else []
  dataset = datasets.ImageFolder(os.path.join(root, "train"),
                                 transforms.Compose([*augment, transforms.PILToTensor()]))
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
      persistent_workers=True, generator=torch.Generator().manual_seed(seed))
  return itertools.chain.from_iterable(itertools.repeat(loader))


def train_step_images_per_sec(model: str, *, batch_size: int, image_size: int,
                              steps: int = 5) -> float:
  """Images/sec of the float32 train step of `model` alone, on device-resident batches."""
  from resnet_jax.bench.throughput import time_train_steps
  from resnet_jax.training.loop import setup
  config = benchmark_config(model, batch_size=batch_size, image_size=image_size,
                            dtype="float32", num_train_steps=steps + 2)
  return batch_size / time_train_steps(setup(config), steps, warmup_steps=1).step_s


class TinyRecords(tfds.core.GeneratorBasedBuilder):
  """N records of 8×8 PNGs in 10 classes: ImageNet's record count at a tiny size."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for metadata beside the class's module, which is __main__ under `python -m`.
  pkg_dir_path = epath.Path(__file__).parent

  def __init__(self, num_records: int, **kwargs):
    self._num_records = num_records
    super().__init__(config=tfds.core.BuilderConfig(name=f"n{num_records}"), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 8, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(self._num_records),
            "test": self._generate_examples(1000)}

  def _generate_examples(self, count: int) -> Iterator[tuple[int, dict]]:
    pngs = []
    for label in range(10):
      buffer = io.BytesIO()
      Image.fromarray(np.full((8, 8, 3), 25 * label, np.uint8)).save(buffer, "PNG")
      pngs.append(buffer.getvalue())
    for i in range(count):
      yield i, {"image": pngs[i % 10], "label": i % 10}


def tiny_records_info(name: str, data_dir: str | None) -> data.DatasetInfo:
  """`tiny:N` as a prepared dataset (prepared into data_dir on first use)."""
  count = name[len(TINY_PREFIX):]
  if not count.isdigit() or int(count) < 1:
    raise ValueError(f"--dataset={name!r}: tiny:N needs a positive record count N")
  builder = quiet_builder(TinyRecords, int(count), data_dir=data_dir or None)
  builder.download_and_prepare()
  splits = builder.info.splits
  return data.DatasetInfo(name=name, num_classes=10, image_shape=(8, 8, 3),
                          num_train_examples=splits["train"].num_examples,
                          num_eval_examples=splits["test"].num_examples,
                          preprocessing="translate", builder_dir=str(builder.data_path))


def benchmark(dataset: str, *, batch_size: int, preset: str, image_size: int, batches: int,
              warmup_batches: int, data_dir: str | None, threads: int, shuffle_buffer: int,
              cache: bool, torchvision: bool, train_step_model: str | None,
              resume_at: Sequence[float]) -> InputResult:
  """Runs every measurement asked for, one after another, on the same cores."""
  if dataset.startswith(TINY_PREFIX):
    info = tiny_records_info(dataset, data_dir)
  else:
    info = data.get_dataset_info(dataset, data_dir)
  preset = data.resolve_preprocessing(info, preset)
  image_size = image_size or (info.image_shape[0] if preset != "imagenet" else 224)
  cores = available_cores()

  def ours(start_batch: int = 0) -> Iterator:
    return data.train_batches(info, global_batch_size=batch_size, image_size=image_size,
                              seed=0, start_batch=start_batch, preprocessing=preset,
                              shuffle_buffer=shuffle_buffer, cache=cache, num_threads=threads)

  timing = dict(local_batch=batch_size, batches=batches, warmup_batches=warmup_batches,
                cores=cores)
  our_rate = time_stream(ours, **timing) if batches else None
  tv_rate = None
  if torchvision and dataset.startswith("folder:") and batches:
    root = os.path.abspath(os.path.expanduser(dataset[len("folder:"):]))
    tv_rate = time_stream(lambda: torchvision_stream(
        root, preset=preset, image_size=image_size, batch_size=batch_size, workers=cores,
        seed=0), **timing)
  step_rate = None
  if train_step_model:
    step_rate = train_step_images_per_sec(train_step_model, batch_size=batch_size,
                                          image_size=image_size)
  per_epoch = data.steps_per_epoch(info, batch_size)
  resume = {}
  for fraction in resume_at:
    start_batch = min(int(fraction * per_epoch), per_epoch - 1)
    start = time.perf_counter()
    next(ours(start_batch))
    resume[f"{fraction:g}"] = time.perf_counter() - start
  return InputResult(
      dataset=dataset, train_examples=info.num_train_examples, preset=preset,
      image_size=image_size, batch_size=batch_size, cores=cores, ours=our_rate,
      torchvision=tv_rate,
      ratio_to_torchvision=(our_rate.images_per_sec / tv_rate.images_per_sec
                            if our_rate and tv_rate else None),
      train_step_model=train_step_model, train_step_images_per_sec=step_rate,
      ratio_to_train_step=(our_rate.images_per_sec / step_rate
                           if our_rate and step_rate else None),
      resume_first_batch_s=resume, shuffle_buffer=shuffle_buffer)


def format_result(r: InputResult, torchvision_note: str) -> str:
  """The result as a short aligned report."""

  def rate(p: PipelineRate) -> str:
    return (f"{p.images_per_sec:,.0f} img/s, {p.images_per_sec_per_core:,.0f} img/s per core "
            f"(first batch after {p.first_batch_s:.2f} s)")

  rows = [("dataset", f"{r.dataset}: {r.train_examples:,} train examples, preset {r.preset}, "
                      f"{r.image_size}x{r.image_size}, batch {r.batch_size}, {r.cores} cores")]
  if r.ours:
    rows.append(("resnet_jax pipeline", rate(r.ours)))
  if r.torchvision:
    rows.append(("torchvision loader", rate(r.torchvision) + f" ({r.cores} workers)"))
    rows.append(("ratio", f"{r.ratio_to_torchvision:.2f} (resnet_jax / torchvision, per core "
                          "alike: same cores)"))
  elif torchvision_note:
    rows.append(("torchvision loader", torchvision_note))
  if r.train_step_images_per_sec:
    rows.append(("train step", f"{r.train_step_model}: {r.train_step_images_per_sec:,.0f} img/s "
                               "(float32, alone on the same cores)"))
    if r.ratio_to_train_step:
      rows.append(("ratio", f"{r.ratio_to_train_step:.2f} (pipeline / train step consumption)"))
  for fraction, seconds in r.resume_first_batch_s.items():
    rows.append((f"resume at {fraction} epoch", f"{seconds:.2f} s to the first batch "
                                                f"(shuffle_buffer={r.shuffle_buffer or 'auto'})"))
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.input", __doc__)
  parser.add_argument("--dataset", required=True,
                      help="folder:PATH, a prepared tfds name, digits, or tiny:N")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--preset", choices=data.PRESETS, default="auto")
  parser.add_argument("--image_size", type=int, default=0,
                      help="0: the dataset's size (224 for the imagenet preset)")
  parser.add_argument("--batches", type=int, default=50, help="timed batches (0: none)")
  parser.add_argument("--warmup_batches", type=int, default=5)
  parser.add_argument("--data_dir", default=None, help="tfds data dir (default: tfds')")
  parser.add_argument("--threads", type=int, default=0, help="tf.data threads (0: autotuned)")
  parser.add_argument("--shuffle_buffer", type=int, default=0, help="0: auto, as in training")
  parser.add_argument("--cache", action="store_true", help="records in memory")
  parser.add_argument("--no_torchvision", action="store_true",
                      help="skip the torchvision comparison even if torch is installed")
  parser.add_argument("--train_step_model", default=None,
                      help="also time this model's train step on batches of the same size")
  parser.add_argument("--resume_at", default="",
                      help="comma-separated fractions of an epoch to time a resume at")
  parser.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
  args = parser.parse_args(argv)
  if args.batch_size < 1 or args.batches < 0 or args.warmup_batches < 0:
    parser.error("--batch_size must be >= 1, --batches and --warmup_batches >= 0")
  try:
    resume_at = [float(f) for f in args.resume_at.split(",") if f.strip()]
  except ValueError:
    parser.error(f"--resume_at={args.resume_at!r}: expected fractions like 0,0.5,0.99")
  if any(not 0 <= f < 1 for f in resume_at):
    parser.error("--resume_at fractions must be in [0, 1)")
  use_torchvision = not args.no_torchvision and torchvision is not None
  note = ("not run: --no_torchvision" if args.no_torchvision
          else "not run: torch/torchvision not installed" if not use_torchvision
          else "not run: only for folder: datasets" if not args.dataset.startswith("folder:")
          else "")
  try:
    result = benchmark(args.dataset, batch_size=args.batch_size, preset=args.preset,
                       image_size=args.image_size, batches=args.batches,
                       warmup_batches=args.warmup_batches, data_dir=args.data_dir,
                       threads=args.threads, shuffle_buffer=args.shuffle_buffer,
                       cache=args.cache, torchvision=use_torchvision,
                       train_step_model=args.train_step_model, resume_at=resume_at)
  except ValueError as e:  # a missing dataset or a bad size: one actionable line.
    parser.exit(2, f"error: {e}\n")
  print(format_result(result, note))
  if args.json:
    write_json(args.json, dataclasses.asdict(result))


if __name__ == "__main__":
  main()
