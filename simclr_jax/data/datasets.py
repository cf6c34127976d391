"""Which datasets exist, what they look like, and how to get at their arrays.

Three kinds of dataset:
  * in-memory ('digits', 'synthetic'): NumPy arrays built in-process. They are
    the TensorFlow-free path (accelerator hosts may lack TF) and the data of
    the fast tests and benchmarks.
  * any TFDS image dataset by name (and optionally version): cifar10,
    imagenet2012, food101, 'oxford_flowers102:2.1.1', ... read with tf.data
    from a prepared `data_dir`. The image and label features are found in the
    builder's info (`feature_keys`); a dataset without labels is pretrained
    on and its probes are skipped. No machine here reaches the internet, so a
    missing dataset is an error that says how to prepare it, never a
    download.
  * 'folder': the user's own images under config.dataset.folder
    (`data/folder.py`), read directly into memory, or streamed like TFDS
    once `python -m simclr_jax.prepare_data` has written them as TFRecords.

TensorFlow is imported lazily through `import_tf`, which also hides the GPUs
from it before anything touches a device, so the input pipeline never takes
accelerator memory that JAX needs.
"""

import copy
import dataclasses
import functools
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

IN_MEMORY_DATASETS = ('digits', 'digits_m', 'synthetic')
FOLDER = 'folder'
# The TFDS datasets the recipes and tests are written for; any other TFDS
# image dataset works the same way.
TFDS_DATASETS = (
    'cifar10',
    'cifar100',
    'stl10',
    'imagenet2012',
    'imagenet2012_subset/1pct',
    'imagenet2012_subset/10pct',
)
BUILTIN_DATASETS = IN_MEMORY_DATASETS + (FOLDER,)
KNOWN_DATASETS = IN_MEMORY_DATASETS + TFDS_DATASETS

