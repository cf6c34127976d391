"""Tests of the input pipeline: digits, sharding, determinism, resume, errors.

TFDS datasets are exercised through `tfds.testing.mock_data` (never a
download): the plain mock for the real cifar10 code path, and a mock whose
examples encode their position in the split, so that per-process shards can be
checked for disjointness and coverage.
"""

import collections
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.data import augment
from simclr_jax.data import datasets
from simclr_jax.data import digits
from simclr_jax.data import pipeline

# Required packages (pyproject.toml): a missing one fails here, not skips.
import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _config(name='digits', backend='jax', batch_size=64, **dataset):
  c = defaults.base_config()
  c.dataset.name = name
  c.augment.backend = backend
  c.batch_size = batch_size
  for k, v in dataset.items():
    c.dataset[k] = v
  return c


def _take(config, n, *, process_index=0, process_count=1, start_step=0):
  it = pipeline.make_pretrain_iterator(
      config, process_index=process_index, process_count=process_count,
      start_step=start_step, include_index=True)
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------- digits --


def test_digits_splits_sizes_classes_stratified_disjoint():
  train_x, train_y = digits.load_digits('train')
  test_x, test_y = digits.load_digits('test')
  assert train_x.shape == (1437, 32, 32, 3) and train_x.dtype == np.uint8
  assert test_x.shape == (360, 32, 32, 3) and test_y.dtype == np.int32
  assert set(train_y) == set(test_y) == set(range(10))
  # Stratified: each class is ~20% test.
  counts_train = np.bincount(train_y, minlength=10)
  counts_test = np.bincount(test_y, minlength=10)
  np.testing.assert_allclose(counts_test / (counts_train + counts_test), 0.2,
                             atol=0.01)
  # Disjoint and complete: train + test is exactly the sklearn data set.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  raw = sk_datasets.load_digits().images * (255.0 / 16.0)
  full = np.clip(np.round(digits.resize_bilinear(raw, 32)), 0, 255)
  key = lambda x: x.astype(np.uint8).tobytes()
  assert (collections.Counter(map(key, train_x[..., 0])) +
          collections.Counter(map(key, test_x[..., 0])) ==
          collections.Counter(map(key, full)))
  # Grey images replicated to 3 channels, full 0..255 range.
  assert (train_x[..., 0] == train_x[..., 2]).all()
  assert train_x.max() == 255 and train_x.min() == 0
  with pytest.raises(ValueError, match='train'):
    digits.load_digits('validation')


def test_resize_bilinear_keeps_constants_and_mean():
  img = np.full((1, 8, 8), 7.0)
  np.testing.assert_allclose(digits.resize_bilinear(img, 32), 7.0)
  x = np.random.default_rng(0).uniform(size=(2, 8, 8))
  y = digits.resize_bilinear(x, 32)
  assert y.shape == (2, 32, 32)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)),
                             atol=0.05)


def test_digits_dataset_info_and_eval_arrays():
  c = _config()
  info = datasets.dataset_info(c)
  assert info == datasets.DatasetInfo('digits', 1437, 10, (32, 32, 3))
  assert pipeline.steps_per_epoch(c, info) == 1437 // 64
  x, y = pipeline.load_eval_arrays(c, 'test')
  assert x.shape == (360, 32, 32, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x, digits.load_digits('test')[0] / 255.0,
                             atol=1e-6)
  np.testing.assert_array_equal(y, digits.load_digits('test')[1])
  x, _ = pipeline.load_eval_arrays(c, 'train', max_examples=5)
  assert x.shape == (5, 32, 32, 3)
  raw, _ = pipeline.load_train_arrays_raw(c)
  assert raw.shape == (1437, 32, 32, 3) and raw.dtype == np.uint8


def _read_eval(config, split, batch_size, **kw):
  """pipeline.eval_batches joined, checking that no chunk is over size."""
  chunks = list(pipeline.eval_batches(config, split, batch_size, **kw))
  assert all(len(x) <= batch_size for x, _ in chunks)
  return (np.concatenate([x for x, _ in chunks]),
          np.concatenate([y for _, y in chunks]))


def _examples(x, y):
  """The examples as a sorted list of (label, pixel bytes): a multiset."""
  return sorted((int(label), image.tobytes()) for image, label in zip(x, y))


