"""Image folders (`folder:PATH`) end to end, on tiny folders of real image files.

The test folders hold JPEG, PNG, greyscale, RGBA, palette, CMYK, BMP, GIF and WebP files
of different sizes, plus a corrupt file, an empty file and a non-image file.
"""

import collections
import hashlib
import io
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile

import chex
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.bench.photo_folder import write_photo_folder
from resnet_jax.data import image_folder, tfds_pipeline
from batch_hashes import example_hashes

CLASSES = ("cat", "dog", "eel")  # written in this order; labels follow the sorted names
FORMATS = ("jpeg", "png", "grey_png", "rgba_png", "palette_png", "cmyk_jpeg", "bmp", "gif",
           "webp", "grey_jpeg")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TAR = os.path.join(REPO, "..", "shared", "data", "cifar10-train-jpeg.tar.gz")


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth random colour image (compresses and resizes like a photo, unlike noise)."""
  corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  top = corners[0, 0] * (1 - x) + corners[0, 1] * x
  bottom = corners[1, 0] * (1 - x) + corners[1, 1] * x
  return (top * (1 - y) + bottom * y).astype(np.uint8)


def encode(pixels: np.ndarray, kind: str) -> tuple[bytes, str]:
  """Bytes of `pixels` in one of FORMATS, and the file extension."""
  image = Image.fromarray(pixels)
  converted = {"grey_png": "L", "rgba_png": "RGBA", "palette_png": "P", "cmyk_jpeg": "CMYK",
               "grey_jpeg": "L"}.get(kind)
  if converted:
    image = image.convert(converted)
  pil_format, extension = {
      "jpeg": ("JPEG", ".jpg"), "cmyk_jpeg": ("JPEG", ".jpeg"), "grey_jpeg": ("JPEG", ".JPG"),
      "bmp": ("BMP", ".bmp"), "gif": ("GIF", ".gif"), "webp": ("WEBP", ".webp"),
  }.get(kind, ("PNG", ".png"))
  buffer = io.BytesIO()
  image.save(buffer, pil_format)
  return buffer.getvalue(), extension


def write_folder(root, per_class: dict[str, int], split: str = "train", seed: int = 0) -> None:
  """Writes per_class[name] images per class, cycling through FORMATS and sizes."""
  rng = np.random.default_rng(seed)
  for name, count in per_class.items():
    os.makedirs(os.path.join(root, split, name), exist_ok=True)
    for i in range(count):
      kind = FORMATS[i % len(FORMATS)]
      encoded, extension = encode(photo(rng, 24 + 3 * (i % 5), 20 + 5 * (i % 4)), kind)
      with open(os.path.join(root, split, name, f"{i:03d}_{kind}{extension}"), "wb") as f:
        f.write(encoded)


def add_bad_files(root) -> list[str]:
  """A corrupt JPEG, a truncated PNG, an empty file and a text file; the three images' paths."""
  good, _ = encode(photo(np.random.default_rng(1), 30, 30), "png")
  bad = {"cat/corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg",
         "dog/truncated.png": good[:len(good) // 2],
         "eel/empty.png": b""}
  for relative, content in bad.items():
    with open(os.path.join(root, "train", relative), "wb") as f:
      f.write(content)
  with open(os.path.join(root, "train", "cat", "notes.txt"), "w") as f:
    f.write("not an image")
  return [os.path.join(root, "train", relative) for relative in bad]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  """18 images per class in train/ only (10% held out), plus unreadable files."""
  root = tmp_path_factory.mktemp("photos")
  write_folder(root, {name: 18 for name in CLASSES})
  add_bad_files(root)
  return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="module")
def info(folder, data_dir) -> data.DatasetInfo:
  return data.get_dataset_info(f"folder:{folder}", data_dir)


def eval_split_hashes(info, process_count: int, global_batch_size: int) -> collections.Counter:
  return sum((example_hashes(data.eval_batches(info, global_batch_size=global_batch_size,
                                               image_size=16, process_index=index,
                                               process_count=process_count))
              for index in range(process_count)), collections.Counter())


# Preparing: classes, hold-out, bad files, re-preparing.

def test_folder_becomes_a_dataset_with_sorted_classes_and_a_stratified_holdout(info):
  assert info.class_names == CLASSES
  assert info.num_classes == 3
  # 18 readable images per class (the bad ones are skipped): 2 of each are held out.
  assert (info.num_train_examples, info.num_eval_examples) == (3 * 16, 3 * 2)
  assert info.eval_split == image_folder.HOLDOUT_SPLIT
  assert info.image_shape == (25, 25, 3)  # median short side, RGB whatever the files were
  assert info.preprocessing == "cifar"  # small images
  labels = np.concatenate([b["label"] for b in data.eval_batches(
      info, global_batch_size=6, image_size=16)])
  np.testing.assert_array_equal(np.bincount(labels), [2, 2, 2])


