"""Evaluation from streamed splits, with the kNN sharded over the devices.

Checks that the bounded-memory path gives what the whole-array path gave:
the sharded kNN against one device and a NumPy double loop (ties included),
streamed features against featurising the whole array, and the main job's
evaluation never asking the data for more than one batch of images.
"""

import jax
import numpy as np
import pytest

from simclr_jax import evaluation
from simclr_jax.config import defaults
from simclr_jax.evaluation import features as features_lib
from simclr_jax.data import pipeline
from simclr_jax.evaluation import readout
from simclr_jax.evaluation import registry
from simclr_jax.runtime import parallel
from simclr_jax.training import evals
from simclr_jax.training import pretrain
from simclr_jax.training import state as state_lib

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs --xla_force_host_platform_device_count=8')


def _numpy_knn(train_x, train_y, test_x, num_classes, k, temperature):
  """Float64 kNN; equal similarities rank by row (stable sort), as in
  lax.top_k; vote ties go to the lowest class."""
  a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  out = []
  for q in b:
    sims = (a.astype(np.float32) @ q.astype(np.float32)).astype(np.float64)
    order = np.argsort(-sims, kind='stable')[:min(k, len(a))]
    votes = np.zeros(num_classes)
    for j in order:
      votes[train_y[j]] += np.exp((sims[j] - sims[order[0]]) / temperature)
    out.append(int(np.argmax(votes)))
  return np.array(out)


