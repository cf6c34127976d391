"""The stream position and the per-example work every source shares.

The position of a pretraining stream is a pure function of the global step:
epoch = step // steps_per_epoch, batch-in-epoch = step % steps_per_epoch, and
each epoch's order is a pure function of (config.seed, epoch). So a run
resumed at step k sees exactly the batches the uninterrupted run would have
seen, and the tf.data augmentation draws the same random numbers, because its
seeds come from (seed, epoch, example id, view) rather than from state.
"""

from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

# Evaluation keeps the central 87.5% of the shorter side, except for images of
# 32 px or less, which are used whole
# (docs/algorithms.md#evaluation-preprocessing).
EVAL_CROP_FRACTION = 0.875
EVAL_NO_CROP_MAX_SIDE = 32


def seed31(*parts: int) -> int:
  """A 31-bit seed that mixes `parts` well (TFDS/tf.data want Python ints)."""
  words = [int(p) % (1 << 32) for p in parts]
  return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of an in-memory split in `epoch`, identical on every process."""
  rng = np.random.default_rng([int(seed) % (1 << 32), int(epoch)])
  return rng.permutation(num_examples)


def _process_rows(perm: np.ndarray, *, spe: int, global_batch: int,
                  local_batch: int, process_index: int,
                  first_batch: int) -> np.ndarray:
  """This process's example indices for batches first_batch..spe-1 of an epoch.

  Global batch g of the epoch is perm[g*B:(g+1)*B] and process p owns its
  rows [p*b:(p+1)*b], so concatenating the processes' batches of a step gives
  the 1-process global batch.
  """
  batches = perm[:spe * global_batch].reshape(spe, global_batch)
  lo = process_index * local_batch
  return batches[first_batch:, lo:lo + local_batch].reshape(-1)


def epoch_rows(config: ml_collections.ConfigDict, num_examples: int, *,
               start_step: int, spe: int, local_batch: int,
               process_index: int) -> Iterator[tuple[int, np.ndarray]]:
  """(epoch, this process's rows) from the epoch holding `start_step` on.

  The first epoch starts at the resumed batch; later ones start at batch 0,
  so both in-memory streams share one definition of the stream position.
  """
  epoch, first = divmod(start_step, spe)
  while True:
    yield epoch, _process_rows(
        epoch_permutation(config.seed, epoch, num_examples), spe=spe,
        global_batch=config.batch_size, local_batch=local_batch,
        process_index=process_index, first_batch=first)
    epoch, first = epoch + 1, 0


def _view_seed(tf: Any, epoch_key: Any, index: Any, view: int) -> Any:
  """Stateless seed of one view: a function of (seed, epoch, example, view)."""
  key = tf.random.experimental.stateless_fold_in(epoch_key, index)
  return tf.random.experimental.stateless_fold_in(
      key, tf.constant(view, tf.int64))


def two_views_fn(config: ml_collections.ConfigDict, tf: Any, epoch: int,
                 include_index: bool):
  """Returns the tf.data map fn (image, label, index) -> batch element."""
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top

  epoch_key = tf.constant([int(config.seed), int(epoch)], tf.int64)
  kw = dict(size=int(config.dataset.image_size),
            color_strength=float(config.augment.color_strength),
            blur=bool(config.augment.blur),
            crop_min_area=float(config.augment.crop_min_area),
            flip=bool(config.augment.flip))

  def fn(image, label, index):
    views = [augment.tf_view(image, seed=_view_seed(tf, epoch_key, index, v),
                             **kw) for v in (0, 1)]
    out = {'views': tf.stack(views), 'labels': tf.cast(label, tf.int32)}
    if include_index:
      out['index'] = index
    return out

  return fn


def finish(tf: Any, ds: Any, local_batch: int) -> Any:
  """Batches, prefetches and pins tf.data determinism (resume depends on it)."""
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def raw_image_fn(tf: Any, image_shape: tuple[int | None, ...], size: int):
  """Returns image -> uint8 (size, size, 3), skipping the resize if a no-op."""
  if tuple(image_shape[:2]) == (size, size):
    return lambda image: tf.ensure_shape(image, [size, size, 3])
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
  return lambda image: augment.resize_centre_crop(image, size)


def numpy_eval_images(images: np.ndarray, size: int) -> np.ndarray:
  """Evaluation preprocessing of in-memory uint8 images, without TensorFlow.

  Same rule as the released SimCLR code: whole image up to 32 px, else the
  central 87.5%, resized to `size`; floats in [0, 1], no normalisation.
  """
  side = images.shape[1]
  if side > EVAL_NO_CROP_MAX_SIDE:
    crop = int(round(side * EVAL_CROP_FRACTION))
    top = (side - crop) // 2
    images = images[:, top:top + crop, top:top + crop]
  out = images.astype(np.float32) / 255.0
  if out.shape[1] != size:
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    out = np.clip(digits.resize_bilinear(out, size), 0.0, 1.0)
  return out.astype(np.float32)