def test_hold_out_takes_the_last_files_of_each_class_by_name():
  files = [(f"{label}/{i}", label) for label in (0, 1) for i in range(10)]
  train, held_out = image_folder._hold_out(files, 0.2)
  assert held_out == [("0/8", 0), ("0/9", 0), ("1/8", 1), ("1/9", 1)]
  assert sorted(train + held_out) == sorted(files)


def test_unreadable_files_are_skipped_with_warnings_naming_them_and_a_count(tmp_path, caplog):
  write_folder(tmp_path, {name: 3 for name in CLASSES})
  bad = add_bad_files(tmp_path)
  with caplog.at_level(logging.WARNING):
    info = data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))
  for path in bad:
    assert re.search(f"Skipping unreadable image {re.escape(path)}: .+", caplog.text), path
  assert f"Skipped 3 of 12 image files in {tmp_path}" in caplog.text
  assert "Ignoring 1 file(s) that are not images" in caplog.text
  assert info.num_train_examples + info.num_eval_examples == 9


def test_an_unchanged_folder_is_not_prepared_again_and_a_changed_one_is(tmp_path, caplog,
                                                                        capsys):
  write_folder(tmp_path, {"a": 4, "b": 4})
  data_dir = str(tmp_path / "tfds")
  first = data.get_dataset_info(f"folder:{tmp_path}", data_dir)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = data.get_dataset_info(f"folder:{tmp_path}", data_dir)
  assert "Preparing" not in caplog.text
  assert again.builder_dir == first.builder_dir

  write_folder(tmp_path, {"b": 6}, seed=1)  # two more files in b, and new bytes for 4 files
  with caplog.at_level(logging.WARNING):
    changed = data.get_dataset_info(f"folder:{tmp_path}", data_dir)
  assert changed.builder_dir != first.builder_dir
  assert changed.num_train_examples + changed.num_eval_examples == 10
  assert re.search(rf"Preparing folder {re.escape(str(tmp_path))} \(10 images, 0\.\d MB\)",
                   caplog.text)
  earlier = os.path.dirname(first.builder_dir)  # the earlier state's copy, once the new is done
  assert not os.path.exists(earlier) and f"Removed {earlier}" in caplog.text
  assert "Downloading and preparing" not in capsys.readouterr().out  # tfds' line, for a download
  rewritten = os.path.join(tmp_path, "train", "a", "000_jpeg.jpg")
  os.utime(rewritten, ns=(0, 0))  # same size, new mtime: prepared again
  assert data.get_dataset_info(f"folder:{tmp_path}", data_dir).builder_dir not in (
      first.builder_dir, changed.builder_dir)


def test_holdout_fraction_is_part_of_the_dataset_identity(folder, data_dir, info):
  other = data.get_dataset_info(f"folder:{folder}", data_dir, holdout_fraction=0.25)
  assert other.builder_dir != info.builder_dir
  assert (other.num_train_examples, other.num_eval_examples) == (3 * 13, 3 * 5)


def test_val_folder_is_the_eval_split(tmp_path):
  write_folder(tmp_path, {name: 4 for name in CLASSES})
  write_folder(tmp_path, {"cat": 2, "eel": 1}, split="val")
  info = data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))
  assert (info.eval_split, info.num_train_examples, info.num_eval_examples) == ("val", 12, 3)
  labels = next(data.eval_batches(info, global_batch_size=3, image_size=16))["label"]
  np.testing.assert_array_equal(sorted(labels), [0, 0, 2])  # labels of train's classes


# Bad folders: errors that say what is wrong and where.

def test_missing_folder_and_missing_train_folder_show_the_expected_layout(tmp_path):
  with pytest.raises(ValueError, match="does not exist.*Expected layout"):
    data.get_dataset_info(f"folder:{tmp_path / 'nowhere'}")
  (tmp_path / "images").mkdir()
  with pytest.raises(ValueError, match=r"has no train/ folder.*Expected layout:\n.*PATH/train/"):
    data.get_dataset_info(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match="names no folder"):
    data.get_dataset_info("folder:")


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
  write_folder(tmp_path, {"cat": 2})
  (tmp_path / "train" / "dog").mkdir()
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'train' / 'dog'}' has no images")):
    data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))


