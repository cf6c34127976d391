"""The one host training loop, shared by pretraining and every downstream mode.

A mode describes its run as a `LoopSpec` (a jitted step, a data stream that
can start at any step, the step count) and calls `run`. The loop gives every
mode the same protections:

  * periodic Orbax checkpoints of the whole train state plus the stream
    position; re-running the same command resumes from the newest readable
    checkpoint, so an interrupted run ends where an uninterrupted one would;
  * SIGTERM/SIGINT (preemption on Cloud TPU and Slurm): finish the step,
    save, return `interrupted=True` (the caller exits 0). In a multi-process
    job a signal that reaches one host stops every host after the same step
    (`_StopAgreement`), so all of them enter the collective save together;
  * the on_nan policy: 'stop' raises NonFiniteError before any NaN reaches a
    checkpoint (with nan_diagnostic.json), 'skip_step' relies on the step
    keeping the old state and counts the skipped steps;
  * metrics read one step late with an asynchronous host copy, so the device
    never waits for a log line; progress with rate and ETA; metrics.jsonl and
    TensorBoard through the metric writer;
  * `stop_after_steps` for time-boxed scheduler slots.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from simclr_jax.runtime import checkpointing
from simclr_jax.runtime import metric_writer
from simclr_jax.runtime import parallel
from simclr_jax.runtime import paths

StepFn = Callable[[Any, dict, jax.Array], tuple[Any, dict]]


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/Inf and on_nan='stop'."""


@dataclasses.dataclass
class LoopSpec:
  """What a mode hands the loop.

  Attributes:
    name: the mode, for log lines ('pretrain', 'finetune', ...).
    step_fn: jitted `step(state, batch, rng) -> (state, metrics)`; metrics
      hold at least 'loss' and 'learning_rate', and 'skipped' (1.0 for a step
      whose update was dropped as non-finite) when the step implements
      on_nan='skip_step'.
    batches: `start_step -> iterator of host-local batches`, positioned so
      that its first batch is the one step `start_step` of an uninterrupted
      run would see.
    total_steps: steps of the whole run.
    steps_per_epoch: for the epoch column of the log (may be fractional).
    batch_size: global batch, for the images/s column.
    rng: the run's step key; step k uses fold_in(rng, k).
    mesh: the device mesh the batches are placed on.
    on_nan: 'stop' or 'skip_step'.
    log_every_steps, checkpoint_every_steps, keep_checkpoints, prefetch: as
      the config fields of the same names.
    accuracy_key: the metric shown as 'acc' in the progress line.
    position: step -> JSON dict of the stream position, stored with each
      checkpoint (for people and for checks; the stream itself is a function
      of the step).
    after_step: optional `(step, state) -> dict | None`, called after each
      step with the new state (the kNN monitor); a dict is written as metrics.
    before_step: optional `(step, state) -> state`, called on the host before
      step `step` runs (also the first step after a resume); the step runs
      from the state it returns (DeepCluster's reclustering). It must be a
      pure function of (step, state), so a resumed run repeats it exactly.
  """
  name: str
  step_fn: StepFn
  batches: Callable[[int], Iterator[dict]]
  total_steps: int
  steps_per_epoch: float
  batch_size: int
  rng: jax.Array
  mesh: Any
  on_nan: str = 'stop'
  log_every_steps: int = 100
  checkpoint_every_steps: int = 1000
  keep_checkpoints: int = 2
  prefetch: int = 2
  accuracy_key: str = 'accuracy'
  position: Callable[[int], dict] = lambda step: {'step': step}
  after_step: Callable[[int, Any], dict | None] | None = None
  before_step: Callable[[int, Any], Any] | None = None


@dataclasses.dataclass
class LoopResult:
  state: Any
  steps: int
  total_steps: int
  interrupted: bool
  resumed_from_step: int | None
  final_loss: float
  final_metrics: dict | None
  skipped_steps: int
  wall_time_s: float


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
      # None: the old handler was installed outside Python (by the runtime);
      # the default action is the closest Python can put back.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@functools.lru_cache(maxsize=None)
def _agree_fn(sharding: jax.sharding.Sharding) -> Callable[[jax.Array], Any]:
  """Jitted max over one value per device, replicated to every process."""
  replicated = jax.sharding.NamedSharding(sharding.mesh,
                                          jax.sharding.PartitionSpec())
  return jax.jit(jnp.max, out_shardings=replicated)


class _StopAgreement:
  """Makes a stop that one process sees a stop of every process, same step.

  On a pod, SIGTERM often reaches one host. Were that host alone to stop and
  enter the checkpoint save (collective across processes) while the others
  ran the next step's collectives, the job would hang. So each process feeds
  its signal number (0 for none) into a tiny all-reduce (max) after every
  step, and every process acts on the result of the previous step's
  reduction: all of them read the same value at the same step and stop
  together, one step after the signal was seen.

  The cost is one all-reduce of one integer per device per step, queued
  behind the step on the device, and the host reading it one step late, as
  it reads metrics: the device always has the current step queued while the
  host waits, so it does not idle. The arrays fed in are built once per
  distinct value (0, SIGTERM, SIGINT), so a step moves no data to the
  device. One process needs no agreement and reads its flag directly.

  The other stop decisions need no exchange: `stop_after_steps` is the same
  flag and the same resumed step on every process, and the non-finite stop
  reads replicated metrics at steps every process reports on.
  """

  def __init__(self, request: _StopRequest):
    self._request = request
    self._multi = jax.process_count() > 1
    self._pending = None
    if self._multi:
      mesh = jax.sharding.Mesh(np.array(jax.devices()), ('processes',))
      self._sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec('processes'))
      self._inputs = {}

  def _input(self, value: int) -> jax.Array:
    if value not in self._inputs:
      self._inputs[value] = jax.make_array_from_single_device_arrays(
          (jax.device_count(),), self._sharding,
          [jax.device_put(np.full((1,), value, np.int32), d)
           for d in jax.local_devices()])
    return self._inputs[value]

  def poll(self) -> int | None:
    """Call once per step, after dispatching it; the agreed signal or None.

    With several processes, the value is every process's view as of the
    previous call, identical on all of them.
    """
    local = self._request.signum
    if not self._multi:
      return local
    agreed = _agree_fn(self._sharding)(self._input(local or 0))
    agreed.copy_to_host_async()
    previous, self._pending = self._pending, agreed
    if previous is None:
      return None
    return int(np.asarray(previous)) or None


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


def truncate_metrics_log(workdir: str, step: int) -> None:
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

  def __init__(self, spec: LoopSpec, workdir: str, writer: Any, ckpt: Any,
               skipped_before: int, extra_metrics: Callable[[], dict]):
    self._spec, self._workdir = spec, workdir
    self._writer, self._ckpt = writer, ckpt
    self._skipped_before = skipped_before
    self._extra_metrics = extra_metrics
    self.skipped_steps = skipped_before
    self.last_metrics = None
    self.final_loss = float('nan')

  def report(self, step: int, metrics: Any, tracker: Any,
             rate: float | None) -> None:
    """Fetches a step's metrics; stops on NaN; logs them if `rate` is set."""
    spec = self._spec
    last = parallel.fetch(metrics)
    seen = parallel.fetch(tracker)
    # The step named is the first bad one, not this one.
    if seen['first_bad_step'] >= 0 and spec.on_nan == 'stop':
      path, bad = _write_nan_diagnostic(self._workdir, seen)
      self._ckpt.wait()
      raise NonFiniteError(
          f'non-finite {", ".join(bad)} at step {seen["first_bad_step"]} '
          f'(on_nan=stop) in {spec.name}; diagnostic in {path}; the last '
          f'good checkpoint (step {self._ckpt.latest_step()}) is kept')
    skipped = self._skipped_before + int(seen['skipped_steps'])
    if skipped > self.skipped_steps:
      logging.warning('Skipped %d non-finite steps so far (first at step '
                      '%d); the state was left unchanged for each.',
                      skipped, seen['first_bad_step'])
    self.skipped_steps = skipped
    last['skipped_steps'] = skipped
    last.update(self._extra_metrics())
    self.last_metrics, self.final_loss = last, last['loss']
    if rate is None:
      return
    total = spec.total_steps
    scalars = dict(last, examples_per_sec=rate * spec.batch_size,
                   epoch=step / spec.steps_per_epoch)
    eta = (total - step) / rate if rate else float('nan')
    logging.info('%s', progress_line(spec, step, scalars, eta))
    self._writer.write(step, scalars)


