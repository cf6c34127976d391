"""Fashion-MNIST read from its IDX files, with no conversion step.

Fashion-MNIST (Xiao et al. 2017, Zalando Research) is 60,000 train and
10,000 test 28x28 grey images of 10 kinds of clothing, in the IDX format of
MNIST. Debian ships the four files (`apt-get install dataset-fashion-mnist`,
under /usr/share/datasets/fashion-mnist/), so a machine with no network can
still train on real images at their real size. `config.dataset.fashion_mnist_dir`
points elsewhere; the files may be gzipped (as distributed) or not.

The grey images are replicated to three channels, as the digits are, so the
RGB encoders and the colour augmentation (brightness and contrast act; hue
and saturation leave a grey image grey) apply unchanged. NumPy only: this
module is on the TensorFlow-free path.
"""

import functools
import gzip
import os

import numpy as np

from simclr_jax.data.base import DatasetError

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
APT_PACKAGE = 'dataset-fashion-mnist'
IMAGE_SIZE = 28
NUM_CLASSES = 10
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# Split name -> IDX file prefix.
FILES = {'train': 'train', 'test': 't10k'}
SPLITS = tuple(FILES)
# IDX magic numbers: two zero bytes, the element type (0x08 = uint8), the
# number of dimensions.
_MAGIC_IMAGES = 0x00000803
_MAGIC_LABELS = 0x00000801


def idx_path(directory: str, split: str, what: str) -> str:
  """The file holding `what` ('images' or 'labels') of `split`, gzipped or
  not; the gzipped name when neither exists (for the error message)."""
  suffix = 'images-idx3-ubyte' if what == 'images' else 'labels-idx1-ubyte'
  plain = os.path.join(directory, f'{FILES[split]}-{suffix}')
  for candidate in (plain + '.gz', plain):
    if os.path.exists(candidate):
      return candidate
  return plain + '.gz'


def read_idx(path: str, magic: int) -> np.ndarray:
  """The uint8 array of one IDX file (big-endian header, then raw bytes)."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  header = np.frombuffer(data[:4], '>u4')[0] if len(data) >= 4 else None
  if header != magic:
    raise DatasetError(
        f'{path} is not an IDX file of {"images" if magic == _MAGIC_IMAGES else "labels"} '
        f'(magic {header!r}, expected {magic:#010x}); reinstall '
        f'{APT_PACKAGE} or fix config.dataset.fashion_mnist_dir.')
  ndim = magic & 0xFF
  shape = tuple(int(d) for d in np.frombuffer(data[4:4 + 4 * ndim], '>u4'))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DatasetError(
        f'{path} is truncated: its header says {shape}, it holds {body.size} '
        f'bytes; reinstall {APT_PACKAGE}.')
  return body.reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped when `path` ends in .gz).

  The inverse of read_idx, for tests and for users making their own files in
  this format.
  """
  array = np.ascontiguousarray(array, np.uint8)
  magic = 0x00000800 | array.ndim
  header = np.array([magic, *array.shape], '>u4').tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


@functools.lru_cache(maxsize=4)
def load(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (N, 28, 28, 3), int32 (N,)) of `split`, read once per process."""
  if split not in FILES:
    raise DatasetError(f'Fashion-MNIST has no split {split!r}; its splits: '
                       f'{", ".join(SPLITS)} (and slices such as '
                       "'train[:50000]').")
  images_path = idx_path(directory, split, 'images')
  labels_path = idx_path(directory, split, 'labels')
  for path in (images_path, labels_path):
    if not os.path.exists(path):
      raise DatasetError(
          f'Fashion-MNIST file {path} is missing: install it with '
          f'`apt-get install {APT_PACKAGE}`, or set '
          'config.dataset.fashion_mnist_dir to a folder holding the IDX files.')
  grey = read_idx(images_path, _MAGIC_IMAGES)
  labels = read_idx(labels_path, _MAGIC_LABELS).astype(np.int32)
  if grey.ndim != 3 or len(grey) != len(labels):
    raise DatasetError(
        f'{images_path} holds {grey.shape} images for {len(labels)} labels; '
        f'reinstall {APT_PACKAGE}.')
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise DatasetError(f'{labels_path} has labels outside 0..9.')
  images = np.repeat(grey[..., None], 3, axis=-1)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels
