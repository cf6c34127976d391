"""Orbax checkpoints of the whole run: train state plus input position.

One CheckpointManager per workdir, async so the train loop is not blocked on
storage. Each step directory holds two items: 'state' (encoder, projection
head, linear head, batch statistics, optimiser state, step) and 'data' (the
input stream position as JSON). Orbax writes into a temporary directory and
renames it when complete, so a run killed mid-save leaves no checkpoint that
a restart could read half of.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from simclr_jax.runtime import paths


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
    shardings; the restored arrays take those shardings.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=ocp.args.JsonRestore()))
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
  written step is never visible: Orbax only lists finalised steps.
  """
  directory = paths.abspath(directory)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f'no checkpoint directory {directory}')
  with ocp.CheckpointManager(
      directory, item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {directory}')
    # A checkpoint written by a multi-host job names devices this process
    # does not have (e.g. ids 2048.. of host 1); the fallback puts such
    # arrays on one local device instead of failing with a topology error.
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
            fallback_sharding=jax.sharding.SingleDeviceSharding(
                jax.local_devices()[0]))))
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
