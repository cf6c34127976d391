"""NT-Xent against an independent NumPy implementation of the paper's formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simclr_jax import losses
from simclr_jax.runtime import parallel


def numpy_nt_xent(za, zb, temperature):
  """Paper eq. (1), averaged over all 2N anchors, in float64."""
  z = np.concatenate([za, zb]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  n = n2 // 2
  sim = z @ z.T / temperature
  total = 0.0
  for i in range(n2):
    pos = (i + n) % n2
    others = [k for k in range(n2) if k != i]
    denom = np.sum(np.exp(sim[i, others]))
    total += -np.log(np.exp(sim[i, pos]) / denom)
  return total / n2


def numeric_grad(f, x, eps=1e-5):
  g = np.zeros_like(x, dtype=np.float64)
  for idx in np.ndindex(x.shape):
    xp, xm = x.astype(np.float64), x.astype(np.float64)
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


@pytest.mark.parametrize('temperature', [0.1, 0.5, 1.0])
def test_value_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(2, 6, 5)).astype(np.float32)
  got = losses.nt_xent(za, zb, temperature=temperature)
  np.testing.assert_allclose(got, numpy_nt_xent(za, zb, temperature),
                             rtol=1e-5)


def test_scale_invariant_inputs_need_not_be_normalised():
  rng = np.random.default_rng(1)
  za, zb = rng.normal(size=(2, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.nt_xent(za, zb),
                             losses.nt_xent(3.0 * za, 0.5 * zb), rtol=1e-5)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  za, zb = rng.normal(size=(2, 4, 3)).astype(np.float32)
  t = 0.3
  ga, gb = jax.grad(lambda a, b: losses.nt_xent(a, b, temperature=t),
                    argnums=(0, 1))(za, zb)
  na = numeric_grad(lambda a: numpy_nt_xent(a, zb, t), za)
  nb = numeric_grad(lambda b: numpy_nt_xent(za, b, t), zb)
  np.testing.assert_allclose(ga, na, atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(gb, nb, atol=2e-4, rtol=1e-3)


def test_perfect_pairs_give_low_loss_and_full_accuracy():
  # Orthogonal pairs: the positive is the only similar key.
  z = np.eye(8, dtype=np.float32)[:4] * 10
  loss, metrics = losses.nt_xent_with_stats(z, z, temperature=0.5)
  assert metrics['contrastive_acc'] == 1.0
  # Remaining mass: 2N-2 negatives at cosine 0 vs positive at cosine 1.
  expected = -np.log(np.exp(2) / (np.exp(2) + 6))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_sharded_equals_single_device_value_and_gradient():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  rng = np.random.default_rng(3)
  za, zb = rng.normal(size=(2, 16, 8)).astype(np.float32)
  sharded = jax.shard_map(
      functools.partial(losses.sharded_nt_xent, temperature=0.2,
                        axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P('data'), P('data')), out_specs=(P(), P()))

  def sharded_loss(a, b):
    return sharded(a, b)[0]

  sh = parallel.data_sharding(mesh)
  a8, b8 = jax.device_put(za, sh), jax.device_put(zb, sh)
  v8, (ga8, gb8) = jax.jit(jax.value_and_grad(sharded_loss, (0, 1)))(a8, b8)
  v1, (ga1, gb1) = jax.value_and_grad(
      lambda a, b: losses.nt_xent(a, b, 0.2), (0, 1))(za, zb)
  np.testing.assert_allclose(v8, numpy_nt_xent(za, zb, 0.2), rtol=1e-5)
  np.testing.assert_allclose(v8, v1, rtol=1e-6)
  # A gather whose backward drops the remote part, or scales by 1/8, fails.
  np.testing.assert_allclose(ga8, ga1, atol=1e-7, rtol=1e-5)
  np.testing.assert_allclose(gb8, gb1, atol=1e-7, rtol=1e-5)
  _, m8 = jax.jit(sharded)(a8, b8)
  _, m1 = losses.nt_xent_with_stats(za, zb, 0.2)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)


def test_entropy_metric_matches_numpy():
  rng = np.random.default_rng(4)
  za, zb = rng.normal(size=(2, 5, 4)).astype(np.float32)
  _, m = losses.nt_xent_with_stats(za, zb, temperature=0.5)
  z = np.concatenate([za, zb]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T / 0.5
  np.fill_diagonal(sim, -np.inf)
  p = np.exp(sim - sim.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), 1)
  np.testing.assert_allclose(m['contrastive_entropy'], ent.mean(), rtol=1e-5)
