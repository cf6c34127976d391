"""Pretraining on the user's images: image folders, read directly or prepared.

Folders are generated here: labelled class subfolders and a flat unlabelled
one, with PNG and JPEG files of mixed sizes, grey and RGBA among them, and a
corrupt file. Expected values come from the files themselves (the arrays
written, TensorFlow's own decode), never from the reader under test.
"""

import json
import logging
import os
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

# Required packages: a missing one fails the import, not skips.
import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order
import tensorflow_datasets  # pylint: disable=g-import-not-at-top,g-bad-import-order,unused-import

from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
from simclr_jax.data import digits  # pylint: disable=g-import-not-at-top
from simclr_jax.data import folder  # pylint: disable=g-import-not-at-top
from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from simclr_jax.tools import prepare_data  # pylint: disable=g-import-not-at-top
from simclr_jax.training import evals  # pylint: disable=g-import-not-at-top
from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top

CLASSES = ('cat', 'dog', 'eel')
PER_CLASS = 12
SIZE = 16


def _image(rng, h, w, channels=3):
  return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


def _write(path, image, fmt):
  data = (tf.io.encode_png(image) if fmt == 'png'
          else tf.io.encode_jpeg(image, quality=95))
  tf.io.write_file(path, data)


def _make_folder(root, *, labelled=True, corrupt=True):
  """CLASSES x PER_CLASS images (or a flat folder of as many), mixed."""
  rng = np.random.default_rng(7)
  n = 0
  for c in (CLASSES if labelled else ('',)):
    count = PER_CLASS if labelled else PER_CLASS * len(CLASSES)
    d = os.path.join(root, c)
    os.makedirs(d, exist_ok=True)
    for i in range(count):
      h, w = [(20, 20), (24, 40), (37, 18), (16, 16)][i % 4]
      kind = i % 4
      if kind == 0:
        _write(os.path.join(d, f'{i:03d}.png'), _image(rng, h, w), 'png')
      elif kind == 1:
        _write(os.path.join(d, f'{i:03d}.JPG'), _image(rng, h, w), 'jpeg')
      elif kind == 2:  # Grey PNG: decoded to RGB.
        _write(os.path.join(d, f'{i:03d}.png'), _image(rng, h, w, 1), 'png')
      else:  # RGBA PNG: alpha dropped.
        _write(os.path.join(d, f'{i:03d}.png'), _image(rng, h, w, 4), 'png')
      n += 1
  with open(os.path.join(root, 'notes.txt'), 'w') as f:
    f.write('not an image; ignored')
  if corrupt:
    d = os.path.join(root, CLASSES[1] if labelled else '')
    with open(os.path.join(d, 'broken.jpg'), 'wb') as f:
      f.write(b'\xff\xd8\xff\xe0 this is not a jpeg')
  return n


def _config(root, **kw):
  c = defaults.base_config()
  c.dataset.name = 'folder'
  c.dataset.folder = str(root)
  c.dataset.image_size = SIZE
  c.dataset.folder_validation_fraction = 0.25
  c.batch_size = 8
  c.augment.backend = 'jax'
  for k, v in kw.items():
    section, _, field = k.rpartition('.')
    (c[section] if section else c)[field] = v
  return c


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
  root = tmp_path_factory.mktemp('labelled')
  _make_folder(str(root))
  return str(root)


@pytest.fixture(scope='module')
def prepared(labelled, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('prepared') / 'tfrecords')
  assert prepare_data.main([f'--folder={labelled}', f'--out={out}',
                            '--validation_fraction=0.25',
                            '--examples_per_shard=5']) == 0
  return out


def _expected(path):
  """TensorFlow's own decode of one file (RGB)."""
  return tf.io.decode_image(tf.io.read_file(path), channels=3,
                            expand_animations=False)


