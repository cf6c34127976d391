"""TFDS datasets (and prepared image folders) read with tf.data.

Any TFDS image dataset by name (and optionally version): cifar10,
imagenet2012, food101, 'oxford_flowers102:2.1.1', ... read from a prepared
`data_dir`, or the TFRecords `python -m simclr_jax.prepare_data` wrote for an
image folder (`tfds.builder_from_directory`). The image and label features
are found in the builder's info (`feature_keys`); a dataset without labels is
pretrained on and its probes are skipped. No machine here reaches the
internet, so a missing dataset is an error that says how to prepare it,
never a download.

Each process reads only its own even share of the pretraining split
(`tfds.even_splits`, as `tfds.split_for_jax_process` does). Images stay
encoded through the shuffle buffer and are decoded by
`_decode_dropping_corrupt`, so one bad file is skipped and named instead of
stopping a pod.
"""

import os
from collections.abc import Iterator
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from simclr_jax.data import in_memory
from simclr_jax.data import streams
from simclr_jax.data.base import Batch
from simclr_jax.data.base import DataSource
from simclr_jax.data.base import DatasetError
from simclr_jax.data.base import DatasetInfo
from simclr_jax.data.base import import_tf
from simclr_jax.data.base import import_tfds
from simclr_jax.data.base import raw_size

# ImageNet cannot be downloaded by TFDS; its tars go to DIR/downloads/manual.
_MANUAL_DOWNLOAD = ('imagenet2012', 'imagenet2012_subset/1pct',
                    'imagenet2012_subset/10pct')
_IMAGENET_TARS = 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'
# The downstream modes hold a train split as raw arrays up to this size
# (CIFAR-10: 150 MB, STL-10 train: 28 MB) and stream it with tf.data beyond
# (ImageNet's 1.28M images at 224 px: 190 GB).
_HOST_ARRAY_LIMIT_BYTES = 8 << 30


def _prepare_hint(name: str, data_dir: str) -> str:
  """The command that prepares `name` in `data_dir` (as the user runs it)."""
  if name in _MANUAL_DOWNLOAD:
    manual = os.path.join(data_dir, 'downloads', 'manual')
    return (f'put {_IMAGENET_TARS} in {manual}, then run `tfds build {name} '
            f'--data_dir={data_dir} --manual_dir={manual}`')
  return (f'run `tfds build {name} --data_dir={data_dir}` on a machine with '
          'internet access (or copy a prepared TFDS data_dir there)')


def _unknown_hint(name: str, tfds: Any, builtin: tuple[str, ...]) -> str:
  return (f'Unknown dataset {name!r}: not one of {", ".join(builtin)} and '
          f'not a dataset of tensorflow-datasets {tfds.__version__}; check '
          "the name (e.g. 'food101', 'svhn_cropped', "
          "'oxford_flowers102:2.1.1'), or for your own images set "
          "dataset.name='folder' and dataset.folder=PATH (large folders: "
          '`python -m simclr_jax.prepare_data --folder=PATH --out=DIR`, then '
          'dataset.folder=DIR).')


def _has_metadata(builder: Any) -> bool:
  """Whether the builder's split sizes come from prepared metadata (a
  prepared dataset, or a prepared image folder's read-only builder)."""
  return builder.is_prepared() or type(builder).__name__ == 'ReadOnlyBuilder'


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