@needs_8
@pytest.mark.parametrize('n_train,k', [(37, 20), (64, 7), (101, 1000)])
def test_sharded_knn_equals_one_device_and_numpy_with_ties(n_train, k):
  rng = np.random.default_rng(n_train)
  # Few distinct rows, each repeated with different labels: many exact
  # similarity ties, so the winner depends on the tie-break by row.
  distinct = rng.normal(size=(6, 5)).astype(np.float32)
  train_x = distinct[rng.integers(0, 6, n_train)]
  train_y = rng.integers(0, 4, n_train)
  test_x = np.concatenate([distinct, rng.normal(size=(19, 5))]
                          ).astype(np.float32)
  one = evaluation.knn_predict(train_x, train_y, test_x, 4, k=k,
                               temperature=0.1, batch_size=8,
                               mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = evaluation.knn_predict(train_x, train_y, test_x, 4, k=k,
                                 temperature=0.1, batch_size=8,
                                 mesh=parallel.make_mesh(jax.devices()[:8]))
  np.testing.assert_array_equal(eight, one)
  np.testing.assert_array_equal(
      eight, _numpy_knn(train_x, train_y, test_x, 4, k, 0.1))


def _spread_as_two_processes(x, batch):
  """x as two processes of 4 devices would hold it after featurising it in
  batches of `batch` rows: in one process here, process 0's rows (the
  first half of every batch) then process 1's, each padded to the same
  count, so the mesh's devices hold the rows in that order."""
  pieces, index = [], []
  for p in range(2):
    rows = np.concatenate([
        np.arange(lo + p * batch // 2, lo + (p + 1) * batch // 2)
        for lo in range(0, len(x), batch)])
    real = rows[rows < len(x)]
    pad = len(rows) - len(real)
    pieces += [x[real], np.zeros((pad, x.shape[1]), np.float32)]
    index += [real, np.full(pad, -1)]
  return features_lib.ShardedFeatures(
      np.concatenate(pieces), np.concatenate(index).astype(np.int32), len(x))


@needs_8
def test_knn_and_probes_read_features_spread_over_processes():
  rng = np.random.default_rng(0)
  # Repeated rows with different labels: exact similarity ties, decided by
  # the row in the split wherever the devices hold it.
  distinct = rng.normal(size=(12, 6)).astype(np.float32)
  train_x = np.concatenate([distinct[rng.integers(0, 12, 60)],
                            rng.normal(size=(43, 6)).astype(np.float32)])
  train_y = rng.integers(0, 4, len(train_x))
  test_x = np.concatenate([distinct, rng.normal(size=(29, 6))]
                          ).astype(np.float32)
  test_y = rng.integers(0, 4, len(test_x))
  mesh = parallel.make_mesh(jax.devices()[:8])
  train_s = _spread_as_two_processes(train_x, 24)
  test_s = _spread_as_two_processes(test_x, 16)
  np.testing.assert_array_equal(train_s.gathered(), train_x)
  rows = [102, 0, 57, 13, 13]
  np.testing.assert_array_equal(train_s.take(rows, mesh), train_x[rows])

  spread = evaluation.knn_predict(train_s, train_y, test_s, 4, k=20,
                                  temperature=0.1, batch_size=8, mesh=mesh)
  np.testing.assert_array_equal(
      spread, _numpy_knn(train_x, train_y, test_x, 4, 20, 0.1))

  whole = evaluation.evaluate_features(train_x, train_y, test_x, test_y,
                                       knn_k=20, shots=(1, 5), draws=2,
                                       mesh=mesh)
  got = evaluation.evaluate_features(train_s, train_y, test_s, test_y,
                                     knn_k=20, shots=(1, 5), draws=2,
                                     mesh=mesh)
  assert got['linear_probe_c'] == whole['linear_probe_c']
  assert abs(got['linear_probe_accuracy'] -
             whole['linear_probe_accuracy']) <= 1e-3
  # The few-shot draws fetch the same rows exactly: the same fits.
  assert got['fewshot_probe_accuracy'] == whole['fewshot_probe_accuracy']
  assert got['knn_accuracy'] == float(np.mean(spread == test_y))


def _digits_config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 1
  c.eval.batch_size = 64
  c.eval.knn_k = 7
  c.eval.fewshot_shots = (1,)
  c.eval.fewshot_draws = 1
  return c


@pytest.fixture(scope='module')
def digits_setup():
  setup = pretrain.build(_digits_config())
  variables = jax.device_get(state_lib.variables_of(
      pretrain.initial_state(setup)))
  return setup, variables


class _ChunkCounter:
  """Wraps pipeline.eval_batches, recording the largest chunk it yields."""

  def __init__(self, monkeypatch):
    self.largest = 0
    self.requested = []
    inner = pipeline.eval_batches

    def counted(config, split, batch_size, **kw):
      self.requested.append(batch_size)
      for x, y in inner(config, split, batch_size, **kw):
        self.largest = max(self.largest, len(x))
        yield x, y

    monkeypatch.setattr(pipeline, 'eval_batches', counted)


@needs_8
def test_streamed_features_equal_whole_array(digits_setup, monkeypatch):
  setup, variables = digits_setup
  c = setup.config
  apply = readout.feature_fn(setup.model)
  images, labels = pipeline.load_eval_arrays(c, 'test', max_examples=100)
  whole = evaluation.extract_features(apply, images, 128, setup.mesh,
                                      variables=variables)
  counter = _ChunkCounter(monkeypatch)
  # 24 rows a chunk: 100 = 4 x 24 + 4, and 24 is a multiple of 8 devices.
  features, got_labels = readout.featurize_split(
      apply, variables, c, 'test', batch_size=24, mesh=setup.mesh,
      max_examples=100)
  np.testing.assert_allclose(features, whole, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_labels, labels)
  assert counter.largest <= 24


@needs_8
def test_features_over_the_budget_stay_with_their_process(digits_setup):
  setup, variables = digits_setup
  apply = readout.feature_fn(setup.model)
  whole, labels = readout.featurize_split(
      apply, variables, setup.config, 'test', batch_size=24,
      mesh=setup.mesh, max_examples=100)
  assert isinstance(whole, np.ndarray)
  spread, spread_labels = readout.featurize_split(
      apply, variables, setup.config, 'test', batch_size=24,
      mesh=setup.mesh, max_examples=100, gather_max_bytes=0)
  assert isinstance(spread, features_lib.ShardedFeatures)
  np.testing.assert_array_equal(spread_labels, labels)
  np.testing.assert_array_equal(spread.gathered(), whole)
  # One process: every row, in order, then the last batch's 20 padding
  # rows (100 = 4 x 24 + 4).
  np.testing.assert_array_equal(spread.index[:100], np.arange(100))
  assert (spread.index[100:] == -1).all() and len(spread.index) == 120
  assert readout.bytes_per_process(spread) == [120 * whole.shape[1] * 4]
  # Just under and at the whole split's bytes.
  size = whole.nbytes
  for budget, gathered in ((size - 1, False), (size, True)):
    out, _ = readout.featurize_split(
        apply, variables, setup.config, 'test', batch_size=24,
        mesh=setup.mesh, max_examples=100, gather_max_bytes=budget)
    assert isinstance(out, np.ndarray) == gathered


def test_pixel_sample_is_seeded_subset_in_split_order():
  c = _digits_config()
  images, labels = pipeline.load_eval_arrays(c, 'train')
  flat = images[..., :1].reshape(len(images), -1)  # Grey: one channel.
  whole = readout.sample_pixels(c, 'train', max_examples=5000, seed=0,
                                batch_size=100)
  np.testing.assert_array_equal(whole[0], flat)
  np.testing.assert_array_equal(whole[1], labels)
  part = readout.sample_pixels(c, 'train', max_examples=50, seed=3,
                               batch_size=100)
  again = readout.sample_pixels(c, 'train', max_examples=50, seed=3,
                                batch_size=64)
  np.testing.assert_array_equal(part[0], again[0])
  rows = [np.flatnonzero((flat == r).all(axis=1))[0] for r in part[0]]
  assert len(set(rows)) == 50 and rows == sorted(rows)
  np.testing.assert_array_equal(part[1], labels[rows])


def test_evaluate_encoder_reads_one_batch_at_a_time(digits_setup,
                                                    monkeypatch):
  setup, _ = digits_setup

  def whole_split(*args, **kwargs):
    raise AssertionError('evaluation must not load a whole split')

  monkeypatch.setattr(pipeline, 'load_eval_arrays', whole_split)
  counter = _ChunkCounter(monkeypatch)
  logged = []
  monkeypatch.setattr(pretrain.logging, 'info',
                      lambda msg, *args: logged.append(msg % args))
  state = pretrain.initial_state(setup)
  results = pretrain.evaluate_encoder(setup, state)
  # Each read-out is announced and timed in the log, in the order it runs.
  starts = [m for m in logged if m.startswith('Read-out') and '(' in m]
  assert [m.split(':')[0] for m in starts] == [
      'Read-out 1/3', 'Read-out 2/3', 'Read-out 3/3']
  assert 'pretrained encoder' in starts[0] and 'raw pixels' in starts[2]
  assert sum('finished in' in m for m in logged) == 3
  assert counter.largest <= setup.config.eval.batch_size
  assert set(counter.requested) == {setup.config.eval.batch_size}
  # Every baseline reads the images the encoder reads.
  assert results['pixel_train_examples'] == 1437
  assert results['pixel_test_examples'] == 360
  assert results['probe_train_examples'] == 1437
  assert results['probe_test_examples'] == 360
  assert results['random_init_bn_batches'] == evals.RANDOM_INIT_BN_BATCHES
  assert results['random_init_bn_shuffle_seed'] == setup.config.seed
  for key in ('linear_probe_accuracy', 'knn_accuracy',
              'random_init_probe_accuracy', 'pixel_knn_accuracy'):
    assert 0.0 <= results[key] <= 1.0, key


def test_a_new_readout_and_a_second_dataset_are_one_entry_each(monkeypatch):
  """A read-out type registered outside the training code, and a probe on
  another split of digits: one config.evals entry each, results named by
  entry, and each dataset featurised once whatever reads it."""

  def mean_norm(train, test, ctx):
    del train, ctx
    return {'mean': float(np.linalg.norm(np.asarray(test[0]), axis=1).mean())}

  monkeypatch.setitem(registry.TYPES, 'norm', registry.ReadoutType(mean_norm))
  c = _digits_config()
  c.evals.random_init.enabled = False
  c.evals.pixel.enabled = False
  c.evals.feature_norm = defaults.eval_entry('norm')
  c.evals.half_probe = defaults.eval_entry('probe', train_split='train[:700]')
  read = []
  inner = readout.featurize_split

  def counted(apply, variables, config, split, **kw):
    read.append((config.dataset.train_split, split))
    return inner(apply, variables, config, split, **kw)

  monkeypatch.setattr(readout, 'featurize_split', counted)
  setup = pretrain.build(c)
  state = pretrain.initial_state(setup)
  results = pretrain.evaluate_encoder(setup, state)
  assert sorted(read) == [('train', 'test'), ('train', 'train'),
                          ('train[:700]', 'test'),
                          ('train[:700]', 'train[:700]')]
  assert results['probe_train_examples'] == 1437
  assert results['half_probe_train_examples'] == 700
  assert results['half_probe_test_examples'] == 360
  assert 0.0 <= results['half_probe_accuracy'] <= 1.0
  assert results['half_probe_c'] > 0
  for key in ('linear_probe_accuracy', 'linear_probe_c',
              'fewshot_probe_accuracy', 'knn_accuracy'):
    assert key in results, key
  assert not any(k.startswith(('random_init', 'pixel')) for k in results)
  test, _ = inner(readout.feature_fn(setup.model),
                  state_lib.variables_of(state), setup.config, 'test',
                  batch_size=64, mesh=setup.mesh)
  assert results['feature_norm_mean'] == pytest.approx(
      np.linalg.norm(test, axis=1).mean(), rel=1e-6)
