"""Datasets held as NumPy arrays: digits, digits_m, fashion_mnist, synthetic,
and unions.

They are the TensorFlow-free path (accelerator hosts may lack TF) and the
data of the fast tests and benchmarks. `ArraySource` answers every
DataSource question from one method, `_load(split)`; an image folder read
directly (data/folder.py) is an ArraySource too, and a TFDS dataset with
config.dataset.in_memory streams its arrays with `array_pretrain_stream`.
"""

import copy
import functools
import re
from collections.abc import Iterator

import ml_collections
import numpy as np

from simclr_jax.data import fashion_mnist
from simclr_jax.data import streams
from simclr_jax.data.base import Batch
from simclr_jax.data.base import DataSource
from simclr_jax.data.base import DatasetError
from simclr_jax.data.base import DatasetInfo
from simclr_jax.data.base import import_tf
from simclr_jax.data.base import raw_size

DIGITS = ('digits', 'digits_m')
SYNTHETIC = 'synthetic'
# 'synthetic' defaults; `config.dataset.num_examples` / `.num_classes` (if the
# recipe adds them) override. Unlabelled benchmarks need only a few batches.
_SYNTHETIC_MIN_EXAMPLES = 1024
_SYNTHETIC_NUM_CLASSES = 10


def array_pretrain_stream(config: ml_collections.ConfigDict,
                          images: np.ndarray, labels: np.ndarray, *,
                          process_index: int, start_step: int,
                          local_batch: int, spe: int,
                          include_index: bool) -> Iterator[Batch]:
  """The pretraining stream of arrays indexed by row id.

  'jax' backend: raw uint8 batches by NumPy indexing (no TensorFlow).
  'tf' backend: two tf.data-augmented views of the same rows.
  """
  rows = streams.epoch_rows(config, len(labels), start_step=start_step,
                            spe=spe, local_batch=local_batch,
                            process_index=process_index)
  if config.augment.backend == 'jax':
    for _, epoch_rows in rows:
      for idx in epoch_rows.reshape(-1, local_batch):
        batch = {'images': images[idx], 'labels': labels[idx].astype(np.int32)}
        if include_index:
          batch['index'] = idx.astype(np.int64)
        yield batch
    return
  tf = import_tf("augment.backend='tf'")
  # Converted once; each epoch's dataset gathers from them by index, so an
  # epoch costs no copy of the arrays.
  images_t = tf.constant(images)
  labels_t = tf.constant(labels, tf.int32)

  def lookup(index):
    return tf.gather(images_t, index), tf.gather(labels_t, index), index

  for epoch, epoch_rows in rows:
    ds = tf.data.Dataset.from_tensor_slices(
        epoch_rows.astype(np.int64)).map(lookup)
    ds = ds.map(streams.two_views_fn(config, tf, epoch, include_index),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    yield from streams.finish(tf, ds, local_batch).as_numpy_iterator()


_SLICE = re.compile(r'^(\w+)\[(-?\d+%?)?:(-?\d+%?)?\]$')


def slice_bounds(expression: str, size: int) -> tuple[int, int]:
  """[start, stop) rows of a split of `size` rows named by TFDS-style bounds
  (the part of 'train[:50000]', 'train[-10%:]' inside the brackets).

  A percentage is rounded to the closest row, as TFDS does by default.
  """
  def bound(text: str | None, default: int) -> int:
    if not text:
      return default
    value = int(text.rstrip('%'))
    if text.endswith('%'):
      rows = round(size * abs(value) / 100)
      value = -rows if value < 0 else rows
    return max(0, min(size, value + size if value < 0 else value))
  start_text, _, stop_text = expression.partition(':')
  return bound(start_text, 0), bound(stop_text, size)


class ArraySource(DataSource):
  """A dataset whose splits are uint8 arrays at raw size in host memory.

  Splits may be sliced as in TFDS ('train[:50000]', 'train[90%:]'), so a
  validation split can be carved from the training split for choosing a
  recipe without touching the test split.
  """
  holds_arrays = True
  slices_splits = True

  def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, R, R, 3), int32 (N,)) of the named split `split`, R =
    raw_size."""
    raise NotImplementedError

  def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`_load` of a split name or a slice of one ('train[-10000:]')."""
    match = _SLICE.match(split.replace(' ', ''))
    if not match:
      return self._load(split)
    images, labels = self._load(match.group(1))
    lo, hi = slice_bounds(f'{match.group(2) or ""}:{match.group(3) or ""}',
                          len(labels))
    if hi <= lo:
      raise DatasetError(f'Split {split!r} of {self.name!r} is empty '
                         f'({len(labels)} rows in {match.group(1)!r}).')
    return images[lo:hi], labels[lo:hi]

  def num_classes(self) -> int:
    raise NotImplementedError

  def info(self) -> DatasetInfo:
    images, labels = self._arrays(self.config.dataset.train_split)
    return DatasetInfo(name=self.name, num_train_examples=len(labels),
                       num_classes=self.num_classes(),
                       image_shape=tuple(images.shape[1:]))

  def split_size(self, split: str) -> int:
    return len(self._arrays(split)[1])

  def raw_arrays(self, split, max_examples=None):
    images, labels = self._arrays(split)
    if max_examples is not None:
      images, labels = images[:max_examples], labels[:max_examples]
    return images, labels.astype(np.int32)

  def eval_batches(self, split, batch_size, max_examples=None,
                   shuffle_seed=None):
    """Split order, or a seeded permutation of all the split's rows (the
    arrays are in memory already, so the shuffle is exact and costs one
    index array)."""
    images, labels = self.raw_arrays(split)
    rows = (np.arange(len(labels)) if shuffle_seed is None else
            np.random.default_rng(int(shuffle_seed)).permutation(len(labels)))
    rows = rows[:max_examples]
    size = int(self.config.dataset.image_size)
    for lo in range(0, len(rows), batch_size):
      idx = rows[lo:lo + batch_size]
      yield streams.numpy_eval_images(images[idx], size), labels[idx]

  def pretrain_stream(self, *, process_index, process_count, start_step,
                      local_batch, spe, include_index, stats):
    del process_count, stats  # Implied by local_batch; nothing is corrupt.
    images, labels = self._arrays(self.config.dataset.train_split)
    return array_pretrain_stream(
        self.config, images, labels, process_index=process_index,
        start_step=start_step, local_batch=local_batch, spe=spe,
        include_index=include_index)


