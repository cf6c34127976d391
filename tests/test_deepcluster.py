"""DeepCluster: k-means, empty clusters, the weighted loss, exact resume.

k-means and PCA whitening are checked against NumPy implementations of the
same procedure (same init, same iterations); the step's loss and the
classifier's SGD update against NumPy formulas on an independent forward
pass; pseudo-labels, centroids and the classifier survive stop and resume
exactly (the run reclusters on the host before steps 0 and 2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.config import validation as config_validation
from simclr_jax.config.validation import ConfigError
from simclr_jax.methods import deepcluster as dc
from simclr_jax.runtime import parallel
from simclr_jax.training import pretrain as train

N = 16  # images per step: 2 per device on the 8 virtual devices.
SIZE = 8


def _np_assign(x, c):
  return np.argmax(x @ c.T - 0.5 * np.sum(c * c, axis=1), axis=1)


def _np_kmeans(x, init, iterations, eps=dc.SPLIT_EPS):
  """Lloyd + the split rule of `dc.split_empty`, in float64 NumPy."""
  x = np.asarray(x, np.float64)
  c = np.array(init, np.float64)
  k, d = c.shape
  sign = np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
  for _ in range(iterations):
    a = _np_assign(x, c)
    n = np.bincount(a, minlength=k)
    for j in range(k):
      if n[j]:
        c[j] = x[a == j].mean(axis=0)
    while (n == 0).any() and n.max() >= 2:
      i, j = int(np.argmin(n)), int(np.argmax(n))
      cj = c[j].copy()
      c[i], c[j] = cj * (1 + eps * sign), cj * (1 - eps * sign)
      half = n[j] // 2
      n[i], n[j] = half, n[j] - half
  return c, _np_assign(x, c)


def _blobs(seed=0, per=15, dim=3):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(4, dim)) * 10
  x = np.concatenate([c + rng.normal(size=(per, dim)) for c in centers])
  return x.astype(np.float32)


@pytest.mark.parametrize('init_rows', [[0, 15, 30, 45, 5],   # Plain.
                                       [0, 0, 15, 30, 45]])  # Duplicate.
def test_kmeans_matches_numpy(init_rows):
  x = _blobs()
  init = x[init_rows]
  c, a = jax.jit(dc.kmeans, static_argnums=2)(jnp.asarray(x),
                                               jnp.asarray(init), 6)
  c_np, a_np = _np_kmeans(x, init, 6)
  np.testing.assert_array_equal(np.asarray(a), a_np)
  np.testing.assert_allclose(np.asarray(c), c_np, rtol=1e-5, atol=1e-5)


def test_kmeans_blocked_assignment_matches_whole():
  x = jnp.asarray(_blobs(per=40))
  c = x[jnp.array([0, 50, 100, 150])]
  np.testing.assert_array_equal(dc.assign(x, c, block=32),
                                dc.assign(x, c))


def test_empty_clusters_are_split_and_none_stays_empty():
  x = _blobs()
  # A centroid far from every point and a duplicate: both start empty.
  init = np.concatenate([x[[0, 0, 15, 30]], np.full((1, 3), 1e3, np.float32)])
  c, a = dc.kmeans(jnp.asarray(x), jnp.asarray(init), 5)
  assert np.bincount(np.asarray(a), minlength=5).min() > 0
  c_np, a_np = _np_kmeans(x, init, 5)
  np.testing.assert_array_equal(np.asarray(a), a_np)
  np.testing.assert_allclose(np.asarray(c), c_np, rtol=1e-5, atol=1e-5)
  # The split rule itself: empties take half of the largest cluster.
  cents = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1
  new_c, n = dc.split_empty(cents, jnp.array([7, 0, 3, 0]))
  assert np.asarray(n).tolist() == [2, 3, 3, 2] and int(n.sum()) == 10
  s = np.array([1, -1, 1]) * dc.SPLIT_EPS
  np.testing.assert_allclose(new_c[1], np.asarray(cents[0]) * (1 + s),
                             rtol=1e-6)


def test_pca_whitening_matches_numpy():
  rng = np.random.default_rng(1)
  f = (rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))).astype(np.float32)
  y = np.asarray(dc.pca_whiten(jnp.asarray(f), 4))
  xc = f.astype(np.float64) - f.mean(0)
  evals, evecs = np.linalg.eigh(xc.T @ xc / len(f))
  top = np.argsort(evals)[::-1][:4]
  ref = xc @ evecs[:, top] / np.sqrt(evals[top])
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  # Eigenvector signs are arbitrary: compare the Gram matrices.
  np.testing.assert_allclose(y @ y.T, ref @ ref.T, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_weighted_cross_entropy_formula():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = np.array([0, 3, 3, 1, 2, 3])
  w = 1.0 / np.bincount(labels, minlength=4)[labels]
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = -np.sum(w * logp[np.arange(6), labels]) / np.sum(w)
  np.testing.assert_allclose(
      dc.weighted_cross_entropy(logits, labels, w), expected, rtol=1e-6)


def _config():
  c = defaults.base_config()
  c.method = 'deepcluster'
  c.dataset.name = 'digits'
  c.dataset.image_size = SIZE
  c.model.depth = 18
  c.model.width_multiplier = 0.0625
  c.model.proj_out_dim = 8
  c.batch_size = N
  c.train_steps = 4
  c.optim.warmup_epochs = 0.1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.evals.random_init.enabled = False
  c.deepcluster.update(dict(num_clusters=10, pca_dim=8, kmeans_iterations=5,
                            recluster_every_steps=2, head_learning_rate=0.5))
  return c


def test_step_loss_and_classifier_update_match_numpy():
  c = _config()
  c.optim.warmup_epochs = 0.0  # Step 0 already at the peak learning rate.
  setup = train.build(c)
  k = c.deepcluster.num_clusters
  rng = np.random.default_rng(0)
  state0 = train.initial_state(setup)
  # Uneven clusters, so the 1/size weights matter; a larger head, so the
  # logits do.
  assign = rng.integers(0, 3, size=1437).astype(np.int32) * 3 % k
  extra = dict(jax.device_get(state0.extra),
               assignments=assign,
               cluster_sizes=np.bincount(assign, minlength=k).astype(np.int32))
  extra['head'] = {
      'kernel': rng.normal(size=extra['head']['kernel'].shape).astype(
          np.float32) * 0.3,
      'bias': rng.normal(size=(k,)).astype(np.float32) * 0.1}
  state0 = state0.replace(
      extra=jax.device_put(extra, parallel.replicated(setup.mesh)))
  host0 = jax.device_get(state0)
  batch = {'views': rng.uniform(size=(N, 2, SIZE, SIZE, 3)).astype(np.float32),
           'labels': rng.integers(0, 3, size=(N,)).astype(np.int32),
           'index': rng.permutation(1437)[:N].astype(np.int32)}
  state1, metrics = train.make_step(setup)(
      state0, parallel.to_global(batch, setup.mesh), jax.random.key(3))
  state1, metrics = jax.device_get((state1, metrics))

  x = batch['views'].reshape((2 * N, SIZE, SIZE, 3))
  out, _ = setup.model.apply(
      {'params': host0.params, 'batch_stats': host0.batch_stats}, x,
      train=True, mutable=['batch_stats'])
  h = np.asarray(out['features'], np.float64)
  head = host0.extra['head']
  logits = h @ head['kernel'] + head['bias']
  labels = np.repeat(assign[batch['index']], 2)
  w = 1.0 / extra['cluster_sizes'][labels]
  logits -= logits.max(1, keepdims=True)
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = -np.sum(w * np.log(p[np.arange(2 * N), labels])) / np.sum(w)
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4)

  g = (p - np.eye(k)[labels]) * (w / w.sum())[:, None]
  lr, wd = c.deepcluster.head_learning_rate, c.deepcluster.head_weight_decay
  np.testing.assert_allclose(
      state1.extra['head']['kernel'],
      head['kernel'] - lr * (h.T @ g + wd * head['kernel']), atol=2e-5)
  np.testing.assert_allclose(state1.extra['head']['bias'],
                             head['bias'] - lr * (g.sum(0) + wd * head['bias']),
                             atol=2e-5)
  # The encoder learns from the pseudo-labels; pseudo-labels stay put.
  assert not np.allclose(state1.params['encoder']['conv_init']['kernel'],
                         host0.params['encoder']['conv_init']['kernel'])
  np.testing.assert_array_equal(state1.extra['assignments'], assign)


def test_state_survives_stop_and_resume(tmp_path):
  c = _config()
  c.batch_size = 64
  full = train.pretrain(c, str(tmp_path / 'full'))
  part_dir = str(tmp_path / 'part')
  first = train.pretrain(c, part_dir, stop_after_steps=2)
  assert first['interrupted'] and first['steps'] == 2
  second = train.pretrain(c, part_dir)
  assert second['resumed_from_step'] == 2 and second['steps'] == 4
  a, b = jax.device_get((full['state'], second['state']))
  # Clustering ran (not the round-robin placeholder) and left no empty
  # cluster unaccounted for.
  sizes = np.asarray(a.extra['cluster_sizes'])
  assert int(sizes.sum()) == 1437
  np.testing.assert_array_equal(
      sizes, np.bincount(a.extra['assignments'], minlength=10))
  assert not np.array_equal(a.extra['assignments'], np.arange(1437) % 10)
  for key in ('assignments', 'cluster_sizes'):
    np.testing.assert_array_equal(b.extra[key], a.extra[key])
  close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  close(b.extra['centroids'], a.extra['centroids'])
  jax.tree.map(close, b.extra['head'], a.extra['head'])
  jax.tree.map(close, b.params, a.params)


@pytest.mark.parametrize('field,value,match', [
    ('deepcluster.num_clusters', 1, 'num_clusters=1 is invalid'),
    ('deepcluster.num_clusters', 2000, 'must be <= the 1437 training'),
    ('deepcluster.pca_dim', 0, 'pca_dim=0 is invalid'),
    ('deepcluster.recluster_every_epochs', 0.0,
     'recluster_every_epochs=0.0 is invalid'),
    ('grad_cache_chunks', 2, 'grad_cache_chunks=2 is not supported'),
    ('dataset.name', 'cifar10', 'needs config.dataset.in_memory=True'),
])
def test_validation_is_one_line(field, value, match):
  c = _config()
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match=match) as e:
    config_validation.validate(c, num_devices=8)
  assert '\n' not in str(e.value)
