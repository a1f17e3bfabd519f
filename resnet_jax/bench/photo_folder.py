"""An ImageNet-like image folder made from real photos, for input benchmarks.

  python -m resnet_jax.bench.photo_folder /tmp/photos --classes 10 --per_class 100

Every file is a distinct random crop (30-100% of the area, 3/4-4/3 aspect) of a real
photo, maybe mirrored, resized so its short side is 333-500 pixels, and saved as a JPEG of
quality 85-95: about the size of a typical ImageNet photo. The photos are
scikit-learn's two 427×640 samples, plus scikit-image's colour samples when it is installed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tqdm
from PIL import Image
from resnet_jax import cli

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                  "motorcycle_right", "immunohistochemistry", "hubble_deep_field", "colorwheel")


def real_photos() -> list[np.ndarray]:
  """uint8 RGB photos: scikit-learn's, and scikit-image's if it is installed."""
  from sklearn.datasets import load_sample_images
  photos = list(load_sample_images().images)
  try:
    import skimage.data
  except ImportError:
    return photos
  for name in SKIMAGE_PHOTOS:
    try:
      image = np.asarray(getattr(skimage.data, name)())
    except Exception:  # a sample skimage must download (pooch) and cannot: leave it out
      continue
    if image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 256:
      photos.append(image.astype(np.uint8))
  return photos


def random_view(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
  """A random crop of the photo, maybe mirrored, with its short side resized to 333-500."""
  height, width = photo.shape[:2]
  for _ in range(20):
    area = rng.uniform(0.3, 1.0) * height * width
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_h, crop_w = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
    if crop_h <= height and crop_w <= width:
      break
  else:
    crop_h, crop_w = height, width
  top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
  image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  scale = rng.integers(333, 501) / min(crop_h, crop_w)
  return image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))),
                      Image.Resampling.BILINEAR)


def write_photo_folder(root: str, *, num_classes: int, per_class: int, seed: int = 0,
                       photos: list[np.ndarray] | None = None) -> int:
  """Writes root/train/class_XX/NNNNN.jpg from `photos` (default: `real_photos()`);
  returns the number of files written."""
  photos = real_photos() if photos is None else photos
  rng = np.random.default_rng(seed)
  with tqdm.tqdm(total=num_classes * per_class, desc="Writing photos", unit="img") as bar:
    for label in range(num_classes):
      class_dir = os.path.join(root, "train", f"class_{label:02d}")
      os.makedirs(class_dir, exist_ok=True)
      for i in range(per_class):
        image = random_view(photos[rng.integers(len(photos))], rng)
        image.save(os.path.join(class_dir, f"{i:05d}.jpg"), "JPEG",
                   quality=int(rng.integers(85, 96)))
        bar.update(1)
  return num_classes * per_class


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.parser_for("resnet_jax.bench.photo_folder", __doc__)
  parser.add_argument("root", help="folder to write (root/train/<class>/*.jpg)")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--per_class", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.classes < 1 or args.per_class < 2:
    parser.error("--classes must be >= 1 and --per_class >= 2")
  photos = real_photos()
  count = write_photo_folder(args.root, num_classes=args.classes, per_class=args.per_class,
                             seed=args.seed, photos=photos)
  print(f"Wrote {count} JPEGs from {len(photos)} photos to {args.root}/train/")


if __name__ == "__main__":
  main()
