"""The pretraining loop: builds everything from a config and runs it.

`pretrain(config, workdir)` is what `main --mode=pretrain` calls. Running it
again on the same workdir resumes from the last complete checkpoint, with the
input stream at the same position, so an interrupted run ends where an
uninterrupted one would.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simclr_jax.runtime import checkpointing
from simclr_jax.config import validation as config_validation
from simclr_jax.evaluation import knn_monitor
from simclr_jax import methods
from simclr_jax.runtime import metric_writer
from simclr_jax import models
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.runtime import paths
from simclr_jax.training import pretrain_step as train_step_lib
from simclr_jax.config.validation import ConfigError

# Config fields that fix the shapes of the checkpointed state; resuming with
# any of them changed cannot work.
_SHAPE_FIELDS = ('model.depth', 'model.width_multiplier', 'model.sk_ratio',
                 'model.stem', 'model.num_proj_layers', 'model.proj_out_dim',
                 'model.linear_eval_while_pretraining', 'optim.name',
                 'dataset.name', 'method')
# ... and those that fix the shapes of one method's extra state or parts.
_METHOD_SHAPE_FIELDS = {'moco_v2': ('moco.queue_size',),
                        'moco_v3': ('mocov3.predictor_hidden_dim',),
                        'byol': ('byol.predictor_hidden_dim',),
                        'swav': ('swav.num_prototypes',)}


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/Inf and on_nan='stop'."""


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


def _get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  return config


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


def check_resume_compatible(workdir: str, config: ml_collections.ConfigDict
                            ) -> None:
  """Stops a resume whose config would not fit the checkpointed state."""
  path = os.path.join(workdir, 'config.json')
  if epath.Path(path).exists():
    saved = json.loads(epath.Path(path).read_text())
    for field in _SHAPE_FIELDS + _METHOD_SHAPE_FIELDS.get(config.method, ()):
      old = saved
      for part in field.split('.'):
        old = old.get(part) if isinstance(old, dict) else None
      new = _get(config, field)
      if old is not None and old != new:
        raise ConfigError(
            f'cannot resume in {workdir}: config.{field} was {old!r} in the '
            f'checkpointed run and is {new!r} now; use a new workdir or the '
            'old value')
  if jax.process_index() == 0:
    # Other processes may be reading it now.
    paths.write_text_atomic(path, config.to_json_best_effort(indent=2))


def build(config: ml_collections.ConfigDict, mesh=None) -> Setup:
  """Validates the config and builds model, optimiser and schedule."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh() if mesh is None else mesh
  config_validation.validate(config, num_devices=mesh.devices.size,
                             process_count=jax.process_count())
  info = datasets.dataset_info(config)
  steps_per_epoch = pipeline.steps_per_epoch(config, info)
  if steps_per_epoch <= 0:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train_examples} training examples of {config.dataset.name}')
  total_steps = config.train_steps or config.num_epochs * steps_per_epoch
  method = methods.make_method(config, mesh=mesh, total_steps=total_steps,
                               num_train_examples=info.num_train_examples)
  model = models.build_model(config, info.num_classes,
                             **method.model_overrides())
  tx, schedule = optim.make_optimizer(config, steps_per_epoch, total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  return Setup(config, mesh, info, steps_per_epoch, total_steps, model,
               method, tx, schedule, init_rng, step_rng)


def make_step(setup: Setup):
  c = setup.config
  views_fn = train_step_lib.make_views_fn(
      c.augment.backend, c.dataset.image_size, c.augment.color_strength,
      c.augment.blur)
  return train_step_lib.make_train_step(
      setup.model, setup.tx, setup.schedule, setup.mesh,
      method=setup.method, views_fn=views_fn,
      skip_nonfinite=c.on_nan == 'skip_step',
      inject_nan_at_step=c.debug.inject_nan_at_step,
      compute_dtype=jnp.dtype(c.model.compute_dtype),
      grad_cache_chunks=c.grad_cache_chunks, grad_cache_bn=c.grad_cache_bn)


def initial_state(setup: Setup) -> train_step_lib.TrainState:
  return train_step_lib.create_train_state(
      setup.model, setup.tx, setup.init_rng, setup.config.dataset.image_size,
      setup.mesh, setup.method)


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  Preemption on Cloud TPU and Slurm arrives as SIGTERM; finishing the step
  and checkpointing loses nothing, where dying mid-step loses everything
  since the last save.
  """

  def __init__(self):
    self.signum = None
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _data_position(setup: Setup, step: int) -> dict:
  return {'step': step, 'epoch': step // setup.steps_per_epoch,
          'batch_in_epoch': step % setup.steps_per_epoch,
          'seed': setup.config.seed, 'dataset': setup.config.dataset.name}


