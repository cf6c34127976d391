"""The pretraining input stream and the arrays that evaluation featurises.

The stream's position is a pure function of the global step: epoch =
step // steps_per_epoch, batch-in-epoch = step % steps_per_epoch, and each
epoch's order is a pure function of (config.seed, epoch). So a run resumed
from a checkpoint at step k (`start_step=k`) sees exactly the batches k, k+1,
... that the uninterrupted run would have seen, neither replaying nor skipping
data, and the tf.data augmentation draws the same random numbers because its
seeds come from (seed, epoch, example id, view) rather than from state.

Every process yields only its own rows (host-local numpy batches of
batch_size // process_count images); `parallel.to_global` assembles them into
global arrays. For in-memory data the processes cut the same global batches,
so a 2-process run trains on the same global batches as a 1-process run; TFDS
data is split per process with `tfds.even_splits`, as
`tfds.split_for_jax_process` does, so each host reads only its own files.

Batch formats (host-local, b = batch_size // process_count):
  augment.backend 'tf':  {'views': float32 (b, 2, S, S, 3) in [0, 1],
                          'labels': int32 (b,)}
  augment.backend 'jax': {'images': uint8 (b, R, R, 3), 'labels': int32 (b,)}
with S = dataset.image_size and R = dataset.raw_size (or S). Labels of
unlabelled examples (stl10 'unlabelled') are -1. With `include_index=True`
each batch also has 'index': int64 (b,), the example's id (its row in the
split for in-memory data, a hash of the TFDS example id otherwise), for tests
and debugging.

What a batch holds depends on the backend only: which dataset it came from
is the DataSource's business (data/datasets.py picks it), so this module
never asks. TensorFlow is imported only where it is needed: digits/synthetic
with the 'jax' backend is pure NumPy.
"""

from collections.abc import Iterator

import ml_collections
import numpy as np

from simclr_jax.data import datasets
from simclr_jax.data import streams
from simclr_jax.data.base import Batch

DatasetError = datasets.DatasetError
epoch_permutation = streams.epoch_permutation
# Rows a chunk when evaluation images are read as one array.
_EVAL_READ_BATCH = 256


def local_batch_size(config: ml_collections.ConfigDict,
                     process_count: int) -> int:
  """Images per process per step; the global batch must split evenly."""
  if config.batch_size <= 0 or config.batch_size % process_count:
    raise DatasetError(
        f'config.batch_size={config.batch_size} must be a positive multiple '
        f'of the process count {process_count}.')
  return config.batch_size // process_count


def steps_per_epoch(config: ml_collections.ConfigDict,
                    info: datasets.DatasetInfo) -> int:
  """Full global batches per epoch (the remainder is dropped every epoch)."""
  return info.num_train_examples // config.batch_size


def make_pretrain_iterator(config: ml_collections.ConfigDict, *,
                           process_index: int, process_count: int,
                           start_step: int = 0,
                           include_index: bool = False,
                           stats: dict | None = None) -> Iterator[Batch]:
  """Returns the endless host-local pretraining stream, from `start_step` on.

  Args:
    config: the run config (dataset, augment, seed, batch_size).
    process_index: this process (jax.process_index()).
    process_count: all processes (jax.process_count()).
    start_step: global step to start from (the checkpoint's step).
    include_index: also yield each example's id under 'index'.
    stats: if given, the stream adds the number of corrupt images it skipped
      (config.dataset.on_corrupt='skip') under 'corrupt_images_skipped'.

  Returns:
    An iterator of batches in the format described in the module docstring.
    It never ends; the trainer stops after its last step.

  Raises:
    DatasetError: unknown or unprepared dataset, batch size not divisible by
      the process count or larger than the training split, TF missing.
  """
  source = datasets.source_for(config)
  backend = config.augment.backend
  if backend not in ('tf', 'jax'):
    raise DatasetError(
        f"Unknown augment.backend {backend!r}; expected 'tf' or 'jax'.")
  if not 0 <= process_index < process_count:
    raise DatasetError(
        f'process_index={process_index} is not in [0, {process_count}).')
  if start_step < 0:
    raise DatasetError(f'start_step={start_step} must be >= 0.')
  local_batch = local_batch_size(config, process_count)
  if backend == 'tf':
    datasets.import_tf("augment.backend='tf'")  # Fail now, not at next().
  info = source.info()
  spe = steps_per_epoch(config, info)
  if spe <= 0:
    raise DatasetError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train_examples} examples of {config.dataset.name} '
        f'{config.dataset.train_split!r}.')
  return source.pretrain_stream(
      process_index=process_index, process_count=process_count,
      start_step=start_step, local_batch=local_batch, spe=spe,
      include_index=include_index, stats={} if stats is None else stats)


def eval_batches(config: ml_collections.ConfigDict, split: str,
                 batch_size: int, *, max_examples: int | None = None,
                 shuffle_seed: int | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(float32 (b, S, S, 3) in [0, 1], int32 (b,)) chunks of `split`.

  Evaluation preprocessing (no augmentation), at most `batch_size` images at
  a time: what evaluation featurises without ever holding the split's
  images. In split order, or with `shuffle_seed` in an order drawn from it
  (DataSource.eval_batches says how each kind of data shuffles).
  """
  return datasets.source_for(config).eval_batches(
      split, batch_size, max_examples, shuffle_seed=shuffle_seed)


def load_eval_arrays(config: ml_collections.ConfigDict, split: str, *,
                     max_examples: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`eval_batches` of a split joined into one array (small splits only)."""
  chunks = list(eval_batches(config, split, _EVAL_READ_BATCH,
                             max_examples=max_examples))
  if not chunks:
    size = int(config.dataset.image_size)
    return np.zeros((0, size, size, 3), np.float32), np.zeros(0, np.int32)
  return (np.concatenate([x for x, _ in chunks]),
          np.concatenate([y for _, y in chunks]).astype(np.int32))


def load_train_arrays_raw(config: ml_collections.ConfigDict,
                          split: str | None = None, *,
                          max_examples: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uint8 (N, R, R, 3), int32 (N,)) raw images of a split.

  For fine-tuning or linear evaluation with on-device ('jax') augmentation:
  the same fixed-size raw images as the 'jax' pretraining batches, in split
  order. `split` defaults to config.dataset.train_split.
  """
  split = config.dataset.train_split if split is None else split
  images, labels = datasets.source_for(config).raw_arrays(split, max_examples)
  return np.asarray(images), labels.astype(np.int32)
