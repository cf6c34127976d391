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

TensorFlow is imported only where it is needed: digits/synthetic with the
'jax' backend is pure NumPy.
"""

from collections.abc import Iterator
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from simclr_jax.data import datasets

DatasetError = datasets.DatasetError
Batch = dict[str, np.ndarray]

# Evaluation keeps the central 87.5% of the shorter side, except for images of
# 32 px or less, which are used whole
# (docs/algorithms.md#evaluation-preprocessing).
_EVAL_CROP_FRACTION = 0.875
_EVAL_NO_CROP_MAX_SIDE = 32
# Examples per tf.data batch when materialising evaluation arrays.
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


def _seed31(*parts: int) -> int:
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


def _epoch_rows(config: ml_collections.ConfigDict, num_examples: int, *,
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
  name = config.dataset.name
  datasets.check_name(config)
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
  info = datasets.dataset_info(config)
  spe = steps_per_epoch(config, info)
  if spe <= 0:
    raise DatasetError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train_examples} examples of {name} '
        f'{config.dataset.train_split!r}.')
  kw = dict(config=config, process_index=process_index,
            process_count=process_count, start_step=start_step,
            local_batch=local_batch, spe=spe, include_index=include_index)
  if datasets.reads_in_memory(config):
    if backend == 'jax':
      return _in_memory_raw_stream(**kw)
    return _in_memory_tf_stream(**kw)
  return _tfds_stream(**kw, stats={} if stats is None else stats)


_TFDS_TRAIN_ARRAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _train_arrays(config: ml_collections.ConfigDict
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The pretraining split as (uint8 images, labels), indexed by row id.

  NumPy datasets come from `datasets.load_in_memory`. A TFDS split with
  config.dataset.in_memory is read once per process, in file order at
  raw_size pixels (the order `load_eval_arrays` reads it in, so a row id
  means the same image to a method featurising the split).
  """
  if datasets.is_in_memory(config):
    return datasets.load_in_memory(config, config.dataset.train_split)
  key = (config.dataset.name, config.dataset.data_dir,
         config.dataset.train_split, datasets.raw_size(config))
  if key not in _TFDS_TRAIN_ARRAYS:
    _TFDS_TRAIN_ARRAYS[key] = load_train_arrays_raw(config)
  return _TFDS_TRAIN_ARRAYS[key]


def _in_memory_raw_stream(*, config, process_index, process_count, start_step,
                          local_batch, spe, include_index) -> Iterator[Batch]:
  """Raw uint8 batches by NumPy indexing: the TensorFlow-free path."""
  del process_count  # Implied by local_batch.
  images, labels = _train_arrays(config)
  for _, rows in _epoch_rows(config, len(labels), start_step=start_step,
                             spe=spe, local_batch=local_batch,
                             process_index=process_index):
    for idx in rows.reshape(-1, local_batch):
      batch = {'images': images[idx], 'labels': labels[idx].astype(np.int32)}
      if include_index:
        batch['index'] = idx.astype(np.int64)
      yield batch


def _view_seed(tf: Any, epoch_key: Any, index: Any, view: int) -> Any:
  """Stateless seed of one view: a function of (seed, epoch, example, view)."""
  key = tf.random.experimental.stateless_fold_in(epoch_key, index)
  return tf.random.experimental.stateless_fold_in(
      key, tf.constant(view, tf.int64))


