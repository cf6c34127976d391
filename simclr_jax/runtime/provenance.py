"""What made a run: code version, library versions, hardware, batch layout.

Every results.json carries this block, so no two runs made by different
code or on different hardware are compared without the difference showing
(the study report flags such points and refuses to pool them).

The code version is read when the run STARTS (`record_start`), not when it
writes its results: a tree edited while a run trains would otherwise be
credited with figures it did not make. Every start in a workdir (a resume
included) is appended to its code_starts.jsonl, and results.json lists
them all, so a run resumed on other code says so.
"""

import json
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
STARTS = 'code_starts.jsonl'
# This process's code version when it started the run (record_start).
_AT_START: dict[str, Any] | None = None


def code_version() -> dict[str, Any]:
  """The git commit when run from a checkout (with '-dirty' if tracked files
  changed; `clean` says the same), else the installed package's version."""
  if os.path.exists(os.path.join(_REPO, '.git')):
    try:
      git = lambda *a: subprocess.run(
          ['git', '-C', _REPO, *a], capture_output=True, text=True,
          timeout=10, check=True).stdout.strip()
      commit = git('rev-parse', 'HEAD')
      dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
      return {'source': 'git', 'version': commit + ('-dirty' if dirty else ''),
              'commit': commit, 'clean': not dirty}
    except (OSError, subprocess.SubprocessError):
      pass
  try:
    return {'source': 'package', 'version': metadata.version('simclr_jax')}
  except metadata.PackageNotFoundError:
    return {'source': 'unknown', 'version': 'unknown'}


def record_start(workdir: str) -> dict[str, Any]:
  """Reads the code version now, before the run does anything, and appends
  it to workdir/code_starts.jsonl (process 0); returns it."""
  global _AT_START
  from etils import epath  # pylint: disable=g-import-not-at-top
  _AT_START = dict(code_version(),
                   started=time.strftime('%Y-%m-%dT%H:%M:%S%z'))
  if jax.process_index() == 0:
    path = epath.Path(workdir) / STARTS
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else ''
    path.write_text(previous + json.dumps(_AT_START, sort_keys=True) + '\n')
  return _AT_START


def starts(workdir: str) -> list[dict[str, Any]]:
  """Every start recorded in workdir, oldest first ([] if none)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / STARTS
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


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
            batch_size: int | None = None,
            workdir: str | None = None) -> dict[str, Any]:
  """The provenance block of results.json.

  `batch_size` is the global batch the run trained with (the mode's own for
  downstream modes; config.batch_size when omitted). `code` is the version
  at this process's start (record_start; read now if it was not called),
  `code_at_finish` the version now, and `code_starts` every start recorded
  in `workdir`.
  """
  devices = jax.devices()
  now = code_version()
  out: dict[str, Any] = {
      'code': _AT_START if _AT_START is not None else now,
      'code_at_finish': now,
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
  if workdir is not None:
    out['code_starts'] = starts(workdir)
  return out


def for_mode(config: ml_collections.ConfigDict, mode: str,
             wall_time_s: float | None = None,
             workdir: str | None = None) -> dict[str, Any]:
  """The provenance block of a run of `mode` (pretrain or a downstream mode).

  A downstream mode trains with its own section's batch (config.finetune.
  batch_size, ...), which is the batch its throughput and layout figures
  describe; pretraining (and a section without one) uses config.batch_size.
  """
  section = config.get(mode)
  batch = (section.get('batch_size') if section is not None and
           hasattr(section, 'get') else None)
  return collect(config, wall_time_s, batch, workdir)
