"""The embedded default dataset: scikit-learn's handwritten digits at 32x32x3.

scikit-learn ships 1,797 real 8x8 digit scans (values 0..16, 10 classes), so
the main job runs end to end on a machine with no network and no TensorFlow.
The images are upsampled to 32x32 so that the CIFAR-sized ResNet stem and the
SimCLR crop augmentation have pixels to work with, and replicated to three
channels so the colour augmentations and RGB encoders apply unchanged.

Everything here is NumPy: this module is on the TensorFlow-free path.
"""

import functools

import numpy as np

# Output side of the upsampled images; 32 matches CIFAR, which the small-image
# recipes (stem, augmentation strengths) are tuned for.
IMAGE_SIZE = 32
NUM_CLASSES = 10
SPLITS = ('train', 'test')
# Fixed split so every run, process and machine sees the same train/test sets.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Returns the (out, in) 1-D bilinear interpolation matrix.

  Half-pixel centres (align_corners=False) with edge clamping, the convention
  of tf.image.resize and jax.image.resize, so the digits sit where a TF or JAX
  resize of the same 8x8 image would put them.
  """
  scale = in_size / out_size
  centres = (np.arange(out_size) + 0.5) * scale - 0.5
  centres = np.clip(centres, 0.0, in_size - 1)
  lo = np.floor(centres).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = centres - lo
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes (N, H, W[, C]) images to (N, size, size[, C]) bilinearly.

  A separable matrix product rather than a TF/JAX op, so that callers on the
  TensorFlow-free path (and the host side of the JAX path) need nothing but
  NumPy. Returns float64; callers round/cast as they need.
  """
  images = np.asarray(images, np.float64)
  rows = _bilinear_matrix(images.shape[1], size)
  cols = _bilinear_matrix(images.shape[2], size)
  out = np.einsum('oh,nhw...->now...', rows, images)
  return np.einsum('pw,now...->nop...', cols, out)


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Builds both splits once per process (scikit-learn import + resize)."""
  # Imported here so that importing the data package stays cheap.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  raw = digits.images.astype(np.float64) * (255.0 / 16.0)  # 0..16 -> 0..255.
  labels = digits.target.astype(np.int32)
  big = resize_bilinear(raw, IMAGE_SIZE)
  big = np.clip(np.round(big), 0, 255).astype(np.uint8)
  images = np.repeat(big[..., None], 3, axis=-1)

  # Stratified so that the small test set has every class in proportion.
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)),
      test_size=_TEST_FRACTION,
      random_state=_SPLIT_SEED,
      stratify=labels,
  )
  out = (images[train_idx], labels[train_idx], images[test_idx],
         labels[test_idx])
  for array in out:
    # Shared by every caller in the process: make accidental edits loud.
    array.setflags(write=False)
  return out


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 32, 32, 3), labels int32 (N,)) of one split.

  Args:
    split: 'train' (1,437 images) or 'test' (360 images).

  Returns:
    Read-only arrays cached for the process; copy before modifying.

  Raises:
    ValueError: for any other split name.
  """
  if split not in SPLITS:
    raise ValueError(
        f"Unknown digits split {split!r}; expected one of {list(SPLITS)}.")
  train_x, train_y, test_x, test_y = _load_all()
  return (train_x, train_y) if split == 'train' else (test_x, test_y)