def _init_nonfinite_tracker(metrics: dict) -> dict:
  """On-device record of non-finite steps; see `_track_nonfinite`."""
  zeros = jax.tree.map(jnp.zeros_like, metrics)
  return {'first_bad_step': jnp.asarray(-1, jnp.int32),
          'bad_metrics': zeros,
          'last_finite_step': jnp.asarray(-1, jnp.int32),
          'last_finite_metrics': zeros,
          'skipped_steps': jnp.asarray(0, jnp.int32)}


@jax.jit
def _track_nonfinite(tracker: dict, metrics: dict, step: jax.Array) -> dict:
  """Folds one step's metrics into the tracker, on device and asynchronously.

  The loop fetches metrics only at log and checkpoint steps (a fetch per step
  would stall the dispatch pipeline), so a NaN between them would otherwise
  be noticed late and attributed to the wrong step. This keeps the first
  non-finite step, its metrics, the last finite step before it and the count
  of non-finite steps; the loop reads it at every fetch, before any save.
  """
  finite = (metrics['skipped'] == 0 if 'skipped' in metrics
            else jnp.isfinite(metrics['loss']))
  clean = tracker['first_bad_step'] < 0
  first = clean & ~finite
  pick = lambda cond: functools.partial(jax.tree.map, lambda new, old:
                                        jnp.where(cond, new, old))
  return {
      'first_bad_step': jnp.where(first, step, tracker['first_bad_step']),
      'bad_metrics': pick(first)(metrics, tracker['bad_metrics']),
      'last_finite_step': jnp.where(clean & finite, step,
                                    tracker['last_finite_step']),
      'last_finite_metrics': pick(clean & finite)(
          metrics, tracker['last_finite_metrics']),
      'skipped_steps': tracker['skipped_steps'] + (~finite).astype(jnp.int32),
  }


def _json_number(x: float) -> float | str:
  """Strict JSON has no NaN/Inf; write those as 'nan', 'inf', '-inf'."""
  return x if math.isfinite(x) else str(x)


def _write_nan_diagnostic(workdir: str, seen: dict) -> tuple[str, list[str]]:
  """Writes nan_diagnostic.json from a fetched tracker; returns (path, bad)."""
  bad = sorted(k for k, v in seen['bad_metrics'].items()
               if not math.isfinite(v))
  last_step = int(seen['last_finite_step'])
  path = os.path.join(workdir, 'nan_diagnostic.json')
  if jax.process_index() == 0:
    with epath.Path(path).open('w') as f:
      json.dump({
          'step': int(seen['first_bad_step']),
          'non_finite': bad,
          'metrics': {k: _json_number(v)
                      for k, v in seen['bad_metrics'].items()},
          # Only steps of this invocation are tracked: after a resume the
          # last finite step may be unknown (null).
          'last_finite_step': last_step if last_step >= 0 else None,
          'last_finite_metrics': (
              {k: _json_number(v)
               for k, v in seen['last_finite_metrics'].items()}
              if last_step >= 0 else None),
      }, f, indent=2)
  return path, bad