def _two_views_fn(config: ml_collections.ConfigDict, tf: Any, epoch: int,
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


def _finish(tf: Any, ds: Any, local_batch: int) -> Any:
  """Batches, prefetches and pins tf.data determinism (resume depends on it)."""
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _in_memory_tf_stream(*, config, process_index, process_count, start_step,
                         local_batch, spe, include_index) -> Iterator[Batch]:
  """Two tf.data-augmented views of in-memory images (digits on the CPU)."""
  del process_count  # Implied by local_batch.
  tf = datasets.import_tf("augment.backend='tf'")
  images, labels = _train_arrays(config)
  # Converted once; each epoch's dataset gathers from them by index, so an
  # epoch costs no copy of the arrays.
  images_t = tf.constant(images)
  labels_t = tf.constant(labels, tf.int32)

  def lookup(index):
    return tf.gather(images_t, index), tf.gather(labels_t, index), index

  for epoch, rows in _epoch_rows(config, len(labels), start_step=start_step,
                                 spe=spe, local_batch=local_batch,
                                 process_index=process_index):
    ds = tf.data.Dataset.from_tensor_slices(rows.astype(np.int64)).map(lookup)
    ds = ds.map(_two_views_fn(config, tf, epoch, include_index),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    yield from _finish(tf, ds, local_batch).as_numpy_iterator()


def _raw_image_fn(tf: Any, image_shape: tuple[int | None, ...], size: int):
  """Returns image -> uint8 (size, size, 3), skipping the resize if a no-op."""
  if tuple(image_shape[:2]) == (size, size):
    return lambda image: tf.ensure_shape(image, [size, size, 3])
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
  return lambda image: augment.resize_centre_crop(image, size)


def _decode_dropping_corrupt(tf: Any, ds: Any, image_feature: Any,
                             image_key: str = 'image') -> Any:
  """Decodes the images of `ds`, dropping those that do not decode.

  `ds` holds examples with the image still encoded (tfds SkipDecoding) and a
  'tfds_id'. A file that is truncated, not an image, or of the wrong shape
  would otherwise stop training with an error from deep inside tf.data. TF
  has no decode that reports failure as a value, so failing elements are
  dropped with `ignore_errors`, and positions numbered before the decode
  recover what was dropped: each surviving example gets '_corrupt' (int64,
  examples dropped just before it) and '_corrupt_id' (the tfds_id of the
  last of those: shard file and record), which `_check_corrupt` reports.
  """
  shape = tuple(image_feature.shape)

  def number(state, ex):
    pos, prev_id = state
    return (pos + 1, ex['tfds_id']), dict(ex, _pos=pos, _corrupt_id=prev_id)

  def decode(ex):
    image = tf.ensure_shape(image_feature.decode_example(ex[image_key]),
                            shape)
    if shape[-1] == 1:  # Grey datasets (mnist): RGB like every other.
      image = tf.image.grayscale_to_rgb(image)
    return dict(ex, **{image_key: image})

  def gap(last, ex):
    ex = dict(ex)
    pos = ex.pop('_pos')
    return pos, dict(ex, _corrupt=pos - last - 1)

  ds = ds.scan((tf.constant(0, tf.int64), tf.constant('')), number)
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.ignore_errors().scan(tf.constant(-1, tf.int64), gap)


def _check_corrupt(batch: Batch, config: ml_collections.ConfigDict,
                   split: Any, stats: dict) -> Batch:
  """Pops the corrupt-image marks of a batch; counts and warns, or raises."""
  dropped = batch.pop('_corrupt')
  ids = batch.pop('_corrupt_id')
  for i in np.flatnonzero(dropped):
    record = ids[i].decode() if isinstance(ids[i], bytes) else str(ids[i])
    more = (f' (and {dropped[i] - 1} more just before it)'
            if dropped[i] > 1 else '')
    if config.dataset.get('on_corrupt', 'skip') == 'fail':
      raise DatasetError(
          f'Corrupt or undecodable image in {config.dataset.name} split '
          f'{split!r}: record {record}{more}; fix or remove it, or set '
          "config.dataset.on_corrupt='skip' to skip such images.")
    logging.warning('Skipped a corrupt or undecodable image in %s: record '
                    '%s%s', config.dataset.name, record, more)
    stats['corrupt_images_skipped'] = (
        stats.get('corrupt_images_skipped', 0) + int(dropped[i]))
  return batch


def _tfds_stream(*, config, process_index, process_count, start_step,
                 local_batch, spe, include_index, stats) -> Iterator[Batch]:
  """Per-process TFDS stream, rebuilt per epoch with that epoch's seeds."""
  tf = datasets.import_tf(f'TFDS dataset {config.dataset.name!r}')
  tfds = datasets.import_tfds(config.dataset.name)
  builder = datasets.tfds_builder(config)
  split = tfds.even_splits(config.dataset.train_split, n=process_count,
                           drop_remainder=True)[process_index]
  image_key, label_key = datasets.feature_keys(builder, config)
  image_feature = builder.info.features[image_key]
  backend = config.augment.backend
  buffer = max(1, int(config.dataset.shuffle_buffer_multiplier) * local_batch)
  per_epoch = spe * local_batch
  raw_fn = _raw_image_fn(tf, image_feature.shape,
                         datasets.raw_size(config))

  def read(shuffle_seed: int) -> Any:
    # Images stay encoded through the cache and the shuffle buffer (bytes
    # are smaller) and are decoded by `_decode_dropping_corrupt`.
    return builder.as_dataset(
        split=split,
        shuffle_files=True,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed,
                                    add_tfds_id=True, try_autocache=False))

  # A cached base has one file order for the whole run (seeded by the run
  # seed); each epoch still gets its own shuffle-buffer order.
  cached = (read(_seed31(config.seed, 0x1F11E5)).cache()
            if config.dataset.cache else None)

  def parse(ex):
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    index = tf.strings.to_hash_bucket_fast(ex['tfds_id'], 1 << 62)
    marks = {k: ex[k] for k in ('_corrupt', '_corrupt_id')}
    return ex[image_key], label, index, marks

  def raw(image, label, index):
    out = {'images': raw_fn(image), 'labels': label}
    if include_index:
      out['index'] = index
    return out

  step = start_step
  warned = False
  while True:
    epoch, first = divmod(step, spe)
    epoch_seed = _seed31(config.seed, epoch)
    ds = cached if cached is not None else read(epoch_seed)
    ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    # Corrupt images are dropped before positions are counted, so batch k of
    # an epoch is the same whether the run started at 0 or resumed at k (at
    # the price of decoding, not augmenting, the part of the epoch a resume
    # skips).
    ds = _decode_dropping_corrupt(tf, ds, image_feature, image_key)
    # filter, not skip/take: the stream is read to its end, so a cache fills
    # completely (tf.data drops a partially read cache).
    lo, hi = first * local_batch, per_epoch
    ds = ds.enumerate().filter(lambda i, ex: (i >= lo) & (i < hi))
    ds = ds.map(lambda i, ex: parse(ex), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    fn = (_two_views_fn(config, tf, epoch, include_index) if backend == 'tf'
          else raw)

    def with_marks(image, label, index, marks, views_fn=fn):
      return dict(views_fn(image, label, index), **marks)

    ds = ds.map(with_marks, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    expected = spe - first
    skipped_before = stats.get('corrupt_images_skipped', 0)
    for batch in _finish(tf, ds, local_batch).as_numpy_iterator():
      yield _check_corrupt(batch, config, config.dataset.train_split, stats)
      step += 1
      expected -= 1
    if stats.get('corrupt_images_skipped', 0) > skipped_before:
      logging.warning('Epoch %d of %s: skipped %d corrupt images.', epoch,
                      config.dataset.name,
                      stats['corrupt_images_skipped'] - skipped_before)
    if expected > 0:
      # This process's even split is shorter than the global arithmetic
      # assumes (it can happen by one example for splits joined with '+').
      # Move on to the next epoch so the stream never stalls.
      if not warned:
        logging.warning(
            'Epoch %d of %s on process %d ended %d batches early; the stream '
            'continues with the next epoch.', epoch, config.dataset.name,
            process_index, expected)
        warned = True
      step += expected


def _numpy_eval_images(images: np.ndarray, size: int) -> np.ndarray:
  """Evaluation preprocessing of in-memory uint8 images, without TensorFlow.

  Same rule as the released SimCLR code: whole image up to 32 px, else the
  central 87.5%, resized to `size`; floats in [0, 1], no normalisation.
  """
  side = images.shape[1]
  if side > _EVAL_NO_CROP_MAX_SIDE:
    crop = int(round(side * _EVAL_CROP_FRACTION))
    top = (side - crop) // 2
    images = images[:, top:top + crop, top:top + crop]
  out = images.astype(np.float32) / 255.0
  if out.shape[1] != size:
    from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
    out = np.clip(digits.resize_bilinear(out, size), 0.0, 1.0)
  return out.astype(np.float32)


def _tfds_arrays(config: ml_collections.ConfigDict, split: str,
                 max_examples: int | None,
                 image_fn_builder) -> tuple[np.ndarray, np.ndarray]:
  """Reads a TFDS split in file order and maps its images with image_fn."""
  tf = datasets.import_tf(f'TFDS dataset {config.dataset.name!r}')
  builder = datasets.tfds_builder(config)
  datasets.tfds_split_size(builder, config.dataset.name, split)
  tfds = datasets.import_tfds(config.dataset.name)
  image_key, label_key = datasets.feature_keys(builder, config)
  image_feature = builder.info.features[image_key]
  image_fn = image_fn_builder(tf, image_feature.shape)
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      decoders={image_key: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(add_tfds_id=True))
  ds = _decode_dropping_corrupt(tf, ds, image_feature, image_key)
  if max_examples is not None:
    ds = ds.take(max_examples)

  def fn(ex):
    label = (tf.cast(ex[label_key], tf.int32) if label_key
             else tf.constant(-1, tf.int32))
    return {'x': image_fn(ex[image_key]), 'y': label,
            '_corrupt': ex['_corrupt'], '_corrupt_id': ex['_corrupt_id']}

  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(_EVAL_READ_BATCH).prefetch(tf.data.AUTOTUNE)
  xs, ys, stats = [], [], {}
  for batch in ds.as_numpy_iterator():
    batch = _check_corrupt(batch, config, split, stats)
    xs.append(batch['x'])
    ys.append(batch['y'])
  if not xs:
    raise DatasetError(f'Split {split!r} of {config.dataset.name} is empty.')
  return np.concatenate(xs), np.concatenate(ys).astype(np.int32)


def load_eval_arrays(config: ml_collections.ConfigDict, split: str, *,
                     max_examples: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Returns (float32 (N, S, S, 3) in [0, 1], int32 (N,)) for featurising.

  Images get the evaluation preprocessing (no augmentation), in split order.
  In-memory datasets are handled in NumPy (no TensorFlow import); TFDS ones
  with augment.tf_eval. Everything is materialised, so bound `max_examples`
  for large splits.
  """
  size = int(config.dataset.image_size)
  datasets.check_name(config)
  if datasets.is_in_memory(config):
    images, labels = datasets.load_in_memory(config, split)
    if max_examples is not None:
      images, labels = images[:max_examples], labels[:max_examples]
    return _numpy_eval_images(images, size), labels.astype(np.int32)

  def eval_fn(tf, image_shape):
    del tf, image_shape  # augment.tf_eval handles any size.
    from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
    return lambda image: augment.tf_eval(image, size)

  return _tfds_arrays(config, split, max_examples, eval_fn)


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
  datasets.check_name(config)
  if datasets.is_in_memory(config):
    images, labels = datasets.load_in_memory(config, split)
    if max_examples is not None:
      images, labels = images[:max_examples], labels[:max_examples]
    return np.asarray(images), labels.astype(np.int32)
  size = datasets.raw_size(config)
  return _tfds_arrays(config, split, max_examples,
                      lambda tf, shape: _raw_image_fn(tf, shape, size))
