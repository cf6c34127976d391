"""Batched, jitted feature extraction from an image stream or array.

The probes and the kNN monitor work on frozen features of a whole split,
read chunk by chunk so that only the features, never the split's images,
are held.
Running the encoder batch by batch bounds device memory; padding the last
batch to the common size means XLA compiles the encoder once per call
instead of once more for the ragged tail (a full recompilation for a
ResNet-50, seconds to minutes).
"""

from typing import Any, Callable, Iterable

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


def on_mesh(x: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
  """A host array (the same on every process) placed with `spec`.

  Each device copies only its own slice, so a row-sharded array never sits
  whole on one device.
  """
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                      lambda idx: x[idx])


def extract_features(apply_fn: Callable[..., jax.Array],
                     images: np.ndarray,
                     batch_size: int,
                     mesh: Mesh | None = None,
                     *,
                     variables: Any = None) -> np.ndarray:
  """apply_fn over `images` in fixed-size batches, as float32 NumPy.

  The in-memory case of `extract_features_stream`: the array is cut into
  chunks of the batch size (capped at n, so a small set wastes no compute)
  and streamed through the same loop.

  Args:
    apply_fn: maps a batch (b, ...) to features (b, ...); see
      `extract_features_stream`.
    images: (n, ...) host array; every host passes the same full array when
      the mesh spans several processes.
    batch_size: examples per call, rounded as in `extract_features_stream`.
    mesh: optional mesh with a 'data' axis.
    variables: optional pytree passed as the first argument of apply_fn.

  Returns:
    (n, ...) float32 features, in the order of `images`.
  """
  images = np.asarray(images)
  n = images.shape[0]
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  shards = 1 if mesh is None else dict(mesh.shape).get(DATA_AXIS, 1)
  # Chunks of whole device batches, so none is padded but the last.
  batch = -(-min(batch_size, max(n, 1)) // shards) * shards
  chunks = ((images[lo:lo + batch], None) for lo in range(0, n, batch))
  features, _ = extract_features_stream(
      apply_fn, chunks, batch, mesh, variables=variables,
      example_shape=images.shape[1:], example_dtype=images.dtype)
  return features


def extract_features_stream(
    apply_fn: Callable[..., jax.Array],
    chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    variables: Any = None,
    example_shape: tuple[int, ...] | None = None,
    example_dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray | None]:
  """apply_fn over a stream of (images, labels) chunks; keeps features only.

  Host memory is O(batch) images plus the features: each chunk is dropped
  once it has been sent to the devices, so a split of any size (ImageNet's
  1.28M training images) is featurised without ever being held as one
  image array.

  Args:
    apply_fn: maps a batch (b, ...) to features (b, ...). Called as
      apply_fn(batch), or apply_fn(variables, batch) when `variables` is
      given. Pass the model variables through `variables` rather than
      closing over them: jit bakes closed-over arrays into the compiled
      program as constants (a copy of every weight per compilation). A
      function that is already jitted is used as is, so its compilation
      cache carries over between calls (train and test split).
    chunks: (images (c, ...), labels (c,) or None) in split order, any c;
      every host yields the same chunks when the mesh spans processes.
    batch_size: examples per device call. Rounded up to a multiple of the
      devices on the mesh's 'data' axis, so every device gets equal rows;
      when the first chunk is smaller (a split smaller than one batch) the
      batch shrinks to it, so small sets waste no compute. Every call is
      padded to this one shape, so the encoder compiles once.
    mesh: optional mesh with a 'data' axis; each batch is sharded over it
      (data parallel) and `variables` are replicated.
    variables: optional pytree (e.g. {'params', 'batch_stats'}) passed as
      the first argument of apply_fn.
    example_shape: shape of one image; only needed to give the feature
      width of an empty stream.
    example_dtype: dtype of the images of an empty stream.

  Returns:
    ((n, ...) float32 features, (n,) int32 labels or None when the chunks
    carry none), in stream order.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if mesh is not None and DATA_AXIS not in mesh.axis_names:
    raise ValueError(f'mesh needs a {DATA_AXIS!r} axis, got '
                     f'{mesh.axis_names}')
  num_shards = 1 if mesh is None else mesh.shape[DATA_AXIS]
  round_up = lambda rows: -(-rows // num_shards) * num_shards

  fn = apply_fn if _is_jitted(apply_fn) else jax.jit(apply_fn)
  if variables is not None:
    if mesh is not None and jax.process_count() == 1:
      # Replicated weights next to sharded data; a no-op for a train state
      # that already lives replicated on this mesh.
      variables = jax.device_put(variables, NamedSharding(mesh, P()))
    call = lambda x: fn(variables, x)
  else:
    call = fn

  def to_device(block: np.ndarray) -> jax.Array:
    if mesh is None:
      return jax.device_put(block)
    # From a callback so that on several hosts each one supplies only the
    # rows of its own devices.
    return jax.make_array_from_callback(
        block.shape, NamedSharding(mesh, P(DATA_AXIS)), lambda idx: block[idx])

  outputs, labels = [], []
  batch = None
  pending = None  # (device result, valid rows): fetched one batch late.
  for images, chunk_labels in chunks:
    images = np.asarray(images)
    if chunk_labels is not None:
      labels.append(np.asarray(chunk_labels, np.int32))
    if batch is None:
      batch = round_up(max(1, min(batch_size, images.shape[0])))
    # A chunk larger than the batch goes in several calls.
    for lo in range(0, images.shape[0], batch):
      block, valid = pad_rows(images[lo:lo + batch], batch)
      result = call(to_device(block))
      # Dispatch is asynchronous: fetching the previous batch only now lets
      # the device compute this one while the host reads the next chunk.
      if pending is not None:
        outputs.append(_to_host(pending[0])[:pending[1]])
      pending = (result, valid)
  if pending is not None:
    outputs.append(_to_host(pending[0])[:pending[1]])
  got_labels = np.concatenate(labels) if labels else None
  if outputs:
    return np.concatenate(outputs), got_labels
  if example_shape is None:
    raise ValueError('an empty stream needs example_shape to give the '
                     'feature shape')
  # Shape inference only: no compilation, no device work.
  dummy = jax.ShapeDtypeStruct((round_up(1),) + tuple(example_shape),
                               example_dtype)
  out_shape = jax.eval_shape(call, dummy).shape
  return (np.zeros((0,) + tuple(out_shape[1:]), np.float32),
          np.zeros((0,), np.int32))
