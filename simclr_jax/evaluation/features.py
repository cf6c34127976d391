"""Batched, jitted feature extraction from an image stream or array.

The probes and the kNN monitor work on frozen features of a whole split,
read chunk by chunk so that only the features, never the split's images,
are held.
Running the encoder batch by batch bounds device memory; padding the last
batch to the common size means XLA compiles the encoder once per call
instead of once more for the ragged tail (a full recompilation for a
ResNet-50, seconds to minutes).

Each process keeps the features its own devices computed. A split whose
features fit `gather_max_bytes` is then gathered whole on every host (a
plain NumPy array); a larger one stays spread over the hosts as
`ShardedFeatures`, which the kNN and the probes read as a global array on
the mesh. ImageNet's 1.28M x 2048 float32 training features are 10 GB: the
whole of it on each of 16 hosts would be 16 copies where one, split 16
ways, does.
"""

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from simclr_jax.runtime.parallel import DATA_AXIS

# A split's features are gathered whole on every host up to this many bytes
# (config.eval.feature_gather_max_bytes has the same default). 1 GiB keeps
# CIFAR's 50,000 x 2048 (400 MB) and ImageNet's validation split (50,000 x
# 2048) whole, bit for bit the arrays the read-outs always had, and spreads
# ImageNet's training split (10 GB) over the hosts.
GATHER_MAX_BYTES = 2 ** 30


def _is_jitted(fn: Callable[..., Any]) -> bool:
  """True for a jax.jit-wrapped function (it can be lowered)."""
  return hasattr(fn, 'lower') and hasattr(fn, 'trace')


def _local_rows(out: jax.Array, offset: int, valid: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """This process's real rows of a row-sharded batch, their split rows, and
  how many rows of the batch it holds (padding included).

  Only the shards of this process's devices are copied to the host: no
  collective, nothing of the other hosts' rows. Rows come in increasing
  order; a row's index in the split is offset + its row in the batch, and
  rows at or past `valid` are the batch's padding, dropped here.
  """
  pieces = {}
  for shard in out.addressable_shards:
    start = shard.index[0].start or 0
    pieces.setdefault(start, shard)  # Replicas of a shard: keep one.
  starts = sorted(pieces)
  rows = np.concatenate([np.asarray(pieces[s].data, np.float32)
                         for s in starts])
  batch_rows = np.concatenate([
      np.arange(s, s + pieces[s].data.shape[0]) for s in starts])
  real = batch_rows < valid
  return (rows[real], (offset + batch_rows[real]).astype(np.int32),
          len(batch_rows))


@dataclasses.dataclass(frozen=True)
class ShardedFeatures:
  """A split's features spread over the processes: each holds its rows.

  Made by `extract_features_stream` for a split too large to gather on
  every host. Every process holds the rows its own devices computed, in
  increasing split order, then zero rows marked -1 that pad every process
  to the same count; together the processes hold each row of the split
  once. The kNN and
  the probes read them as one global array sharded over the mesh's 'data'
  axis (`on_mesh`), built from these pieces without any host seeing more
  than its own. All processes hold the same number of rows, which is what
  jax.make_array_from_process_local_data needs.

  Attributes:
    local: (m, d) float32 features of this process's rows.
    index: (m,) int32 split row of each, -1 for padding.
    num_rows: rows of the whole split (n, without padding).
  """
  local: np.ndarray
  index: np.ndarray
  num_rows: int

  @property
  def shape(self) -> tuple[int, ...]:
    """(n, d) of the whole split, as for a gathered array."""
    return (self.num_rows,) + self.local.shape[1:]

  @property
  def ndim(self) -> int:
    return self.local.ndim

  @property
  def nbytes(self) -> int:
    """Bytes of features this process holds (its share of the split)."""
    return int(self.local.nbytes)

  def __len__(self) -> int:
    return self.num_rows

  def _padded(self, values: np.ndarray, mesh: Mesh, fill: Any) -> np.ndarray:
    """values (one per local row) padded to a multiple of this process's
    devices on the mesh, so each takes equal rows."""
    local_devices = len({d for d in mesh.devices.flat
                         if d.process_index == jax.process_index()})
    rows = -(-values.shape[0] // local_devices) * local_devices
    if rows == values.shape[0]:
      return values
    pad = np.full((rows - values.shape[0],) + values.shape[1:], fill,
                  values.dtype)
    return np.concatenate([values, pad])

  def on_mesh(self, mesh: Mesh, values: np.ndarray | None = None,
              fill: Any = 0) -> jax.Array:
    """One global array of per-row `values` (default: the features),
    sharded over the mesh's 'data' axis from every process's own rows.

    Its rows are the processes' pieces one after another, a permutation of
    the split (plus padding); `on_mesh(mesh, index, -1)` says which row is
    which. Padding added here takes `fill`.
    """
    values = self.local if values is None else values
    local = self._padded(np.asarray(values), mesh, fill)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    return jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(DATA_AXIS)), local, global_shape)

  def take(self, rows: Sequence[int] | np.ndarray, mesh: Mesh) -> np.ndarray:
    """Features of the given split rows, the same (len(rows), d) array on
    every process; all processes must call it with the same rows.

    Each device contributes its own matching rows and zeros elsewhere and
    the devices sum them, so a row arrives exactly and nothing larger than
    (len(rows), d) exists anywhere.
    """
    rows = np.asarray(rows, np.int32)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise ValueError(f'rows must lie in [0, {self.num_rows})')
    wanted = jax.make_array_from_callback(
        rows.shape, NamedSharding(mesh, P()), lambda idx: rows[idx])
    out = _take(self.on_mesh(mesh), self.on_mesh(mesh, self.index, -1),
                wanted, mesh=mesh)
    return np.asarray(out.addressable_data(0), np.float32)

  def gathered(self) -> np.ndarray:
    """The whole (n, d) split in split order, on every process.

    Holds the whole split on each host: only for splits known to be small
    (what `extract_features_stream` does under gather_max_bytes).
    """
    if jax.process_count() == 1:
      features, index = self.local, self.index
    else:
      features = np.asarray(multihost_utils.process_allgather(self.local))
      index = np.asarray(multihost_utils.process_allgather(self.index))
      features = features.reshape((-1,) + self.local.shape[1:])
      index = index.reshape(-1)
    out = np.zeros((self.num_rows,) + self.local.shape[1:], np.float32)
    real = index >= 0
    out[index[real]] = features[real]
    return out


