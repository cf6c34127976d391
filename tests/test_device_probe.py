"""Tests of the on-device logistic-regression probe.

scikit-learn's LogisticRegression, called the way the probe was specified
(StandardScaler, then L-BFGS in float64 on the host), is the independent
reference; the device probe must agree with it, choose its regularisation
from training rows only, and be blind to the rows that pad the shards.
"""

import jax
import numpy as np
import pytest
from sklearn import linear_model
from sklearn import preprocessing

from simclr_jax.config import defaults
from simclr_jax.data import pipeline
from simclr_jax.data.sampling import fewshot_indices
from simclr_jax.evaluation import probe
from simclr_jax.runtime import parallel

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8,
    reason='needs --xla_force_host_platform_device_count=8')


def _sklearn_accuracy(train_x, train_y, test_x, test_y, c=probe.DEFAULT_C):
  """The host probe: standardise on train, float64 L-BFGS, predict test."""
  scaler = preprocessing.StandardScaler().fit(np.float64(train_x))
  model = linear_model.LogisticRegression(C=c, max_iter=1000).fit(
      scaler.transform(np.float64(train_x)), train_y)
  return np.mean(model.predict(scaler.transform(np.float64(test_x)))
                 == test_y)


@pytest.fixture(scope='module')
def digits_pixels():
  """Flattened 16 px eval images of the embedded digits (768 features)."""
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  flat = lambda a: (a[0].reshape(len(a[0]), -1), a[1])
  return (flat(pipeline.load_eval_arrays(c, 'train')) +
          flat(pipeline.load_eval_arrays(c, 'test')))


def test_matches_sklearn_on_digits_pixels(digits_pixels):
  train_x, train_y, test_x, test_y = digits_pixels
  reference = _sklearn_accuracy(train_x, train_y, test_x, test_y)
  fixed = probe.linear_probe_accuracy(train_x, train_y, test_x, test_y,
                                      c_grid=(probe.DEFAULT_C,))
  assert abs(fixed - reference) <= 0.005
  chosen = probe.linear_probe_accuracy(train_x, train_y, test_x, test_y)
  assert abs(chosen - reference) <= 0.005


def test_fewshot_matches_sklearn_on_digits_pixels(digits_pixels):
  train_x, train_y, test_x, test_y = digits_pixels
  got = probe.fewshot_probe_accuracy(train_x, train_y, test_x, test_y,
                                     shots=(1, 5), draws=3, seed=4)
  for shot in (1, 5):
    reference = np.mean([_sklearn_accuracy(
        train_x[idx], train_y[idx], test_x, test_y)
                         for idx in (fewshot_indices(train_y, shot, 4 + d)
                                     for d in range(3))])
    assert abs(got[str(shot)] - reference) <= 0.005


@pytest.fixture(scope='module')
def blobs():
  rng = np.random.default_rng(0)
  centres = 2.0 * rng.normal(size=(3, 6))
  def draw(n):
    y = rng.integers(0, 3, n)
    return (centres[y] + 1.2 * rng.normal(size=(n, 6))).astype(np.float32), y
  return draw(157) + draw(60)


def _recorded_fits(monkeypatch):
  """Replaces probe.fit_probe with a wrapper that keeps its results."""
  fits, inner = [], probe.fit_probe
  def recording(*args, **kwargs):
    fits.append(inner(*args, **kwargs))
    return fits[-1]
  monkeypatch.setattr(probe, 'fit_probe', recording)
  return fits


def test_choice_of_c_sees_training_rows_only(blobs, monkeypatch):
  train_x, train_y, test_x, test_y = blobs
  fits = _recorded_fits(monkeypatch)
  rng = np.random.default_rng(1)
  accuracy = probe.linear_probe_accuracy(train_x, train_y, test_x, test_y)
  probe.linear_probe_accuracy(train_x, train_y, test_x, rng.permutation(test_y))
  nan = probe.linear_probe_accuracy(train_x, train_y,
                                    np.full_like(test_x, np.nan), test_y)
  assert len(fits) == 3
  for other in fits[1:]:
    assert other.c == fits[0].c
    np.testing.assert_array_equal(np.asarray(other.weights),
                                  np.asarray(fits[0].weights))
    np.testing.assert_array_equal(np.asarray(other.bias),
                                  np.asarray(fits[0].bias))
  assert accuracy > 0.8 and 0.0 <= nan <= 1.0
  # The choice does move with the training labels, so the checks above are
  # not vacuous: labels no feature predicts want the strongest penalty.
  # The grid grows below its start, one step at a time, to its floor.
  noise = rng.integers(0, 3, len(train_y))
  chosen = probe.fit_probe(train_x, noise).c
  assert probe.C_RANGE[0] <= chosen < probe.C_RANGE[0] * 3.5


def test_grid_grows_until_the_choice_is_inside_it(monkeypatch):
  """Blobs that want less regularisation than the starting grid offers: the
  grid grows upward until the best C has a fitted neighbour on each side,
  and the best is the one scikit-learn's held-out cross-entropy picks."""
  from simclr_jax.data.sampling import stratified_fraction  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  centres = 2.0 * rng.normal(size=(3, 6))
  y = rng.integers(0, 3, 400)
  x = (centres[y] + 2.0 * rng.normal(size=(400, 6))).astype(np.float32)
  tried, inner = [], probe._fit_rows
  def recording(data, k, w, c, init=None):
    tried.append(c)
    return inner(data, k, w, c, init)
  monkeypatch.setattr(probe, '_fit_rows', recording)
  chosen = probe.fit_probe(x, y, seed=3).c
  grid = sorted(set(tried))
  assert max(grid) > max(probe.C_GRID) and chosen > max(probe.C_GRID)
  assert min(grid) < chosen < max(grid)
  held = stratified_fraction(y, probe.VALIDATION_FRACTION, 3)
  kept = np.setdiff1d(np.arange(len(y)), held)
  scaler = preprocessing.StandardScaler().fit(np.float64(x[kept]))
  def held_loss(c):
    model = linear_model.LogisticRegression(C=c, max_iter=5000, tol=1e-8)
    model.fit(scaler.transform(np.float64(x[kept])), y[kept])
    p = model.predict_proba(scaler.transform(np.float64(x[held])))
    return -np.sum(np.log(p[np.arange(len(held)), y[held]]))
  losses = {c: held_loss(c) for c in grid}
  assert losses[chosen] <= min(losses.values()) * (1 + 1e-3)


@needs_8
def test_padded_rows_do_not_change_the_fit(blobs):
  train_x, train_y, _, _ = blobs  # 157 rows: 5 rows of padding on 8 shards.
  one = probe.fit_probe(train_x, train_y,
                        mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = probe.fit_probe(train_x, train_y,
                          mesh=parallel.make_mesh(jax.devices()[:8]))
  padded = probe.fit_probe(train_x, train_y, rows=400,
                           mesh=parallel.make_mesh(jax.devices()[:8]))
  for fit in (eight, padded):
    assert fit.c == one.c
    for name in ('mean', 'scale', 'weights', 'bias'):
      np.testing.assert_allclose(np.asarray(getattr(fit, name)),
                                 np.asarray(getattr(one, name)),
                                 rtol=1e-3, atol=1e-4)
