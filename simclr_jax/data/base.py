"""What every kind of dataset answers: the DataSource interface.

A run never asks which kind of dataset it holds. `datasets.source_for`
looks at config.dataset once and returns a DataSource; everything after that
(the trainer, the probes, the downstream modes, the methods) asks the source
the same questions whatever it reads from:

  * `info()`: features, classes, split sizes, labelled or not;
  * `splits()`: the split names it has;
  * `pretrain_stream(...)`: the host-local two-view stream from any step;
  * `eval_batches(split, ...)`: evaluation-preprocessed images in bounded
    batches, in split order or a seeded shuffled order (never the whole
    split at once);
  * `raw_arrays(split)`: the split as uint8 arrays at raw size, for data that
    fits in host memory;
  * `labelled_stream(...)`: crop + flip views for the downstream modes, for
    data too big to hold (`holds_arrays` says which of the two to use).

The kinds live beside this file: in-memory arrays and their unions
(`in_memory.py`), an image folder read directly (`folder.py`), and TFDS
datasets, prepared image folders included (`tfds_source.py`).

TensorFlow is imported lazily through `import_tf`, which hides the GPUs from
it before anything touches a device, so the input pipeline never takes
accelerator memory that JAX needs.
"""

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any

from absl import logging
import ml_collections
import numpy as np

Batch = dict[str, np.ndarray]


class DatasetError(ValueError):
  """A dataset problem the user can fix; the message says how, in one line."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know before reading any data.

  Attributes:
    name: config.dataset.name.
    num_train_examples: size of config.dataset.train_split (all processes).
    num_classes: label classes (the linear head's width); 0 for a dataset
      without labels (labels read as -1).
    image_shape: stored image shape; (None, None, 3) for variable-size images.
  """
  name: str
  num_train_examples: int
  num_classes: int
  image_shape: tuple[int | None, ...]

  @property
  def labelled(self) -> bool:
    return self.num_classes > 0


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


class DataSource(abc.ABC):
  """One dataset as the run sees it, whatever it is read from.

  Attributes:
    config: the run config; its `dataset` section names the data.
    holds_arrays: whether the pretraining and labelled train split are held
      in host memory as arrays indexed by row id (methods with per-image
      state need it; the downstream modes then augment on device).
    slices_splits: whether split expressions such as 'train[:90%]' work
      (TFDS's slicing), so a dataset with one split can hold part of it out.
    grey: whether the images are grey, stored once and repeated to the
      three channels the encoders read (the pixel baseline then reads one
      channel: 784 values for a 28 px image, not 2,352 copies).
  """
  holds_arrays: bool = True
  slices_splits: bool = False
  grey: bool = False

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @property
  def name(self) -> str:
    return self.config.dataset.name

  def fits_in_memory(self) -> bool:
    """Whether the downstream modes hold the train split as raw arrays
    (`raw_arrays`, augmented on device) rather than `labelled_stream`."""
    return True

  @abc.abstractmethod
  def info(self) -> DatasetInfo:
    """Train split size, classes and image shape (cheap: metadata only,
    except for folders decoded into memory)."""

  @abc.abstractmethod
  def splits(self) -> list[str]:
    """The split names the data has ([] when its metadata cannot tell)."""

  @abc.abstractmethod
  def split_size(self, split: str) -> int:
    """Examples in `split` (all processes), or DatasetError naming the
    splits there are."""

  @abc.abstractmethod
  def raw_arrays(self, split: str, max_examples: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, R, R, 3), int32 (N,)) of `split` at raw size, in order.

    Materialises the split: for data that fits in host memory.
    """

  @abc.abstractmethod
  def eval_batches(self, split: str, batch_size: int,
                   max_examples: int | None = None,
                   shuffle_seed: int | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 (b, S, S, 3) in [0, 1], int32 (b,)) chunks of `split`.

    Evaluation preprocessing (no augmentation), at most `batch_size` rows a
    chunk, so host memory stays O(batch). With `shuffle_seed` None the rows
    come in split order, which featurising needs (row i is example i). With
    a seed they come in an order drawn from it, the same for the same seed,
    for statistics that must not follow the split's order (a split sorted
    by class would feed a few classes at a time): a permutation of the split
    where it is held in memory, a seeded file order and a bounded shuffle
    buffer where it is streamed. `max_examples` keeps the first rows of that
    order.
    """

  @abc.abstractmethod
  def pretrain_stream(self, *, process_index: int, process_count: int,
                      start_step: int, local_batch: int, spe: int,
                      include_index: bool, stats: dict
                      ) -> Iterator[Batch]:
    """The endless host-local pretraining stream (data/pipeline.py says
    what its batches hold and why it can start at any step)."""

  def labelled_stream(self, split: str, *, global_batch: int, seed: int,
                      process_index: int, process_count: int,
                      start_step: int, with_labels: bool = True
                      ) -> Iterator[Batch]:
    """Host-local crop + flip views for data not held as arrays."""
    raise DatasetError(
        f'Dataset {self.name!r} is held in memory; its labelled batches come '
        'from raw_arrays.')