def test_in_memory_eval_batches_shuffled_by_seed():
  c = _config()
  x, y = pipeline.load_eval_arrays(c, 'test')  # Split order.
  sx, sy = _read_eval(c, 'test', 100, shuffle_seed=0)
  # Every example of the split once, labels with their images, reordered.
  assert _examples(sx, sy) == _examples(x, y)
  assert not np.array_equal(sy, y)
  again, other = (_read_eval(c, 'test', 64, shuffle_seed=s) for s in (0, 1))
  np.testing.assert_array_equal(again[0], sx)
  assert not np.array_equal(other[1], sy)
  part = _read_eval(c, 'test', 64, shuffle_seed=0, max_examples=50)
  np.testing.assert_array_equal(part[0], sx[:50])


def test_digits_jax_batches():
  batches = _take(_config(batch_size=32), 2)
  b = batches[0]
  assert b['images'].shape == (32, 32, 32, 3) and b['images'].dtype == np.uint8
  assert b['labels'].shape == (32,) and b['labels'].dtype == np.int32
  assert set(b['labels']) <= set(range(10))
  train_x, train_y = digits.load_digits('train')
  np.testing.assert_array_equal(b['images'], train_x[b['index']])
  np.testing.assert_array_equal(b['labels'], train_y[b['index']])
  # Without include_index the trainer gets exactly images and labels.
  it = pipeline.make_pretrain_iterator(_config(batch_size=32), process_index=0,
                                       process_count=1)
  assert set(next(it)) == {'images', 'labels'}


def test_digits_raw_size_resizes_images():
  b = _take(_config(batch_size=8, raw_size=40), 1)[0]
  assert b['images'].shape == (8, 40, 40, 3) and b['images'].dtype == np.uint8


def test_digits_shards_disjoint_cover_and_match_one_process():
  c = _config(batch_size=64)
  spe = 1437 // 64
  one = _take(c, spe + 2)
  two = [_take(c, spe + 2, process_index=p, process_count=2) for p in (0, 1)]
  four = [_take(c, spe, process_index=p, process_count=4) for p in range(4)]
  for step in range(spe + 2):
    for key in ('images', 'labels', 'index'):
      np.testing.assert_array_equal(
          np.concatenate([two[0][step][key], two[1][step][key]]),
          one[step][key])
  epoch = [np.concatenate([b['index'] for b in shard[:spe]])
           for shard in two + four]
  for shards in (epoch[:2], epoch[2:]):
    union = np.concatenate(shards)
    assert len(set(union.tolist())) == len(union) == spe * 64  # Disjoint.
    assert set(union.tolist()) <= set(range(1437))  # Drops the 29 left over.
  # The next epoch is a different order of the same split.
  assert not np.array_equal(one[0]['index'], one[spe]['index'])


def test_digits_determinism_and_resume_jax():
  c = _config(batch_size=128)
  spe = 1437 // 128
  full = _take(c, spe + 4)
  _assert_same_batches(full, _take(c, spe + 4))
  for k in (3, spe, spe + 1):
    _assert_same_batches(full[k:], _take(c, spe + 4 - k, start_step=k))
  for p in (0, 1):
    resumed = _take(c, 3, process_index=p, process_count=2, start_step=spe - 1)
    for step, b in enumerate(resumed, start=spe - 1):
      np.testing.assert_array_equal(b['index'],
                                    full[step]['index'][p * 64:(p + 1) * 64])
  c.seed = 1
  assert not np.array_equal(_take(c, 1)[0]['index'], full[0]['index'])


def test_digits_tf_views_deterministic_resumable():
  c = _config(backend='tf', batch_size=256)
  spe = 1437 // 256
  full = _take(c, spe + 1)
  b = full[0]
  assert b['views'].shape == (256, 2, 32, 32, 3)
  assert b['views'].dtype == np.float32 and b['labels'].dtype == np.int32
  assert 0.0 <= b['views'].min() and b['views'].max() <= 1.0
  # The two views of an image differ, and differ per image.
  diff = np.abs(b['views'][:, 0] - b['views'][:, 1]).mean(axis=(1, 2, 3))
  assert (diff > 1e-3).mean() > 0.95
  np.testing.assert_array_equal(
      b['labels'], digits.load_digits('train')[1][b['index']])
  # Resume across the epoch boundary reproduces views bit for bit.
  _assert_same_batches(full[spe - 1:], _take(c, 2, start_step=spe - 1))
  # Process 1's half of a step is the global batch's second half.
  half = _take(c, 1, process_index=1, process_count=2, start_step=spe)[0]
  for key in ('views', 'labels', 'index'):
    np.testing.assert_array_equal(half[key], full[spe][key][128:])