# (pretraining split, labelled train split, evaluation split) per dataset, for
# recipes to copy into config.dataset: STL-10 pretrains on its 100k unlabelled
# images plus the labelled train set (labels -1 / 0..9), then probes on
# 'train'; ImageNet evaluates on 'validation' (its 'test' has no labels).
RECOMMENDED_SPLITS = {
    'digits': ('train', 'train', 'test'),
    'digits_m': ('train', 'train', 'test'),
    'synthetic': ('train', 'train', 'test'),
    'cifar10': ('train', 'train', 'test'),
    'cifar100': ('train', 'train', 'test'),
    'stl10': ('unlabelled+train', 'train', 'test'),
    'imagenet2012': ('train', 'train', 'validation'),
    'imagenet2012_subset/1pct': ('train', 'train', 'validation'),
    'imagenet2012_subset/10pct': ('train', 'train', 'validation'),
}
# When config.dataset.eval_split is missing from a dataset, the first of
# these it has is evaluated on instead; with only a train split, the last
# 10% of it is held out (TFDS slicing), as `resolve_splits` logs.
_EVAL_SPLIT_FALLBACKS = ('test', 'validation')
_HELD_OUT_PERCENT = 10

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
    num_classes is 0 for a dataset without labels (labels read as -1).
  """
  name: str
  num_train_examples: int
  num_classes: int
  image_shape: tuple[int | None, ...]

  @property
  def labelled(self) -> bool:
    return self.num_classes > 0


def is_in_memory(config: ml_collections.ConfigDict) -> bool:
  """True for data built or decoded into NumPy arrays in-process: digits and
  synthetic (which never need TensorFlow) and an image folder that has not
  been prepared as TFRecords."""
  name = config.dataset.name
  if name == FOLDER:
    from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
    return not folder.is_prepared(config.dataset.folder)
  return name in IN_MEMORY_DATASETS or bool(union_parts(name))


def union_parts(name: str) -> tuple[str, ...]:
  """The parts of an in-memory union such as 'digits+digits_m', else ().

  A union holds the images of every part, in order; only the first part's
  labels are kept (the rest read as unlabelled, -1), so a contrastive run
  on source and target images together never sees a target label
  (downstream/adapt.py).
  """
  parts = tuple(name.split('+'))
  if len(parts) > 1 and all(p in IN_MEMORY_DATASETS for p in parts):
    return parts
  return ()


def reads_in_memory(config: ml_collections.ConfigDict) -> bool:
  """Whether pretraining indexes its train split in host memory by row id:
  the NumPy datasets always, a TFDS dataset with config.dataset.in_memory
  (small ones, e.g. CIFAR-10's 150 MB; methods that hold state per image
  of the split, such as DeepCluster's pseudo-labels, need it)."""
  return is_in_memory(config) or bool(config.dataset.get('in_memory', False))


def check_name(config: ml_collections.ConfigDict) -> None:
  """Raises DatasetError for a dataset name no reader can take.

  Any non-empty name is a TFDS name until TFDS says otherwise
  (`tfds_builder`); an image folder is checked when it is listed.
  """
  name = config.dataset.name
  if not isinstance(name, str) or not name.strip():
    raise DatasetError(
        f'config.dataset.name={name!r} is invalid: use one of '
        f'{", ".join(BUILTIN_DATASETS)} or a TFDS dataset name (e.g. '
        "'cifar10', 'food101', 'oxford_flowers102:2.1.1').")


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


def _unknown_hint(name: str, tfds: Any) -> str:
  return (f'Unknown dataset {name!r}: not one of '
          f'{", ".join(BUILTIN_DATASETS)} and not a dataset of '
          f'tensorflow-datasets {tfds.__version__}; check the name (e.g. '
          "'food101', 'svhn_cropped', 'oxford_flowers102:2.1.1'), or for "
          "your own images set dataset.name='folder' and dataset.folder=PATH "
          '(large folders: `python -m simclr_jax.prepare_data --folder=PATH '
          '--out=DIR`, then dataset.folder=DIR).')


def tfds_builder(config: ml_collections.ConfigDict) -> Any:
  """Returns the TFDS builder of config.dataset (name[:version], data_dir).

  A prepared image folder is read with `tfds.builder_from_directory`.
  Constructing a builder reads only metadata (or the code's defaults when
  nothing is prepared), so this is cheap and never downloads.
  """
  name = config.dataset.name
  check_name(config)
  if is_in_memory(config):
    raise DatasetError(f'Dataset {name!r} is in-memory, not a TFDS dataset.')
  tfds = import_tfds(name)
  if name == FOLDER:
    return tfds.builder_from_directory(config.dataset.folder)
  try:
    return tfds.builder(name, data_dir=config.dataset.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(_unknown_hint(name, tfds)) from e


def feature_keys(builder: Any, config: ml_collections.ConfigDict
                 ) -> tuple[str, str | None]:
  """(image feature, label feature or None) of a TFDS dataset.

  config.dataset.image_key / label_key when set; otherwise 'image' (or the
  only Image feature) and 'label' (or the only ClassLabel feature). A
  dataset without a class label is unlabelled.
  """
  tfds = import_tfds(config.dataset.name)
  features = builder.info.features

  def pick(key_field: str, preferred: str, kind: Any) -> str | None:
    key = config.dataset.get(key_field, '')
    if key:
      if key not in features:
        raise DatasetError(
            f'config.dataset.{key_field}={key!r}: {config.dataset.name} has '
            f'no such feature; its features: {sorted(features.keys())}.')
      return key
    if preferred in features and isinstance(features[preferred], kind):
      return preferred
    found = [k for k in features.keys() if isinstance(features[k], kind)]
    return found[0] if len(found) == 1 else None

  image = pick('image_key', 'image', tfds.features.Image)
  if image is None:
    raise DatasetError(
        f'Dataset {config.dataset.name!r} has no single image feature (its '
        f'features: {sorted(features.keys())}); set config.dataset.image_key.')
  return image, pick('label_key', 'label', tfds.features.ClassLabel)


def available_splits(config: ml_collections.ConfigDict) -> list[str]:
  """The split names of config.dataset, as far as its metadata knows them."""
  name = config.dataset.name
  if union_parts(name):
    name = union_parts(name)[0]
  if name in ('digits', 'digits_m'):
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    return list(digits.SPLITS)
  if name == 'synthetic':
    return ['train', 'test']
  if is_in_memory(config):  # An image folder read directly.
    from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
    return sorted(folder.listing_of(config).splits)
  builder = tfds_builder(config)
  return sorted(builder.info.splits.keys()) if _has_metadata(builder) else []


def resolve_splits(config: ml_collections.ConfigDict) -> None:
  """Picks an evaluation split the dataset has, in place, saying so.

  config.dataset.eval_split is kept when the dataset has it (or when its
  splits cannot be known, as under tfds.testing.mock_data). Otherwise the
  first of 'test', 'validation' it has is used; a dataset with only its
  training split has the last 10% of it held out for evaluation and
  pretrains on the rest. Nothing changes for a split expression ('a+b',
  'train[:50%]'), which TFDS checks when reading.
  """
  d = config.dataset
  splits = available_splits(config)
  if not splits or d.eval_split in splits or any(
      c in d.eval_split for c in '+[:'):
    return
  for candidate in _EVAL_SPLIT_FALLBACKS:
    if candidate in splits:
      logging.info('%s has no split %r; evaluating on %r.', d.name,
                   d.eval_split, candidate)
      d.eval_split = candidate
      return
  if d.train_split in splits and not is_in_memory(config):
    keep = 100 - _HELD_OUT_PERCENT
    train, held = f'{d.train_split}[:{keep}%]', f'{d.train_split}[{keep}%:]'
    logging.info('%s has only %s; pretraining on %r and evaluating on the '
                 'held-out %r.', d.name, ', '.join(splits), train, held)
    d.train_split, d.eval_split = train, held
    return
  raise DatasetError(
      f'Dataset {d.name!r} has no split {d.eval_split!r} to evaluate on; its '
      f'splits: {splits}; set config.dataset.eval_split.')


def evaluation_config(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """The config whose dataset the probes and the kNN monitor read.

  The pretraining dataset, unless config.eval.dataset names another (for
  example labelled images to probe an encoder pretrained on unlabelled
  ones); its empty fields keep the pretraining dataset's values.
  """
  override = config.eval.get('dataset', None)
  if override is None or not override.get('name', ''):
    return config
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in override.items():
      if value not in ('', None):
        out.dataset[key] = value
  resolve_splits(out)
  return out


def _has_metadata(builder: Any) -> bool:
  """Whether the builder's split sizes come from prepared metadata (a
  prepared dataset, or a prepared image folder's read-only builder)."""
  return builder.is_prepared() or type(builder).__name__ == 'ReadOnlyBuilder'


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
  if _has_metadata(builder):
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
  check_name(config)
  if is_in_memory(config):
    images, labels = load_in_memory(config, config.dataset.train_split)
    return DatasetInfo(
        name=name,
        num_train_examples=len(labels),
        num_classes=_in_memory_num_classes(config),
        image_shape=tuple(images.shape[1:]),
    )
  builder = tfds_builder(config)
  num_train = tfds_split_size(builder, name, config.dataset.train_split)
  image_key, label_key = feature_keys(builder, config)
  features = builder.info.features
  return DatasetInfo(
      name=name,
      num_train_examples=num_train,
      num_classes=(int(features[label_key].num_classes) if label_key else 0),
      image_shape=tuple(features[image_key].shape),
  )


def _in_memory_num_classes(config: ml_collections.ConfigDict) -> int:
  if union_parts(config.dataset.name):
    return _in_memory_num_classes(_part_config(
        config, union_parts(config.dataset.name)[0]))
  if config.dataset.name in ('digits', 'digits_m'):
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    return digits.NUM_CLASSES
  if config.dataset.name == FOLDER:
    from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.listing_of(config).num_classes
  return int(config.dataset.get('num_classes', _SYNTHETIC_NUM_CLASSES))


def _part_config(config: ml_collections.ConfigDict,
                 name: str) -> ml_collections.ConfigDict:
  part = copy.deepcopy(config)
  part.dataset.name = name
  return part


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
def _resized_digits(split: str, side: int, name: str = 'digits'
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Digits (or digits_m) at `side` pixels (cached: once per process)."""
  from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import digits_m  # pylint: disable=g-import-not-at-top
  load = digits_m.load_digits_m if name == 'digits_m' else digits.load_digits
  images, labels = load(split)
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
  check_name(config)
  if union_parts(name):
    arrays = [load_in_memory(_part_config(config, p), split)
              for p in union_parts(name)]
    labels = [arrays[0][1]] + [np.full(len(y), -1, np.int32)
                               for _, y in arrays[1:]]
    return (np.concatenate([x for x, _ in arrays]),
            np.concatenate(labels).astype(np.int32))
  if name in ('digits', 'digits_m'):
    try:
      return _resized_digits(split, raw_size(config), name)
    except ValueError as e:
      raise DatasetError(str(e)) from e
  if name == FOLDER and is_in_memory(config):
    from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
    return folder.load_split(config, split, raw_size(config))
  if name == 'synthetic':
    if split not in ('train', 'test'):
      raise DatasetError(
          f"Unknown synthetic split {split!r}; expected 'train' or 'test'.")
    return _synthetic_arrays(split, _synthetic_num_examples(config, split),
                             raw_size(config), _in_memory_num_classes(config))
  raise DatasetError(f'Dataset {name!r} is not an in-memory dataset.')
