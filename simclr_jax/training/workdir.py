"""A run's workdir: created once, and its config.json guards every resume.

Every mode records the config it trains with in WORKDIR/config.json before
its first step. Re-running in the same workdir resumes the run only when the
fields that fix the checkpoint's shapes and meaning (the mode, the model, the
method's state, the source run, the label fraction, ...) are unchanged;
otherwise it stops with one line naming the first field that differs.
"""

import json
import os
from typing import Any, Sequence

import jax
import ml_collections
from etils import epath

from simclr_jax.config.validation import ConfigError
from simclr_jax.runtime import paths

_MISSING = object()


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir or raises a one-line ConfigError."""
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir={workdir!r} cannot be written: '
                      f'{e.strerror or e}') from None


def mode_of(config: Any) -> str:
  """The mode a recorded config was trained in (pretraining has no section)."""
  downstream = config.get('downstream') or {}
  return downstream.get('mode', 'pretrain')


def _lookup(tree: Any, dotted: str) -> Any:
  for part in dotted.split('.'):
    if not hasattr(tree, 'get'):
      return _MISSING
    tree = tree.get(part, _MISSING)
    if tree is _MISSING:
      return _MISSING
  return tree


def check_and_record(workdir: str, config: ml_collections.ConfigDict,
                     fields: Sequence[str]) -> None:
  """Refuses a workdir holding an incompatible run; then writes config.json.

  `fields` are dotted config fields that must be equal for the checkpoint in
  the workdir to continue this run. A field absent from the saved config
  (written by an older version) is not compared; the mode always is.
  """
  path = os.path.join(workdir, 'config.json')
  if epath.Path(path).exists():
    saved = json.loads(epath.Path(path).read_text())
    old_mode, new_mode = mode_of(saved), mode_of(config)
    if old_mode != new_mode:
      raise ConfigError(
          f'cannot resume in {workdir}: it holds a {old_mode} run and this is '
          f'a {new_mode} run; use a new workdir')
    for field in fields:
      old, new = _lookup(saved, field), _lookup(config, field)
      if isinstance(new, ml_collections.ConfigDict):
        new = new.to_dict()
      if old is not _MISSING and old != new:
        raise ConfigError(
            f'cannot resume in {workdir}: config.{field} was {old!r} in the '
            f'checkpointed run and is '
            f'{None if new is _MISSING else new!r} now; use a new workdir or '
            'the old value')
  if jax.process_index() == 0:
    # Other processes may be reading it now.
    paths.write_text_atomic(path, config.to_json_best_effort(indent=2))
