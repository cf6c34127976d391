"""Pretraining: builds model, method, optimiser and stream from a config.

`pretrain(config, workdir)` is what `main --mode=pretrain` calls; it hands
the shared loop (training/loop.py) a jitted step and a stream that can start
at any step, so re-running on the same workdir resumes from the last complete
checkpoint with the input stream at the same position, and an interrupted run
ends where an uninterrupted one would. `evaluate_encoder` then runs the
read-outs config.evals declares (training/evals.py).
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from simclr_jax import methods
from simclr_jax import models
from simclr_jax.config import defaults
from simclr_jax.config import durations
from simclr_jax.config import resolve as config_resolve
from simclr_jax.config.validation import ConfigError
from simclr_jax.evaluation import knn_monitor
from simclr_jax.evaluation import readout
from simclr_jax.evaluation import registry
from simclr_jax.models import encoders
from simclr_jax.runtime import accelerator
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.training import evals
from simclr_jax.training import loop
from simclr_jax.training import pretrain_step as train_step_lib
from simclr_jax.training import state as state_lib
from simclr_jax.training import workdir as workdir_lib

NonFiniteError = loop.NonFiniteError
prepare_workdir = workdir_lib.prepare_workdir


@dataclasses.dataclass
class Setup:
  """What a run is built from; shared by pretraining, evaluation, benchmark."""
  config: ml_collections.ConfigDict
  mesh: Any
  info: Any
  steps_per_epoch: int
  total_steps: int
  model: Any
  method: Any  # methods.Method: the loss and any state besides params.
  tx: Any
  schedule: Any
  init_rng: jax.Array
  step_rng: jax.Array


def check_resume_compatible(workdir: str, config: ml_collections.ConfigDict
                            ) -> None:
  """Stops a resume whose config would not fit the checkpointed state."""
  workdir_lib.check_and_record(
      workdir, config, defaults.resume_fields(config, 'pretrain'))


def _data_position(setup: Setup, step: int) -> dict:
  return {'step': step, 'epoch': step // setup.steps_per_epoch,
          'batch_in_epoch': step % setup.steps_per_epoch,
          'seed': setup.config.seed, 'dataset': setup.config.dataset.name}


def build(config: ml_collections.ConfigDict, mesh=None) -> Setup:
  """Resolves the config (once) and builds model, optimiser and schedule.

  Setup.config is the resolved config (config/resolve.py): the one the run
  records and every later stage reads.
  """
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh() if mesh is None else mesh
  config = config_resolve.resolve(config, num_devices=mesh.devices.size,
                                  process_count=jax.process_count())
  registry.check(config)  # The read-out types, before anything compiles.
  info = datasets.dataset_info(config)
  steps_per_epoch = pipeline.steps_per_epoch(config, info)
  if steps_per_epoch <= 0:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train_examples} training examples of {config.dataset.name}')
  total_steps = config.train_steps or config.num_epochs * steps_per_epoch
  method = methods.make_method(config, mesh=mesh, total_steps=total_steps,
                               num_train_examples=info.num_train_examples)
  # The online linear head needs a width even without labels (its loss is
  # then 0: every label is -1).
  model = models.build_model(config, max(info.num_classes, 1),
                             **method.model_overrides())
  tx, schedule = make_optimizer(config, steps_per_epoch, total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  return Setup(config, mesh, info, steps_per_epoch, total_steps, model,
               method, tx, schedule, init_rng, step_rng)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int):
  """(optimizer, schedule) of pretraining, with what the encoder declares:
  the leaves without weight decay or LARS adaptation, and the parts that
  never train (MoCo v3's frozen patch projection)."""
  return optim.make_optimizer(
      config, steps_per_epoch, total_steps,
      frozen=encoders.frozen_mask(config.model, config.dataset.image_size),
      no_decay=encoders.no_decay_leaves())


def views_fn(setup: Setup):
  """batch, rng -> the two views the step trains on (made on the device for
  the 'jax' backend, read from the batch for 'tf')."""
  c = setup.config
  return train_step_lib.make_views_fn(
      c.augment.backend, c.dataset.image_size, c.augment.color_strength,
      c.augment.blur, c.augment.crop_min_area, c.augment.flip)


def make_step(setup: Setup):
  c = setup.config
  return train_step_lib.make_train_step(
      setup.model, setup.tx, setup.schedule, setup.mesh,
      method=setup.method, views_fn=views_fn(setup),
      skip_nonfinite=c.on_nan == 'skip_step',
      inject_nan_at_step=c.debug.inject_nan_at_step,
      compute_dtype=jnp.dtype(c.model.compute_dtype),
      grad_cache_chunks=c.grad_cache_chunks, grad_cache_bn=c.grad_cache_bn)


def initial_state(setup: Setup) -> state_lib.TrainState:
  return train_step_lib.create_train_state(
      setup.model, setup.tx, setup.init_rng, setup.config.dataset.image_size,
      setup.mesh, setup.method)


def _monitor_hook(setup: Setup, workdir: str):
  """The loop's after_step hook for the config.evals entries that also run
  during pretraining (the kNN monitor), or None if there are none."""
  periodic = readout.entries(setup.config, setup.steps_per_epoch,
                             periodic=True)
  if not periodic:
    return None  # Off: read no evaluation dataset at start-up.
  scored = [e for e in periodic if evals.labelled(setup, e)]
  if len(scored) < len(periodic):
    logging.warning('Off during pretraining: %s.', evals.skipped_why(
        [e for e in periodic if e not in scored]))
  if not scored:
    return None
  monitor = knn_monitor.KnnMonitor(setup, workdir, scored)

  def after_step(step: int, state) -> dict | None:
    due = monitor.due(step, setup.total_steps)
    if not due:
      return None
    return monitor.measure(step, state_lib.variables_of(state), due)

  return after_step


def _host_update_hook(setup: Setup):
  """The loop's before_step hook from `method.host_update`, or None.

  Each call streams the train split (eval preprocessing) through the
  encoder and keeps only its features.
  """
  method = setup.method
  if type(method).host_update is methods.Method.host_update:
    return None
  c = setup.config
  apply = readout.feature_fn(setup.model)

  def featurize(variables):
    # Streamed in split order: row i is example i of the train split.
    return readout.featurize_split(apply, variables, c, c.dataset.train_split,
                                   batch_size=c.eval.batch_size,
                                   mesh=setup.mesh)[0]

  context = methods.HostContext(
      config=c, mesh=setup.mesh, model=setup.model,
      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps,
      featurize=featurize)
  return lambda step, state: method.host_update(step, state, context)


def loop_spec(setup: Setup, workdir: str,
              input_stats: dict | None = None) -> loop.LoopSpec:
  """Pretraining as the shared loop runs it."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = setup.config
  input_stats = {} if input_stats is None else input_stats

  def batches(start_step: int):
    return pipeline.make_pretrain_iterator(
        c, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start_step,
        include_index=setup.method.needs_index, stats=input_stats)

  return loop.LoopSpec(
      name='pretrain', step_fn=make_step(setup), batches=batches,
      total_steps=setup.total_steps, steps_per_epoch=setup.steps_per_epoch,
      batch_size=c.batch_size, rng=setup.step_rng, mesh=setup.mesh,
      on_nan=c.on_nan,
      log_every_steps=durations.steps(c, 'log_every', setup.steps_per_epoch,
                                      minimum=1),
      checkpoint_every_steps=durations.steps(
          c, 'checkpoint_every', setup.steps_per_epoch, minimum=1),
      keep_checkpoints=c.keep_checkpoints, prefetch=c.dataset.prefetch,
      accuracy_key='contrastive_acc',
      position=functools.partial(_data_position, setup),
      after_step=_monitor_hook(setup, workdir),
      before_step=_host_update_hook(setup))


def pretrain(config: ml_collections.ConfigDict, workdir: str,
             setup: Setup | None = None,
             stop_after_steps: int | None = None) -> dict:
  """Runs (or resumes) pretraining; returns the results dict.

  `stop_after_steps` ends this invocation early (with a checkpoint) after that
  many steps, for time-boxed scheduler slots; running again continues.

  Returns a dict with steps, final_train_loss, resumed_from_step, wall_time_s
  and 'state' (the final TrainState, not JSON).
  """
  t_start = time.time()
  setup = setup or build(config)
  config = setup.config  # Resolved: what the workdir records.
  workdir_lib.prepare_workdir(workdir)
  check_resume_compatible(workdir, config)
  input_stats = {}  # The stream counts corrupt images it skipped here.
  spec = loop_spec(setup, workdir, input_stats)
  logging.info('Pretraining %s: %d steps (%d per epoch), global batch %d on '
               '%s', config.dataset.name, setup.total_steps,
               setup.steps_per_epoch, config.batch_size, accelerator.describe())
  corrupt = lambda: {'corrupt_images_skipped': input_stats.get(
      'corrupt_images_skipped', 0)}
  out = loop.run(spec, initial_state(setup), workdir,
                 stop_after_steps=stop_after_steps, extra_metrics=corrupt)
  return {
      'steps': out.steps,
      'total_steps': out.total_steps,
      'interrupted': out.interrupted,
      'final_train_loss': out.final_loss,
      'final_metrics': out.final_metrics,
      'resumed_from_step': out.resumed_from_step,
      'skipped_steps': out.skipped_steps,
      'corrupt_images_skipped': input_stats.get('corrupt_images_skipped', 0),
      'knn_monitor': knn_monitor.read_history(workdir),
      'pretrain_wall_time_s': time.time() - t_start,
      'state': out.state,
  }


def evaluate_encoder(setup: Setup, state: state_lib.TrainState) -> dict:
  """The end-of-run read-outs config.evals declares (training/evals.py):
  by default probes, few-shot probes and kNN of the pretrained encoder,
  against the same network at random init and the raw pixels."""
  return evals.evaluate(
      setup, state_lib.variables_of(state),
      init_variables=lambda: state_lib.variables_of(
          jax.device_get(initial_state(setup))))
