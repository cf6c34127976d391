"""LARS and the schedule against docs/algorithms.md#optimiser, in NumPy."""

import math

import jax
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.runtime import optim


def numpy_lars_step(params, grads, velocity, lr, wd, eeta, momentum, adapt):
  """g += wd*w; trust = eeta*|w|/|g| (1 if a norm is 0); v = m v + lr trust g."""
  new_p, new_v = {}, {}
  for k in params:
    w, g = params[k].astype(np.float64), grads[k].astype(np.float64)
    if adapt[k]:
      g = g + wd * w
      wn, gn = np.linalg.norm(w), np.linalg.norm(g)
      trust = eeta * wn / gn if wn > 0 and gn > 0 else 1.0
    else:
      trust = 1.0
    v = momentum * velocity[k] + lr * trust * g
    new_v[k] = v
    new_p[k] = w - v
  return new_p, new_v


def test_lars_matches_reference_formula_with_exclusions():
  c = defaults.base_config()
  c.batch_size = 256
  c.optim.base_learning_rate = 0.8
  c.optim.weight_decay = 1e-3
  c.optim.warmup_epochs = 0
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=10, total_steps=100)
  rng = np.random.default_rng(0)
  params = {
      'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
      'bn': {'scale': rng.normal(size=(4,)).astype(np.float32),
             'bias': rng.normal(size=(4,)).astype(np.float32)},
      'dense': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                'bias': rng.normal(size=(3,)).astype(np.float32)},
      'zero': {'kernel': np.zeros((2, 2), np.float32)},
  }
  flat = {'/'.join(k): v for k, v in _flatten(params).items()}
  adapt = {k: not k.endswith(('bias', 'scale')) for k in flat}
  assert adapt == {'conv/kernel': True, 'bn/scale': False, 'bn/bias': False,
                   'dense/kernel': True, 'dense/bias': False,
                   'zero/kernel': True}
  state = tx.init(params)
  p = params
  ref_p = dict(flat)
  ref_v = {k: 0.0 for k in flat}
  for step in range(3):
    grads = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    lr = float(schedule(step))
    ref_p, ref_v = numpy_lars_step(
        ref_p, {'/'.join(k): v for k, v in _flatten(grads).items()}, ref_v,
        lr, 1e-3, 0.001, 0.9, adapt)
    updates, state = tx.update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  got = {'/'.join(k): np.asarray(v) for k, v in _flatten(p).items()}
  for k in flat:
    np.testing.assert_allclose(got[k], ref_p[k], rtol=1e-5, atol=1e-7,
                               err_msg=k)
  # The excluded leaves really moved by plain momentum SGD, not by trust*lr.
  assert not np.allclose(got['bn/scale'], flat['bn/scale'])


def test_lars_gives_the_online_linear_head_momentum_sgd_with_l2():
  """The head's update, step by step: v = m*v + lr*(g + wd*w); w -= v.

  No trust ratio for any head leaf, weight decay on its kernel only; the
  representation's kernels keep LARS (trust ratio and decay).
  """
  c = defaults.base_config()
  c.batch_size = 512
  c.optim.base_learning_rate = 1.0
  c.optim.weight_decay = 1e-2
  c.optim.warmup_epochs = 1
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=2, total_steps=10)
  rng = np.random.default_rng(1)
  params = {
      'encoder': {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))}},
      'linear_head': {'dense': {'kernel': rng.normal(size=(4, 10)),
                                'bias': rng.normal(size=(10,))}},
  }
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  flat = {'/'.join(k): v for k, v in _flatten(params).items()}
  state, p = tx.init(params), params
  head_w = flat['linear_head/dense/kernel'].astype(np.float64)
  head_b = flat['linear_head/dense/bias'].astype(np.float64)
  v_w, v_b = 0.0, 0.0
  enc_p, enc_v = {'k': flat['encoder/conv/kernel']}, {'k': 0.0}
  for step in range(4):
    grads = jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), p)
    g = {'/'.join(k): np.asarray(v, np.float64)
         for k, v in _flatten(grads).items()}
    lr = float(schedule(step))
    v_w = 0.9 * v_w + lr * (g['linear_head/dense/kernel'] + 1e-2 * head_w)
    head_w = head_w - v_w
    v_b = 0.9 * v_b + lr * g['linear_head/dense/bias']
    head_b = head_b - v_b
    enc_p, enc_v = numpy_lars_step(enc_p, {'k': g['encoder/conv/kernel']},
                                   enc_v, lr, 1e-2, 0.001, 0.9, {'k': True})
    updates, state = tx.update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    got = {'/'.join(k): np.asarray(v) for k, v in _flatten(p).items()}
    np.testing.assert_allclose(got['linear_head/dense/kernel'], head_w,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['linear_head/dense/bias'], head_b,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['encoder/conv/kernel'], enc_p['k'],
                               rtol=1e-5, atol=1e-7)
  # Without the exclusion the head would have moved by about eeta = 0.1% of
  # its norm per unit of learning rate; it moved by far more.
  moved = np.linalg.norm(head_w - flat['linear_head/dense/kernel'])
  assert moved > 0.1 * np.linalg.norm(flat['linear_head/dense/kernel'])


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


@pytest.mark.parametrize('scaling,batch,expected', [
    ('linear', 4096, 0.3 * 16), ('sqrt', 4096, 0.075 * 64),
    ('linear', 512, 2.0)])
def test_peak_learning_rate(scaling, batch, expected):
  base = {'linear': 0.3, 'sqrt': 0.075}[scaling] if batch == 4096 else 1.0
  assert math.isclose(optim.peak_learning_rate(base, batch, scaling),
                      expected)


def test_schedule_warmup_then_cosine_to_zero():
  c = defaults.base_config()
  c.batch_size = 512
  c.optim.base_learning_rate = 1.0
  c.optim.warmup_epochs = 10
  spe, total = 20, 1000
  _, schedule = optim.make_optimizer(c, steps_per_epoch=spe, total_steps=total)
  peak = 2.0
  warm = 10 * spe
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(warm // 2), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(warm), peak, rtol=1e-6)
  mid = warm + (total - warm) // 2
  np.testing.assert_allclose(schedule(mid), peak * 0.5, rtol=1e-5)
  np.testing.assert_allclose(schedule(total), 0.0, atol=1e-7)
  k = warm + 123
  cos = 0.5 * peak * (1 + math.cos(math.pi * 123 / (total - warm)))
  np.testing.assert_allclose(schedule(k), cos, rtol=1e-5)


def test_unknown_optimizer_is_a_clear_error():
  c = defaults.base_config()
  c.optim.name = 'rmsprop'
  with pytest.raises(ValueError, match=r"optim.name='rmsprop'.*lars, sgd"):
    optim.make_optimizer(c, 10, 100)
