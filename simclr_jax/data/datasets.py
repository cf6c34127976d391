"""Which datasets exist, what they look like, and how to get at their arrays.

Two kinds of dataset:
  * in-memory ('digits', 'synthetic'): NumPy arrays built in-process. They are
    the TensorFlow-free path (accelerator hosts may lack TF) and the data of
    the fast tests and benchmarks.
  * TFDS (cifar10, cifar100, stl10, imagenet2012 and its 1%/10% subsets):
    read with tf.data from a prepared `data_dir`. No machine here reaches the
    internet, so a missing dataset is an error that says how to prepare it,
    never a download.

TensorFlow is imported lazily through `import_tf`, which also hides the GPUs
from it before anything touches a device, so the input pipeline never takes
accelerator memory that JAX needs.
"""

import dataclasses
import functools
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

IN_MEMORY_DATASETS = ('digits', 'synthetic')
TFDS_DATASETS = (
    'cifar10',
    'cifar100',
    'stl10',
    'imagenet2012',
    'imagenet2012_subset/1pct',
    'imagenet2012_subset/10pct',
)
KNOWN_DATASETS = IN_MEMORY_DATASETS + TFDS_DATASETS

# (pretraining split, labelled train split, evaluation split) per dataset, for
# recipes to copy into config.dataset: STL-10 pretrains on its 100k unlabelled
# images plus the labelled train set (labels -1 / 0..9), then probes on
# 'train'; ImageNet evaluates on 'validation' (its 'test' has no labels).
RECOMMENDED_SPLITS = {
    'digits': ('train', 'train', 'test'),
    'synthetic': ('train', 'train', 'test'),
    'cifar10': ('train', 'train', 'test'),
    'cifar100': ('train', 'train', 'test'),
    'stl10': ('unlabelled+train', 'train', 'test'),
    'imagenet2012': ('train', 'train', 'validation'),
    'imagenet2012_subset/1pct': ('train', 'train', 'validation'),
    'imagenet2012_subset/10pct': ('train', 'train', 'validation'),
}

# ImageNet cannot be downloaded by TFDS; its tars go to DIR/downloads/manual.
_MANUAL_DOWNLOAD = ('imagenet2012', 'imagenet2012_subset/1pct',
                    'imagenet2012_subset/10pct')
_IMAGENET_TARS = 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'

# 'synthetic' defaults; `config.dataset.num_examples` / `.num_classes` (if the
# recipe adds them) override. Unlabelled benchmarks need only a few batches.
_SYNTHETIC_MIN_EXAMPLES = 1024
_SYNTHETIC_NUM_CLASSES = 10


class DatasetError(ValueError):
  """A dataset problem the user can fix; the message says how, in one line."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know before reading any data.

  Attributes:
    name: config.dataset.name.
    num_train_examples: size of config.dataset.train_split (all processes).
    num_classes: label classes (the linear head's width).
    image_shape: stored image shape; (None, None, 3) for variable-size images.
  """
  name: str
  num_train_examples: int
  num_classes: int
  image_shape: tuple[int | None, ...]


def is_in_memory(name: str) -> bool:
  """True for the NumPy datasets that never need TensorFlow."""
  return name in IN_MEMORY_DATASETS


def reads_in_memory(config: ml_collections.ConfigDict) -> bool:
  """Whether pretraining indexes its train split in host memory by row id:
  the NumPy datasets always, a TFDS dataset with config.dataset.in_memory
  (small ones, e.g. CIFAR-10's 150 MB; methods that hold state per image
  of the split, such as DeepCluster's pseudo-labels, need it)."""
  return is_in_memory(config.dataset.name) or bool(
      config.dataset.get('in_memory', False))


def check_known(name: str) -> None:
  """Raises DatasetError (listing the known names) for an unknown dataset."""
  if name not in KNOWN_DATASETS:
    raise DatasetError(
        f'Unknown dataset {name!r}; known datasets: '
        f'{", ".join(KNOWN_DATASETS)}.')


def raw_size(config: ml_collections.ConfigDict) -> int:
  """Side of the host-side images for the on-device ('jax') augmentation."""
  return int(config.dataset.raw_size or config.dataset.image_size)


_GPUS_HIDDEN = False


def import_tf(why: str) -> Any:
  """Imports TensorFlow for `why`, hiding the GPUs from it first.

  Hiding must happen before TF initialises its devices; afterwards it can no
  longer be changed, which only matters if someone else imported TF and
  touched a device first (then we log instead of failing).

  Args:
    why: what needs TF, for the error message.

  Returns:
    The tensorflow module.

  Raises:
    DatasetError: if TensorFlow is not installed.
  """
  global _GPUS_HIDDEN
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetError(
        f'TensorFlow is not installed but {why} needs it; install '
        'tensorflow-cpu, or use augment.backend=\'jax\' with dataset '
        '\'digits\' or \'synthetic\', which need no TensorFlow.') from e
  if not _GPUS_HIDDEN:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as e:  # Devices already initialised elsewhere.
      logging.warning('Could not hide GPUs from TensorFlow: %s', e)
    _GPUS_HIDDEN = True
  return tf