def _truncate_metrics_log(workdir: str, step: int) -> None:
  """Drops metrics.jsonl lines past `step`, the checkpoint a run resumes from.

  After a kill (not a graceful stop) the log holds steps the checkpoint never
  saw; the resumed run logs them again, and readers should see each step once.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if jax.process_index() != 0 or not epath.Path(path).exists():
    return
  with epath.Path(path).open() as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # A line cut short by the kill.
  if len(keep) != len(lines):
    paths.write_text_atomic(path, ''.join(keep))


class _Reporter:
  """Host side of the loop: non-finite checks, log lines and summaries.

  `report` is the only place the loop waits for the device; the loop calls
  it at checkpoint steps (before saving) and one step late for log steps.
  """

  def __init__(self, setup: Setup, workdir: str, writer: Any, ckpt: Any,
               skipped_before: int, input_stats: dict):
    self._setup, self._workdir = setup, workdir
    self._writer, self._ckpt = writer, ckpt
    self._skipped_before = skipped_before
    self._input_stats = input_stats
    self.skipped_steps = skipped_before
    self.last_metrics = None
    self.final_loss = float('nan')

  def report(self, step: int, metrics: Any, tracker: Any,
             rate: float | None) -> None:
    """Fetches a step's metrics; stops on NaN; logs them if `rate` is set."""
    config = self._setup.config
    last = parallel.fetch(metrics)
    seen = parallel.fetch(tracker)
    # The step named is the first bad one, not this one.
    if seen['first_bad_step'] >= 0 and config.on_nan == 'stop':
      path, bad = _write_nan_diagnostic(self._workdir, seen)
      self._ckpt.wait()
      raise NonFiniteError(
          f'non-finite {", ".join(bad)} at step {seen["first_bad_step"]} '
          f'(on_nan=stop); diagnostic in {path}; the last good '
          f'checkpoint (step {self._ckpt.latest_step()}) is kept')
    skipped = self._skipped_before + int(seen['skipped_steps'])
    if skipped > self.skipped_steps:
      logging.warning('Skipped %d non-finite steps so far (first at step '
                      '%d); the state was left unchanged for each.',
                      skipped, seen['first_bad_step'])
    self.skipped_steps = skipped
    last['skipped_steps'] = skipped
    last['corrupt_images_skipped'] = self._input_stats.get(
        'corrupt_images_skipped', 0)
    self.last_metrics, self.final_loss = last, last['loss']
    if rate is None:
      return
    total = self._setup.total_steps
    scalars = dict(last, examples_per_sec=rate * config.batch_size,
                   epoch=step / self._setup.steps_per_epoch)
    eta = (total - step) / rate if rate else float('nan')
    logging.info(
        'step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  ETA %s',
        step, total, scalars['loss'], scalars.get('contrastive_acc', 0.0),
        scalars['learning_rate'], scalars['examples_per_sec'],
        metric_writer.format_eta(eta))
    self._writer.write(step, scalars)


def pretrain(config: ml_collections.ConfigDict, workdir: str,
             setup: Setup | None = None,
             stop_after_steps: int | None = None) -> dict:
  """Runs (or resumes) pretraining; returns the results dict.

  `stop_after_steps` ends this invocation early (with a checkpoint) after that
  many steps, for time-boxed scheduler slots; running again continues.

  Returns a dict with steps, final_train_loss, resumed_from_step, wall_time_s
  and 'state' (the final TrainState, not JSON).
  """
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  t_start = time.time()
  setup = setup or build(config)
  prepare_workdir(workdir)
  check_resume_compatible(workdir, config)
  mesh = setup.mesh
  state = initial_state(setup)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=config.keep_checkpoints)
  resumed_from = ckpt.latest_step()
  # Non-finite steps skipped (on_nan='skip_step') over the whole run; the
  # count travels in the checkpoint's data item.
  skipped_before = 0
  if resumed_from is not None:
    state, position, _ = ckpt.restore(state)
    logging.info('Resumed from step %d (data position %s)', resumed_from,
                 position)
    skipped_before = int(position.get('skipped_steps', 0))
    _truncate_metrics_log(workdir, resumed_from)
  start_step = int(jax.device_get(state.step))
  step_fn = make_step(setup)
  input_stats = {}  # The stream counts corrupt images it skipped here.
  batches = pipeline.make_pretrain_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=start_step,
      include_index=setup.method.needs_index, stats=input_stats)
  batches = parallel.prefetch_to_mesh(batches, mesh, config.dataset.prefetch)
  writer = metric_writer.MetricWriter(workdir)
  monitor = knn_monitor.KnnMonitor(setup, workdir)
  stop = _StopRequest()
  total = setup.total_steps
  logging.info('Pretraining %s: %d steps (%d per epoch), global batch %d on '
               '%d devices, from step %d', config.dataset.name, total,
               setup.steps_per_epoch, config.batch_size, mesh.devices.size,
               start_step)
  reporter = _Reporter(setup, workdir, writer, ckpt, skipped_before,
                       input_stats)
  tracker = None
  t_loop, steps_timed = None, 0
  step = start_step
  interrupted = False
  pending = None  # A log step whose metrics are on their way to the host.
  try:
    while step < total:
      batch = next(batches)
      rng = jax.random.fold_in(setup.step_rng, step)
      state, metrics = step_fn(state, batch, rng)
      step += 1
      if tracker is None:
        tracker = _init_nonfinite_tracker(metrics)
      tracker = _track_nonfinite(tracker, metrics, step)
      if t_loop is None:  # Exclude compilation from the throughput.
        jax.block_until_ready(metrics)
        t_loop, steps_timed = time.time(), 0
      else:
        steps_timed += 1
      if pending is not None:
        # Read the previous log step's metrics only now, with this step
        # already queued behind it: the device never idles waiting for the
        # host to print a log line.
        reporter.report(*pending)
        pending = None
      is_log = step % config.log_every_steps == 0 or step == total
      is_ckpt = step % config.checkpoint_every_steps == 0 or step == total
      stopping = stop.signum is not None or bool(
          stop_after_steps and step - start_step >= stop_after_steps)
      rate = steps_timed / max(time.time() - t_loop, 1e-9)
      if is_ckpt or stopping:
        # Synchronous: the non-finite check must precede the save below, so
        # NaN parameters never reach a checkpoint.
        reporter.report(step, metrics, tracker, rate if is_log else None)
      elif is_log:
        for x in jax.tree.leaves((metrics, tracker)):
          x.copy_to_host_async()
        pending = (step, metrics, tracker, rate)
      if monitor.due(step, total):
        writer.write(step, {'knn_accuracy': monitor.measure(step, state)})
      if is_ckpt or stopping:
        ckpt.save(step, state, dict(_data_position(setup, step),
                                    skipped_steps=reporter.skipped_steps),
                  force=True)
      if stopping:
        interrupted = step < total
        break
  finally:
    ckpt.wait()
    stop.restore()
    writer.close()
  if interrupted:
    logging.warning(
        'Stopped (%s) at step %d; checkpoint saved. Re-run the same command '
        'to resume.', f'signal {stop.signum}' if stop.signum else
        'stop_after_steps', step)
  ckpt.close()
  return {
      'steps': step,
      'total_steps': total,
      'interrupted': interrupted,
      'final_train_loss': reporter.final_loss,
      'final_metrics': reporter.last_metrics,
      'resumed_from_step': resumed_from,
      'skipped_steps': reporter.skipped_steps,
      'corrupt_images_skipped': input_stats.get('corrupt_images_skipped', 0),
      'knn_monitor': knn_monitor.read_history(workdir),
      'pretrain_wall_time_s': time.time() - t_start,
      'state': state,
  }


