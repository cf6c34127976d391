"""Every method of the family runs on the shared sharded step, correctly wired.

Each step's loss is checked against the method's loss function applied to
projections computed independently with model.apply, and each method's
state update (EMA target, queue, memory bank, frozen prototypes) against a
direct NumPy formula. Queue and memory bank survive stop and resume exactly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax import losses
from simclr_jax import methods
from simclr_jax.training import pretrain as train

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
  c.eval.probe_random_init = False
  c.moco.queue_size = 4 * N
  c.moco.momentum = 0.9
  c.mocov3.predictor_hidden_dim = 16
  c.byol.predictor_hidden_dim = 16
  c.byol.momentum = 0.9
  c.mocov3.momentum = 0.9
  c.swav.num_prototypes = 12
  c.swav.freeze_prototypes_steps = 1
  c.instdisc.num_negatives = 32
  return c


def _batch(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {'views': rng.uniform(size=(N, 2, SIZE, SIZE, 3)).astype(np.float32),
          'labels': rng.integers(0, 3, size=(N,)).astype(np.int32),
          'index': rng.permutation(1437)[:N].astype(np.int32)}


def _one_step(method_name: str, **overrides):
  c = _config(method_name)
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


def _ema(old, new, m):
  return jax.tree.map(lambda o, n: m * np.asarray(o) + (1 - m) * np.asarray(n),
                      old, new)


@pytest.mark.parametrize('name', ['moco_v2', 'moco_v3', 'byol'])
def test_momentum_target_follows_online_by_ema(name):
  c, _, state0, state1, metrics, _ = _one_step(name)
  section = {'moco_v2': c.moco, 'moco_v3': c.mocov3, 'byol': c.byol}[name]
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
  # The loss used the queue from BEFORE the enqueue (REFERENCE §6).
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


def test_unknown_method_is_a_clear_error():
  c = _config('simclr')
  with pytest.raises(ValueError, match='method'):
    c.method = 'simsiam'
    train.build(c)


@pytest.mark.parametrize('name,key', [('moco_v2', 'queue'),
                                      ('instdisc', 'memory_bank')])
def test_method_state_survives_stop_and_resume(tmp_path, name, key):
  c = _config(name)
  c.dataset.image_size = 16
  c.batch_size = 64
  c.moco.queue_size = 4 * 128
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
  if name == 'moco_v2':
    assert int(a['queue_ptr']) == int(b['queue_ptr']) == (4 * 128) % (4 * 128)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-6),
                 a['target_params'], b['target_params'])