def import_tfds(name: str) -> Any:
  """Imports tensorflow_datasets (after TF, so its GPUs are hidden first)."""
  import_tf(f'TFDS dataset {name!r}')
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DatasetError(
        f'tensorflow-datasets is not installed but dataset {name!r} needs it; '
        'pip install tensorflow-datasets, or use dataset \'digits\'.') from e
  return tfds


def _prepare_hint(name: str, data_dir: str) -> str:
  """The command that prepares `name` in `data_dir` (as the user runs it)."""
  if name in _MANUAL_DOWNLOAD:
    manual = os.path.join(data_dir, 'downloads', 'manual')
    return (f'put {_IMAGENET_TARS} in {manual}, then run `tfds build {name} '
            f'--data_dir={data_dir} --manual_dir={manual}`')
  return (f'run `tfds build {name} --data_dir={data_dir}` on a machine with '
          'internet access (or copy a prepared TFDS data_dir there)')


def tfds_builder(config: ml_collections.ConfigDict) -> Any:
  """Returns the TFDS builder of config.dataset.name in config.dataset.data_dir.

  Constructing a builder reads only metadata (or the code's defaults when
  nothing is prepared), so this is cheap and never downloads.
  """
  name = config.dataset.name
  check_known(name)
  if is_in_memory(name):
    raise DatasetError(f'Dataset {name!r} is in-memory, not a TFDS dataset.')
  tfds = import_tfds(name)
  return tfds.builder(name, data_dir=config.dataset.data_dir)


def tfds_split_size(builder: Any, name: str, split: Any) -> int:
  """Number of examples in `split`, checking that the data is there.

  A prepared dataset knows its split sizes. An unprepared one normally cannot
  be read at all, which is the error we report; but under
  `tfds.testing.mock_data` it can be read without metadata, so we fall back to
  the cardinality of the (mocked) split rather than refusing to run the tests.

  Args:
    builder: from `tfds_builder`.
    name: the dataset name, for messages.
    split: a TFDS split spec (string or `tfds.even_splits` element).

  Returns:
    The split's example count.

  Raises:
    DatasetError: if the dataset is not prepared or has no such split.
  """
  data_dir = builder.data_dir_root
  if builder.is_prepared():
    try:
      return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
      raise DatasetError(
          f'Dataset {name!r} has no split {split!r}; available splits: '
          f'{sorted(builder.info.splits.keys())}.') from e
  try:
    ds = builder.as_dataset(split=split)
    count = int(ds.cardinality())
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises AssertionError (no data) or others depending on version.
    raise DatasetError(
        f'Dataset {name!r} is not prepared in data_dir={data_dir}: '
        f'{_prepare_hint(name, data_dir)}.') from e
  if count < 0:
    raise DatasetError(
        f'Dataset {name!r} in data_dir={data_dir} has no known size for split '
        f'{split!r}: {_prepare_hint(name, data_dir)}.')
  return count


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Returns the DatasetInfo of config.dataset (train split size, classes)."""
  name = config.dataset.name
  check_known(name)
  if is_in_memory(name):
    images, labels = load_in_memory(config, config.dataset.train_split)
    return DatasetInfo(
        name=name,
        num_train_examples=len(labels),
        num_classes=_in_memory_num_classes(config),
        image_shape=tuple(images.shape[1:]),
    )
  builder = tfds_builder(config)
  num_train = tfds_split_size(builder, name, config.dataset.train_split)
  features = builder.info.features
  return DatasetInfo(
      name=name,
      num_train_examples=num_train,
      num_classes=int(features['label'].num_classes),
      image_shape=tuple(features['image'].shape),
  )


def _in_memory_num_classes(config: ml_collections.ConfigDict) -> int:
  if config.dataset.name == 'digits':
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    return digits.NUM_CLASSES
  return int(config.dataset.get('num_classes', _SYNTHETIC_NUM_CLASSES))


def _synthetic_num_examples(config: ml_collections.ConfigDict,
                            split: str) -> int:
  """Train size from config (at least one global batch); test is a quarter."""
  n = int(config.dataset.get('num_examples', 0) or
          max(_SYNTHETIC_MIN_EXAMPLES, config.batch_size))
  return n if split == 'train' else max(n // 4, 1)


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


@functools.lru_cache(maxsize=4)
def _resized_digits(split: str, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Digits at `side` pixels (cached: done once per process, not per batch)."""
  from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_digits(split)
  if side == images.shape[1]:
    return images, labels
  resized = digits.resize_bilinear(images, side)
  resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  resized.setflags(write=False)
  return resized, labels


def load_in_memory(config: ml_collections.ConfigDict,
                   split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uint8 (N, R, R, 3), int32 (N,)) of an in-memory dataset split.

  Both come at R = raw_size (or image_size) pixels, the side the 'jax'
  backend's batches promise; digits are resized from their native 32 px only
  when R differs. Arrays are cached and read-only.
  """
  name = config.dataset.name
  check_known(name)
  if name == 'digits':
    try:
      return _resized_digits(split, raw_size(config))
    except ValueError as e:
      raise DatasetError(str(e)) from e
  if name == 'synthetic':
    if split not in ('train', 'test'):
      raise DatasetError(
          f"Unknown synthetic split {split!r}; expected 'train' or 'test'.")
    return _synthetic_arrays(split, _synthetic_num_examples(config, split),
                             raw_size(config), _in_memory_num_classes(config))
  raise DatasetError(f'Dataset {name!r} is not an in-memory dataset.')
