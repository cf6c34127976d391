"""Fashion-MNIST read from IDX files: small files written here in the format
Debian's dataset-fashion-mnist installs, read by the loader the recipe uses.
"""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.data import datasets
from simclr_jax.data import fashion_mnist
from conftest import ROOT

RECIPE = os.path.join(ROOT, 'configs', 'fashion_mnist.py')


def _write_raw_idx(path, array):
  """IDX by hand (struct, not the project's writer): magic 0x0803/0x0801,
  big-endian dimensions, then the bytes."""
  header = struct.pack('>I', 0x800 | array.ndim) + b''.join(
      struct.pack('>I', d) for d in array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  """train: 50 images, test: 20; gzipped train, plain test (both occur)."""
  d = tmp_path_factory.mktemp('fmnist')
  rng = np.random.default_rng(0)
  data = {}
  for split, prefix, n, gz in (('train', 'train', 50, '.gz'),
                               ('test', 't10k', 20, '')):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    _write_raw_idx(str(d / f'{prefix}-images-idx3-ubyte{gz}'), images)
    _write_raw_idx(str(d / f'{prefix}-labels-idx1-ubyte{gz}'), labels)
    data[split] = (images, labels)
  return str(d), data


def _config(directory, **dataset):
  c = defaults.base_config()
  c.dataset.name = 'fashion_mnist'
  c.dataset.image_size = 28
  c.dataset.fashion_mnist_dir = directory
  c.dataset.update(dataset)
  return c


def test_reads_idx_files_as_grey_replicated_to_rgb(idx_dir):
  directory, data = idx_dir
  source = datasets.source_for(_config(directory))
  info = source.info()
  assert (info.num_train_examples, info.num_classes,
          info.image_shape) == (50, 10, (28, 28, 3))
  assert source.splits() == ['train', 'test']
  for split, (grey, labels) in data.items():
    images, y = source.raw_arrays(split)
    assert images.dtype == np.uint8 and y.dtype == np.int32
    for channel in range(3):
      np.testing.assert_array_equal(images[..., channel], grey)
    np.testing.assert_array_equal(y, labels)


def test_write_idx_round_trips_and_matches_the_hand_written_bytes(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  ours, theirs = str(tmp_path / 'a.gz'), str(tmp_path / 'b.gz')
  fashion_mnist.write_idx(ours, array)
  _write_raw_idx(theirs, array)
  assert gzip.open(ours).read() == gzip.open(theirs).read()


@pytest.mark.parametrize('split,rows', [
    ('train[:40]', slice(0, 40)), ('train[40:]', slice(40, 50)),
    ('train[-10:]', slice(40, 50)), ('train[:80%]', slice(0, 40)),
    ('train[80%:]', slice(40, 50)), ('train[10%:30%]', slice(5, 15)),
    ('train[-20%:]', slice(40, 50))])
def test_slices_carve_a_validation_split_from_train(idx_dir, split, rows):
  directory, data = idx_dir
  source = datasets.source_for(_config(directory, train_split=split))
  images, labels = source.raw_arrays(split)
  np.testing.assert_array_equal(images[..., 0], data['train'][0][rows])
  np.testing.assert_array_equal(labels, data['train'][1][rows])
  assert source.info().num_train_examples == len(labels)
  assert source.split_size(split) == len(labels)


def test_validation_recipe_never_reads_the_test_split():
  """configs/fashion_mnist.py:validation pretrains and evaluates inside the
  training split, on disjoint rows that cover it."""
  c = defaults.load_recipe(RECIPE, 'validation')
  train, held = c.dataset.train_split, c.dataset.eval_split
  assert train.startswith('train[') and held.startswith('train[')
  from simclr_jax.data import in_memory  # pylint: disable=g-import-not-at-top
  a = in_memory.slice_bounds(train[len('train['):-1], 60000)
  b = in_memory.slice_bounds(held[len('train['):-1], 60000)
  assert a == (0, 50000) and b == (50000, 60000)


@pytest.mark.parametrize('bad', ['train[7:3]', 'validation'])
def test_bad_splits_say_what_exists(idx_dir, bad):
  directory, _ = idx_dir
  with pytest.raises(datasets.DatasetError, match='train'):
    datasets.source_for(_config(directory)).raw_arrays(bad)


def test_corrupt_file_is_named(tmp_path):
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(b'\x00\x00\x08\x01' +
                                                     b'\x00' * 8)
  (tmp_path / 'train-labels-idx1-ubyte').write_bytes(b'\x00\x00\x08\x01')
  with pytest.raises(datasets.DatasetError,
                     match='train-images-idx3-ubyte is not an IDX file'):
    datasets.source_for(_config(str(tmp_path))).info()


def test_missing_files_end_the_run_with_one_line(tmp_path):
  """No files: one `error:` line naming the apt package and the field."""
  proc = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', f'--config={RECIPE}',
       f'--workdir={tmp_path / "run"}',
       f'--config.dataset.fashion_mnist_dir={tmp_path / "none"}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert 'apt-get install dataset-fashion-mnist' in errors[0]
  assert 'config.dataset.fashion_mnist_dir' in errors[0]
  assert 'Traceback' not in proc.stderr


def test_pixel_baseline_reads_each_grey_pixel_of_every_image(tmp_path):
  """The pixel baseline of a small slice in the installed format: 784 values
  an image (the IDX bytes / 255, not three copies), every image of both
  splits, and a probe that scikit-learn's LogisticRegression at the C it
  chose reproduces (the check the full 60,000 images make against the
  published 84.2%, docs/fashion_mnist.md)."""
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  from sklearn import preprocessing  # pylint: disable=g-import-not-at-top
  from simclr_jax.evaluation import readout  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  patterns = rng.uniform(0, 160, (10, 28, 28))
  data = {}
  for split, prefix, n in (('train', 'train', 300), ('test', 't10k', 100)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.clip(patterns[labels] + rng.normal(0, 60, (n, 28, 28)),
                     0, 255).astype(np.uint8)
    _write_raw_idx(str(tmp_path / f'{prefix}-images-idx3-ubyte.gz'), images)
    _write_raw_idx(str(tmp_path / f'{prefix}-labels-idx1-ubyte.gz'), labels)
    data[split] = (images, labels)
  c = _config(str(tmp_path))
  c.eval.knn_k, c.eval.fewshot_shots, c.eval.fewshot_draws = 5, (1,), 1
  pixels = [readout.sample_pixels(c, split, max_examples=0, seed=0,
                                  batch_size=64) for split in data]
  for (x, y), (images, labels) in zip(pixels, data.values()):
    assert x.shape == (len(labels), 784)
    np.testing.assert_allclose(x, images.reshape(len(labels), 784) / 255,
                               rtol=1e-6)
    np.testing.assert_array_equal(y, labels)
  got = readout.evaluate_pixels(*pixels, eval_config=c.eval, seed=0)
  (train_x, train_y), (test_x, test_y) = pixels
  scaler = preprocessing.StandardScaler().fit(np.float64(train_x))
  clf = linear_model.LogisticRegression(C=got['linear_probe_c'],
                                        max_iter=2000)
  clf.fit(scaler.transform(np.float64(train_x)), train_y)
  want = np.mean(clf.predict(scaler.transform(np.float64(test_x))) == test_y)
  assert want > 0.5  # The slice is learnable, so agreement means something.
  assert abs(got['linear_probe_accuracy'] - want) <= 0.02
