"""Every method of the family runs on the shared sharded step, correctly wired.

Each step's loss is checked against the method's loss function applied to
projections computed independently with model.apply, and each method's
state update (EMA target, queue, memory bank, frozen prototypes) against a
direct NumPy formula. Queue and memory bank survive stop and resume exactly.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.config import validation as config_validation
from simclr_jax import losses
from simclr_jax import methods
from simclr_jax.models import resnet
from simclr_jax.runtime.config_checks import ConfigError
from simclr_jax.training import pretrain as train
from conftest import ROOT

N = 16  # images per step: 2 per device on the 8 virtual devices.
SIZE = 8


def _config(method: str):
  c = defaults.base_config()
  c.method = method
  c.dataset.name = 'digits'
  c.dataset.image_size = SIZE
  c.model.depth = 18
  c.model.width_multiplier = 0.0625
  c.model.proj_out_dim = 8
  c.batch_size = N
  c.train_steps = 4
  c.optim.warmup_epochs = 0.1
  c.loss.temperature = 0.2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.evals.random_init.enabled = False
  c.moco_v2.queue_size = 4 * N
  c.moco_v2.momentum = 0.9
  c.moco_v3.predictor_hidden_dim = 16
  c.byol.predictor_hidden_dim = 16
  c.byol.momentum = 0.9
  c.moco_v3.momentum = 0.9
  c.swav.num_prototypes = 12
  c.swav.freeze_prototypes_steps = 1
  c.instdisc.num_negatives = 32
  return c


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {'views': rng.uniform(size=(N, 2, SIZE, SIZE, 3)).astype(np.float32),
          'labels': rng.integers(0, 3, size=(N,)).astype(np.int32),
          'index': rng.permutation(1437)[:N].astype(np.int32)}


def _one_step(method_name: str, config=None, **overrides):
  c = config or _config(method_name)
  c.update_from_flattened_dict(overrides)
  setup = train.build(c)
  state0 = jax.device_get(train.initial_state(setup))
  step_fn = train.make_step(setup)
  batch = _batch()
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  batch_on_mesh = parallel.to_global(batch, setup.mesh)
  rng = jax.random.key(3)
  state1, metrics = step_fn(train.initial_state(setup), batch_on_mesh, rng)
  return c, setup, state0, jax.device_get(state1), jax.device_get(metrics), \
      batch


def _online(setup, state, batch):
  """Independent forward pass: train-mode online outputs of both views."""
  x = batch['views'].reshape((2 * N, SIZE, SIZE, 3))
  out, _ = setup.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, x,
      train=True, mutable=['batch_stats'])
  return jax.device_get(out), x


def _split(t):
  t = np.asarray(t).reshape((N, 2) + np.shape(t)[1:])
  return t[:, 0], t[:, 1]


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


LOSS_ONLY = {
    'simclr': lambda c, za, zb, b: losses.nt_xent(
        za, zb, temperature=c.loss.temperature),
    'hcl': lambda c, za, zb, b: losses.hard_negative_nt_xent(
        za, zb, temperature=c.loss.temperature, beta=c.hcl.beta,
        tau_plus=c.hcl.tau_plus),
    'supcon': lambda c, za, zb, b: losses.supcon(
        np.stack([za, zb], 1), b['labels'], temperature=c.loss.temperature),
    'triplet': lambda c, za, zb, b: losses.triplet_margin(
        np.concatenate([_unit(za), _unit(zb)]).astype(np.float32),
        np.tile(np.arange(N), 2), margin=c.margin.margin),
    'contrastive_margin': lambda c, za, zb, b: losses.contrastive_margin(
        np.concatenate([_unit(za), _unit(zb)]).astype(np.float32),
        np.tile(np.arange(N), 2), margin=c.margin.margin,
        batch_hard=c.margin.batch_hard),
}


@pytest.mark.parametrize('name', sorted(LOSS_ONLY))
def test_projection_loss_methods_score_the_right_pairs(name):
  c, setup, state0, _, metrics, batch = _one_step(name)
  out, _ = _online(setup, state0, batch)
  z_a, z_b = _split(out['projection'])
  expected = float(LOSS_ONLY[name](c, z_a, z_b, batch))
  assert math.isfinite(expected)
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4,
                             atol=1e-5)


# The predictor methods' pair loss of (predictions p, target projections z).
PREDICTOR = {
    'byol': lambda c, p, z: losses.byol(*p, *z),
    'moco_v3': lambda c, p, z: losses.moco_v3(*p, *z, c.loss.temperature),
}


def _check_predictor_loss(name, c, setup, state0, metrics, batch):
  """BYOL / MoCo v3 score each view's prediction against the other view's
  target. At step 0 the target network is a copy of the online one, so the
  targets are the online projections of the same views."""
  out, _ = _online(setup, state0, batch)
  p_a, p_b = _split(out['prediction'])
  z_a, z_b = _split(out['projection'])
  expected = float(PREDICTOR[name](c, (p_a, p_b), (z_a, z_b)))
  assert math.isfinite(expected)
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4,
                             atol=1e-5)
  # Each view against its own target would be another number.
  same_view = float(PREDICTOR[name](c, (p_a, p_b), (z_b, z_a)))
  assert abs(same_view - expected) > 1e-3


def _ema(old, new, m):
  return jax.tree.map(lambda o, n: m * np.asarray(o) + (1 - m) * np.asarray(n),
                      old, new)


@pytest.mark.parametrize('name', ['moco_v2', 'moco_v3', 'byol'])
def test_momentum_target_follows_online_by_ema(name):
  c, setup, state0, state1, metrics, batch = _one_step(name)
  if name in PREDICTOR:  # The same step's loss (one compile for both checks).
    _check_predictor_loss(name, c, setup, state0, metrics, batch)
  section = c[methods.METHODS[name].section]
  m = section.momentum
  if name != 'moco_v2':  # BYOL / MoCo v3 cosine schedule at step 0: tau = m.
    m = 1 - (1 - m) * (math.cos(0.0) + 1) / 2
  online1 = {k: state1.params[k] for k in ('encoder', 'projection_head')}
  target0 = state0.extra['target_params']
  expected = _ema(target0, online1, m)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               state1.extra['target_params'], expected)
  assert math.isfinite(float(metrics['contrastive_loss']))


def test_moco_enqueues_both_views_keys_after_the_loss():
  c, setup, state0, state1, metrics, batch = _one_step('moco_v2')
  target = setup.model.clone(linear_head=False, predictor_hidden_dim=0,
                             num_prototypes=0)
  x = batch['views'].reshape((2 * N, SIZE, SIZE, 3))
  out, _ = target.apply({'params': state0.extra['target_params'],
                         'batch_stats': state0.extra['target_batch_stats']},
                        x, train=True, mutable=['batch_stats'])
  keys = _unit(out['projection'])
  queue1 = np.asarray(state1.extra['queue'])
  np.testing.assert_allclose(queue1[:2 * N], keys, atol=1e-5)
  np.testing.assert_array_equal(queue1[2 * N:],
                                np.asarray(state0.extra['queue'])[2 * N:])
  assert int(state1.extra['queue_ptr']) == 2 * N
  # The loss used the queue from BEFORE the enqueue (He et al. 2020, Alg. 1).
  online, _ = _online(setup, state0, batch)
  q_a, q_b = _split(_unit(online['projection']))
  k_a, k_b = _split(keys)
  queue0 = np.asarray(state0.extra['queue'], np.float64)

  def infonce(q, k):
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue0.T],
                            1) / c.loss.temperature
    logits -= logits.max(1, keepdims=True)
    return np.mean(-logits[:, 0] + np.log(np.exp(logits).sum(1)))

  expected = 0.5 * (infonce(q_a, k_b) + infonce(q_b, k_a))
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4)


def test_instdisc_updates_only_the_batch_rows_of_the_bank():
  c, setup, state0, state1, _, batch = _one_step('instdisc')
  out, _ = _online(setup, state0, batch)
  z_a, z_b = _split(_unit(out['projection']))
  f = _unit(z_a + z_b)
  bank0 = np.asarray(state0.extra['memory_bank'], np.float64)
  bank1 = np.asarray(state1.extra['memory_bank'])
  m = c.instdisc.bank_momentum
  idx = batch['index']
  np.testing.assert_allclose(bank1[idx], _unit(m * bank0[idx] + (1 - m) * f),
                             atol=1e-5)
  others = np.setdiff1d(np.arange(len(bank0)), idx)
  np.testing.assert_array_equal(bank1[others], bank0[others].astype(np.float32))
  np.testing.assert_allclose(np.linalg.norm(bank1, axis=1), 1.0, atol=1e-5)


def test_swav_prototypes_frozen_then_trained():
  # No warmup: at step 0 the learning rate is already the peak, so every
  # parameter but the frozen prototypes moves.
  c, setup, state0, state1, metrics, batch = _one_step(
      'swav', **{'optim.warmup_epochs': 0.0})
  assert c.swav.freeze_prototypes_steps == 1
  np.testing.assert_array_equal(state1.params['prototypes'],
                                state0.params['prototypes'])
  assert not np.allclose(state1.params['encoder']['conv_init']['kernel'],
                         state0.params['encoder']['conv_init']['kernel'])
  out, _ = _online(setup, state0, batch)
  s_a, s_b = _split(out['prototype_scores'])
  q_a = losses.sinkhorn(s_a, c.swav.epsilon, c.swav.sinkhorn_iterations)
  q_b = losses.sinkhorn(s_b, c.swav.epsilon, c.swav.sinkhorn_iterations)
  expected = losses.swav(s_a, s_b, q_a, q_b, c.loss.temperature)
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4)


@pytest.mark.parametrize('symmetric', [True, False])
def test_invaspread_scores_the_global_batch_with_one_head_layer(symmetric):
  assert methods.METHODS['invaspread'].section == 'invaspread'
  c, setup, state0, _, metrics, batch = _one_step(
      'invaspread', **{'model.num_proj_layers': 1,
                       'invaspread.symmetric': symmetric})
  # No MLP projector: one Dense (no hidden layer, no ReLU) + its BN.
  head = state0.params['projection_head']
  assert sorted(head) == ['bn1', 'dense1']
  assert head['dense1']['kernel'].shape[-1] == c.model.proj_out_dim
  out, _ = _online(setup, state0, batch)
  np.testing.assert_allclose(out['projection'], out['head_hiddens'][1])
  # All N images of the step (2 per device) against each other, image i's
  # two views as the positive pair.
  z_a, z_b = _split(out['projection'])
  t = c.loss.temperature
  expected = float(losses.invaspread(z_a, z_b, t))
  if symmetric:
    expected = 0.5 * (expected + float(losses.invaspread(z_b, z_a, t)))
  assert math.isfinite(expected)
  np.testing.assert_allclose(metrics['contrastive_loss'], expected, rtol=2e-4,
                             atol=1e-5)
  # Pairing views of different images gives another loss.
  shuffled = float(losses.invaspread(z_a, np.roll(z_b, 1, axis=0), t))
  assert abs(shuffled - float(losses.invaspread(z_a, z_b, t))) > 1e-3


def test_invaspread_bad_settings_are_one_line_errors():
  c = _config('invaspread')
  config_validation.validate(c, num_devices=8)
  c.batch_size = 1
  with pytest.raises(ConfigError) as e:
    config_validation.validate(c, num_devices=1)
  assert '\n' not in str(e.value)
  assert 'config.batch_size=1 is invalid: must be an integer >= 2' in str(
      e.value)
  c = _config('invaspread')
  c.invaspread = {'symmetric': 'yes'}  # E.g. a hand-edited config.json.
  with pytest.raises(ConfigError, match=r"^config.invaspread.symmetric='yes' "
                     'is not supported; choose one of True, False$'):
    methods.METHODS['invaspread'].validate(c)


def _np_sinkhorn(scores, epsilon, iterations):
  """The paper's Sinkhorn-Knopp loop (Caron et al. 2020, App. A.1), float64."""
  q = np.exp((np.asarray(scores, np.float64) - np.max(scores)) / epsilon)
  b, k = q.shape
  for _ in range(iterations):
    q = q / q.sum(0, keepdims=True) / k
    q = q / q.sum(1, keepdims=True) / b
  return q * b