def _at_side(images: np.ndarray, side: int) -> np.ndarray:
  """uint8 square images resized bilinearly to `side` (unchanged if there),
  read-only like the cached arrays they come from."""
  from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
  if side == images.shape[1]:
    return images
  resized = digits.resize_bilinear(images, side)
  resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  resized.setflags(write=False)
  return resized


@functools.lru_cache(maxsize=4)
def _resized_digits(split: str, side: int, name: str = 'digits'
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Digits (or digits_m) at `side` pixels (cached: once per process)."""
  from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import digits_m  # pylint: disable=g-import-not-at-top
  load = digits_m.load_digits_m if name == 'digits_m' else digits.load_digits
  images, labels = load(split)
  return _at_side(images, side), labels


class DigitsSource(ArraySource):
  """The embedded scikit-learn digits (or their textured digits_m), resized
  from their native 32 px only when raw_size differs."""

  @property
  def grey(self) -> bool:
    return self.name == 'digits'  # digits_m's textures are in colour.

  def splits(self):
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    return list(digits.SPLITS)

  def num_classes(self):
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    return digits.NUM_CLASSES

  def _load(self, split):
    try:
      return _resized_digits(split, raw_size(self.config), self.name)
    except ValueError as e:
      raise DatasetError(str(e)) from e


@functools.lru_cache(maxsize=2)
def _resized_fashion_mnist(directory: str, split: str, side: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST at `side` pixels (its native 28 needs no resize)."""
  images, labels = fashion_mnist.load(directory, split)
  return _at_side(images, side), labels


class FashionMnistSource(ArraySource):
  """Fashion-MNIST from the IDX files in config.dataset.fashion_mnist_dir
  (data/fashion_mnist.py), resized from 28 px only when raw_size differs."""
  grey = True

  def splits(self):
    return list(fashion_mnist.SPLITS)

  def num_classes(self):
    return fashion_mnist.NUM_CLASSES

  def _load(self, split):
    directory = self.config.dataset.fashion_mnist_dir
    return _resized_fashion_mnist(directory, split, raw_size(self.config))


@functools.lru_cache(maxsize=4)
def _synthetic_arrays(split: str, num_examples: int, side: int,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Random images and labels, fixed per split so every run sees the same."""
  rng = np.random.default_rng([0x5EED, 0 if split == 'train' else 1])
  images = rng.integers(0, 256, (num_examples, side, side, 3), dtype=np.uint8)
  labels = rng.integers(0, num_classes, (num_examples,), dtype=np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


class SyntheticSource(ArraySource):
  """Random images for benchmarks: train at least one global batch (or
  config.dataset.num_examples), test a quarter of it."""

  def splits(self):
    return ['train', 'test']

  def num_classes(self):
    return int(self.config.dataset.get('num_classes', _SYNTHETIC_NUM_CLASSES))

  def _load(self, split):
    if split not in ('train', 'test'):
      raise DatasetError(
          f"Unknown synthetic split {split!r}; expected 'train' or 'test'.")
    d = self.config.dataset
    n = int(d.get('num_examples', 0) or
            max(_SYNTHETIC_MIN_EXAMPLES, self.config.batch_size))
    n = n if split == 'train' else max(n // 4, 1)
    return _synthetic_arrays(split, n, raw_size(self.config),
                             self.num_classes())


def union_parts(name: str, part_names: tuple[str, ...]) -> tuple[str, ...]:
  """The parts of a union such as 'digits+digits_m' when every part is one
  of `part_names`, else ()."""
  parts = tuple(name.split('+'))
  if len(parts) > 1 and all(p in part_names for p in parts):
    return parts
  return ()


class UnionSource(ArraySource):
  """The images of several in-memory datasets, in order ('a+b').

  Only the first part's labels are kept (the rest read as unlabelled, -1), so
  a contrastive run on source and target images together never sees a target
  label (downstream/adapt.py).
  """

  def __init__(self, config, parts: list[ArraySource]):
    super().__init__(config)
    self.parts = parts
    self.grey = all(p.grey for p in parts)

  def splits(self):
    return self.parts[0].splits()

  def num_classes(self):
    return self.parts[0].num_classes()

  def _load(self, split):
    arrays = [p.raw_arrays(split) for p in self.parts]
    labels = [arrays[0][1]] + [np.full(len(y), -1, np.int32)
                               for _, y in arrays[1:]]
    return (np.concatenate([x for x, _ in arrays]),
            np.concatenate(labels).astype(np.int32))


def with_name(config: ml_collections.ConfigDict,
              name: str) -> ml_collections.ConfigDict:
  """A copy of `config` reading dataset `name` (a union's part, a label
  subset) with every other dataset field kept."""
  part = copy.deepcopy(config)
  part.dataset.name = name
  return part