def test_empty_split_and_unknown_eval_class_are_errors_naming_them(tmp_path):
  write_folder(tmp_path, {"cat": 2, "dog": 2})
  (tmp_path / "val").mkdir()
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'val'}' has no images")):
    data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))
  write_folder(tmp_path, {"cow": 1}, split="val")
  with pytest.raises(ValueError, match=r"has class folder\(s\) \['cow'\] that train/ lacks"):
    data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))


def test_a_split_of_only_unreadable_files_is_an_error(tmp_path):
  write_folder(tmp_path, {"cat": 2})
  os.makedirs(tmp_path / "val" / "cat")
  (tmp_path / "val" / "cat" / "broken.jpg").write_bytes(b"broken")
  with pytest.raises(ValueError, match="Split 'val' .* has no readable image"):
    data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))


# Reading: colour modes, shards, determinism, resume, eval coverage.

def test_every_colour_mode_reaches_the_model_as_rgb_of_the_right_pixels(tmp_path):
  pixels = photo(np.random.default_rng(5), 16, 16)
  for kind in FORMATS:
    os.makedirs(tmp_path / "train" / kind)
    encoded, extension = encode(pixels, kind)
    (tmp_path / "train" / kind / f"image{extension}").write_bytes(encoded)
    (tmp_path / "train" / kind / f"copy{extension}").write_bytes(encoded)
  info = data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"),
                               holdout_fraction=0.5)
  batch = next(data.eval_batches(info, global_batch_size=len(FORMATS), image_size=16))
  chex.assert_shape(batch["image"], (len(FORMATS), 16, 16, 3))
  grey = np.asarray(Image.fromarray(pixels).convert("L"), np.float32)
  for image, label in zip(batch["image"], batch["label"]):
    kind = info.class_names[label]
    expected = np.repeat(grey[..., None], 3, -1) if "grey" in kind else pixels
    tolerance = 20 if ("jpeg" in kind or kind in ("palette_png", "gif", "webp")) else 1
    error = np.abs(image.astype(np.float32) - expected).mean()
    assert error < tolerance, (kind, error)


def test_process_shards_are_disjoint_and_cover_every_split(info):
  for split, total in ((info.train_split, info.num_train_examples),
                       (info.eval_split, info.num_eval_examples)):
    for process_count in (1, 2, 3, 5):
      ranges = [tfds_pipeline._chunks(info, split, index, process_count)
                for index in range(process_count)]
      records = [(file, offset + i) for chunks in ranges
                 for file, offset, count in zip(chunks.files, chunks.offsets, chunks.counts)
                 for i in range(count)]
      assert len(records) == len(set(records)) == total


def test_train_batches_of_processes_are_disjoint(info):
  shards = [example_hashes(itertools.islice(data.train_batches(
      info, global_batch_size=12, image_size=16, seed=0, augment=False,
      process_index=index, process_count=3), 12)) for index in range(3)]  # 3 epochs
  assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
  assert sum(len(shard) for shard in shards) == info.num_train_examples


@pytest.mark.parametrize("shuffle_buffer,cache", [(0, False), (5, False), (5, True)])
def test_resume_equals_the_uninterrupted_stream_across_an_epoch_boundary(
    info, monkeypatch, shuffle_buffer, cache):
  monkeypatch.setattr(tfds_pipeline, "CHUNK_SIZE", 3)  # many chunks and groups in 48 records
  kwargs = dict(global_batch_size=8, image_size=16, seed=7, shuffle_buffer=shuffle_buffer,
                process_index=1, process_count=2)
  per_epoch = data.steps_per_epoch(info, 8)  # 6 batches; 4 per process's 24 records
  uninterrupted = list(itertools.islice(data.train_batches(info, **kwargs), 2 * per_epoch))
  again = list(itertools.islice(data.train_batches(info, cache=cache, **kwargs),
                                2 * per_epoch))
  chex.assert_trees_all_equal(again, uninterrupted)  # same seed, same batches; cache or not
  for start in (per_epoch - 2, per_epoch - 1, per_epoch, per_epoch + 3):
    resumed = list(itertools.islice(data.train_batches(info, start_batch=start, cache=cache,
                                                       **kwargs), 2 * per_epoch - start))
    chex.assert_trees_all_equal(resumed, uninterrupted[start:])
  first, second = (np.concatenate([b["label"] for b in uninterrupted[e * per_epoch:][
      :per_epoch]]) for e in (0, 1))
  assert not np.array_equal(first, second)  # every epoch is reshuffled


