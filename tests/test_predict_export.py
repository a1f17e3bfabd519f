"""Specification of prediction and export: image files in, top-k classes or a serialised
forward pass out, agreeing with `model.apply` on the same prepared images."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_digits

from resnet_jax import export, predict, pretrained
from resnet_jax.data.preprocessing import PRESETS
from test_image_folder import encode, photo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = pretrained.ModelInfo(model="resnet20", num_classes=4, image_size=16,
                            preprocessing="cifar", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                            class_names=("ant", "bee", "cat", "dog"), source="random init")
GOOD = ("big_photo.jpg", "grey.png", "nested/rgba.png", "palette.gif", "sixteen_bit.png")
BAD = ("not_an_image.jpg", "truncated.png")
LINE = re.compile(r"^  (\d)\. (\S+) +(\d+\.\d\d)%$")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> str:
  """Random resnet20 weights with random BatchNorm statistics, saved as converted weights."""
  model = INFO.create_model()
  variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda s: rng.uniform(0.5, 2.0, s.shape).astype(np.float32), variables["batch_stats"])
  path = str(tmp_path_factory.mktemp("weights") / "resnet20")
  pretrained.save(path, variables, INFO)
  return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
  """A folder of images in several formats and sizes, two unreadable ones and a text file."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(1)
  files = {"big_photo.jpg": encode(photo(rng, 30, 40), "jpeg")[0],
           "grey.png": encode(photo(rng, 20, 12), "grey_png")[0],
           "nested/rgba.png": encode(photo(rng, 16, 16), "rgba_png")[0],
           "palette.gif": encode(photo(rng, 9, 11), "gif")[0],
           "not_an_image.jpg": b"plain text, not a JPEG",
           "truncated.png": encode(photo(rng, 20, 20), "png")[0][:150],
           "notes.txt": b"not an image, and not named like one"}
  os.makedirs(root / "nested")
  for name, content in files.items():
    (root / name).write_bytes(content)
  sixteen_bit = (photo(rng, 24, 24)[..., 0].astype(np.uint16) * 257)
  Image.fromarray(sixteen_bit).save(root / "sixteen_bit.png")
  return str(root)


