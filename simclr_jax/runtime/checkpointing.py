"""Orbax checkpoints of the whole run: train state plus input position.

One CheckpointManager per workdir, async so the train loop is not blocked on
storage. Each step directory holds two items: 'state' (encoder, projection
head, linear head, batch statistics, optimiser state, step) and 'data' (the
input stream position as JSON). Orbax writes into a temporary directory and
renames it when complete, so a run killed mid-save leaves no checkpoint that
a restart could read half of.

A complete checkpoint can still be unreadable later (a bad disk, a copy that
overwrote its files). Restoring without an explicit step therefore tries the
listed steps from newest to oldest and skips unreadable ones with one warning
line each; see `_try_restore` and docs/robustness.md.
"""

import gc
import json
import logging as py_logging
import os
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from simclr_jax.runtime import paths


class CheckpointError(ValueError):
  """No readable checkpoint; the message is one line that says what to do."""


# What a failed restore attempt would leave on stderr. Orbax reads the arrays
# with asyncio tasks on a private event loop and returns at the first error,
# closing that loop while TensorStore still finishes the other reads:
# - asyncio logs 'Future/Task exception was never retrieved' with a
#   traceback for each failed read when it is garbage-collected;
# - each read that completes after the close calls back into the closed loop,
#   and TensorStore reports the resulting RuntimeError('Event loop is
#   closed') to sys.unraisablehook (a traceback each, from its threads).
_ATTEMPT_LOGGERS = ('absl', 'asyncio', 'orbax')
_CLOSED_LOOP = 'Event loop is closed'
_REASON_CHARS = 160
_SETTLE_S = 0.1


def _short_reason(e: BaseException) -> str:
  """The first line of an exception, truncated: for one-line messages."""
  lines = str(e).strip().splitlines()
  reason = f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__
  if len(reason) > _REASON_CHARS:
    reason = reason[:_REASON_CHARS - 3] + '...'
  return reason