# ------------------------------------------------------------ TFDS mocks --

_MOCK_SIZES = {'train': 64, 'test': 24}


def _split_range(split):
  """[lo, hi) of a plain or tfds.even_splits split (drop_remainder)."""
  if isinstance(split, str):
    return split, 0, _MOCK_SIZES[split]
  name, lo, hi = _split_range(split.split)
  per = (hi - lo) // split.count
  return name, lo + split.index * per, lo + (split.index + 1) * per


def _indexed_as_dataset(self, split, decoders=None, read_config=None, **kw):
  """A mock cifar10 whose example i of a split has all pixels = i, label i%10.

  Unlike the default mock it honours the (even) split it is given, so the
  per-process shards are real slices of one split.
  """
  del self, kw
  name, lo, hi = _split_range(split)

  def make(i):
    image = tf.fill([32, 32, 3], tf.cast(i, tf.uint8))
    if decoders and 'image' in decoders:
      image = tf.io.encode_png(image)
    ex = {'id': tf.strings.as_string(i), 'image': image, 'label': i % 10}
    if read_config is not None and read_config.add_tfds_id:
      prefix = f'cifar10-{name}.tfrecord-00000-of-00001__'
      ex['tfds_id'] = tf.strings.join([prefix, tf.strings.as_string(i)])
    return ex

  return tf.data.Dataset.range(lo, hi).map(make)


def _tfds_id_hash(name, i):
  s = f'cifar10-{name}.tfrecord-00000-of-00001__{i}'
  return int(tf.strings.to_hash_bucket_fast(s, 1 << 62))


@pytest.fixture(name='indexed_cifar')
def _indexed_cifar():
  with tfds.testing.mock_data(as_dataset_fn=_indexed_as_dataset):
    yield


@pytest.fixture(name='plain_cifar')
def _plain_cifar():
  with tfds.testing.mock_data(num_examples=64):
    yield


def _cifar(backend='jax', batch_size=16, **dataset):
  dataset.setdefault('data_dir', '/nonexistent/tfds')
  return _config('cifar10', backend, batch_size, **dataset)


def test_tfds_mock_batches_both_backends(plain_cifar):
  del plain_cifar
  info = datasets.dataset_info(_cifar())
  assert (info.num_train_examples, info.num_classes) == (64, 10)
  raw = _take(_cifar('jax'), 2)[1]
  assert raw['images'].shape == (16, 32, 32, 3)
  assert raw['images'].dtype == np.uint8
  assert raw['labels'].dtype == np.int32 and raw['index'].dtype == np.int64
  views = _take(_cifar('tf'), 1)[0]
  assert views['views'].shape == (16, 2, 32, 32, 3)
  assert views['views'].dtype == np.float32
  assert 0.0 <= views['views'].min() and views['views'].max() <= 1.0
  assert not np.allclose(views['views'][:, 0], views['views'][:, 1])
  small = _take(_cifar('jax', raw_size=24), 1)[0]
  assert small['images'].shape == (16, 24, 24, 3)
  x, y = pipeline.load_eval_arrays(_cifar(), 'test', max_examples=10)
  assert x.shape == (10, 32, 32, 3) and x.dtype == np.float32
  assert y.dtype == np.int32 and 0.0 <= x.min() and x.max() <= 1.0