def test_shuffle_buffer_keeps_groups_of_chunks_together():
  counts = np.full(10, 4)
  groups = list(tfds_pipeline.epoch_groups(counts, epoch=0, seed=0, process_index=0,
                                           shuffle_buffer=8, epoch_examples=40,
                                           start_position=0))
  assert [len(g.chunk_indices) for g in groups] == [2] * 5
  assert sorted(np.concatenate([g.chunk_indices for g in groups])) == list(range(10))
  resumed = list(tfds_pipeline.epoch_groups(counts, epoch=0, seed=0, process_index=0,
                                            shuffle_buffer=8, epoch_examples=40,
                                            start_position=19))
  assert len(resumed) == 3 and resumed[0].begin == 3 and resumed[0].first_position == 19
  np.testing.assert_array_equal(resumed[0].chunk_indices, groups[2].chunk_indices)


@pytest.mark.parametrize("process_count,global_batch_size", [(1, 4), (2, 4), (3, 3), (2, 10)])
def test_eval_counts_every_example_once(info, process_count, global_batch_size):
  everything = example_hashes(data.eval_batches(info, global_batch_size=6, image_size=16))
  assert sum(everything.values()) == info.num_eval_examples == 6
  assert eval_split_hashes(info, process_count, global_batch_size) == everything


def test_a_folder_of_distinct_full_size_photos_gets_the_imagenet_preset(tmp_path):
  write_photo_folder(str(tmp_path), num_classes=2, per_class=3)
  paths = sorted(str(p) for p in tmp_path.glob("train/*/*.jpg"))
  assert len(paths) == 6
  assert len({hashlib.sha1(open(p, "rb").read()).hexdigest() for p in paths}) == 6
  assert all(333 <= min(Image.open(p).size) <= 500 for p in paths)
  info = data.get_dataset_info(f"folder:{tmp_path}", str(tmp_path / "tfds"))
  assert (info.preprocessing, info.image_shape) == ("imagenet", (224, 224, 3))
  batch = next(data.train_batches(info, global_batch_size=4, image_size=0, seed=0))
  chex.assert_shape(batch["image"], (4, 224, 224, 3))
  assert batch["image"].std() > 10  # real pixels, not padding


# Training from a folder with the shipped configs.

def run_train(config: str, dataset: str, workdir, data_dir: str, *overrides: str
              ) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "train.py", f"--config={config}", f"--config.dataset={dataset}",
       f"--config.data_dir={data_dir}", f"--workdir={workdir}", "--config.progress_bar=False",
       *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # ~35 s; the fault suite's broken-images row trains train.py on a folder too
def test_train_py_trains_on_an_image_folder_with_the_folder_config(folder, data_dir, tmp_path):
  result = run_train("configs/folder.py", f"folder:{folder}", tmp_path / "run", data_dir,
                     "--config.num_train_steps=3", "--config.batch_size=8",
                     "--config.image_size=32",
                     "--config.eval_every_steps=3", "--config.log_every_steps=1",
                     "--config.mixup_alpha=0.2", "--config.cutmix_alpha=1.0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"Final eval: loss \d+\.\d+, accuracy", result.stdout)


def test_train_py_names_the_missing_folder(tmp_path):
  result = run_train("configs/folder.py", f"folder:{tmp_path}/nowhere", tmp_path / "run",
                     str(tmp_path))
  assert result.returncode != 0
  assert "error: Image folder" in result.stderr and "does not exist" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow  # 30 s; the fast suite trains on folders of real PNG digits
@pytest.mark.skipif(not os.path.exists(CIFAR_TAR), reason="needs ../shared/data (real CIFAR-10)")
def test_cifar10_folder_config_trains_on_real_cifar10_jpegs(tmp_path):
  with tarfile.open(CIFAR_TAR) as tar:  # the first 40 images of each class
    per_class = collections.Counter()
    members = []
    for member in tar:
      parts = member.name.split("/")
      if member.isfile() and len(parts) == 4 and per_class[parts[2]] < 40:
        per_class[parts[2]] += 1
        members.append(member)
      if len(members) == 400:
        break
    tar.extractall(tmp_path, members=members, filter="data")
  root = os.path.join(tmp_path, members[0].name.split("/")[0])
  result = run_train("configs/cifar10_folder.py", f"folder:{root}", tmp_path / "run",
                     str(tmp_path / "tfds"), "--config.num_train_steps=4",
                     "--config.batch_size=32", "--config.eval_every_steps=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"Final eval: loss \d+\.\d+, accuracy", result.stdout)
  shutil.rmtree(root)
