"""Users' image folders (`folder:PATH`) as tfds datasets: scanned, checked, prepared once.

  PATH/train/<class>/*.{jpg,jpeg,png,bmp,gif,webp}
  PATH/val/<class>/...  or  PATH/test/<class>/...     (optional)

Classes are the sorted names of the train folders. Without val/ or test/, the last
`holdout_fraction` of each class's files (sorted by name; at least one) are held out
as the `holdout` split. Preparing copies every readable file's bytes as they are (no
re-encoding) into a tfds dataset under `data_dir/folder_images/`, named by a fingerprint
of the file list (paths, sizes, versions) and the hold-out, so a changed folder is prepared
again (and, once that copy is complete, the copy of its earlier state is deleted) and an
unchanged one never is. Preparing is where each file is decoded once with the decoder
training uses: an unreadable file is skipped with a warning naming it and a count at the
end, so nothing fails mid-epoch and nothing is dropped silently. The folder and the data dir
may each be local or in a bucket (`storage.paths`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax.storage import paths
from resnet_jax.storage.file_lock import file_lock

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
EVAL_FOLDERS = ("val", "test")
HOLDOUT_SPLIT = "holdout"
FACTS_FILE = "resnet_jax_folder.json"  # beside the tfds files: what preparing found
_FORMAT_VERSION = 1  # bump when what preparing writes changes
LAYOUT = ("Expected layout:\n"
          "  PATH/train/<class name>/<image>   (.jpg .jpeg .png .bmp .gif .webp)\n"
          "  PATH/val/<class name>/<image>     (optional; or PATH/test/...; without either,\n"
          "                                     holdout_fraction of each class is held out)")


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """The files of an image folder by split, with labels, and the fingerprint of it all."""
  root: str
  class_names: tuple[str, ...]
  holdout_fraction: float
  splits: dict[str, list[tuple[str, int]]]  # split folder → [(path, label)]
  eval_split: str  # "val", "test", or "holdout": held out of train when preparing
  ignored_files: tuple[str, ...]  # not images by their extension
  fingerprint: str
  image_bytes: int  # of all the image files


def _folder_tree(root: str) -> dict[str, dict[str, list[paths.Entry]]]:
  """split → class → the entries directly in that class folder, from one listing of `root`;
  hidden folders and files are left out."""
  tree: dict[str, dict[str, list[paths.Entry]]] = {}
  for entry in paths.list_tree(paths.resolve(root)):
    parts = entry.path[len(root) + 1:].split("/")
    if any(part.startswith(".") for part in parts) or len(parts) > 3:
      continue
    if len(parts) == 1 and not entry.is_dir:
      continue
    classes = tree.setdefault(parts[0], {})
    if len(parts) == 2 and entry.is_dir:
      classes.setdefault(parts[1], [])
    elif len(parts) == 3 and not entry.is_dir:
      classes.setdefault(parts[1], []).append(entry)
  return tree


def scan(root: str, holdout_fraction: float) -> FolderListing:
  """Lists and checks the folder (local or in a bucket); raises ValueError naming what is
  wrong with it."""
  root_path = paths.resolve(root)
  paths.check_bucket(root_path, "folder:")
  root = os.fspath(root_path)
  if not root_path.is_dir():
    raise ValueError(f"Image folder {root!r} does not exist or is not a directory. {LAYOUT}")
  tree = _folder_tree(root)
  train_dir = f"{root}/train"
  if "train" not in tree:
    raise ValueError(f"Image folder {root!r} has no train/ folder. {LAYOUT}")
  if not tree["train"]:
    raise ValueError(f"{train_dir!r} has no class folders. {LAYOUT}")
  class_names = tuple(sorted(tree["train"]))
  label_of = {name: label for label, name in enumerate(class_names)}
  ignored: list[str] = []
  image_bytes = 0
  fingerprint = hashlib.sha256(json.dumps([_FORMAT_VERSION, holdout_fraction]).encode())

  def list_split(split: str) -> list[tuple[str, int]]:
    nonlocal image_bytes
    split_dir = f"{root}/{split}"
    unknown = sorted(set(tree[split]) - set(class_names))
    if unknown:
      raise ValueError(f"{split_dir!r} has class folder(s) {unknown} that train/ lacks; "
                       f"every {split}/ class must also be a train/ class.")
    files = []
    for name in sorted(tree[split]):
      entries = tree[split][name]
      images = [e for e in entries if e.path.lower().endswith(IMAGE_EXTENSIONS)]
      ignored.extend(e.path for e in entries if e not in images)
      if not images and split == "train":
        raise ValueError(f"Class folder {split_dir + '/' + name!r} has no images "
                         f"({' '.join(IMAGE_EXTENSIONS)}); add images or remove it.")
      for entry in images:
        image_bytes += entry.size
        fingerprint.update(f"{entry.path[len(root) + 1:]}\0{entry.size}\0"
                           f"{entry.version}\n".encode())
        files.append((entry.path, label_of[name]))
    if not files:
      raise ValueError(f"Split folder {split_dir!r} has no images. {LAYOUT}")
    return files

  splits = {"train": list_split("train")}
  for split in EVAL_FOLDERS:
    if split in tree:
      splits[split] = list_split(split)
  eval_split = next((s for s in EVAL_FOLDERS if s in splits), HOLDOUT_SPLIT)
  return FolderListing(root, class_names, holdout_fraction, splits, eval_split,
                       tuple(ignored), fingerprint.hexdigest(), image_bytes)


def _hold_out(files: list[tuple[str, int]], fraction: float
              ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """Per class, the last fraction × n files by name (rounded; at least 1, at most n − 1)."""
  train, held_out = [], []
  labels = np.asarray([label for _, label in files])
  for label in np.unique(labels):
    of_class = [files[i] for i in np.flatnonzero(labels == label)]  # sorted by name
    count = min(max(1, int(fraction * len(of_class) + 0.5)), len(of_class) - 1)
    count = count if fraction > 0 else 0
    train += of_class[:len(of_class) - count]
    held_out += of_class[len(of_class) - count:]
  return train, held_out


@dataclasses.dataclass(frozen=True)
class CheckedImage:
  path: str
  short_side: int  # 0: unreadable
  error: str


def read_files(files: list[str], threads: int = 16, chunk: int = 256
               ) -> Iterator[tuple[str, bytes]]:
  """(path, bytes) of each file in order, read `threads` at a time through `storage.paths`
  (a bucket answers each read slowly, but many at once); at most `chunk` files in memory."""
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(files), chunk):
      part = files[start:start + chunk]
      yield from zip(part, pool.map(_read_or_empty, part))


def _read_or_empty(path: str) -> bytes:
  """The file's bytes; b"" where it cannot be read (decoding then says it is unreadable)."""
  try:
    return paths.resolve(path).read_bytes()
  except OSError:
    return b""