def test_listing_labels_split_and_corrupt_file(labelled, caplog):
  listing = folder.listing_of(_config(labelled))
  assert listing.class_names == CLASSES
  paths = sorted(listing.splits['train'][0] + listing.splits['validation'][0])
  assert len(paths) == len(CLASSES) * PER_CLASS + 1  # + broken.jpg.
  assert not set(listing.splits['train'][0]) & set(
      listing.splits['validation'][0])
  assert len(listing.splits['validation'][0]) == round(len(paths) * 0.25)
  for split in ('train', 'validation'):
    for p, y in zip(*listing.splits[split]):
      assert CLASSES[y] == os.path.basename(os.path.dirname(p))
  # The split is a pure function of the seed; another seed, another split.
  again = folder.list_folder(labelled, 0.25, 0)
  assert again.splits['validation'][0] == listing.splits['validation'][0]
  other = folder.list_folder(labelled, 0.25, 1)
  assert other.splits['validation'][0] != listing.splits['validation'][0]

  c = _config(labelled)
  with caplog.at_level(logging.WARNING):
    images, labels = (np.concatenate(a) for a in zip(
        *(datasets.source_for(c).raw_arrays(s)
          for s in ('train', 'validation'))))
  assert len(labels) == len(CLASSES) * PER_CLASS  # The corrupt file left out.
  assert 'broken.jpg' in caplog.text
  assert images.shape[1:] == (SIZE, SIZE, 3) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [PER_CLASS] * len(CLASSES)
  # A file already at SIZE x SIZE comes back pixel for pixel.
  train_paths, _ = listing.splits['train']
  x, _ = datasets.source_for(c).raw_arrays('train')
  kept = [p for p in train_paths if 'broken' not in p]
  for row, p in enumerate(kept):
    ref = _expected(p).numpy()
    if ref.shape[:2] == (SIZE, SIZE):
      np.testing.assert_array_equal(x[row], ref)

  failing = _config(labelled)
  failing.dataset.on_corrupt = 'fail'
  failing.dataset.folder_split_seed = 3  # Not cached by the reads above.
  with pytest.raises(datasets.DatasetError, match='broken.jpg'):
    datasets.dataset_info(failing)


def test_flat_folder_is_unlabelled_and_errors_are_one_line(tmp_path):
  flat = tmp_path / 'flat'
  n = _make_folder(str(flat), labelled=False, corrupt=False)
  info = datasets.dataset_info(_config(flat))
  assert info.num_classes == 0 and not info.labelled
  assert info.num_train_examples == n - round(n * 0.25)
  _, labels = datasets.source_for(_config(flat)).raw_arrays('validation')
  assert (labels == -1).all()

  mixed = tmp_path / 'mixed'
  _make_folder(str(mixed))
  _write(str(mixed / 'stray.png'), np.zeros((4, 4, 3), np.uint8), 'png')
  for c, match in [(_config(mixed), 'both image files'),
                   (_config(tmp_path / 'absent'), 'is not a directory'),
                   (_config(''), "dataset.folder='' is not a directory")]:
    with pytest.raises(datasets.DatasetError, match=match) as e:
      datasets.dataset_info(c)
    assert '\n' not in str(e.value)


def test_missing_eval_split_falls_back_to_validation(labelled):
  c = _config(labelled)
  assert c.dataset.eval_split == 'test'
  assert datasets.resolved_splits(c) == ('train', 'validation')


def _indices(config, process_index, process_count, steps, start=0):
  it = pipeline.make_pretrain_iterator(
      config, process_index=process_index, process_count=process_count,
      start_step=start, include_index=True)
  return [next(it) for _ in range(steps)]


@pytest.mark.parametrize('source', ['direct', 'prepared'])
def test_shards_disjoint_covering_and_resume_exact(source, labelled,
                                                   prepared):
  root = labelled if source == 'direct' else prepared
  c = _config(root, batch_size=4)
  if source == 'prepared':
    c.augment.backend = 'tf'  # Streamed views, seeded per example.
  spe = pipeline.steps_per_epoch(c, datasets.dataset_info(c))
  seen = [
      np.concatenate([b['index'] for b in _indices(c, p, 2, spe)])
      for p in (0, 1)
  ]
  assert not set(seen[0]) & set(seen[1])
  assert len(set(seen[0]) | set(seen[1])) == spe * c.batch_size
  if source == 'direct':  # Row ids of the train split.
    n = datasets.dataset_info(c).num_train_examples
    assert set(seen[0]) | set(seen[1]) <= set(range(n))
  # Resume: the stream from step k is the uninterrupted stream's tail.
  full = _indices(c, 1, 2, spe + 2)
  resumed = _indices(c, 1, 2, 3, start=spe - 1)
  for a, b in zip(full[spe - 1:], resumed):
    np.testing.assert_array_equal(a['index'], b['index'])
    key = 'images' if 'images' in a else 'views'
    np.testing.assert_array_equal(a[key], b[key])


