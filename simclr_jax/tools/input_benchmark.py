"""Throughput of SimCLR view generation: tf.data on the host vs JAX on device.

Pretraining needs two augmented views per image every step; this measures
how many views per second each backend of `simclr_jax.data.augment` produces,
so one can tell whether the host CPUs (tf.data) keep an accelerator fed or
whether on-device augmentation (`jax_views`) is needed. Wired into
`python -m simclr_jax.benchmark --input_only`.

`measure_jpeg_throughput` adds what an ImageNet run pays first: JPEG
records (written here, ImageNet-sized) read with tf.data and decoded by the
pipeline's own functions (`data/tfds_source.py`, `data/streams.py`: the corrupt-image-tolerant
decode, then the two views for the tf backend, or the resize to raw_size
for the on-device backend).
"""

import os
import tempfile
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


# ImageNet's training JPEGs average about 400 x 350 px and 110 KB.
JPEG_HEIGHT, JPEG_WIDTH = 350, 400
# The per-GPU rate the accelerator targets (ResNet-50, 224 px, bf16).
TARGET_VIEWS_PER_SEC = 7000.0


def write_jpeg_records(directory: str, num_images: int, *, num_shards: int = 4,
                       height: int = JPEG_HEIGHT, width: int = JPEG_WIDTH,
                       seed: int = 0) -> dict[str, Any]:
  """Writes `num_images` JPEGs as tf.train.Example records (image, label).

  The images are smooth random fields plus pixel noise, which JPEG (quality
  90) compresses to roughly ImageNet's bytes per image at this size.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  paths = [os.path.join(directory, f'train.tfrecord-{i:05d}')
           for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  total = 0
  for i in range(num_images):
    coarse = rng.uniform(0, 255, (height // 16 + 1, width // 16 + 1, 3))
    image = np.kron(coarse, np.ones((16, 16, 1)))[:height, :width]
    image = np.clip(image + rng.normal(0, 32, image.shape), 0, 255)
    data = tf.io.encode_jpeg(image.astype(np.uint8), quality=90).numpy()
    total += len(data)
    example = tf.train.Example(features=tf.train.Features(feature={
        'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        'label': tf.train.Feature(int64_list=tf.train.Int64List(
            value=[i % 1000]))}))
    writers[i % num_shards].write(example.SerializeToString())
  for w in writers:
    w.close()
  return {'paths': paths, 'num_images': num_images,
          'mean_jpeg_bytes': total / num_images,
          'jpeg_height': height, 'jpeg_width': width}


def measure_jpeg_throughput(backend: str, image_size: int = 224,
                            batch_size: int = 64, num_batches: int = 8,
                            raw_size: int | None = None,
                            num_images: int = 256,
                            records_dir: str | None = None) -> dict[str, Any]:
  """Host-side throughput from JPEG records to what the device receives.

  Args:
    backend: 'tf': decode + the two SimCLR views on the host (views/s);
      'jax': decode + resize to raw_size (images/s; each image becomes two
      views on the device).
    image_size, raw_size: as in the config (raw_size default 8/7 x size).
    batch_size, num_batches: timed batches, after two warm-up batches.
    num_images: distinct JPEGs written (cycled).
    records_dir: where to write them (default: a temporary directory).

  Returns:
    The rates per second and per host core, and the host cores one
    accelerator at TARGET_VIEWS_PER_SEC needs.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import streams  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  raw_size = raw_size or _default_raw_size(image_size)
  with tempfile.TemporaryDirectory() as tmp:
    info = write_jpeg_records(records_dir or tmp, num_images)
    config = defaults.base_config()
    config.dataset.image_size = image_size
    config.augment.color_strength = 1.0
    config.augment.blur = image_size > 32
    image_feature = tfds.features.Image(shape=(None, None, 3))
    spec = {'image': tf.io.FixedLenFeature([], tf.string),
            'label': tf.io.FixedLenFeature([], tf.int64)}

    def parse(i, record):
      ex = tf.io.parse_single_example(record, spec)
      return dict(ex, tfds_id=tf.strings.as_string(i))

    ds = (tf.data.TFRecordDataset(info['paths'],
                                  num_parallel_reads=tf.data.AUTOTUNE)
          .repeat().enumerate().map(parse, num_parallel_calls=tf.data.AUTOTUNE))
    ds = tfds_source._decode_dropping_corrupt(tf, ds, image_feature)  # pylint: disable=protected-access
    if backend == 'tf':
      views = streams.two_views_fn(config, tf, 0, include_index=False)
      fn = lambda ex: views(ex['image'], tf.cast(ex['label'], tf.int32),
                            tf.constant(0, tf.int64))
      per_item = 2
    elif backend == 'jax':
      resize = streams.raw_image_fn(tf, (None, None, 3), raw_size)
      fn = lambda ex: {'images': resize(ex['image'])}
      per_item = 1
    else:
      raise ValueError(f'backend must be "tf" or "jax", not {backend!r}')
    ds = (ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    it = ds.as_numpy_iterator()
    for _ in range(2):
      next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    seconds = time.perf_counter() - start
  cores = _num_cpu_cores()
  items = batch_size * num_batches / seconds
  views = items * 2  # Views per second this feeds the device.
  return {
      'backend': backend, 'source': 'jpeg_tfrecords',
      'image_size': image_size, 'raw_size': raw_size if backend == 'jax' else
      None, 'batch_size': batch_size,
      'output': 'views' if per_item == 2 else 'raw images (2 views each)',
      'items_per_sec': items, 'items_per_sec_per_core': items / cores,
      'views_fed_per_sec': views, 'views_fed_per_sec_per_core': views / cores,
      'cores_for_target': TARGET_VIEWS_PER_SEC / (views / cores),
      'target_views_per_sec': TARGET_VIEWS_PER_SEC, 'num_cpu_cores': cores,
      'mean_jpeg_bytes': info['mean_jpeg_bytes'],
      'jpeg_size': [info['jpeg_height'], info['jpeg_width']],
  }
