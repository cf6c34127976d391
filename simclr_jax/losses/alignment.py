"""Feature alignment across domains: the losses of `--mode=adapt`.

Pure functions of the source and target feature batches (the encoder's
features of labelled source and unlabelled target images), each jittable and
differentiable; downstream/adapt.py adds them to the source cross-entropy.

  gradient_reversal  DANN's layer: identity forward, -scale x gradient back
                     (Ganin & Lempitsky 2015, Section 3.2).
  dann_schedule      its scale over training, 2 / (1 + exp(-gamma p)) - 1
                     with p the progress in [0, 1] (ibid., Section 5.2.2).
  coral              Deep CORAL: ||C_s - C_t||_F^2 / (4 d^2) with C the
                     unbiased feature covariances (Sun & Saenko 2016, eq. 1).
  mmd                multi-kernel MMD^2 with Gaussian kernels (Long et al.
                     2015, DAN, eq. 2-3), the biased estimate over all pairs.
"""


import jax
import jax.numpy as jnp

# DAN's kernel family: bandwidths base * 2^k around a data-driven base.
MMD_BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


@jax.custom_vjp
def gradient_reversal(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity on the way forward; the way back multiplies by -scale."""
  del scale
  return x


def _reversal_fwd(x, scale):
  return x, scale


def _reversal_bwd(scale, g):
  return (-scale * g, jnp.zeros_like(scale))


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


def dann_schedule(progress: jax.Array, gamma: float = 10.0) -> jax.Array:
  """DANN's reversal scale: 0 at the start, rising smoothly towards 1."""
  return 2.0 / (1.0 + jnp.exp(-gamma * progress)) - 1.0


def _covariance(x: jax.Array) -> jax.Array:
  centred = x - jnp.mean(x, axis=0, keepdims=True)
  return centred.T @ centred / (x.shape[0] - 1)


def coral(source: jax.Array, target: jax.Array) -> jax.Array:
  """Deep CORAL loss between (n_s, d) and (n_t, d) feature batches."""
  source = source.astype(jnp.float32)
  target = target.astype(jnp.float32)
  d = source.shape[1]
  diff = _covariance(source) - _covariance(target)
  return jnp.sum(diff * diff) / (4.0 * d * d)


def _sq_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :]
                     - 2.0 * a @ b.T, 0.0)


def mmd_bandwidths(source: jax.Array, target: jax.Array) -> jax.Array:
  """sigma^2 of each kernel: the multipliers x the mean squared distance of
  all pairs of the joint batch, held constant for the gradient (DAN)."""
  joint = jnp.concatenate([source, target]).astype(jnp.float32)
  base = jax.lax.stop_gradient(jnp.mean(_sq_distances(joint, joint)))
  return base * jnp.asarray(MMD_BANDWIDTH_MULTIPLIERS, jnp.float32)


def mmd(source: jax.Array, target: jax.Array,
        bandwidths: jax.Array | None = None) -> jax.Array:
  """MK-MMD^2 = E k(s, s') + E k(t, t') - 2 E k(s, t), k = sum of Gaussians
  exp(-||a - b||^2 / (2 sigma^2)) over `bandwidths` (sigma^2 values; default
  `mmd_bandwidths`)."""
  source = source.astype(jnp.float32)
  target = target.astype(jnp.float32)
  if bandwidths is None:
    bandwidths = mmd_bandwidths(source, target)

  def kernel(a, b):
    d2 = _sq_distances(a, b)[..., None]
    return jnp.mean(jnp.sum(jnp.exp(-d2 / (2.0 * bandwidths)), -1))

  return (kernel(source, source) + kernel(target, target)
          - 2.0 * kernel(source, target))