def test_prepared_tfrecords_read_back_equal_to_the_folder(labelled, prepared):
  direct, streamed = _config(labelled), _config(prepared)
  a, b = datasets.dataset_info(streamed), datasets.dataset_info(direct)
  train_files = folder.listing_of(direct).splits['train'][0]
  good = len([p for p in train_files if 'broken' not in p])
  assert (a.num_train_examples, a.num_classes) == (
      b.num_train_examples, b.num_classes) == (good, 3)
  assert datasets.source_for(streamed).splits() == ['train', 'validation']
  for split in ('train', 'validation'):
    x0, y0 = pipeline.load_train_arrays_raw(direct, split)
    x1, y1 = pipeline.load_train_arrays_raw(streamed, split)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(x0, x1)
    # Evaluation preprocessing: a direct read holds square raw images, the
    # stream applies tf_eval to the stored file (which squashes a
    # non-square image at <= 32 px, as the reference does); they agree on
    # files that are already SIZE x SIZE.
    e0, _ = pipeline.load_eval_arrays(direct, split)
    e1, _ = pipeline.load_eval_arrays(streamed, split)
    files = [p for p in folder.listing_of(direct).splits[split][0]
             if 'broken' not in p]
    square = [tuple(_expected(p).shape[:2]) == (SIZE, SIZE) for p in files]
    assert 0 < sum(square) < len(files)
    np.testing.assert_allclose(e0[square], e1[square], atol=1e-6)
  with pytest.raises(datasets.DatasetError, match='already holds'):
    folder.write_tfrecords(labelled, prepared)


def test_prepared_folder_eval_batches_shuffle_its_class_sorted_files(
    prepared):
  """prepare_data writes examples in path order, so its shards are sorted by
  class; a shuffled read mixes files and examples, seeded."""
  c = _config(prepared)

  def read(**kw):
    chunks = list(pipeline.eval_batches(c, 'train', 8, **kw))
    return (np.concatenate([x for x, _ in chunks]),
            np.concatenate([y for _, y in chunks]))

  x, y = read()
  assert (np.diff(y) >= 0).all()  # Split order: class by class.
  sx, sy = read(shuffle_seed=0)
  examples = lambda x, y: sorted((int(b), a.tobytes()) for a, b in zip(x, y))
  assert examples(sx, sy) == examples(x, y)
  assert not (np.diff(sy) >= 0).all()
  np.testing.assert_array_equal(read(shuffle_seed=0)[0], sx)
  assert not np.array_equal(read(shuffle_seed=1)[0], sx)


def test_digits_as_png_folder_decode_to_the_embedded_pixels(tmp_path):
  x, y = digits.load_digits('test')
  folder.write_image_folder(str(tmp_path), {'test': (x, y)})
  c = _config(tmp_path)
  c.dataset.image_size = 32
  fx, fy = datasets.source_for(c).raw_arrays('test')
  paths, _ = folder.listing_of(c).splits['test']
  rows = [int(os.path.basename(p)[:-4]) for p in paths]
  np.testing.assert_array_equal(fx, x[rows])
  np.testing.assert_array_equal(fy, y[rows])
  assert sorted(rows) == list(range(len(y)))


