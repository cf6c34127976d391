"""What made a run: code version, library versions, hardware, batch layout.

Every results.json carries this block, so no two runs made by different
code or on different hardware are compared without the difference showing
(the study report flags such points).
"""

import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any

import jax
import ml_collections

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
             'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets')
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def code_version() -> dict[str, str]:
  """The git commit when run from a checkout (with '-dirty' if tracked files
  changed), else the installed package's version."""
  if os.path.exists(os.path.join(_REPO, '.git')):
    try:
      git = lambda *a: subprocess.run(
          ['git', '-C', _REPO, *a], capture_output=True, text=True,
          timeout=10, check=True).stdout.strip()
      commit = git('rev-parse', 'HEAD')
      dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
      return {'source': 'git', 'version': commit + ('-dirty' if dirty else '')}
    except (OSError, subprocess.SubprocessError):
      pass
  try:
    return {'source': 'package', 'version': metadata.version('simclr_jax')}
  except metadata.PackageNotFoundError:
    return {'source': 'unknown', 'version': 'unknown'}


def library_versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def collect(config: ml_collections.ConfigDict | None = None,
            wall_time_s: float | None = None,
            batch_size: int | None = None) -> dict[str, Any]:
  """The provenance block of results.json.

  `batch_size` is the global batch the run trained with (the mode's own for
  downstream modes; config.batch_size when omitted).
  """
  devices = jax.devices()
  out: dict[str, Any] = {
      'code': code_version(),
      'libraries': library_versions(),
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'hostname': platform.node(),
      'finished': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  if config is not None:
    batch = int(config.batch_size if batch_size is None else batch_size)
    out.update(global_batch=batch, per_device_batch=batch // len(devices),
               compute_dtype=str(config.model.compute_dtype),
               grad_cache_chunks=int(config.get('grad_cache_chunks', 0)))
  if wall_time_s is not None:
    out['wall_time_s'] = float(wall_time_s)
  return out


def for_mode(config: ml_collections.ConfigDict, mode: str,
             wall_time_s: float | None = None) -> dict[str, Any]:
  """The provenance block of a run of `mode` (pretrain or a downstream mode).

  A downstream mode trains with its own section's batch (config.finetune.
  batch_size, ...), which is the batch its throughput and layout figures
  describe; pretraining (and a section without one) uses config.batch_size.
  """
  section = config.get(mode)
  batch = (section.get('batch_size') if section is not None and
           hasattr(section, 'get') else None)
  return collect(config, wall_time_s, batch)