def reference_probabilities(weights_dir: str, prepared: np.ndarray) -> np.ndarray:
  """Softmax of `model.apply` in eval mode, normalising in NumPy as the spec says."""
  weights = pretrained.load(weights_dir)
  normalised = (prepared / 255.0 - np.asarray(INFO.mean)) / np.asarray(INFO.std)
  logits = INFO.create_model().apply(weights.variables, normalised.astype(np.float32))
  return np.asarray(jax.nn.softmax(logits))


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of a command-line `main` run in this process."""
  try:
    main(argv)
    status = 0
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


# Prediction.

def test_predict_prints_sorted_top_k_per_image_and_an_error_line_per_unreadable_file(
    weights_dir, images, capsys):
  status, out, err = run_main(predict.main, ["--checkpoint", weights_dir, "--top_k", "3",
                                             "--batch_size", "2", images], capsys)
  assert status == 1
  blocks: dict[str, list[str]] = {}
  for line in out.splitlines():
    if line.startswith("  "):
      blocks[path].append(line)
    else:
      path = line
      blocks[path] = []
  assert list(blocks) == [os.path.join(images, name) for name in sorted(GOOD)]
  for lines in blocks.values():
    matches = [LINE.match(line) for line in lines]
    assert len(matches) == 3 and all(matches), lines
    assert [int(m[1]) for m in matches] == [1, 2, 3]
    assert all(m[2] in INFO.class_names for m in matches)
    percents = [float(m[3]) for m in matches]
    assert percents == sorted(percents, reverse=True) and sum(percents) <= 100.01
    assert len({len(line) for line in lines}) == 1  # aligned columns
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert [e.split(": ")[1] for e in errors] == [os.path.join(images, b) for b in BAD]
  assert "notes.txt" not in out + err  # folders are searched by image extension


def test_predict_run_as_a_program_prints_only_its_own_error_lines_on_stderr(weights_dir, images):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's
  result = subprocess.run([sys.executable, "-m", "resnet_jax.predict", "--checkpoint",
                           weights_dir, images], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == len(BAD) and all(line.startswith("error: ") for line in lines), lines


def test_explicit_files_are_tried_whatever_their_extension(weights_dir, images, tmp_path):
  renamed = str(tmp_path / "photo.data")
  shutil.copy(os.path.join(images, "big_photo.jpg"), renamed)
  notes, missing = os.path.join(images, "notes.txt"), str(tmp_path / "missing.png")
  paths = predict.image_paths([renamed, notes, missing])
  predictions = predict.predict_files(pretrained.load(weights_dir), paths, top_k=2)
  assert [p.path for p in predictions] == [renamed, notes, missing]
  assert len(predictions[0].labels) == 2 and not predictions[0].error
  assert "Unknown image file format" in predictions[1].error
  assert predictions[2].error == "no such file"


def test_top_1_and_probabilities_equal_model_apply_on_the_same_prepared_images(
    weights_dir, images):
  paths = [os.path.join(images, name) for name in GOOD]
  predictions = predict.predict_files(pretrained.load(weights_dir), paths, batch_size=4,
                                      top_k=4)
  prepared = np.stack([PRESETS["cifar"].eval(tf.io.read_file(p), 16, channels=3).numpy()
                       for p in paths])
  expected = reference_probabilities(weights_dir, prepared)
  for prediction, row in zip(predictions, expected):
    assert prediction.labels[0] == np.argmax(row)
    np.testing.assert_allclose(prediction.probabilities, row[list(prediction.labels)],
                               rtol=1e-5, atol=1e-6)


def test_predict_reads_a_train_py_workdir(trained_folder_run, tmp_path):
  workdir = trained_folder_run[0]
  digits = load_digits()
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"digit_{digits.target[i]}.png"))
    Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(paths[-1])
  result = subprocess.run(
      [sys.executable, "-m", "resnet_jax.predict", f"--checkpoint={workdir}", "--top_k=2",
       "--json", *paths], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [row["path"] for row in rows] == paths
  class_names = pretrained.load_info(workdir).class_names
  assert class_names == tuple(f"digit_{d}" for d in range(5))
  assert all(entry["class"] in class_names for row in rows for entry in row["top_k"])


# Export.

@pytest.fixture(scope="module")
def exported(weights_dir, tmp_path_factory) -> tuple[str, str]:
  """(serialised file, SavedModel directory) written by the export command."""
  out = tmp_path_factory.mktemp("export")
  file, saved_model = str(out / "resnet20.jax"), str(out / "saved_model")
  export.main(["--checkpoint", weights_dir, "--out", file, "--saved_model", saved_model])
  return file, saved_model


@pytest.fixture(scope="module")
def batches() -> list[np.ndarray]:
  """Prepared uint8 images at two batch sizes."""
  rng = np.random.default_rng(2)
  return [rng.integers(0, 256, (n, 16, 16, 3), np.uint8) for n in (1, 5)]


def test_exported_file_reloads_and_equals_model_apply_at_two_batch_sizes(
    weights_dir, exported, batches):
  model = export.load_exported(exported[0])
  assert model.info == INFO
  for images in batches:
    probabilities = np.asarray(jax.nn.softmax(model(images)))
    np.testing.assert_allclose(probabilities, reference_probabilities(weights_dir, images),
                               rtol=1e-5, atol=1e-6)


def test_sidecar_json_describes_classes_input_and_output(exported):
  with open(exported[0] + ".json") as f:
    description = json.load(f)
  assert description["model"]["class_names"] == list(INFO.class_names)
  assert description["input"]["shape"] == ["batch", 16, 16, 3]
  assert description["input"]["dtype"] == "uint8"
  assert description["output"]["shape"] == ["batch", 4]
  assert description["platforms"] == list(export.PLATFORMS)


def test_saved_model_equals_model_apply_at_two_batch_sizes(weights_dir, exported, batches):
  serve = tf.saved_model.load(exported[1]).signatures["serving_default"]
  for images in batches:
    logits = serve(images=tf.constant(images))["logits"].numpy()
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)),
                               reference_probabilities(weights_dir, images),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content,message", [
    (None, "no such file"), (b"not a program", "is not a serialised jax.export program")])
def test_load_exported_names_a_missing_or_corrupt_file(tmp_path, content, message):
  file = tmp_path / "model.jax"
  if content is not None:
    file.write_bytes(content)
  with pytest.raises(ValueError, match=f"{re.escape(str(file))}.*{message}"):
    export.load_exported(str(file))


# Bad command lines.

@pytest.mark.parametrize("main,extra", [(predict.main, ["image.png"]),
                                        (export.main, ["--out", "model.jax"])])
@pytest.mark.parametrize("checkpoint", ["missing", "empty"])
def test_a_bad_checkpoint_exits_2_with_one_error_line(main, extra, checkpoint, tmp_path,
                                                      capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("empty")
  (tmp_path / "image.png").write_bytes(b"")
  status, out, err = run_main(main, ["--checkpoint", checkpoint, *extra], capsys)
  assert status == 2 and out == ""
  assert err.startswith("error: ") and err.count("\n") == 1
  assert os.path.join(os.getcwd(), checkpoint) in err