def test_tfds_shards_disjoint_and_cover_split(indexed_cifar):
  del indexed_cifar
  c = _cifar(batch_size=16)  # 64 examples: 4 steps per epoch.
  one = _take(c, 4)
  seen = np.concatenate([b['images'][:, 0, 0, 0] for b in one])
  assert sorted(seen.tolist()) == list(range(64))
  for b in one:  # Labels travel with their images.
    np.testing.assert_array_equal(b['labels'], b['images'][:, 0, 0, 0] % 10)
  shards = []
  for p in (0, 1):
    batches = _take(c, 4, process_index=p, process_count=2)
    assert all(b['images'].shape[0] == 8 for b in batches)
    shards.append(np.concatenate([b['images'][:, 0, 0, 0] for b in batches]))
    ids = np.concatenate([b['index'] for b in batches])
    assert set(ids.tolist()) == {_tfds_id_hash('train', i) for i in shards[p]}
  assert not set(shards[0].tolist()) & set(shards[1].tolist())
  assert sorted(np.concatenate(shards).tolist()) == list(range(64))
  # even_splits: process p reads the p-th contiguous slice of the split.
  assert set(shards[0].tolist()) == set(range(32))
  x, y = pipeline.load_eval_arrays(c, 'test')
  assert x.shape == (24, 32, 32, 3)
  np.testing.assert_array_equal(y, np.arange(24) % 10)


@pytest.mark.parametrize('cache', [True, False])
def test_tfds_determinism_and_resume(indexed_cifar, cache):
  del indexed_cifar
  c = _cifar(batch_size=16, cache=cache)
  full = _take(c, 7)
  _assert_same_batches(full, _take(c, 7))
  for k in (2, 4, 5):  # Mid-epoch, at and past the epoch boundary.
    _assert_same_batches(full[k:], _take(c, 7 - k, start_step=k))
  # Every epoch is a new order of the whole split.
  epochs = [np.concatenate([b['images'][:, 0, 0, 0] for b in full[:4]])]
  epochs.append(np.concatenate([b['images'][:, 0, 0, 0]
                                for b in _take(c, 4, start_step=4)]))
  assert sorted(epochs[1].tolist()) == list(range(64))
  assert not np.array_equal(epochs[0], epochs[1])


def test_tfds_eval_batches_shuffled_in_a_bounded_buffer(indexed_cifar):
  del indexed_cifar
  c = _cifar(shuffle_buffer_multiplier=1)  # A buffer of one 8-row batch.

  def rows(seed):
    x, y = _read_eval(c, 'train', 8, shuffle_seed=seed)
    ids = np.rint(x[:, 0, 0, 0] * 255).astype(int)  # Example i is all i.
    np.testing.assert_array_equal(y, ids % 10)
    return ids

  ids = rows(3)
  assert sorted(ids.tolist()) == list(range(64))
  assert not np.array_equal(ids, np.arange(64))
  np.testing.assert_array_equal(rows(3), ids)
  assert not np.array_equal(rows(4), ids)
  # The mock reads in split order, so the output at position j can only be
  # one of the first j + 8 examples read.
  assert (ids < np.arange(64) + 8).all()


def test_tfds_tf_views_resume(plain_cifar):
  del plain_cifar
  c = _cifar('tf', batch_size=16)
  full = _take(c, 5)
  _assert_same_batches(full[3:], _take(c, 2, start_step=3))


