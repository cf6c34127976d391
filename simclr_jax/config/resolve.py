"""The resolved config: what depends on the data and the mesh, filled in once.

A recipe says what the user wants; a few fields can only be settled against
the dataset and the devices: the evaluation split a dataset really has (or a
held-out part of its train split), the splits of the datasets read-outs
read instead of it (config.evals.<entry>.dataset), and the gradient-caching chunk count that
`max_batch_per_device` asks for. `resolve` computes them once, on a copy,
logs every change, and the run records the result (the workdir's
config.json), so nothing patches the config in place later.
"""

import copy
import weakref

from absl import logging
import ml_collections

from simclr_jax.config import validation
from simclr_jax.data import datasets

# Configs `resolve` returned (by id, weakly), so resolving twice is free.
_RESOLVED: 'weakref.WeakValueDictionary[int, ml_collections.ConfigDict]' = (
    weakref.WeakValueDictionary())


def chunks_for(per_device_batch: int, max_per_device: int) -> int:
  """Fewest chunks that split a per-device batch into chunks of at most
  `max_per_device` images (0: no caching needed or no limit set)."""
  if max_per_device <= 0 or per_device_batch <= max_per_device:
    return 0
  return next(c for c in range(-(-per_device_batch // max_per_device),
                               per_device_batch + 1)
              if per_device_batch % c == 0)


def is_resolved(config: ml_collections.ConfigDict) -> bool:
  return _RESOLVED.get(id(config)) is config


def _grad_cache_chunks(config: ml_collections.ConfigDict,
                       num_devices: int) -> int:
  """config.max_batch_per_device: the chunk count that makes the per-device
  batch fit, when gradient caching is not set explicitly."""
  limit = config.get('max_batch_per_device', 0)
  if config.get('grad_cache_chunks', 0) or not limit:
    return config.get('grad_cache_chunks', 0)
  per_device = int(config.batch_size) // max(1, num_devices)
  chunks = chunks_for(per_device, limit)
  if chunks:
    logging.info('Per-device batch %d > max_batch_per_device %d: gradient '
                 'caching in %d chunks of %d images per device.', per_device,
                 limit, chunks, per_device // chunks)
  return chunks


def resolve(config: ml_collections.ConfigDict, *, num_devices: int,
            process_count: int = 1, mode: str = 'pretrain'
            ) -> ml_collections.ConfigDict:
  """Validates `config` and returns a copy with its derived fields settled.

  Args:
    config: the run's config as given (left unchanged).
    num_devices: devices of the mesh the run trains on.
    process_count: processes of the job.
    mode: 'pretrain' validates the whole config and settles gradient
      caching; the downstream modes check their own section when they start
      (config/downstream.py), so for them only the splits are settled;
      'export' reads no data and settles nothing.

  Returns:
    The resolved config; resolving it again returns it as it is.

  Raises:
    ConfigError, DatasetError: one line naming the field to change.
  """
  if is_resolved(config):
    return config
  out = copy.deepcopy(config)
  if mode == 'pretrain':
    validation.validate(out, num_devices=num_devices,
                        process_count=process_count)
    chunks = _grad_cache_chunks(out, num_devices)
    if chunks != out.grad_cache_chunks:
      out.grad_cache_chunks = chunks
      # The chunk count it chose, against the method and the mesh.
      validation.validate(out, num_devices=num_devices,
                          process_count=process_count)
  if mode != 'export':
    d = out.dataset
    d.train_split, d.eval_split = datasets.resolved_splits(out)
    for entry in out.evals.values():
      if entry.get('enabled', True) and datasets.overridden(entry.dataset):
        ec = datasets.with_overrides(out, entry.dataset, resolve_splits=True)
        entry.dataset.train_split = ec.dataset.train_split
        entry.dataset.eval_split = ec.dataset.eval_split
  _RESOLVED[id(out)] = out
  return out
