"""Gradient caching computes the full-batch gradient chunk by chunk.

The references are independent: jax.grad of `losses.nt_xent` (the unsharded
loss) on projections of the whole batch computed in one call.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from simclr_jax.config import validation as config_validation
from simclr_jax.config import defaults
from simclr_jax.config import resolve as config_resolve
from simclr_jax.training import grad_cache
from simclr_jax import losses
from simclr_jax import methods
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.training import pretrain_step as ts

TEMPERATURE = 0.2
NUM_CLASSES = 5


class _TinyNet(nn.Module):
  """Conv-BN encoder, Dense-BN head and a linear head on detached features.

  The same output contract as SimCLRModel, small enough to compile in a
  second, with BN in both encoder and head so the BN modes matter.
  """

  @nn.compact
  def __call__(self, x, train):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5)
    h = nn.relu(bn()(nn.Conv(4, (3, 3), use_bias=False)(x)))
    h = jnp.mean(h, axis=(1, 2))
    z = bn()(nn.Dense(8, use_bias=False)(h))
    z = nn.Dense(6)(nn.relu(z))
    logits = nn.Dense(NUM_CLASSES)(jax.lax.stop_gradient(h))
    return {'projection': z, 'logits': logits}


def _data(n=32, size=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2 * n, size, size, 3)).astype(np.float32)
  labels = np.repeat(rng.integers(0, NUM_CLASSES, n), 2).astype(np.int32)
  return x, labels


def _variables(model, x):
  v = model.init(jax.random.key(0), x[:2], train=False)
  # Non-trivial running statistics, so frozen BN is not the identity.
  rng = np.random.default_rng(1)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          rng.uniform(0.5, 1.5, s.shape) if path[-1].key == 'var' else
          rng.normal(0, 0.1, s.shape), jnp.float32), v['batch_stats'])
  return v['params'], stats


def _reference_loss(z, logits, labels):
  """Plain full-batch loss: NT-Xent + the linear head's cross-entropy."""
  n = z.shape[0] // 2
  z = z.reshape(n, 2, -1)
  contrastive = losses.nt_xent(z[:, 0], z[:, 1], temperature=TEMPERATURE)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return contrastive + ce


def _sharded_grads(model, params, stats, x, labels, chunks, bn):
  mesh = parallel.make_mesh()
  contrastive = jax.shard_map(
      functools.partial(losses.sharded_nt_xent, temperature=TEMPERATURE,
                        axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
      out_specs=(P(), P()))
  # Host-driven: its programs are jitted inside; it is not itself jittable.
  fn = grad_cache.SimCLRGradCache(
      model, contrastive_loss=lambda a, b, ctx: contrastive(a, b),
      head_loss=methods.base.linear_head_loss,
      num_chunks=chunks, mesh=mesh, bn=bn)
  sharding = parallel.data_sharding(mesh)
  return fn(params, stats, jax.device_put(x, sharding),
            jax.device_put(labels, sharding))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol, err_msg=jax.tree_util.keystr(path))


def _assert_train_bn_grads_close(a, b):
  """Train-mode BN's backward pass cancels large terms (sum of dy and of
  dy * x_hat), so float32 rounding reaches about 1e-5 of a leaf's largest
  entry; run in float64 the two sides agree to 1e-7 (the float32
  accumulator), so this tolerance is rounding, not a wrong gradient."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-4,
                               atol=5e-5 * np.abs(y).max(),
                               err_msg=jax.tree_util.keystr(path))


def _frozen_bn_matches_full_batch(model, chunks, **tolerance):
  """Cached frozen-BN gradient of `model` over `chunks` against jax.grad of
  the whole batch's loss in one call; returns (grads, stats, new_stats)."""
  x, labels = _data()
  params, stats = _variables(model, x)

  def full_loss(p):
    out = model.apply({'params': p, 'batch_stats': stats}, x, train=False)
    return _reference_loss(out['projection'], out['logits'], labels)

  want_loss, want = jax.value_and_grad(full_loss)(params)
  grads, (metrics, new_stats) = _sharded_grads(model, params, stats, x,
                                               labels, chunks, 'frozen')
  np.testing.assert_allclose(
      metrics['contrastive_loss'] + metrics['linear_loss'], want_loss,
      rtol=1e-6)
  _assert_trees_close(grads, want, **tolerance)
  return grads, stats, new_stats


@pytest.mark.parametrize('chunks', [2, 4])
def test_frozen_bn_equals_full_batch_gradient(chunks):
  grads, stats, new_stats = _frozen_bn_matches_full_batch(_TinyNet(), chunks)
  assert parallel.make_mesh().devices.size == 8
  # The linear head and the encoder both received gradient.
  assert float(jnp.abs(grads['Dense_2']['kernel']).max()) > 0
  assert float(jnp.abs(grads['Conv_0']['kernel']).max()) > 0
  _assert_trees_close(new_stats, stats, rtol=0, atol=0)


