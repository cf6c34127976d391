"""Labelled training streams and label fractions for the downstream modes.

Linear evaluation, fine-tuning and distillation train on labelled images with
crop + flip only (docs/algorithms.md#evaluation-preprocessing). Two forms,
chosen by the DataSource (`fits_in_memory`):

  * Arrays (digits, synthetic, CIFAR, STL-10: anything that fits in host
    memory): the split's raw uint8 images at dataset.raw_size, yielded as
    {'images': uint8 (b, R, R, 3), 'labels': int32 (b,)} by `array_batches`.
    The crop + flip is done on device inside the jitted step
    (augment.jax_finetune_views, the same distribution as
    augment.tf_finetune_view), so no TensorFlow is needed for in-memory
    datasets.
  * Streams (the ImageNet family, too big to materialise): the source's
    `labelled_stream`, tf.data with augment.tf_finetune_view, yielding
    {'views': float32 (b, S, S, 3), 'labels'}.

Label fractions (docs/algorithms.md#fine-tuning-on-label-fractions): ImageNet
uses the official TFDS subsets `imagenet2012_subset/1pct` and `/10pct`; every
other dataset a seeded, class-stratified fraction of its training split
(`label_subset`). The evaluation split is never read for training.

Batches are host-local (global batch / process count rows, process p taking
rows [p*b, (p+1)*b) of each global batch), for parallel.prefetch_to_mesh.
"""

from collections.abc import Iterator
import ml_collections
import numpy as np

from simclr_jax.data import pipeline
from simclr_jax.data import sampling

Batch = dict[str, np.ndarray]

# label_fraction -> official ImageNet subset (SimCLRv2 semi-supervised).
IMAGENET_SUBSETS = {0.01: 'imagenet2012_subset/1pct',
                    0.1: 'imagenet2012_subset/10pct'}


def label_subset(labels: np.ndarray, fraction: float, seed: int
                 ) -> np.ndarray:
  """Sorted indices of a seeded, class-stratified `fraction` of `labels`.

  Every class keeps round(fraction * its count) examples (at least one), so
  the subset has the class balance of the full split; the same seed always
  gives the same subset.
  """
  if fraction == 1.0:
    return np.arange(len(labels), dtype=np.int64)
  return sampling.stratified_fraction(labels, fraction, seed)


def imagenet_source(name: str, fraction: float) -> str:
  """The TFDS dataset holding `fraction` of a streamed dataset's labels.

  A dataset too big for host memory is streamed, so its label fraction
  cannot be drawn by row; ImageNet has official subsets for 1% and 10%.

  Raises:
    ValueError: for a fraction without an official subset.
  """
  if fraction == 1.0:
    return name
  if name != 'imagenet2012' or fraction not in IMAGENET_SUBSETS:
    raise ValueError(
        f'finetune.label_fraction={fraction} with dataset.name={name!r}: '
        'a streamed dataset\'s label fractions are the official ImageNet '
        "TFDS subsets, so use dataset.name='imagenet2012' with "
        'label_fraction 0.01 or 0.1 (or 1.0 for all labels), or hold a '
        'smaller dataset in memory with dataset.in_memory=True')
  return IMAGENET_SUBSETS[fraction]


def load_labelled_arrays(config: ml_collections.ConfigDict,
                         fraction: float = 1.0, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(raw uint8 images, int32 labels, indices) of a fraction of the train split.

  `indices` are the rows of the full training split that were kept, so a
  caller can mark the same subset inside the full split (distillation's
  labelled part).
  """
  images, labels = pipeline.load_train_arrays_raw(config)
  idx = label_subset(labels, fraction, seed)
  return images[idx], labels[idx].astype(np.int32), idx


def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  return np.random.default_rng([int(seed) % (1 << 32), epoch]).permutation(
      num_examples)


def index_stream(num_examples: int, global_batch: int, seed: int,
                 start_step: int = 0) -> Iterator[np.ndarray]:
  """Endless global batches of example indices, one permutation per epoch.

  Batches run across epoch boundaries instead of dropping a remainder, so a
  small labelled subset (10% of digits is 144 images) is used whole every
  epoch, and a batch larger than the subset still works. Epoch e's order is
  a function of (seed, e) only, so the stream of a run resumed at
  `start_step` continues exactly where the uninterrupted one was: batch k
  covers positions [k*B, (k+1)*B) of the concatenated epoch orders.
  """
  if num_examples <= 0:
    raise ValueError('the labelled training set is empty')
  position = start_step * global_batch
  epoch = position // num_examples
  pending = _epoch_order(seed, epoch, num_examples)[position % num_examples:]
  epoch += 1
  while True:
    while pending.size < global_batch:
      pending = np.concatenate(
          [pending, _epoch_order(seed, epoch, num_examples)])
      epoch += 1
    yield pending[:global_batch]
    pending = pending[global_batch:]


def array_batches(images: np.ndarray, labels: np.ndarray, *,
                  global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0
                  ) -> Iterator[Batch]:
  """Host-local raw batches from in-memory arrays (augmented on device)."""
  local = global_batch // process_count
  lo = process_index * local
  for idx in index_stream(len(labels), global_batch, seed, start_step):
    rows = idx[lo:lo + local]
    yield {'images': images[rows], 'labels': labels[rows].astype(np.int32)}
