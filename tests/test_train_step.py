"""The sharded train step: 8 devices must compute what 1 device computes."""

import jax
import numpy as np

from simclr_jax.config import defaults
from simclr_jax import methods
from simclr_jax import models
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.training import pretrain_step as ts


def _tiny_config():
  c = defaults.base_config()
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.dataset.image_size = 8
  c.batch_size = 16
  c.optim.warmup_epochs = 0
  c.optim.weight_decay = 1e-4
  c.loss.temperature = 0.2
  return c


def _run(mesh, batches, steps=2):
  c = _tiny_config()
  model = models.build_model(c, num_classes=10)
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=10, total_steps=20)
  state = ts.create_train_state(model, tx, jax.random.key(0), 8, mesh)
  method = methods.make_method(c, mesh=mesh, total_steps=20,
                               num_train_examples=0)
  step = ts.make_train_step(
      model, tx, schedule, mesh, method=method,
      views_fn=ts.make_views_fn('tf', 8, 0.5, False))
  metrics = []
  for i in range(steps):
    batch = parallel.to_global(batches[i], mesh)
    state, m = step(state, batch, jax.random.key(i))
    metrics.append(parallel.fetch(m))
  return jax.device_get(state), metrics


def _batches(n=2):
  rng = np.random.default_rng(0)
  return [{'views': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
           'labels': rng.integers(0, 10, size=(16,)).astype(np.int32)}
          for _ in range(n)]


def test_eight_devices_match_one_device():
  batches = _batches()
  s8, m8 = _run(parallel.make_mesh(), batches)
  s1, m1 = _run(parallel.make_mesh(jax.devices()[:1]), batches)
  assert parallel.make_mesh().devices.size == 8
  for a, b in zip(m8, m1):
    for k in ('loss', 'contrastive_acc', 'linear_loss', 'grad_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  # Global BN: the running statistics are those of the whole batch, so
  # they agree with the single-device run (per-device BN would not).
  for path, x in jax.tree_util.tree_leaves_with_path(s8.batch_stats):
    y = _get(s1.batch_stats, path)
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  for path, x in jax.tree_util.tree_leaves_with_path(s8.params):
    y = _get(s1.params, path)
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The step really trained something: parameters moved.
  s0, _ = _run(parallel.make_mesh(), batches, steps=0)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s8.params,
                       s0.params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def _stem_conv_numpy(views, kernel):
  """The CIFAR stem's 3x3 stride-1 conv (pad 1, no bias) in float64 NumPy."""
  x = np.pad(views.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  k = np.asarray(kernel, np.float64)
  size = views.shape[1]
  return sum(np.einsum('nhwc,cd->nhwd', x[:, i:i + size, j:j + size],
                       k[i, j]) for i in range(3) for j in range(3))


def test_bn_running_stats_are_global_batch_stats_not_per_device():
  """One real sharded step: the stem BN's running statistics are the global
  batch's (NumPy on all 32 views), not any device's 4 views.

  After one step, running = 0.9 * initial + 0.1 * batch statistic (BN
  momentum 0.9 of the TF reference; Flax keeps the biased variance).
  """
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  batches = _batches(1)
  s0, _ = _run(mesh, batches, steps=0)
  s1, _ = _run(mesh, batches, steps=1)
  # (N, 2, S, S, 3) -> (2N, S, S, 3), the two views of an image adjacent, as
  # the step feeds them; device d holds rows 4d..4d+3 (2 images per device).
  views = batches[0]['views'].reshape(32, 8, 8, 3)
  y = _stem_conv_numpy(views, s0.params['encoder']['conv_init']['kernel'])
  old = s0.batch_stats['encoder']['bn_init']
  got = s1.batch_stats['encoder']['bn_init']

  def running(y):
    return (0.9 * np.asarray(old['mean']) + 0.1 * y.mean(axis=(0, 1, 2)),
            0.9 * np.asarray(old['var']) + 0.1 * y.var(axis=(0, 1, 2)))

  # float32 vs float64: measured errors are ~1e-8 (mean) and ~4e-8 (var).
  tol = dict(rtol=1e-6, atol=1e-7)
  want_mean, want_var = running(y)
  np.testing.assert_allclose(got['mean'], want_mean, **tol)
  np.testing.assert_allclose(got['var'], want_var, **tol)
  # Per-device statistics would be far outside that tolerance (measured
  # 6e-4 and more): each device's own 4 views, and also the device-average
  # of per-device variances (whose mean would equal the global mean but
  # whose variance misses the spread between devices; measured 7e-5).
  bound = 10 * (tol['atol'] + tol['rtol'] * np.abs(want_var).max())
  for d in range(8):
    local_mean, local_var = running(y[4 * d:4 * d + 4])
    assert np.abs(local_mean - got['mean']).max() > bound, d
    assert np.abs(local_var - got['var']).max() > bound, d
  per_device_var = np.mean([y[4 * d:4 * d + 4].var(axis=(0, 1, 2))
                            for d in range(8)], axis=0)
  averaged_var = 0.9 * np.asarray(old['var']) + 0.1 * per_device_var
  assert np.abs(averaged_var - got['var']).max() > bound


def test_metrics_are_finite_and_complete():
  _, m = _run(parallel.make_mesh(), _batches(1), steps=1)
  for k in ('loss', 'contrastive_acc', 'contrastive_entropy', 'learning_rate',
            'grad_norm', 'param_norm', 'linear_loss', 'linear_acc',
            'skipped'):
    assert np.isfinite(m[0][k]), k
  assert m[0]['loss'] > 0 and 0 <= m[0]['contrastive_acc'] <= 1


def _get(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree
