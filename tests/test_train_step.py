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


def test_per_device_bn_would_differ():
  """Guards the test above: per-device BN statistics are really different."""
  x = _batches(1)[0]['views'].reshape(32, 8, 8, 3)
  global_mean = x.mean(axis=(0, 1, 2))
  local_mean = x[:4].mean(axis=(0, 1, 2))
  assert np.abs(global_mean - local_mean).max() > 1e-3


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