def test_vit_gradient_cache_equals_full_batch_gradient():
  """A ViT encoder (LayerNorm, attention, a class token) under a BN head:
  the cached gradient over 2 chunks equals jax.grad of the whole batch's
  loss in one call."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  model = models.SimCLRModel(
      encoder=models.ViT(width=8, depth=1, num_heads=2, patch_size=3,
                         name='encoder'),
      num_proj_layers=2, proj_out_dim=6, num_classes=NUM_CLASSES)
  grads, _, _ = _frozen_bn_matches_full_batch(model, 2, rtol=1e-5, atol=1e-6)
  qkv = grads['encoder']['blocks_0']['attn']['qkv']['kernel']
  assert float(jnp.abs(qkv).max()) > 0


def test_per_chunk_bn_is_the_gradient_of_per_chunk_statistics():
  """Train-mode BN: exact gradient of the network whose BN sees one chunk."""
  model = _TinyNet()
  x, labels = _data()
  params, stats = _variables(model, x)
  chunks, devices = 2, 8
  # Chunk c = sub-block c of every device's rows (grad_cache interleaves
  # chunks so each one is sharded over all devices).
  rows = np.arange(len(x)).reshape(devices, chunks, -1)
  chunk_rows = [rows[:, c].reshape(-1) for c in range(chunks)]

  def per_chunk_loss(p):
    z = jnp.zeros((len(x), 6))
    logits = jnp.zeros((len(x), NUM_CLASSES))
    updates = []
    for idx in chunk_rows:
      out, new = model.apply({'params': p, 'batch_stats': stats}, x[idx],
                             train=True, mutable=['batch_stats'])
      z = z.at[idx].set(out['projection'])
      logits = logits.at[idx].set(out['logits'])
      updates.append(new['batch_stats'])
    return _reference_loss(z, logits, labels), updates

  (_, updates), want = jax.value_and_grad(per_chunk_loss, has_aux=True)(
      params)
  grads, (_, new_stats) = _sharded_grads(model, params, stats, x, labels,
                                         chunks, 'per_chunk')
  _assert_train_bn_grads_close(grads, want)
  want_stats = jax.tree.map(lambda *s: sum(s) / len(s), *updates)
  _assert_trees_close(new_stats, want_stats, rtol=1e-5, atol=1e-6)


def test_one_chunk_equals_global_bn_gradient():
  model = _TinyNet()
  x, labels = _data(n=16)
  params, stats = _variables(model, x)

  def full_loss(p):
    out, _ = model.apply({'params': p, 'batch_stats': stats}, x, train=True,
                         mutable=['batch_stats'])
    return _reference_loss(out['projection'], out['logits'], labels)

  want = jax.grad(full_loss)(params)
  grads, _ = _sharded_grads(model, params, stats, x, labels, 1, 'per_chunk')
  _assert_train_bn_grads_close(grads, want)


class _FrozenBN:
  """A model whose BN always uses running statistics, whatever `train` says.

  Lets the plain train step (grad_cache_chunks=0) compute the frozen-BN
  gradient, the reference for grad_cache_bn='frozen'.
  """

  def __init__(self, model):
    self.model = model

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def clone(self, **fields):  # A method's target network.
    return _FrozenBN(self.model.clone(**fields))

  def apply(self, variables, x, train, mutable=False):
    del train
    out = self.model.apply(variables, x, train=False)
    return (out, {'batch_stats': variables['batch_stats']}) if mutable else out


def _train(model, chunks, bn='per_chunk', steps=2, method='simclr'):
  """Runs the real jitted train step (LARS, online head, metrics)."""
  c = defaults.base_config()
  c.method = method
  c.optim.warmup_epochs = 0
  c.loss.temperature = TEMPERATURE
  mesh = parallel.make_mesh()
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=10, total_steps=20)
  m = methods.make_method(c, mesh=mesh, total_steps=20, num_train_examples=0)
  state = ts.create_train_state(model, tx, jax.random.key(0), 8, mesh, m)
  step = ts.make_train_step(
      model, tx, schedule, mesh, method=m,
      views_fn=ts.make_views_fn('tf', 8, 0.5, False),
      grad_cache_chunks=chunks, grad_cache_bn=bn)
  rng = np.random.default_rng(0)
  metrics = []
  for i in range(steps):
    batch = parallel.to_global(
        {'views': rng.uniform(size=(16, 2, 8, 8, 3)).astype(np.float32),
         'labels': rng.integers(0, NUM_CLASSES, size=(16,)).astype(np.int32)},
        mesh)
    state, m = step(state, batch, jax.random.key(i))
    metrics.append(parallel.fetch(m))
  return jax.device_get(state), metrics


def test_train_step_with_grad_cache_matches_plain_step_frozen_bn():
  # The tiny net stands in for the ResNet to keep this test fast on 2 shared
  # cores; the step only needs the SimCLRModel output contract. The ResNet
  # path with gradient caching runs in tests/test_benchmark.py.
  net = _TinyNet()
  s0, m0 = _train(_FrozenBN(net), chunks=0)
  s2, m2 = _train(net, chunks=2, bn='frozen')
  for a, b in zip(m2, m0):
    # Not contrastive_acc: an argmax over near-tied logits flips on rounding.
    for k in ('loss', 'linear_loss', 'grad_norm', 'param_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  _assert_trees_close(s2.params, s0.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(s2.batch_stats, s0.batch_stats, rtol=0, atol=0)


def _predictor_net():
  """MoCo v3's and BYOL's shape, tiny: a ViT, a BN projection head and a
  BN predictor, so the target network and both BN modes matter."""
  from simclr_jax import models  # pylint: disable=g-import-not-at-top
  return models.SimCLRModel(
      encoder=models.ViT(width=8, depth=1, num_heads=2, patch_size=4,
                         name='encoder'),
      num_proj_layers=2, proj_out_dim=6, num_classes=NUM_CLASSES,
      predictor_hidden_dim=8)


def _assert_states_close(a, b, **tolerance):
  _assert_trees_close(a.params, b.params, **tolerance)
  _assert_trees_close(a.extra, b.extra, **tolerance)  # The target network.


@pytest.mark.parametrize('method', ['moco_v3', 'byol'])
def test_predictor_methods_grad_cache_matches_plain_step_frozen_bn(method):
  """Two chunks, frozen BN: the online predictions are cached, the target
  network runs chunk by chunk; two steps (LARS, momentum update of the
  target) land where the plain step does."""
  net = _predictor_net()
  s0, m0 = _train(_FrozenBN(net), chunks=0, method=method)
  s2, m2 = _train(net, chunks=2, bn='frozen', method=method)
  for a, b in zip(m2, m0):
    for k in ('loss', 'linear_loss', 'grad_norm', 'param_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)
  assert m0[0]['grad_norm'] > 0
  # Two LARS steps move some biases to hundreds; float32 rounding of the
  # chunked sums then reaches about 1e-5 of them.
  _assert_states_close(s2, s0, rtol=1e-4, atol=1e-6)


def test_moco_v3_grad_cache_one_chunk_is_the_plain_step():
  """One chunk, BN in training mode: the cached path (online BN statistics,
  the target's statistics by chunk) is the plain step's global BN."""
  s0, m0 = _train(_predictor_net(), chunks=0, method='moco_v3')
  s1, m1 = _train(_predictor_net(), chunks=1, method='moco_v3')
  for a, b in zip(m1, m0):
    for k in ('loss', 'grad_norm', 'param_norm'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)
  _assert_states_close(s1, s0, rtol=1e-4, atol=1e-5)
  _assert_trees_close(s1.batch_stats, s0.batch_stats, rtol=1e-5, atol=1e-6)


def test_train_step_per_chunk_bn_trains_and_updates_statistics():
  s, m = _train(_TinyNet(), chunks=2, steps=1)
  for k in ('loss', 'contrastive_acc', 'linear_loss', 'linear_acc',
            'grad_norm', 'param_norm'):
    assert np.isfinite(m[0][k]), k
  assert m[0]['skipped'] == 0.0
  # The running means moved from their initial zeros.
  means = [float(np.abs(v).max()) for p, v in
           jax.tree_util.tree_leaves_with_path(s.batch_stats)
           if p[-1].key == 'mean']
  assert means and max(means) > 0


def test_config_validation_rejects_uneven_chunks():
  c = defaults.base_config()
  c.batch_size = 48
  c.grad_cache_chunks = 4  # 48 images over 4 chunks x 8 devices: no.
  with pytest.raises(config_validation.ConfigError, match='grad_cache_chunks'):
    config_validation.validate(c, num_devices=8)
  c.grad_cache_chunks = 3
  config_validation.validate(c, num_devices=8)
  c.grad_cache_bn = 'sometimes'
  with pytest.raises(config_validation.ConfigError, match='grad_cache_bn'):
    config_validation.validate(c, num_devices=8)


def test_max_batch_per_device_picks_the_fewest_chunks_that_fit():
  for per_device, limit, want in ((512, 256, 2), (384, 256, 2), (300, 128, 3),
                                  (7, 3, 7), (128, 256, 0), (128, 0, 0)):
    chunks = config_resolve.chunks_for(per_device, limit)
    assert chunks == want, (per_device, limit, chunks)
    if chunks:  # Every chunk fits and they tile the batch.
      assert per_device % chunks == 0 and per_device // chunks <= limit
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.batch_size = 192  # 24 per device on 8 devices.
  c.max_batch_per_device = 10
  setup = pretrain.build(c)
  assert setup.config.grad_cache_chunks == 3  # 24 = 3 x 8 <= 10.
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.batch_size = 64
  c.max_batch_per_device = 8
  assert pretrain.build(c).config.grad_cache_chunks == 0  # 8 already fits.