def _np_log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def _np_swav_loss(s_a, s_b, q_a, q_b, t):
  return np.mean(-np.sum(q_b * _np_log_softmax(s_a / t), 1) -
                 np.sum(q_a * _np_log_softmax(s_b / t), 1))


def _step_batch(batch, step=0):
  return methods.StepBatch(
      x=jnp.asarray(batch['views'].reshape((2 * N, SIZE, SIZE, 3))),
      labels=jnp.asarray(batch['labels']), index=None,
      rng=jax.random.key(5), step=jnp.asarray(step, jnp.int32))


def _proto_norms(params):
  return np.linalg.norm(np.asarray(params['prototypes'], np.float64), axis=0)


def test_swav_prototypes_are_unit_norm_after_every_step():
  # Caron et al. 2020, App. A: renormalised after each step, outside the
  # gradient; they also start unit-norm.
  # A non-finite step (the third, skipped under on_nan='skip_step') keeps
  # the previous, already unit-norm prototypes.
  c = _config('swav')
  c.optim.warmup_epochs = 0.0
  c.on_nan = 'skip_step'
  c.debug.inject_nan_at_step = 3
  setup = train.build(c)
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  state = train.initial_state(setup)
  step_fn = train.make_step(setup)
  before = jax.device_get(state.params['prototypes'])
  np.testing.assert_allclose(_proto_norms(jax.device_get(state.params)), 1.0,
                             atol=1e-5)
  for k in range(5):
    state, metrics = step_fn(
        state, parallel.to_global(_batch(k), setup.mesh), jax.random.key(k))
    params = jax.device_get(state.params)
    skipped = k + 1 == c.debug.inject_nan_at_step
    assert float(jax.device_get(metrics['skipped'])) == float(skipped)
    np.testing.assert_allclose(_proto_norms(params), 1.0, atol=1e-5)
    after = np.asarray(params['prototypes'])
    if skipped:
      np.testing.assert_array_equal(after, before)
    elif k >= c.swav.freeze_prototypes_steps:  # Trained (not frozen): moved.
      assert not np.allclose(after, before)
    before = after


def test_swav_prototype_gradient_is_that_of_plain_weights():
  # The forward pass uses the stored prototypes P as they are: scores =
  # normalise(z) @ P. At a P that is NOT unit-norm this differs from the old
  # normalise(z) @ normalise(P), whose gradient carries the normalisation's
  # Jacobian.
  c = _config('swav')
  setup = train.build(c)
  method, model = setup.method, setup.model
  state0 = jax.device_get(train.initial_state(setup))
  batch = _batch()
  rng = np.random.default_rng(0)
  proto = np.asarray(state0.params['prototypes'])
  proto = (proto * rng.uniform(0.3, 2.0, size=(1, proto.shape[1]))).astype(
      np.float32)
  params = dict(state0.params, prototypes=proto)
  grads = jax.grad(lambda p: method.loss(model, p, state0.batch_stats,
                                         state0.extra, _step_batch(batch))[0])(
                                             params)
  g = np.asarray(grads['prototypes'], np.float64)

  out, _ = _online(setup, state0, batch)  # z does not depend on P.
  zn = _unit(out['projection'])
  z_a, z_b = _split(zn)
  t, eps, iters = c.loss.temperature, c.swav.epsilon, c.swav.sinkhorn_iterations
  p64 = proto.astype(np.float64)
  s_a, s_b = z_a @ p64, z_b @ p64
  q_a, q_b = _np_sinkhorn(s_a, eps, iters), _np_sinkhorn(s_b, eps, iters)

  def softmax(x):
    return np.exp(_np_log_softmax(x))

  # d/ds of mean_i -q.log_softmax(s_i / T) = (softmax(s_i / T) - q) / (T N).
  g_a = (softmax(s_a / t) - q_b) / (t * N)
  g_b = (softmax(s_b / t) - q_a) / (t * N)
  expected = z_a.T @ g_a + z_b.T @ g_b
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4 * scale)

  def old_loss(p):  # Prototypes normalised inside the forward pass.
    pn = p / jnp.linalg.norm(p, axis=0, keepdims=True)
    sa, sb = jnp.asarray(z_a, jnp.float32) @ pn, jnp.asarray(z_b,
                                                           jnp.float32) @ pn
    return losses.swav(sa, sb, losses.sinkhorn(sa, eps, iters),
                       losses.sinkhorn(sb, eps, iters), t)

  g_old = np.asarray(jax.grad(old_loss)(jnp.asarray(proto)))
  assert np.abs(g_old - expected).max() > 0.05 * scale


def _swav_queue_setup(queue_length, start_epoch=0):
  c = _config('swav')
  c.swav.queue_length = queue_length
  c.swav.queue_start_epochs = start_epoch
  return c, train.build(c)


def test_swav_codes_with_a_queue_are_sinkhorn_over_queue_and_batch():
  c, setup = _swav_queue_setup(2 * N, start_epoch=1)
  method = setup.method
  state0 = jax.device_get(train.initial_state(setup))
  assert state0.extra['queue'].shape == (2, 2 * N, c.model.proj_out_dim)
  batch = _batch()
  out, _ = _online(setup, state0, batch)
  s_a, s_b = _split(out['prototype_scores'])
  proto = np.asarray(state0.params['prototypes'], np.float64)
  rng = np.random.default_rng(1)
  queue = _unit(rng.normal(size=(2, 2 * N, c.model.proj_out_dim))).astype(
      np.float32)
  eps, iters = c.swav.epsilon, c.swav.sinkhorn_iterations
  with_queue = [
      _np_sinkhorn(np.concatenate([queue[v] @ proto, s]), eps, iters)[-N:]
      for v, s in enumerate((s_a, s_b))]
  batch_only = [_np_sinkhorn(s, eps, iters) for s in (s_a, s_b)]
  start = method.queue_start_step
  assert start == 1437 // N  # Epoch 1.

  def codes(filled, step):
    extra = {'queue': jnp.asarray(queue),
             'queue_filled': jnp.asarray(filled, jnp.int32)}
    return [np.asarray(q) for q in method.codes(
        state0.params, extra, jnp.asarray(s_a), jnp.asarray(s_b),
        jnp.asarray(step, jnp.int32))]

  for got, want in ((codes(2 * N, start), with_queue),
                    (codes(2 * N, start + 7), with_queue),
                    (codes(2 * N, start - 1), batch_only),  # Not started.
                    (codes(N, start), batch_only)):  # Not full yet.
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  assert not np.allclose(with_queue[0], batch_only[0], atol=1e-3)

  # The jitted step's loss uses these codes (queue in use from step 0).
  c, setup = _swav_queue_setup(2 * N, start_epoch=0)
  state = train.initial_state(setup)
  state = state.replace(extra={'queue': jnp.asarray(queue),
                               'queue_filled': jnp.asarray(2 * N, jnp.int32)})
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  state = jax.device_put(state, parallel.replicated(setup.mesh))
  _, metrics = train.make_step(setup)(
      state, parallel.to_global(batch, setup.mesh), jax.random.key(3))
  expected = _np_swav_loss(s_a, s_b, with_queue[0], with_queue[1],
                           c.loss.temperature)
  np.testing.assert_allclose(jax.device_get(metrics['contrastive_loss']),
                             expected, rtol=2e-4)


def test_swav_queue_holds_the_latest_features_newest_first():
  c, setup = _swav_queue_setup(4 * N)
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  state = train.initial_state(setup)
  step_fn = train.make_step(setup)
  feats = []
  for k in range(5):
    batch = _batch(k)
    out, _ = _online(setup, jax.device_get(state), batch)
    feats.append(_split(_unit(out['projection'])))
    state, _ = step_fn(state, parallel.to_global(batch, setup.mesh),
                       jax.random.key(k))
    extra = jax.device_get(state.extra)
    assert int(extra['queue_filled']) == min((k + 1) * N, 4 * N)
  queue = np.asarray(extra['queue'])
  for v in range(2):
    expected = np.concatenate([feats[k][v] for k in (4, 3, 2, 1)])
    np.testing.assert_allclose(queue[v], expected, atol=1e-5)


def test_swav_queue_length_must_be_a_multiple_of_the_batch():
  from simclr_jax.runtime import config_checks  # pylint: disable=g-import-not-at-top
  c = _config('swav')
  c.swav.queue_length = N + 4
  with pytest.raises(config_checks.ConfigError) as e:
    methods.METHODS['swav'].validate(c)
  msg = str(e.value)
  assert '\n' not in msg and f'config.swav.queue_length={N + 4}' in msg
  assert f'multiple of batch_size = {N}' in msg
  c.swav.queue_length = 0  # Off.
  methods.METHODS['swav'].validate(c)
  assert 'swav.queue_length' in methods.resume_shape_fields(c)


def test_unknown_method_is_a_clear_error():
  c = _config('simclr')
  with pytest.raises(ValueError, match='method'):
    c.method = 'simsiam'
    train.build(c)


@pytest.mark.parametrize('name,key', [('moco_v2', 'queue'),
                                      ('instdisc', 'memory_bank'),
                                      ('swav', 'queue')])
