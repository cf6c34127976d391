"""The ResNet's convolution: `lax.conv_general_dilated`, with a CPU weight
gradient computed in batch chunks.

On XLA's CPU backend the weight gradient of a convolution is the slowest of its
three parts for the thin, high-resolution layers of a small ResNet: it is one
convolution whose output (k x k x C_in x C_out, a few hundred numbers) leaves
nothing to spread over the cores and whose contraction runs over the whole
batch. Measured on a 2-core host, the weight gradient of a 3x3 conv on 512 x 28
x 28 x 8 activations took 3.5x its forward pass. Summing the weight gradients
of a few independent slices of the batch gives the same number (up to the
order of the float32 sum) and lets the CPU runtime run the slices side by side;
docs/benchmarks.md has the measurements.

Only the CPU program changes. On GPU and TPU `weight_grad_chunks` is 1 and the
layer is `lax.conv_general_dilated` itself, so an accelerator traces exactly
the program it traced before. The forward pass and the input gradient are
XLA's own on every backend.

The slices are interleaved (rows i, i + k, i + 2k, ... for slice i of k), not
contiguous, so that under `jit` over a batch-sharded array every slice keeps
the batch's sharding: each device sums over its own rows, as for the
unsliced convolution.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Rows of a slice on each device. For the Fashion-MNIST step (512 rows, one
# device, 2 cores) slices of 32, 64 and 128 rows gave the same step time
# within the noise, 8 rows a slower one; 64 compiles faster than 32.
ROWS_PER_CHUNK = 64


def weight_grad_chunks(batch: int, backend: str | None = None,
                       num_devices: int | None = None) -> int:
  """How many interleaved slices the weight gradient of a `batch`-row conv sums.

  1 (no slicing) off the CPU, when the batch does not divide across the
  devices, or when each device holds fewer than 2 * ROWS_PER_CHUNK rows (8
  virtual CPU devices sharing 2 cores hold few rows each, and slicing those
  further was slower).
  Otherwise the largest count k with whole slices on every device and at least
  ROWS_PER_CHUNK rows per device in each.

  Args:
    batch: Rows of the convolution's input (the global batch under `jit`).
    backend: The backend the program is traced for; jax.default_backend() if
      None.
    num_devices: Devices the batch is sharded over; jax.device_count() if None
      (the project's mesh spans every device).
  """
  backend = jax.default_backend() if backend is None else backend
  num_devices = jax.device_count() if num_devices is None else num_devices
  if backend != 'cpu' or batch % num_devices:
    return 1
  per_device = batch // num_devices
  k = per_device // ROWS_PER_CHUNK
  while k > 1 and per_device % k:
    k -= 1
  return max(k, 1)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None,
                         chunks: int | None = None) -> jax.Array:
  """`lax.conv_general_dilated`, whose weight gradient sums `chunks` slices.

  Takes lax's arguments (flax.linen.Conv passes it as `conv_general_dilated`).
  `chunks` None means `weight_grad_chunks` of the batch; tests pass it.
  """
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  batch_axis = dims.lhs_spec[0]
  out_batch_axis = dims.out_spec[0]
  batch = lhs.shape[batch_axis]
  if chunks is None:
    chunks = weight_grad_chunks(batch)
  if chunks <= 1 or batch_group_count != 1 or batch % chunks:
    return conv(lhs, rhs)
  return _chunked_weight_grad(conv, chunks, batch_axis, out_batch_axis)(
      lhs, rhs)


def _slice(x: jax.Array, axis: int, chunks: int, i: int) -> jax.Array:
  """Rows i, i + chunks, i + 2 * chunks, ... of `x` along `axis`."""
  shape = x.shape[:axis] + (x.shape[axis] // chunks, chunks) + x.shape[axis + 1:]
  return lax.index_in_dim(x.reshape(shape), i, axis + 1, keepdims=False)


def _chunked_weight_grad(conv: Callable[[jax.Array, jax.Array], jax.Array],
                         chunks: int, batch_axis: int, out_batch_axis: int
                         ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`conv` with a custom VJP: XLA's input gradient, a sliced weight gradient."""

  @jax.custom_vjp
  def f(lhs, rhs):
    return conv(lhs, rhs)

  def fwd(lhs, rhs):
    return conv(lhs, rhs), (lhs, rhs)

  def bwd(residuals, g):
    lhs, rhs = residuals
    _, lhs_vjp = jax.vjp(lambda x: conv(x, rhs), lhs)
    (d_lhs,) = lhs_vjp(g)
    # Partial sums in float32 whatever the compute dtype, so slicing does not
    # add rounding to a bfloat16 run.
    d_rhs = jnp.zeros(rhs.shape, jnp.float32)
    for i in range(chunks):
      x = _slice(lhs, batch_axis, chunks, i)
      gi = _slice(g, out_batch_axis, chunks, i)
      _, rhs_vjp = jax.vjp(lambda w, x=x: conv(x, w), rhs)
      d_rhs = d_rhs + rhs_vjp(gi)[0].astype(jnp.float32)
    return d_lhs, d_rhs.astype(rhs.dtype)

  f.defvjp(fwd, bwd)
  return f
