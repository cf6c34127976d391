"""Tests of the frozen-feature evaluation: kNN, probes, subsets, extraction.

Each check compares against an independent computation (a NumPy double loop,
scikit-learn called by hand, the function applied to the whole array at
once) so that a wrong weighting, a missing normalisation, a dropped or
duplicated row, or a mis-seeded draw changes the outcome.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import linear_model
from sklearn import preprocessing

from simclr_jax import evaluation
from simclr_jax.runtime import parallel
from simclr_jax.evaluation import probe

# ---------------------------------------------------------------- kNN ----


def _knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
  """Direct float64 kNN, one test point and one train point at a time.

  Also returns, per test point, the similarity gap at the top-k boundary and
  the relative margin of the winning class, so the test can assert that its
  data has no near-ties on which float32 and float64 could disagree.
  """
  predictions, gaps, margins = [], [], []
  for q in test_x:
    q = q / np.linalg.norm(q)
    sims = np.empty(len(train_x))
    for j, t in enumerate(train_x):
      sims[j] = np.dot(q, t / np.linalg.norm(t))
    order = np.argsort(-sims, kind='stable')
    kk = min(k, len(train_x))
    gaps.append(sims[order[kk - 1]] - sims[order[kk]]
                if kk < len(train_x) else np.inf)
    votes = np.zeros(num_classes)
    for j in order[:kk]:
      votes[train_y[j]] += np.exp(sims[j] / temperature)
    top2 = np.sort(votes)[-2:]
    margins.append((top2[1] - top2[0]) / top2[1])
    predictions.append(int(np.argmax(votes)))
  return np.array(predictions), np.array(gaps), np.array(margins)


@pytest.fixture(scope='module')
def knn_data():
  rng = np.random.default_rng(0)
  n_train, n_test, dim, classes = 150, 50, 12, 5
  # Cluster structure makes the votes meaningful; random per-row scales make
  # a missing L2 normalisation change the neighbours.
  centers = rng.normal(size=(classes, dim))
  train_y = rng.integers(0, classes, n_train)
  test_y = rng.integers(0, classes, n_test)
  train_x = centers[train_y] + 1.5 * rng.normal(size=(n_train, dim))
  test_x = centers[test_y] + 1.5 * rng.normal(size=(n_test, dim))
  train_x *= rng.uniform(0.1, 10.0, size=(n_train, 1))
  test_x *= rng.uniform(0.1, 10.0, size=(n_test, 1))
  return (train_x.astype(np.float32), train_y, test_x.astype(np.float32),
          test_y, classes)


@pytest.mark.parametrize('k', [1, 7, 40, 1000])  # 1000 > n_train: clipped.
@pytest.mark.parametrize('temperature', [0.05, 0.1, 1.0])
def test_knn_predict_matches_numpy_double_loop(knn_data, k, temperature):
  train_x, train_y, test_x, _, classes = knn_data
  expected, gaps, margins = _knn_reference(
      train_x.astype(np.float64), train_y, test_x.astype(np.float64),
      classes, k, temperature)
  # Preconditions on the data, not on the code: no near-ties anywhere.
  assert gaps.min() > 1e-5 and margins.min() > 1e-5
  # batch_size 16 over 50 points: three full chunks and a padded one.
  got = evaluation.knn_predict(train_x, train_y, test_x, classes, k=k,
                               temperature=temperature, batch_size=16)
  assert got.shape == (len(test_x),)
  np.testing.assert_array_equal(got, expected)


def test_knn_weighting_is_not_majority_vote(knn_data):
  """The data above must be able to tell weighted from plain voting."""
  train_x, train_y, test_x, _, classes = knn_data
  weighted, _, _ = _knn_reference(train_x, train_y, test_x, classes, 40, 0.05)
  plain, _, _ = _knn_reference(train_x, train_y, test_x, classes, 40, 1e6)
  assert np.any(weighted != plain)


def test_knn_tie_goes_to_lowest_class():
  # Two train points equally similar to the query, labels 1 and 0.
  train_x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  got = evaluation.knn_predict(train_x, np.array([1, 0]),
                               np.array([[1.0, 1.0]], np.float32), 2, k=2)
  np.testing.assert_array_equal(got, [0])


def test_knn_accuracy_and_small_temperature(knn_data):
  train_x, train_y, test_x, test_y, classes = knn_data
  expected, _, _ = _knn_reference(train_x, train_y, test_x, classes, 7, 0.1)
  acc = evaluation.knn_accuracy(train_x, train_y, test_x, test_y, classes,
                                k=7, temperature=0.1)
  assert acc == pytest.approx(np.mean(expected == test_y))
  assert acc > 0.5  # The clusters are learnable.
  # exp(1 / 0.001) overflows float32; the shifted weights must not.
  got = evaluation.knn_predict(train_x, train_y, test_x, classes, k=7,
                               temperature=1e-3)
  nearest, _, _ = _knn_reference(train_x, train_y, test_x, classes, 1, 0.1)
  np.testing.assert_array_equal(got, nearest)


def test_knn_rejects_out_of_range_labels(knn_data):
  train_x, train_y, test_x, _, _ = knn_data
  with pytest.raises(ValueError, match='train_labels'):
    evaluation.knn_predict(train_x, train_y, test_x, num_classes=3)


# -------------------------------------------------------------- probes ----


def test_linear_probe_separable_data_is_near_perfect():
  rng = np.random.default_rng(1)
  centers = 6.0 * rng.normal(size=(3, 20))
  y_train, y_test = rng.integers(0, 3, 150), rng.integers(0, 3, 150)
  x_train = centers[y_train] + rng.normal(size=(150, 20))
  x_test = centers[y_test] + rng.normal(size=(150, 20))
  acc = evaluation.linear_probe_accuracy(x_train, y_train, x_test, y_test)
  assert acc >= 0.98


def test_linear_probe_random_labels_is_chance():
  rng = np.random.default_rng(2)
  x_train, x_test = rng.normal(size=(400, 20)), rng.normal(size=(2000, 20))
  y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 2000)
  acc = evaluation.linear_probe_accuracy(x_train, y_train, x_test, y_test)
  assert abs(acc - 0.25) < 0.05  # ~5 standard errors at n_test = 2000.


@pytest.fixture(scope='module')
def probe_data():
  rng = np.random.default_rng(3)
  classes, dim = 4, 16
  centers = 1.5 * rng.normal(size=(classes, dim))
  y_train = np.repeat(np.arange(classes), 30)
  y_test = rng.integers(0, classes, 200)
  x_train = centers[y_train] + rng.normal(size=(len(y_train), dim))
  x_test = centers[y_test] + rng.normal(size=(len(y_test), dim))
  return x_train, y_train, x_test, y_test


def test_fewshot_draws_exact_seeded_and_distinct(probe_data):
  _, y_train, _, _ = probe_data
  for shots in (1, 5, 10):
    draws = [probe.fewshot_indices(y_train, shots, seed) for seed in range(4)]
    for idx in draws:
      assert len(np.unique(idx)) == len(idx)
      np.testing.assert_array_equal(np.bincount(y_train[idx]),
                                    [shots] * 4)
    assert len({tuple(idx) for idx in draws}) == 4  # All draws differ.
    np.testing.assert_array_equal(
        draws[2], probe.fewshot_indices(y_train, shots, 2))
  with pytest.raises(ValueError, match='fewer than'):
    probe.fewshot_indices(y_train, 31, 0)


def test_fewshot_value_is_mean_over_draws(probe_data):
  x_train, y_train, x_test, y_test = probe_data
  got = evaluation.fewshot_probe_accuracy(
      x_train, y_train, x_test, y_test, shots=(1, 5), draws=3, seed=7)
  assert set(got) == {'1', '5'}
  for shots in (1, 5):
    accs = []
    for d in range(3):
      idx = probe.fewshot_indices(y_train, shots, 7 + d)
      scaler = preprocessing.StandardScaler().fit(x_train[idx])
      model = linear_model.LogisticRegression(
          C=probe.DEFAULT_C, max_iter=1000).fit(
              scaler.transform(x_train[idx]), y_train[idx])
      accs.append(np.mean(model.predict(scaler.transform(x_test)) == y_test))
    assert len(set(accs)) > 1  # Draws matter, so a single draw would fail.
    assert got[str(shots)] == pytest.approx(np.mean(accs), abs=1e-12)


def test_stratified_fraction():
  counts = [3, 10, 57, 130]
  labels = np.random.default_rng(4).permutation(np.repeat(np.arange(4),
                                                          counts))
  for fraction in (0.01, 0.1, 0.37, 0.5, 1.0):
    idx = evaluation.stratified_fraction(labels, fraction, seed=0)
    assert len(np.unique(idx)) == len(idx)
    per_class = np.bincount(labels[idx], minlength=4)
    assert np.all(per_class >= 1)
    assert np.all(np.abs(per_class - fraction * np.array(counts)) <= 1)
    np.testing.assert_array_equal(
        idx, evaluation.stratified_fraction(labels, fraction, seed=0))
  np.testing.assert_array_equal(
      evaluation.stratified_fraction(labels, 1.0, seed=0), np.arange(200))
  assert not np.array_equal(evaluation.stratified_fraction(labels, 0.5, 0),
                            evaluation.stratified_fraction(labels, 0.5, 1))
  for bad in (0.0, 1.5, -0.1, float('nan')):
    with pytest.raises(ValueError, match='fraction must be in'):
      evaluation.stratified_fraction(labels, bad, seed=0)


def test_evaluate_features_keys(probe_data):
  x_train, y_train, x_test, y_test = probe_data
  got = evaluation.evaluate_features(
      x_train, y_train, x_test, y_test, knn_k=20, knn_temperature=0.1,
      shots=(1, 5, 10), draws=2, seed=0)
  assert set(got) == {'linear_probe_accuracy', 'linear_probe_c',
                      'fewshot_probe_accuracy', 'knn_accuracy'}
  assert set(got['fewshot_probe_accuracy']) == {'1', '5', '10'}
  assert got['linear_probe_accuracy'] == evaluation.linear_probe_accuracy(
      x_train, y_train, x_test, y_test, seed=0)
  # The C recorded is the one the probe chose, which reproduces its accuracy.
  assert got['linear_probe_accuracy'] == evaluation.linear_probe_accuracy(
      x_train, y_train, x_test, y_test, c_grid=(got['linear_probe_c'],))
  assert got['knn_accuracy'] == evaluation.knn_accuracy(
      x_train, y_train, x_test, y_test, 4, k=20, temperature=0.1)
  assert all(isinstance(v, float) for v in got['fewshot_probe_accuracy']
             .values())


# ---------------------------------------------------------- extraction ----


def _feature_fn(variables, x):
  """A small nonlinear map whose output depends on every input row."""
  h = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
  return jnp.tanh(h @ variables['w'] + variables['b'])


@pytest.fixture(scope='module')
def extract_data():
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, size=(37, 4, 4, 3), dtype=np.uint8)
  variables = {'w': jnp.asarray(rng.normal(size=(48, 6)), jnp.float32),
               'b': jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  whole = np.asarray(jax.jit(_feature_fn)(variables, images))
  return images, variables, whole


def test_extract_features_partial_batch_one_compilation(extract_data):
  images, variables, whole = extract_data
  traced_shapes = []

  def fn(v, x):
    traced_shapes.append(x.shape)  # Runs once per trace, not per call.
    return _feature_fn(v, x)

  got = evaluation.extract_features(fn, images, 8, variables=variables)
  assert got.dtype == np.float32 and got.shape == whole.shape
  np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
  assert traced_shapes == [(8, 4, 4, 3)]  # 37 = 4 x 8 + 5, padded to 8.
  # Closing over the variables gives the same answer.
  closed = evaluation.extract_features(lambda x: _feature_fn(variables, x),
                                       images, 16)
  np.testing.assert_allclose(closed, whole, rtol=1e-5, atol=1e-6)
  # Batch larger than the data: one padded-free batch of all rows.
  big = evaluation.extract_features(fn, images, 1000, variables=variables)
  np.testing.assert_allclose(big, whole, rtol=1e-5, atol=1e-6)
  empty = evaluation.extract_features(fn, images[:0], 8, variables=variables)
  assert empty.shape == (0, 6) and empty.dtype == np.float32


@pytest.mark.skipif(jax.device_count() < 8,
                    reason='needs --xla_force_host_platform_device_count=8')
def test_extract_features_on_8_device_mesh(extract_data):
  images, variables, whole = extract_data
  mesh = parallel.make_mesh(jax.devices()[:8])
  shapes, shardings = [], []

  def fn(v, x):
    shapes.append(x.shape)
    jax.debug.inspect_array_sharding(x, callback=shardings.append)
    return _feature_fn(v, x)

  got = evaluation.extract_features(fn, images, 10, mesh,
                                    variables=variables)
  np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)
  assert shapes == [(16, 4, 4, 3)]  # 10 rounded up to a multiple of 8.
  assert shardings[0].num_devices == 8
  assert shardings[0].shard_shape((16, 4, 4, 3)) == (2, 4, 4, 3)
  with pytest.raises(ValueError, match="'data' axis"):
    evaluation.extract_features(
        fn, images, 8, jax.sharding.Mesh(np.array(jax.devices()[:8]), ('x',)),
        variables=variables)


def test_pixel_baseline_reads_out_the_flattened_images():
  """pixel_* numbers: the NumPy kNN and sklearn probe on raw pixels."""
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from simclr_jax.evaluation import readout  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  centres = rng.uniform(0, 1, size=(3, 4, 4, 3))
  def draw(n):
    y = rng.integers(0, 3, size=n)
    x = (centres[y] + 0.3 * rng.normal(size=(n, 4, 4, 3))).astype(np.float32)
    return x, y.astype(np.int32)
  train, test = draw(60), draw(30)
  c = defaults.base_config().eval
  c.knn_k, c.fewshot_shots, c.fewshot_draws = 5, (2,), 2
  got = readout.prefixed('pixel_', readout.evaluate_pixels(
      train, test, eval_config=c, seed=0))
  assert set(got) == {'pixel_probe_accuracy', 'pixel_probe_c',
                      'pixel_fewshot_probe_accuracy', 'pixel_knn_accuracy'}
  flat_train, flat_test = train[0].reshape(60, -1), test[0].reshape(30, -1)
  predicted, _, _ = _knn_reference(flat_train, train[1], flat_test, 3, 5,
                                   c.knn_temperature)
  assert got['pixel_knn_accuracy'] == pytest.approx(
      np.mean(predicted == test[1]))
  scaler = preprocessing.StandardScaler().fit(flat_train)
  clf = linear_model.LogisticRegression(C=got['pixel_probe_c'], max_iter=1000)
  clf.fit(scaler.transform(flat_train), train[1])
  assert got['pixel_probe_accuracy'] == pytest.approx(
      np.mean(clf.predict(scaler.transform(flat_test)) == test[1]), abs=0.04)


@pytest.mark.parametrize('name, channels', [('digits', 1), ('digits_m', 3)])
def test_pixel_baseline_reads_every_image_and_grey_pixels_once(name, channels):
  """The pixels of the whole split (the images the encoder reads), one value
  per pixel for a grey dataset, against the eval images read directly."""
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from simclr_jax.evaluation import readout  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  c.dataset.name, c.dataset.image_size = name, 8
  assert c.eval.pixel_max_examples == 0  # The default: every image.
  images, labels = pipeline.load_eval_arrays(c, 'train')
  x, y = readout.sample_pixels(c, 'train', max_examples=0, seed=0,
                               batch_size=100)
  np.testing.assert_array_equal(y, labels)
  np.testing.assert_array_equal(
      x, images[..., :channels].reshape(len(labels), -1))
  if channels == 1:  # Grey: the channels dropped were copies.
    np.testing.assert_array_equal(images[..., 1], images[..., 0])