def test_method_state_survives_stop_and_resume(tmp_path, name, key):
  c = _config(name)
  c.dataset.image_size = 16
  c.batch_size = 64
  c.moco_v2.queue_size = 4 * 128
  # Full after 2 steps and in use from then on: the resumed run (from step
  # 2) must continue with exactly the checkpointed queue.
  c.swav.queue_length = 2 * 64
  c.swav.queue_start_epochs = 0
  full = train.pretrain(c, str(tmp_path / 'full'))
  part_dir = str(tmp_path / 'part')
  first = train.pretrain(c, part_dir, stop_after_steps=2)
  assert first['interrupted'] and first['steps'] == 2
  second = train.pretrain(c, part_dir)
  assert second['resumed_from_step'] == 2 and second['steps'] == 4
  a = jax.device_get(full['state'].extra)
  b = jax.device_get(second['state'].extra)
  np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]),
                             rtol=1e-5, atol=1e-6)
  if name == 'swav':
    assert int(a['queue_filled']) == int(b['queue_filled']) == 2 * 64
    np.testing.assert_allclose(  # Filled with unit features, no zeros.
        np.linalg.norm(np.asarray(a['queue']), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.device_get(second['state'].params['prototypes'])),
        np.asarray(jax.device_get(full['state'].params['prototypes'])),
        rtol=1e-5, atol=1e-6)
  if name == 'moco_v2':
    assert int(a['queue_ptr']) == int(b['queue_ptr']) == (4 * 128) % (4 * 128)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-6),
                 a['target_params'], b['target_params'])


def test_moco_v3_vit_recipe_heads_loss_and_frozen_patch_projection():
  """configs/methods/moco_v3.py's ViT settings on a tiny ViT: the loss is
  MoCo v3's of independently computed outputs, the projector and predictor
  end in a BN without affine parameters (their train-mode outputs by
  NumPy from the layer before), and the frozen patch projection does
  not move while the blocks do."""
  recipe = defaults.recipe_module(os.path.join(ROOT, 'configs', 'methods',
                                               'moco_v3.py'))
  # No warmup: the first step's learning rate is not 0.
  c = recipe.vit_recipe(_config('moco_v3'), size='tiny', patch_size=4,
                        warmup_epochs=0)
  c.model.vit.update(dict(width=16, depth=1, num_heads=2))
  c.model.proj_hidden_dim = 12
  c.moco_v3.predictor_hidden_dim = 12
  c.moco_v3.momentum = 0.9
  config_validation.validate(c, num_devices=8)
  assert c.optim.name == 'adamw' and c.loss.temperature == 0.2
  c, setup, state0, state1, metrics, batch = _one_step('moco_v3', c)
  _check_predictor_loss('moco_v3', c, setup, state0, metrics, batch)
  head, pred = state0.params['projection_head'], state0.params['predictor']
  assert sorted(head) == ['bn1', 'bn2', 'dense1', 'dense2', 'dense3']
  assert 'bias' not in pred['dense2'] and 'bn2' not in pred
  assert np.shape(head['dense1']['kernel']) == (16, 12)
  out, _ = _online(setup, state0, batch)

  def bn(x, p=None):  # Train-mode BN by NumPy; no p = no affine.
    y = (x - x.mean(0)) / np.sqrt(x.var(0) + resnet.BN_EPSILON)
    return y if p is None else y * p['scale'] + p.get('bias', 0.0)

  f64 = lambda t: np.asarray(t, np.float64)
  z = bn(f64(out['head_hiddens'][2]) @ f64(head['dense3']['kernel']))
  np.testing.assert_allclose(out['projection'], z, rtol=1e-4, atol=1e-4)
  h = np.maximum(bn(f64(out['projection']) @ f64(pred['dense1']['kernel']),
                    jax.tree.map(f64, pred['bn1'])), 0)
  np.testing.assert_allclose(out['prediction'],
                             bn(h @ f64(pred['dense2']['kernel'])),
                             rtol=1e-4, atol=1e-4)
  patch0 = state0.params['encoder']['patch_embed']
  patch1 = state1.params['encoder']['patch_embed']
  jax.tree.map(np.testing.assert_array_equal, patch0, patch1)
  assert not np.allclose(state0.params['encoder']['blocks_0']['mlp']['fc1']
                         ['kernel'], state1.params['encoder']['blocks_0']
                         ['mlp']['fc1']['kernel'])
