"""Batched, jitted feature extraction from a NumPy image array.

The probes and the kNN monitor work on frozen features of a whole split.
Running the encoder batch by batch bounds device memory; padding the last
batch to the common size means XLA compiles the encoder once per call
instead of once more for the ragged tail (a full recompilation for a
ResNet-50, seconds to minutes).
"""

from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from simclr_jax.runtime.parallel import DATA_AXIS


def _is_jitted(fn: Callable[..., Any]) -> bool:
  """True for a jax.jit-wrapped function (it can be lowered)."""
  return hasattr(fn, 'lower') and hasattr(fn, 'trace')


def _to_host(out: jax.Array) -> np.ndarray:
  """Device result to host NumPy, gathering from other hosts if needed."""
  if not out.is_fully_addressable:
    out = multihost_utils.process_allgather(out, tiled=True)
  return np.asarray(out, np.float32)


def pad_rows(block: np.ndarray, rows: int) -> tuple[np.ndarray, int]:
  """Zero-pads `block` to `rows` rows; returns (padded, number of real rows).

  Every batch then has one shape, so a jitted function compiles once.
  """
  valid = block.shape[0]
  if valid < rows:
    pad = np.zeros((rows - valid,) + block.shape[1:], block.dtype)
    block = np.concatenate([block, pad])
  return block, valid


def extract_features(apply_fn: Callable[..., jax.Array],
                     images: np.ndarray,
                     batch_size: int,
                     mesh: Mesh | None = None,
                     *,
                     variables: Any = None) -> np.ndarray:
  """apply_fn over `images` in fixed-size batches, as float32 NumPy.

  Args:
    apply_fn: maps a batch (b, ...) to features (b, ...). Called as
      apply_fn(batch), or apply_fn(variables, batch) when `variables` is
      given. Pass the model variables through `variables` rather than
      closing over them: jit bakes closed-over arrays into the compiled
      program as constants (a copy of every weight per compilation). A
      function that is already jitted is used as is, so its compilation
      cache carries over between calls (train and test split).
    images: (n, ...) host array; every host passes the same full array when
      the mesh spans several processes.
    batch_size: examples per call. Rounded up to a multiple of the number of
      devices on the mesh's 'data' axis, so every device gets equal rows;
      capped at n (rounded the same way) so small sets waste no compute.
    mesh: optional mesh with a 'data' axis; each batch is sharded over it
      (data parallel) and `variables` are replicated.
    variables: optional pytree (e.g. {'params', 'batch_stats'}) passed as
      the first argument of apply_fn.

  Returns:
    (n, ...) float32 features, in the order of `images`.
  """
  images = np.asarray(images)
  n = images.shape[0]
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if mesh is not None and DATA_AXIS not in mesh.axis_names:
    raise ValueError(f'mesh needs a {DATA_AXIS!r} axis, got '
                     f'{mesh.axis_names}')
  num_shards = 1 if mesh is None else mesh.shape[DATA_AXIS]
  batch = -(-min(batch_size, max(n, 1)) // num_shards) * num_shards

  fn = apply_fn if _is_jitted(apply_fn) else jax.jit(apply_fn)
  if variables is not None:
    if mesh is not None and jax.process_count() == 1:
      # Replicated weights next to sharded data; a no-op for a train state
      # that already lives replicated on this mesh.
      variables = jax.device_put(variables, NamedSharding(mesh, P()))
    call = lambda x: fn(variables, x)
  else:
    call = fn

  if n == 0:
    # Shape inference only: no compilation, no device work.
    dummy = jax.ShapeDtypeStruct((batch,) + images.shape[1:], images.dtype)
    out_shape = jax.eval_shape(call, dummy).shape
    return np.zeros((0,) + tuple(out_shape[1:]), np.float32)

  def to_device(block: np.ndarray) -> jax.Array:
    if mesh is None:
      return jax.device_put(block)
    # From a callback so that on several hosts each one supplies only the
    # rows of its own devices.
    return jax.make_array_from_callback(
        block.shape, NamedSharding(mesh, P(DATA_AXIS)), lambda idx: block[idx])

  outputs = []
  pending = None  # (device result, valid rows): fetched one batch late.
  for start in range(0, n, batch):
    block, valid = pad_rows(images[start:start + batch], batch)
    result = call(to_device(block))
    # Dispatch is asynchronous: fetching the previous batch only now lets
    # the device compute this one while the host copies and pads.
    if pending is not None:
      outputs.append(_to_host(pending[0])[:pending[1]])
    pending = (result, valid)
  outputs.append(_to_host(pending[0])[:pending[1]])
  return np.concatenate(outputs)