def test_unlabelled_folder_run_skips_probes_and_can_probe_elsewhere(
    tmp_path, labelled, caplog):
  """A real (one-step) pretraining run on a flat folder, then read-outs."""
  from simclr_jax import main  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  flat = tmp_path / 'flat'
  _make_folder(str(flat), labelled=False)
  c = _config(flat, batch_size=8, train_steps=1)
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.optim.warmup_epochs = 0.0
  c.evals.random_init.enabled = False
  c.evals.pixel.enabled = False
  c.eval.knn_k = 3
  c.eval.fewshot_shots = (1,)
  c.eval.fewshot_draws = 1
  # A probe of the labelled folder is one more entry.
  c.evals.labelled_probe = defaults.eval_entry('probe', name='folder',
                                               folder=labelled)
  with caplog.at_level(logging.WARNING):
    results = main.run_pretrain(c, str(tmp_path / 'run'))
  assert results['steps'] == 1 and not results['interrupted']
  assert 'probes skipped' in results['probes_skipped']
  assert 'linear_probe_accuracy' not in results
  assert 'probes skipped' in caplog.text
  with open(tmp_path / 'run' / 'results.json') as f:
    written = json.load(f)
  assert 0.0 <= written['labelled_probe_accuracy'] <= 1.0
  assert written['labelled_probe_train_examples'] > 0
  # The same encoder read out on the labelled folder: each entry's dataset.
  del c.evals['labelled_probe']
  for name in ('linear_probe', 'fewshot_probe', 'knn'):
    c.evals[name].dataset.update(dict(name='folder', folder=labelled))
  setup = pretrain.build(c)
  out = pretrain.evaluate_encoder(setup, pretrain.initial_state(setup))
  assert 'probes_skipped' not in out
  assert 0.0 <= out['linear_probe_accuracy'] <= 1.0
  assert 0.0 <= out['knn_accuracy'] <= 1.0


# A folder's train split in path order is class by class: 10 classes of 20
# images, image i filled with the value i (PNG: exact), so a batch's rows
# and classes can be read off its pixels.
_CLASSES, _PER_CLASS, _SIDE = 10, 20, 8


@pytest.fixture(scope='module')
def class_sorted_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('class_sorted'))
  n = _CLASSES * _PER_CLASS
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, _SIDE, _SIDE, 3))
  folder.write_image_folder(root, {'train': (images,
                                             np.arange(n) // _PER_CLASS)})
  # <= 32 px: no crop, no resize; 24 rows a batch, a multiple of 8 devices.
  return _config(root, **{'dataset.image_size': _SIDE, 'eval.batch_size': 24,
                          'seed': 5})


def _rows(x: np.ndarray) -> np.ndarray:
  assert (x == x[:, :1, :1, :1]).all()
  return np.rint(x[:, 0, 0, 0] * 255).astype(int)


def test_bn_batches_of_a_class_sorted_folder_are_seeded_shuffles(
    class_sorted_folder):
  c = class_sorted_folder
  n = _CLASSES * _PER_CLASS
  ordered = np.concatenate([_rows(x) for x, _ in
                            pipeline.eval_batches(c, 'train', 32)])
  np.testing.assert_array_equal(ordered, np.arange(n))  # Class by class.

  def bn_rows(seed):
    return np.stack([_rows(x) for x in evals._cycled_batches(
        c, 'train', 32, 10, seed=seed)])

  rows = bn_rows(0)
  assert rows.shape == (10, 32)
  # In split order a batch of 32 spans at most 3 classes.
  assert min(len(set(r // _PER_CLASS)) for r in rows) >= 6
  flat = rows.reshape(-1)
  assert ((0 <= flat) & (flat < n)).all()
  # The first pass gives each image once; the second pass has a new order.
  assert len(set(flat[:n])) == n
  assert not np.array_equal(flat[n:], flat[:len(flat) - n])
  np.testing.assert_array_equal(bn_rows(0), rows)
  assert not np.array_equal(bn_rows(1), rows)


class _BatchNormOnly(nn.Module):
  """BatchNorm of the images themselves: its running statistics are the
  per-channel pixel statistics of the batches it saw."""

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_random_init_bn_statistics_come_from_the_shuffled_batches(
    class_sorted_folder):
  c = class_sorted_folder
  model = _BatchNormOnly()
  variables = model.init(jax.random.key(0), np.zeros((1, _SIDE, _SIDE, 3)),
                         train=False)
  setup = types.SimpleNamespace(config=c, model=model,
                                mesh=parallel.make_mesh())
  out = evals.recalibrate_batch_stats(setup, variables, batches=5)
  # NumPy: BN's running averages over the batches the seed gives.
  mean, var = np.zeros(3), np.ones(3)
  for x in evals._cycled_batches(c, 'train', 24, 5, seed=c.seed):
    assert len(set(_rows(x) // _PER_CLASS)) >= 5
    x = x.astype(np.float64)
    mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 1, 2))
    var = 0.9 * var + 0.1 * x.var(axis=(0, 1, 2))
  stats = out['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-5, atol=1e-6)