def encoder_variables(state: train_step_lib.TrainState) -> dict:
  """The variables model.apply needs, from a train state."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def recalibrate_batch_stats(setup: Setup, variables: dict,
                            images: np.ndarray, passes: int = 20) -> dict:
  """Re-estimates BN running statistics by forwarding data in train mode.

  Used for the random-init baseline: its running averages are still the
  initial (0, 1), which would make a fair network look broken.
  """
  model = setup.model
  bs = min(setup.config.eval.batch_size, len(images))
  n_dev = setup.mesh.devices.size
  bs = max(n_dev, bs // n_dev * n_dev)

  @jax.jit
  def update(batch_stats, x):
    _, new = model.apply({'params': variables['params'],
                          'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'])
    return new['batch_stats']

  batch_stats = variables['batch_stats']
  rng = np.random.default_rng(0)
  for _ in range(passes):
    idx = rng.permutation(len(images))
    for i in range(0, len(images) - bs + 1, bs):
      batch_stats = update(batch_stats, jnp.asarray(images[idx[i:i + bs]]))
  return {'params': variables['params'], 'batch_stats': batch_stats}


def evaluate_encoder(setup: Setup, state: train_step_lib.TrainState) -> dict:
  """Frozen-feature probes, few-shot probes and kNN, pretrained vs random.

  The random-init baseline is the exact network pretraining started from
  (same seed), with BN statistics re-estimated on the training images.
  """
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from simclr_jax.evaluation import features as features_lib  # pylint: disable=g-import-not-at-top

  c = setup.config
  train_x, train_y = pipeline.load_eval_arrays(c, c.dataset.train_split)
  test_x, test_y = pipeline.load_eval_arrays(c, c.dataset.eval_split)
  model = setup.model
  # Variables are an argument, not a closed-over constant, so they are not
  # baked into the compiled program.
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)['features'])

  def featurize(variables):
    return tuple(
        features_lib.extract_features(apply, x, c.eval.batch_size,
                                      mesh=setup.mesh, variables=variables)
        for x in (train_x, test_x))

  kw = dict(knn_k=c.eval.knn_k, knn_temperature=c.eval.knn_temperature,
            shots=tuple(c.eval.fewshot_shots), draws=c.eval.fewshot_draws,
            seed=c.seed)
  t0 = time.time()

  def probe(variables):
    f_train, f_test = featurize(variables)
    return evaluation.evaluate_features(f_train, train_y, f_test, test_y, **kw)

  results = probe(encoder_variables(state))
  if c.eval.probe_random_init:
    init = jax.device_get(initial_state(setup))
    variables = recalibrate_batch_stats(setup, encoder_variables(init),
                                        train_x)
    rand = probe(variables)
    # DESIGN.md names: random_init_probe_accuracy for the all-label probe.
    results.update({'random_init_' + k.replace('linear_probe', 'probe'): v
                    for k, v in rand.items()})
  results['eval_wall_time_s'] = time.time() - t0
  return results