def test_prepared_tfds_data_dir(tmp_path):
  """The un-mocked path: real TFRecord shards, file shuffling, even_splits."""

  class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes a small dataset where `tfds.builder('cifar10')` will find it."""
    name = 'cifar10'
    VERSION = tfds.core.Version('3.0.2')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'id': tfds.features.Text(),
              'image': tfds.features.Image(shape=(32, 32, 3)),
              'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(100),
              'test': self._generate_examples(30)}

    def _generate_examples(self, n):
      for i in range(n):
        image = np.full((32, 32, 3), i, np.uint8)
        yield str(i), {'id': str(i), 'image': image, 'label': i % 10}

  tfds.disable_progress_bar()
  FakeCifar10(data_dir=str(tmp_path),
              file_format='tfrecord').download_and_prepare(
                  download_config=tfds.download.DownloadConfig(num_shards=4))
  c = _cifar(batch_size=16, data_dir=str(tmp_path))
  assert datasets.dataset_info(c).num_train_examples == 100
  pixel = lambda batches: np.concatenate([b['images'][:, 0, 0, 0]
                                          for b in batches])
  spe = 100 // 16
  full = _take(c, spe + 2)
  assert len(set(pixel(full[:spe]).tolist())) == spe * 16
  _assert_same_batches(full[spe - 1:], _take(c, 3, start_step=spe - 1))
  shards = [set(pixel(_take(c, spe, process_index=p, process_count=2)))
            for p in (0, 1)]
  assert not shards[0] & shards[1]
  assert len(shards[0] | shards[1]) == spe * 16
  with pytest.raises(datasets.DatasetError, match="no split 'validation'"):
    pipeline.load_eval_arrays(c, 'validation')


def test_resize_crop_keeps_centre_and_aspect():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 200  # Central square of the wide image.
  out = augment.resize_centre_crop(tf.constant(image), 20).numpy()
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  # Bicubic rings by a few levels at the square's edges; a wrong crop would
  # bring in the black sides.
  assert np.abs(out[:, 1:-1].astype(int) - 200).max() <= 5


# ----------------------------------------------------------------- errors --


def test_missing_tfds_dataset_error_says_how_to_prepare(tmp_path):
  c = _cifar(data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetError) as e:
    datasets.dataset_info(c)
  msg = str(e.value)
  assert '\n' not in msg
  assert 'cifar10' in msg and str(tmp_path) in msg
  assert f'tfds build cifar10 --data_dir={tmp_path}' in msg
  with pytest.raises(datasets.DatasetError, match='not prepared'):
    pipeline.make_pretrain_iterator(c, process_index=0, process_count=1)
  c.dataset.name = 'imagenet2012'
  with pytest.raises(datasets.DatasetError) as e:
    datasets.dataset_info(c)
  manual = os.path.join(str(tmp_path), 'downloads', 'manual')
  assert 'ILSVRC2012_img_train.tar' in str(e.value)
  assert (f'tfds build imagenet2012 --data_dir={tmp_path} '
          f'--manual_dir={manual}') in str(e.value)


def test_any_tfds_dataset_by_name_finds_its_features():
  # Real TFDS metadata (from the dataset code; nothing is prepared here).
  cases = {'food101': ('image', 'label'), 'oxford_flowers102:2.1.1':
           ('image', 'label'), 'caltech_birds2011': ('image', 'label'),
           'lsun/classroom': ('image', None)}
  for name, keys in cases.items():
    c = _config(name, data_dir='/nonexistent/tfds')
    assert datasets.source_for(c).feature_keys() == keys, name
  c = _config('caltech_birds2011', data_dir='/nonexistent/tfds',
              image_key='segmentation_mask')
  assert datasets.source_for(c).feature_keys()[0] == (
      'segmentation_mask')
  c.dataset.label_key = 'labels'
  with pytest.raises(datasets.DatasetError, match="no such feature"):
    datasets.source_for(c).feature_keys()


def test_unlabelled_and_versioned_tfds_datasets_stream():
  with tfds.testing.mock_data(num_examples=32):
    c = _config('lsun/classroom', batch_size=8, data_dir='/nonexistent/tfds',
                image_size=16)
    info = datasets.dataset_info(c)
    assert info.num_classes == 0 and not info.labelled
    batch = _take(c, 1)[0]
    assert batch['images'].shape == (8, 16, 16, 3)
    assert (batch['labels'] == -1).all()
    c = _config('svhn_cropped:3.1.0', batch_size=8,
                data_dir='/nonexistent/tfds')
    assert datasets.dataset_info(c).num_classes == 10
    assert _take(c, 1)[0]['labels'].max() < 10
    # A grey dataset reads as RGB, for training and for evaluation.
    c = _config('mnist', batch_size=8, data_dir='/nonexistent/tfds',
                image_size=16)
    images = _take(c, 1)[0]['images']
    assert images.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    x, _ = pipeline.load_eval_arrays(c, 'test')
    assert x.shape[1:] == (16, 16, 3)


def test_unknown_dataset_and_bad_batch_errors(tmp_path):
  # Any TFDS name is accepted; one that is not prepared says how to build it.
  c = _config('mnist')
  c.dataset.data_dir = str(tmp_path)
  with pytest.raises(datasets.DatasetError,
                     match=f'tfds build mnist --data_dir={tmp_path}'):
    datasets.dataset_info(c)
  # A name TFDS does not know: one line naming it and the two ways out.
  with pytest.raises(datasets.DatasetError) as e:
    datasets.dataset_info(_config('no_such_images'))
  message = str(e.value)
  assert "Unknown dataset 'no_such_images'" in message and '\n' not in message
  assert "dataset.name='folder'" in message and 'prepare_data' in message
  with pytest.raises(datasets.DatasetError, match='multiple of the process'):
    pipeline.make_pretrain_iterator(_config(batch_size=30), process_index=0,
                                    process_count=4)
  with pytest.raises(datasets.DatasetError, match='larger than'):
    pipeline.make_pretrain_iterator(_config(batch_size=2048), process_index=0,
                                    process_count=1)
  assert issubclass(datasets.DatasetError, ValueError)


def test_synthetic_dataset():
  c = _config('synthetic', batch_size=32, image_size=16)
  c.dataset.num_examples = 96
  info = datasets.dataset_info(c)
  assert (info.num_train_examples, info.num_classes) == (96, 10)
  assert info.image_shape == (16, 16, 3)
  b = _take(c, 4)[3]
  assert b['images'].shape == (32, 16, 16, 3) and b['images'].dtype == np.uint8
  x, _ = pipeline.load_eval_arrays(c, 'test')
  assert x.shape == (24, 16, 16, 3) and x.dtype == np.float32


def test_digits_jax_path_without_tensorflow():
  code = textwrap.dedent("""
      import sys
      sys.modules['tensorflow'] = None  # `import tensorflow` now fails.
      from simclr_jax.config import defaults
      from simclr_jax.data import datasets, pipeline
      c = defaults.base_config()
      c.augment.backend = 'jax'
      c.batch_size = 16
      it = pipeline.make_pretrain_iterator(c, process_index=0, process_count=1)
      b = next(it)
      assert b['images'].shape == (16, 32, 32, 3), b['images'].shape
      x, _ = pipeline.load_eval_arrays(c, 'test')
      assert x.shape == (360, 32, 32, 3)
      c.augment.backend = 'tf'
      try:
        pipeline.make_pretrain_iterator(c, process_index=0, process_count=1)
        raise AssertionError('expected DatasetError')
      except datasets.DatasetError as e:
        assert 'TensorFlow is not installed' in str(e), e
        assert "augment.backend='jax'" in str(e), e
      assert sys.modules['tensorflow'] is None
      assert 'tensorflow_datasets' not in sys.modules
      print('OK')
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize('backend', ['jax', 'tf'])
def test_tfds_in_memory_gives_row_ids_of_the_split(indexed_cifar, backend):
  """dataset.in_memory: the TFDS train split is indexed by row id, the rows
  of load_eval_arrays' file order (what DeepCluster featurises)."""
  del indexed_cifar
  c = _cifar(backend, batch_size=16, in_memory=True)
  batches = _take(c, 4)  # One epoch of 64 examples.
  ids = np.concatenate([b['index'] for b in batches])
  assert sorted(ids.tolist()) == list(range(64))
  np.testing.assert_array_equal(
      np.concatenate([b['labels'] for b in batches]), ids % 10)
  if backend == 'jax':  # Example i is filled with the value i.
    np.testing.assert_array_equal(
        np.concatenate([b['images'][:, 0, 0, 0] for b in batches]), ids)
  _, y = pipeline.load_eval_arrays(c, 'train')
  np.testing.assert_array_equal(y[ids], ids % 10)
  # Two processes: disjoint rows covering the epoch.
  shards = [np.concatenate([b['index'] for b in _take(
      c, 4, process_index=p, process_count=2)]) for p in (0, 1)]
  assert not set(shards[0].tolist()) & set(shards[1].tolist())
  assert sorted(np.concatenate(shards).tolist()) == list(range(64))
  # The method that needs it accepts the dataset only this way.
  from simclr_jax.config import validation  # pylint: disable=g-import-not-at-top
  c.method = 'deepcluster'
  c.deepcluster.num_clusters = 10
  validation.validate(c, num_devices=8)
  c.dataset.in_memory = False
  with pytest.raises(validation.ConfigError, match='in_memory=True'):
    validation.validate(c, num_devices=8)
