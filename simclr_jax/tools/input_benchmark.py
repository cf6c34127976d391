"""Throughput of SimCLR view generation: tf.data on the host vs JAX on device.

Pretraining needs two augmented views per image every step; this measures
how many views per second each backend of `simclr_jax.data.augment` produces,
so one can tell whether the host CPUs (tf.data) keep an accelerator fed or
whether on-device augmentation (`jax_views`) is needed. Wired into
`python -m simclr_jax.benchmark --input_only`.
"""

import os
import time
from typing import Any

import jax
import numpy as np

from simclr_jax.data import augment

# Distinct synthetic images cycled through (enough that caching cannot help).
_POOL = 64


def _num_cpu_cores() -> int:
  """Cores this process may use (the affinity mask, not the host's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _default_raw_size(image_size: int) -> int:
  # CIFAR-like images are augmented at their native size; ImageNet-like
  # decoded images are a little larger than the crop (256 for 224).
  return image_size if image_size <= 32 else image_size * 8 // 7


def _tf_views_per_sec(image_size: int, batch_size: int, num_batches: int,
                      pool: np.ndarray) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TF on the host only: it must never take accelerator memory.
  tf.config.set_visible_devices([], 'GPU')

  def two_views(image):
    return (augment.tf_view(image, image_size), augment.tf_view(image,
                                                                image_size))

  ds = (tf.data.Dataset.from_tensor_slices(pool).repeat()
        .map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE))
  it = iter(ds)
  for _ in range(2):  # Warm-up: tracing, thread pools, autotuning.
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  _ = batch[0].numpy()
  return 2 * batch_size * num_batches / (time.perf_counter() - start)


def _jax_views_per_sec(image_size: int, batch_size: int, num_batches: int,
                       pool: np.ndarray) -> float:
  device = jax.devices()[0]
  reps = -(-batch_size // len(pool))
  images = jax.device_put(np.tile(pool, (reps, 1, 1, 1))[:batch_size], device)

  @jax.jit
  def two_views(rng, step, images):
    rng = jax.random.fold_in(rng, step)
    k1, k2 = jax.random.split(rng)
    return (augment.jax_views(k1, images, image_size),
            augment.jax_views(k2, images, image_size))

  rng = jax.random.key(0)
  jax.block_until_ready(two_views(rng, 0, images))  # Warm-up: compile.
  start = time.perf_counter()
  out = None
  for step in range(1, num_batches + 1):
    out = two_views(rng, step, images)
  jax.block_until_ready(out)
  return 2 * batch_size * num_batches / (time.perf_counter() - start)


def measure_input_throughput(backend: str, image_size: int, batch_size: int,
                             num_batches: int,
                             raw_size: int | None = None) -> dict[str, Any]:
  """Times two-view generation after warm-up.

  Args:
    backend: 'tf' (tf.data map(tf_view, AUTOTUNE) on host CPUs) or 'jax'
      (jitted jax_views on the first JAX device, images already there).
    image_size: output view side.
    batch_size: images per batch (each yields two views).
    num_batches: timed batches.
    raw_size: side of the synthetic uint8 source images; default image_size
      for <= 32 px, else 8/7 of it (256 for 224).

  Returns:
    {'backend', 'image_size', 'raw_size', 'batch_size', 'views_per_sec',
    'views_per_sec_per_core', 'num_cpu_cores', 'device_kind'}; per core
    divides by the CPU cores for 'tf' and for 'jax' on CPU, and by the one
    device used for 'jax' on an accelerator.
  """
  raw_size = raw_size or _default_raw_size(image_size)
  pool = np.random.RandomState(0).randint(
      0, 256, (_POOL, raw_size, raw_size, 3)).astype(np.uint8)
  cores = _num_cpu_cores()
  device = jax.devices()[0]
  if backend == 'tf':
    vps = _tf_views_per_sec(image_size, batch_size, num_batches, pool)
    per_core, device_kind = vps / cores, 'cpu (tf.data)'
  elif backend == 'jax':
    vps = _jax_views_per_sec(image_size, batch_size, num_batches, pool)
    per_core = vps / cores if device.platform == 'cpu' else vps
    device_kind = device.device_kind
  else:
    raise ValueError(f'backend must be "tf" or "jax", not {backend!r}')
  return {
      'backend': backend,
      'image_size': image_size,
      'raw_size': raw_size,
      'batch_size': batch_size,
      'views_per_sec': float(vps),
      'views_per_sec_per_core': float(per_core),
      'num_cpu_cores': cores,
      'device_kind': device_kind,
  }