def progress_line(spec: LoopSpec, step: int, scalars: dict,
                  eta_s: float) -> str:
  """The log's progress line. 'acc' appears only where the method reports
  `spec.accuracy_key`: a method without one (MoCo, BYOL, SwAV) would
  otherwise show a constant 0 that reads as a broken run."""
  acc = scalars.get(spec.accuracy_key)
  return (f'{spec.name} step {step}/{spec.total_steps}  '
          f'epoch {scalars["epoch"]:.1f}  loss {scalars["loss"]:.4f}  '
          + ('' if acc is None else f'acc {float(acc):.3f}  ')
          + f'lr {scalars["learning_rate"]:.4g}  '
          f'{scalars["examples_per_sec"]:.1f} img/s  '
          f'ETA {metric_writer.format_eta(eta_s)}')


def run(spec: LoopSpec, state: Any, workdir: str, *,
        stop_after_steps: int | None = None,
        extra_metrics: Callable[[], dict] = dict) -> LoopResult:
  """Runs (or resumes) `spec` from `state`, the freshly initialised state.

  `state` doubles as the restore template: when workdir/checkpoints holds a
  readable checkpoint, the run continues from it. `extra_metrics()` adds
  host-side counters (e.g. corrupt images skipped) to every report.
  """
  t_start = time.time()
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), max_to_keep=spec.keep_checkpoints)
  resumed_from = None
  # Non-finite steps skipped (on_nan='skip_step') over the whole run; the
  # count travels in the checkpoint's data item.
  skipped_before = 0
  if ckpt.latest_step() is not None:
    state, position, resumed_from = ckpt.restore(state)
    logging.info('Resumed from step %d (%s)', resumed_from, spec.name)
    skipped_before = int(position.get('skipped_steps', 0))
    truncate_metrics_log(workdir, resumed_from)
  start_step = int(jax.device_get(state.step))
  total = spec.total_steps
  batches = parallel.prefetch_to_mesh(spec.batches(start_step), spec.mesh,
                                      spec.prefetch)
  writer = metric_writer.MetricWriter(workdir)
  stop = _StopRequest()
  agreement = _StopAgreement(stop)
  stop_signal = None
  reporter = _Reporter(spec, workdir, writer, ckpt, skipped_before,
                       extra_metrics)
  tracker = None
  t_loop, steps_timed = None, 0
  step = start_step
  interrupted = False
  pending = None  # A log step whose metrics are on their way to the host.
  try:
    while step < total:
      if spec.before_step is not None:
        state = spec.before_step(step, state)
      batch = next(batches)
      state, metrics = spec.step_fn(state, batch,
                                    jax.random.fold_in(spec.rng, step))
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
      is_log = step % spec.log_every_steps == 0 or step == total
      is_ckpt = step % spec.checkpoint_every_steps == 0 or step == total
      stop_signal = agreement.poll()
      stopping = stop_signal is not None or bool(
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
      if spec.after_step is not None:
        scalars = spec.after_step(step, state)
        if scalars:
          writer.write(step, scalars)
      if is_ckpt or stopping:
        ckpt.save(step, state, dict(spec.position(step),
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
        'Stopped %s (%s) at step %d; checkpoint saved. Re-run the same '
        'command to resume.', spec.name,
        f'signal {stop_signal}' if stop_signal else 'stop_after_steps', step)
  ckpt.close()
  return LoopResult(
      state=state, steps=step, total_steps=total, interrupted=interrupted,
      resumed_from_step=resumed_from, final_loss=reporter.final_loss,
      final_metrics=reporter.last_metrics,
      skipped_steps=reporter.skipped_steps,
      wall_time_s=time.time() - t_start)
