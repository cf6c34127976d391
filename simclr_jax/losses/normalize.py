"""The one L2 normaliser every loss, method and read-out uses."""

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm: x / sqrt(max(sum x^2, eps)).

  The same formula as tf.math.l2_normalize, which the authors' code uses. The
  eps floor keeps the value and the gradient of an all-zero row finite (the
  row stays zero, so its cosine similarity to everything is 0).
  """
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps))