def _short_side(path: tf.Tensor, encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(path, short side), decoding as training will (JPEGs at 1/8 scale: every byte is still
  parsed); raises where the file is unreadable."""

  def jpeg() -> tf.Tensor:
    decoded = tf.image.decode_jpeg(encoded, channels=3, ratio=8)
    shape = tf.image.extract_jpeg_shape(encoded)[:2]
    return shape + 0 * tf.reduce_sum(tf.shape(decoded))  # keeps the decode in the graph

  def other() -> tf.Tensor:
    return tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2]

  return path, tf.reduce_min(tf.cond(tf.io.is_jpeg(encoded), jpeg, other))


def check_image(path: str) -> CheckedImage:
  """`_short_side` run eagerly on one file, to say why it fails."""
  try:
    encoded = tf.constant(paths.resolve(path).read_bytes())
    return CheckedImage(path, int(_short_side(tf.constant(path), encoded)[1]), "")
  except (tf.errors.OpError, ValueError, OSError) as e:
    message = getattr(e, "message", str(e))  # TF's text, without the op's name and device
    message = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", message).strip()
    return CheckedImage(path, 0, message or type(e).__name__)


def check_images(files: list[str]) -> list[CheckedImage]:
  """Decodes every file on tf.data's threads, with a progress bar; explains each failure."""
  ds = tf.data.Dataset.from_generator(
      lambda: read_files(files), output_signature=(tf.TensorSpec((), tf.string),) * 2)
  ds = ds.map(_short_side, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().prefetch(tf.data.AUTOTUNE)
  readable = {}
  with tqdm.tqdm(total=len(files), desc="Checking images", unit="img", leave=False) as bar:
    for path, short_side in ds.as_numpy_iterator():
      readable[path.decode()] = CheckedImage(path.decode(), int(short_side), "")
      bar.update(1)
  return [readable.get(p) or check_image(p) for p in files]  # the eager check says why


class FolderImages(tfds.core.GeneratorBasedBuilder):
  """An image folder as a tfds dataset: one config per folder state (its fingerprint)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Encoded bytes copied as they are."}

  def __init__(self, listing: FolderListing, readable: dict[str, list[tuple[str, int]]],
               **kwargs):
    slug = re.sub(r"[^a-z0-9]+", "_", listing.root.rsplit("/", 1)[-1].lower()).strip("_")
    config = tfds.core.BuilderConfig(name=f"{slug or 'folder'}_{listing.fingerprint[:16]}",
                                     description=listing.root)
    self._listing, self._readable = listing, readable
    super().__init__(config=config, file_format="tfrecord", **kwargs)

  def _log_download_bytes(self) -> None:
    """Nothing: tfds' "Downloading and preparing dataset Unknown size" fits no local folder;
    `prepared_builder_dir` says what it prepares."""

  def _log_download_done(self) -> None:
    """Nothing (see `_log_download_bytes`)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f"Images of {self._listing.root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self._listing.class_names),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(files) for split, files in self._readable.items()}

  def _generate_examples(self, files: list[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
    root = self._listing.root
    labels = dict(files)
    for path, encoded in read_files([path for path, _ in files]):
      yield path, {"image": encoded, "label": labels[path], "file_name": path[len(root) + 1:]}


def quiet_builder(builder_class: type, *args, **kwargs) -> tfds.core.DatasetBuilder:
  """A builder made with a config of its own, without tfds' warning that the config is not
  one of its BUILDER_CONFIGS."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return builder_class(*args, **kwargs)
  finally:
    absl_logger.setLevel(level)


def _check_and_report(listing: FolderListing) -> tuple[dict[str, list[tuple[str, int]]], int]:
  """The readable files by split and their median short side; warns about every other one."""
  if listing.ignored_files:
    logging.warning("Ignoring %d file(s) that are not images by extension (%s), e.g. %s",
                    len(listing.ignored_files), " ".join(IMAGE_EXTENSIONS),
                    listing.ignored_files[0])
  all_files = [path for files in listing.splits.values() for path, _ in files]
  checked = {c.path: c for c in check_images(all_files)}
  bad = [c for c in checked.values() if c.error]
  for c in bad:
    logging.warning("Skipping unreadable image %s: %s", c.path, c.error)
  if bad:
    logging.warning("Skipped %d of %d image files in %s that could not be decoded (listed "
                    "above).", len(bad), len(all_files), listing.root)
  readable = {split: [(p, label) for p, label in files if not checked[p].error]
              for split, files in listing.splits.items()}
  if listing.eval_split == HOLDOUT_SPLIT:
    readable["train"], readable[HOLDOUT_SPLIT] = _hold_out(readable["train"],
                                                           listing.holdout_fraction)
    if not readable[HOLDOUT_SPLIT]:
      raise ValueError(
          f"{listing.root!r} has no val/ or test/ folder and holdout_fraction="
          f"{listing.holdout_fraction} holds out no image: set config.holdout_fraction "
          "(e.g. 0.1) or add a val/ folder.")
  for split, files in readable.items():
    if not files:
      raise ValueError(f"Split {split!r} of {listing.root!r} has no readable image; its "
                       "files are all unreadable (see the warnings above).")
  short_sides = [checked[p].short_side for p, _ in readable["train"]]
  return readable, int(np.median(short_sides))


def remove_earlier_preparations(builder_dir: epath.Path, listing: FolderListing) -> list[str]:
  """Deletes the other complete preparations of the folder beside `builder_dir` with the
  same hold-out (its earlier states, each a config of FolderImages); returns them."""
  config_dir, same = builder_dir.parent, {"root": listing.root,
                                          "holdout_fraction": listing.holdout_fraction}
  removed = []
  for other in config_dir.parent.iterdir():
    if other.name == config_dir.name or not other.is_dir():
      continue
    if any({k: json.loads(facts.read_text()).get(k) for k in same} == same
           for facts in other.glob(f"*/{FACTS_FILE}")):
      other.rmtree()
      removed.append(os.fspath(other))
  return removed


def prepared_builder_dir(root: str, data_dir: str | None,
                         holdout_fraction: float) -> tuple[str, FolderListing, dict]:
  """Prepares the folder if its current state is not prepared yet; returns where it is.

  Returns (builder_dir, listing, facts), facts being what preparing found
  (`native_image_size`, `skipped_files`, `eval_split`). `root` and `data_dir` may be local
  or in a bucket. With several processes, process 0 prepares while the others wait at a
  barrier; a process that then finds nothing (its data_dir is a disk of its own host, not
  shared) prepares its own copy. Processes on one host take turns through a file lock.
  """
  listing = scan(root, holdout_fraction)
  data_dir = os.fspath(paths.resolve(data_dir or str(tfds.core.constants.DATA_DIR)))
  probe = quiet_builder(FolderImages, listing, {}, data_dir=data_dir)
  builder_dir = paths.resolve(probe.data_path)
  facts_path = builder_dir / FACTS_FILE
  lock = (contextlib.nullcontext() if paths.is_bucket(data_dir) else
          file_lock(f"{data_dir}/{probe.name}/{probe.builder_config.name}.lock"))

  def prepare_unless_prepared() -> None:
    with lock:
      if facts_path.exists():
        return
      total = sum(len(files) for files in listing.splits.values())
      logging.warning("Preparing folder %s (%d images, %.1f MB) into %s; once for each state "
                      "of the folder.", listing.root, total, listing.image_bytes / 1e6,
                      builder_dir)
      readable, native_size = _check_and_report(listing)
      quiet_builder(FolderImages, listing, readable, data_dir=data_dir).download_and_prepare()
      facts = {"root": listing.root, "holdout_fraction": listing.holdout_fraction,
               "native_image_size": native_size,
               "eval_split": listing.eval_split,
               "skipped_files": sorted({p for files in listing.splits.values() for p, _ in files}
                                       - {p for files in readable.values() for p, _ in files})}
      # Written last: marks the dataset complete.
      paths.write_atomically(facts_path, json.dumps(facts, indent=1))
      for earlier in remove_earlier_preparations(builder_dir, listing):
        logging.warning("Removed %s, the preparation of an earlier state of %s", earlier,
                        listing.root)

  if jax.process_count() > 1:
    if jax.process_index() == 0:
      prepare_unless_prepared()
    multihost_utils.sync_global_devices(f"prepared {probe.builder_config.name}")
  prepare_unless_prepared()
  return os.fspath(builder_dir), listing, json.loads(facts_path.read_text())