class _HoldRecords(py_logging.Filter):
  """Holds back what `_ATTEMPT_LOGGERS` log while installed."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    self.records.append(record)
    return False


def _drop_closed_loop_callbacks(previous):
  """An unraisablehook that drops callbacks into a closed event loop.

  Such a callback can only come from work whose loop is gone, here the reads
  of a failed restore attempt; everything else goes to `previous`.
  """
  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == _CLOSED_LOOP):
      return
    previous(unraisable)
  hook.drops_closed_loop_callbacks = True
  return hook


def _try_restore(fn: Callable[[], Any]) -> tuple[Any, str | None]:
  """Runs the restore `fn()`: (result, None), or (None, reason) if it failed.

  While it runs, records of the Orbax/asyncio loggers are held back: a
  successful attempt logs them afterwards as usual, a failed one drops them
  (its asyncio tracebacks would bury the one warning line the caller logs).
  Records other threads log in that window are held and dropped alike; at
  restore time nothing else is running. After a failure, callbacks into the
  attempt's closed event loop stay silenced for the rest of the process:
  reads still in flight may complete at any later time.
  """
  hold = _HoldRecords()
  loggers = [py_logging.getLogger(name) for name in _ATTEMPT_LOGGERS]
  for logger in loggers:
    logger.addFilter(hold)
  previous_hook = sys.unraisablehook
  if not getattr(previous_hook, 'drops_closed_loop_callbacks', False):
    sys.unraisablehook = _drop_closed_loop_callbacks(previous_hook)
  try:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      # DATA_LOSS / OUT_OF_RANGE (ValueError from TensorStore), undecodable
      # metadata (UnicodeDecodeError, JSON errors), missing files, ...
      reason = _short_reason(e)
    else:
      sys.unraisablehook = previous_hook
      for logger in loggers:
        logger.removeFilter(hold)
      for record in hold.records:
        py_logging.getLogger(record.name).handle(record)
      return result, None
    # Out of the except block the exception and its traceback are released;
    # collecting now destroys the attempt's orphaned asyncio futures while
    # their records are still held (left to chance, that would happen at a
    # later collection, mid-training). The short settle lets the reads still
    # in flight (local files: milliseconds) finish inside the window too.
    gc.collect()
    time.sleep(_SETTLE_S)
    gc.collect()
    return None, reason
  finally:
    for logger in loggers:
      logger.removeFilter(hold)


def _all_processes_ok(ok: bool) -> bool:
  """Whether every process of the job restored (the same step) fine.

  Each process reads the array shards it needs, so a corrupt shard can fail
  on some processes only; all must then fall back together, or they would
  continue from different steps.
  """
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _restore_newest_readable(directory: str, listed: list[int],
                             step: int | None,
                             restore_step: Callable[[int], Any],
                             all_processes: bool
                             ) -> tuple[Any, int, list[int]]:
  """Restores `step`, or the newest readable of the `listed` steps.

  Returns (restored, step restored, unreadable newer steps skipped). An
  explicit `step` gets no fallback. `all_processes`: every process of the
  job calls this in step, and they agree on the step they restore.
  """
  if not listed:
    raise FileNotFoundError(f'no complete checkpoint in {directory}')
  explicit = step is not None
  if explicit and step not in listed:
    raise CheckpointError(
        f'no checkpoint step {step} in {directory}; it holds steps '
        f'{", ".join(map(str, sorted(listed)))}')
  tried, reasons = [], {}
  for step in [step] if explicit else sorted(listed, reverse=True):
    restored, reason = _try_restore(lambda s=step: restore_step(s))
    if all_processes and not _all_processes_ok(reason is None):
      reason = reason or 'unreadable on another process'
    tried.append(step)
    if reason is None:
      return restored, step, tried[:-1]
    reasons[step] = reason
    if explicit:
      raise CheckpointError(
          f'checkpoint step {step} in {directory} is unreadable ({reason}); '
          'restore another step or omit the step to use the newest readable '
          'one')
    logging.warning('Checkpoint step %d in %s is unreadable, skipping it: %s',
                    step, directory, reason)
  raise CheckpointError(
      f'no readable checkpoint in {directory}: tried steps '
      f'{", ".join(map(str, tried))} (step {tried[0]}: {reasons[tried[0]]}); '
      'move the checkpoints away (or use a new workdir) to start afresh')


class Checkpointer:
  """Thin wrapper that fixes the item layout of this project's checkpoints."""

  def __init__(self, directory: str, max_to_keep: int = 2,
               async_save: bool = True):
    # Local paths are made absolute; gs:// and other URIs are kept as they
    # are (Orbax reads and writes them directly; abspath would mangle them).
    self.directory = paths.abspath(directory)
    # A run killed mid-save leaves a '<step>.orbax-checkpoint-tmp' directory.
    # Orbax never lists it as a step; removing it at start keeps the
    # directory clean (a later save of the same step would replace it anyway).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_position: dict,
           force: bool = False) -> bool:
    """Starts an async save of `state` at `step`; returns whether it saved."""
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_position)),
        force=force)
    if saved:
      logging.info('Saving checkpoint at step %d to %s', step, self.directory)
    return saved

  def restore(self, state_template: Any, step: int | None = None
              ) -> tuple[Any, dict, int]:
    """Restores (state, data_position, step) into the template's shardings.

    `state_template` may hold real arrays or jax.ShapeDtypeStruct leaves with
    shardings; the restored arrays take those shardings. With `step=None` the
    newest readable step is restored: unreadable newer ones are skipped with
    a warning and then deleted (see below); the returned step is the one
    restored. Raises CheckpointError if no step (or the given `step`) can be
    read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    restored, step, unreadable = _restore_newest_readable(
        self.directory, list(self._manager.all_steps()), step,
        restore_step=lambda s: self._manager.restore(
            s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore())),
        all_processes=True)
    # The run continues from `step` and will save the skipped step numbers
    # again, so their directories must go: Orbax will not save a step at or
    # below the newest one it lists (save() returns False, or with force
    # raises StepAlreadyExistsError), and it counts them towards max_to_keep,
    # so the next saves would garbage-collect the good older checkpoints
    # first. They are removed only now that an older step restored, and
    # through the manager (primary process deletes, all processes sync).
    for bad in unreadable:
      logging.warning('Deleting unreadable checkpoint step %d in %s; the run '
                      'continues from step %d', bad, self.directory, step)
      try:
        self._manager.delete(bad)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(
            f'cannot delete unreadable checkpoint step {bad} in '
            f'{self.directory} ({_short_reason(e)}); remove that directory '
            'by hand and re-run') from None
    return restored['state'], dict(restored['data'] or {}), step

  def wait(self) -> None:
    """Blocks until pending async saves are durable on storage."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_raw(directory: str, step: int | None = None
                ) -> tuple[dict[str, Any], int]:
  """Restores the 'state' item of a checkpoint as a plain tree of numpy arrays.

  Needs no template, so downstream modes (linear evaluation, fine-tuning,
  export) can read a run without rebuilding its optimiser. A partially
  written step is never visible: Orbax only lists finalised steps. With
  `step=None`, unreadable newer steps are skipped as in
  `Checkpointer.restore` (but not deleted: this reads another run); raises
  CheckpointError if none (or the given `step`) can be read.
  """
  directory = paths.abspath(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f'no checkpoint directory {directory}')
  with ocp.CheckpointManager(
      directory, item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(create=False)) as manager:
    # A checkpoint written by a multi-host job names devices this process
    # does not have (e.g. ids 2048.. of host 1); the fallback puts such
    # arrays on one local device instead of failing with a topology error.
    # Every process reads the whole tree itself, and callers may call this
    # on one process only: no agreement between processes.
    restored, step, _ = _restore_newest_readable(
        directory, list(manager.all_steps()), step,
        restore_step=lambda s: manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(
                fallback_sharding=jax.sharding.SingleDeviceSharding(
                    jax.local_devices()[0])))),
        all_processes=False)
  state = restored['state']
  if not isinstance(state, dict):  # Orbax may return a dataclass-like tree.
    state = dict(state)
  return jax.tree.map(np.asarray, state), step


def load_run(workdir: str, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
  """Reads a finished or interrupted run: (config, variables, step).

  `workdir` is what `--workdir` was for that run (it holds config.json and
  checkpoints/). `variables` is {'params': ..., 'batch_stats': ...} as numpy
  arrays, the model's own variable tree, ready for `model.apply`.
  """
  config_path = os.path.join(workdir, 'config.json')
  if not epath.Path(config_path).exists():
    raise FileNotFoundError(
        f'{workdir} holds no config.json: is it the --workdir of a run?')
  config = ml_collections.ConfigDict(
      json.loads(epath.Path(config_path).read_text()))
  state, step = restore_raw(os.path.join(workdir, 'checkpoints'), step)
  variables = {'params': state['params'],
               'batch_stats': state.get('batch_stats', {})}
  return config, variables, step