class TfdsSource(DataSource):
  """A TFDS dataset by name, or a prepared image folder by directory.

  Args:
    config: the run config.
    directory: a prepared image folder (prepare_data's output) to read
      instead of the TFDS dataset config.dataset.name.
    builtin: the names of the other kinds, for the unknown-name message.
  """

  def __init__(self, config: ml_collections.ConfigDict, directory: str = '',
               builtin: tuple[str, ...] = ()):
    super().__init__(config)
    self.directory = directory
    self._builtin = builtin
    self._builder = None
    self.slices_splits = True
    # Pretraining indexes the train split by row id only when asked (small
    # datasets; DeepCluster's per-image pseudo-labels need it).
    self.holds_arrays = bool(config.dataset.get('in_memory', False))

  # --- metadata ---------------------------------------------------------

  @property
  def tfds(self) -> Any:
    return import_tfds(self.name)

  def builder(self) -> Any:
    """The TFDS builder (name[:version] in data_dir, or the prepared
    folder). Constructing one reads only metadata, never downloads."""
    if self._builder is None:
      tfds = self.tfds
      if self.directory:
        self._builder = tfds.builder_from_directory(self.directory)
      else:
        try:
          self._builder = tfds.builder(self.name,
                                       data_dir=self.config.dataset.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
          raise DatasetError(_unknown_hint(self.name, tfds,
                                           self._builtin)) from e
    return self._builder

  @property
  def grey(self) -> bool:
    """One stored channel (MNIST, Fashion-MNIST in TFDS)."""
    shape = self.builder().info.features[self.feature_keys()[0]].shape
    return bool(shape) and shape[-1] == 1

  def feature_keys(self) -> tuple[str, str | None]:
    """(image feature, label feature or None).

    config.dataset.image_key / label_key when set; otherwise 'image' (or the
    only Image feature) and 'label' (or the only ClassLabel feature). A
    dataset without a class label is unlabelled.
    """
    tfds = self.tfds
    features = self.builder().info.features
    d = self.config.dataset

    def pick(key_field: str, preferred: str, kind: Any) -> str | None:
      key = d.get(key_field, '')
      if key:
        if key not in features:
          raise DatasetError(
              f'config.dataset.{key_field}={key!r}: {d.name} has no such '
              f'feature; its features: {sorted(features.keys())}.')
        return key
      if preferred in features and isinstance(features[preferred], kind):
        return preferred
      found = [k for k in features.keys() if isinstance(features[k], kind)]
      return found[0] if len(found) == 1 else None

    image = pick('image_key', 'image', tfds.features.Image)
    if image is None:
      raise DatasetError(
          f'Dataset {d.name!r} has no single image feature (its features: '
          f'{sorted(features.keys())}); set config.dataset.image_key.')
    return image, pick('label_key', 'label', tfds.features.ClassLabel)

  def splits(self):
    builder = self.builder()
    return sorted(builder.info.splits.keys()) if _has_metadata(builder) else []

  def split_size(self, split: Any) -> int:
    """Examples in `split`, checking that the data is there.

    A prepared dataset knows its split sizes. An unprepared one normally
    cannot be read at all, which is the error we report; but under
    `tfds.testing.mock_data` it can be read without metadata, so we fall back
    to the cardinality of the (mocked) split rather than refusing to run the
    tests.
    """
    builder = self.builder()
    data_dir = builder.data_dir_root
    if _has_metadata(builder):
      try:
        return int(builder.info.splits[split].num_examples)
      except (KeyError, ValueError, AssertionError) as e:
        raise DatasetError(
            f'Dataset {self.name!r} has no split {split!r}; available splits: '
            f'{sorted(builder.info.splits.keys())}.') from e
    try:
      count = int(builder.as_dataset(split=split).cardinality())
    except Exception as e:  # pylint: disable=broad-except
      # TFDS raises AssertionError (no data) or others depending on version.
      raise DatasetError(
          f'Dataset {self.name!r} is not prepared in data_dir={data_dir}: '
          f'{_prepare_hint(self.name, data_dir)}.') from e
    if count < 0:
      raise DatasetError(
          f'Dataset {self.name!r} in data_dir={data_dir} has no known size for '
          f'split {split!r}: {_prepare_hint(self.name, data_dir)}.')
    return count

  def info(self) -> DatasetInfo:
    num_train = self.split_size(self.config.dataset.train_split)
    image_key, label_key = self.feature_keys()
    features = self.builder().info.features
    return DatasetInfo(
        name=self.name, num_train_examples=num_train,
        num_classes=(int(features[label_key].num_classes) if label_key else 0),
        image_shape=tuple(features[image_key].shape))

  def fits_in_memory(self) -> bool:
    """Whether the downstream modes hold the train split as raw arrays."""
    if self.holds_arrays:
      return True
    side = raw_size(self.config)
    n = self.split_size(self.config.dataset.train_split)
    return n * side * side * 3 <= _HOST_ARRAY_LIMIT_BYTES

  # --- reading a split in batches -----------------------------------------

  def _batches(self, split: str, max_examples: int | None, image_fn_builder,
               batch_size: int, shuffle_seed: int | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split in file order (or a seeded shuffled order), images mapped by
    image_fn, in batches.

    Shuffled, the files are read in an order drawn from `shuffle_seed`,
    one example from each interleaved file in turn, so that files holding
    one class each (prepare_data writes an image folder in path order) mix;
    a shuffle buffer of dataset.shuffle_buffer_multiplier x batch_size
    examples, held encoded, mixes them further. The buffer bounds host
    memory whatever the size of the split, as in the pretraining stream;
    a split larger than it is shuffled locally, not uniformly.
    """
    tf = import_tf(f'TFDS dataset {self.name!r}')
    tfds = self.tfds
    self.split_size(split)  # Fails with the prepare hint if not there.
    image_key, label_key = self.feature_keys()
    image_feature = self.builder().info.features[image_key]
    image_fn = image_fn_builder(tf, image_feature.shape)
    shuffled = shuffle_seed is not None
    if shuffled:
      # Read once per seed: an autocache (of a small split) would only
      # cost memory.
      read_config = tfds.ReadConfig(
          shuffle_seed=int(shuffle_seed), add_tfds_id=True,
          try_autocache=False, interleave_block_length=1)
    else:
      read_config = tfds.ReadConfig(add_tfds_id=True)
    ds = self.builder().as_dataset(
        split=split, shuffle_files=shuffled,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=read_config)
    if shuffled:
      buffer = int(self.config.dataset.shuffle_buffer_multiplier) * batch_size
      ds = ds.shuffle(max(1, buffer), seed=int(shuffle_seed),
                      reshuffle_each_iteration=False)
    ds = _decode_dropping_corrupt(tf, ds, image_feature, image_key)
    if max_examples is not None:
      ds = ds.take(max_examples)

    def fn(ex):
      label = (tf.cast(ex[label_key], tf.int32) if label_key
               else tf.constant(-1, tf.int32))
      return {'x': image_fn(ex[image_key]), 'y': label,
              '_corrupt': ex['_corrupt'], '_corrupt_id': ex['_corrupt_id']}

    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(2)
    stats, empty = {}, True
    for batch in ds.as_numpy_iterator():
      batch = _check_corrupt(batch, self.config, split, stats)
      empty = False
      yield batch['x'], batch['y'].astype(np.int32)
    if empty:
      raise DatasetError(f'Split {split!r} of {self.name} is empty.')

  def eval_batches(self, split, batch_size, max_examples=None,
                   shuffle_seed=None):
    size = int(self.config.dataset.image_size)

    def eval_fn(tf, image_shape):
      del tf, image_shape  # augment.tf_eval handles any size.
      from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
      return lambda image: augment.tf_eval(image, size)

    return self._batches(split, max_examples, eval_fn, batch_size,
                         shuffle_seed)

  def raw_arrays(self, split, max_examples=None):
    size = raw_size(self.config)
    chunks = list(self._batches(
        split, max_examples,
        lambda tf, shape: streams.raw_image_fn(tf, shape, size), 256))
    return (np.concatenate([x for x, _ in chunks]),
            np.concatenate([y for _, y in chunks]))

  # --- streams ------------------------------------------------------------

  def pretrain_stream(self, *, process_index, process_count, start_step,
                      local_batch, spe, include_index, stats):
    if self.holds_arrays:
      images, labels = _train_arrays(self)
      return in_memory.array_pretrain_stream(
          self.config, images, labels, process_index=process_index,
          start_step=start_step, local_batch=local_batch, spe=spe,
          include_index=include_index)
    return self._tfds_stream(
        process_index=process_index, process_count=process_count,
        start_step=start_step, local_batch=local_batch, spe=spe,
        include_index=include_index, stats=stats)

  def _tfds_stream(self, *, process_index, process_count, start_step,
                   local_batch, spe, include_index, stats) -> Iterator[Batch]:
    """Per-process TFDS stream, rebuilt per epoch with that epoch's seeds."""
    config = self.config
    tf = import_tf(f'TFDS dataset {self.name!r}')
    tfds = self.tfds
    builder = self.builder()
    split = tfds.even_splits(config.dataset.train_split, n=process_count,
                             drop_remainder=True)[process_index]
    image_key, label_key = self.feature_keys()
    image_feature = builder.info.features[image_key]
    backend = config.augment.backend
    buffer = max(1, int(config.dataset.shuffle_buffer_multiplier) * local_batch)
    per_epoch = spe * local_batch
    raw_fn = streams.raw_image_fn(tf, image_feature.shape, raw_size(config))

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
    cached = (read(streams.seed31(config.seed, 0x1F11E5)).cache()
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
      epoch_seed = streams.seed31(config.seed, epoch)
      ds = cached if cached is not None else read(epoch_seed)
      ds = ds.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
      # Corrupt images are dropped before positions are counted, so batch k
      # of an epoch is the same whether the run started at 0 or resumed at k
      # (at the price of decoding, not augmenting, the part of the epoch a
      # resume skips).
      ds = _decode_dropping_corrupt(tf, ds, image_feature, image_key)
      # filter, not skip/take: the stream is read to its end, so a cache
      # fills completely (tf.data drops a partially read cache).
      lo, hi = first * local_batch, per_epoch
      ds = ds.enumerate().filter(lambda i, ex: (i >= lo) & (i < hi))
      ds = ds.map(lambda i, ex: parse(ex), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
      fn = (streams.two_views_fn(config, tf, epoch, include_index)
            if backend == 'tf' else raw)

      def with_marks(image, label, index, marks, views_fn=fn):
        return dict(views_fn(image, label, index), **marks)

      ds = ds.map(with_marks, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
      expected = spe - first
      skipped_before = stats.get('corrupt_images_skipped', 0)
      for batch in streams.finish(tf, ds, local_batch).as_numpy_iterator():
        yield _check_corrupt(batch, config, config.dataset.train_split, stats)
        step += 1
        expected -= 1
      if stats.get('corrupt_images_skipped', 0) > skipped_before:
        logging.warning('Epoch %d of %s: skipped %d corrupt images.', epoch,
                        self.name,
                        stats['corrupt_images_skipped'] - skipped_before)
      if expected > 0:
        # This process's even split is shorter than the global arithmetic
        # assumes (it can happen by one example for splits joined with '+').
        # Move on to the next epoch so the stream never stalls.
        if not warned:
          logging.warning(
              'Epoch %d of %s on process %d ended %d batches early; the stream '
              'continues with the next epoch.', epoch, self.name,
              process_index, expected)
          warned = True
        step += expected

  def labelled_stream(self, split, *, global_batch, seed, process_index,
                      process_count, start_step, with_labels=True):
    """Host-local crop + flip views streamed from `split` with tf.data.

    Each process reads its own even share of the split. Views are seeded by
    (seed, position in this process's stream), so a run is repeatable.
    `with_labels=False` marks every label -1 (unlabelled data for
    distillation).
    """
    from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
    config = self.config
    tf = import_tf(f'TFDS dataset {self.name!r}')
    tfds = self.tfds
    self.split_size(split)  # Fails if not prepared.
    image_key, label_key = self.feature_keys()
    local = global_batch // process_count
    part = tfds.even_splits(split, n=process_count,
                            drop_remainder=True)[process_index]
    size = int(config.dataset.image_size)
    ds = self.builder().as_dataset(
        split=part, shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=seed))
    buffer = max(1, int(config.dataset.shuffle_buffer_multiplier) * local)
    # Skipping before the map keeps each view's seed (its stream position),
    # so a run resumed at `start_step` sees the batches the uninterrupted
    # run saw.
    ds = ds.repeat().shuffle(buffer, seed=seed).enumerate().skip(
        start_step * local)
    process_seed = int(seed) * 1000003 + process_index
    keep_labels = with_labels and label_key is not None

    def fn(i, ex):
      view_seed = tf.stack([tf.constant(process_seed, tf.int64), i])
      label = (tf.cast(ex[label_key], tf.int32) if keep_labels
               else tf.constant(-1, tf.int32))
      return {'views': augment.tf_finetune_view(
          ex[image_key], size, seed=view_seed,
          crop_min_area=config.augment.finetune_crop_min_area,
          flip=config.augment.finetune_flip),
              'labels': label}

    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()


_TRAIN_ARRAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _train_arrays(source: TfdsSource) -> tuple[np.ndarray, np.ndarray]:
  """The pretraining split as (uint8 images, labels), indexed by row id.

  Read once per process, in file order at raw_size pixels (the order
  `eval_batches` reads it in, so a row id means the same image to a method
  featurising the split).
  """
  d = source.config.dataset
  key = (d.name, d.data_dir, source.directory, d.train_split,
         raw_size(source.config))
  if key not in _TRAIN_ARRAYS:
    _TRAIN_ARRAYS[key] = source.raw_arrays(d.train_split)
  return _TRAIN_ARRAYS[key]
