"""Device mesh, shardings and host-to-device batch assembly.

One mesh axis, 'data': the batch is sharded over it and the train state is
replicated. Under jit over such arrays XLA inserts the cross-device
reductions itself, which is also what makes BatchNorm statistics global.
"""

import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (all devices by default)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles each host's rows into global batch-sharded arrays."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      local_batch)


def prefetch_to_mesh(iterator: Iterable[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict]:
  """Moves host batches onto the mesh in a background thread.

  The transfer of step t+1 overlaps the compute of step t, and the train loop
  never waits on tf.data unless the input is the bottleneck. Exceptions in
  the producer are re-raised in the consumer.
  """
  if size <= 0:
    for batch in iterator:
      yield to_global(batch, mesh)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()
  stop = threading.Event()

  def producer():
    try:
      for batch in iterator:
        if stop.is_set():
          return
        q.put(to_global(batch, mesh))
      q.put(sentinel)
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  thread = threading.Thread(target=producer, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is sentinel:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    # Unblock a producer waiting on a full queue.
    while thread.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.1)


def fetch(tree: Any) -> Any:
  """Device values to host numpy (scalars to Python floats)."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)).item()
                      if np.ndim(x) == 0 else np.asarray(x), tree)