@functools.partial(jax.jit, static_argnames=('mesh',))
def _take(x: jax.Array, index: jax.Array, wanted: jax.Array, *,
          mesh: Mesh) -> jax.Array:
  """Rows of x whose index is in `wanted`, replicated (see take)."""

  def per_device(x, index, wanted):
    # A device's rows are a slice of one process's piece: real rows in
    # increasing split order, then padding (-1); with the padding keyed
    # last, a binary search finds a real row.
    key = jnp.where(index >= 0, index, jnp.iinfo(jnp.int32).max)
    pos = jnp.clip(jnp.searchsorted(key, wanted), 0, key.shape[0] - 1)
    found = key[pos] == wanted
    return jax.lax.psum(jnp.where(found[:, None], x[pos], 0.0), DATA_AXIS)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P(DATA_AXIS), P(DATA_AXIS), P()),
                       out_specs=P(), check_vma=False)(x, index, wanted)


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
    gather_max_bytes: int | None = None,
) -> tuple[np.ndarray | ShardedFeatures, np.ndarray | None]:
  """apply_fn over a stream of (images, labels) chunks; keeps features only.

  Host memory is O(batch) images plus the features: each chunk is dropped
  once it has been sent to the devices, so a split of any size (ImageNet's
  1.28M training images) is featurised without ever being held as one
  image array. Each process copies only its own devices' rows of each
  batch to its host; the features are gathered on every host at the end
  when they fit `gather_max_bytes`, and otherwise stay where they are.

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
    gather_max_bytes: the largest (n, d) float32 features gathered whole on
      every host; None gathers any size. Larger features are returned as
      ShardedFeatures, each process holding its share. The decision depends
      on n and d only, so every process takes the same one.

  Returns:
    ((n, d) float32 features, or ShardedFeatures of them; (n,) int32 labels,
    the same on every process, or None when the chunks carry none), in
    stream order.
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

  rows, index, labels = [], [], []
  local_count = 0  # This process's rows of every batch, padding included.
  batch = None
  offset = 0  # Split row of the next batch's first row.
  pending = None  # (device result, offset, valid rows): fetched one late.

  def fetch(result: jax.Array, start: int, valid: int) -> None:
    nonlocal local_count
    features, where, count = _local_rows(result, start, valid)
    rows.append(features)
    index.append(where)
    local_count += count

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
        fetch(*pending)
      pending = (result, offset, valid)
      offset += valid
  if pending is not None:
    fetch(*pending)
  got_labels = np.concatenate(labels) if labels else None
  if rows:
    width = rows[0].shape[1:]
    # Zero rows (-1) bring every process to the same count; the rows of all
    # batches, padding included, are the same number on every process.
    padding = local_count - sum(len(r) for r in rows)
    sharded = ShardedFeatures(
        np.concatenate(rows + [np.zeros((padding,) + width, np.float32)]),
        np.concatenate(index + [np.full(padding, -1, np.int32)]), offset)
    rows.clear()  # Joined into `sharded`; drop the pieces.
    whole_bytes = offset * int(np.prod(width)) * 4
    if gather_max_bytes is None or whole_bytes <= gather_max_bytes:
      return sharded.gathered(), got_labels
    return sharded, got_labels
  if example_shape is None:
    raise ValueError('an empty stream needs example_shape to give the '
                     'feature shape')
  # Shape inference only: no compilation, no device work.
  dummy = jax.ShapeDtypeStruct((round_up(1),) + tuple(example_shape),
                               example_dtype)
  out_shape = jax.eval_shape(call, dummy).shape
  return (np.zeros((0,) + tuple(out_shape[1:]), np.float32),
          np.zeros((0,), np.int32))
