r"""Command-line entry point.

  python -m simclr_jax.main --config=configs/digits.py --workdir=/tmp/run

Modes: pretrain (default; then probes the frozen encoder), and the downstream
modes that start from a finished run named by --config.init_from=RUN_WORKDIR:
linear_eval, finetune, distill, embed and export; and adapt (domain
adaptation, from such a run or from scratch). The same command
runs on every host of a multi-host job; re-running it in the same workdir
resumes. Bad configs and unusable inputs end with one line on stderr and
exit status 2.
"""

import functools
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from simclr_jax.config import cli as config_cli
from simclr_jax.runtime import entry
from simclr_jax.runtime import results as results_lib

# results.json's wall time counts from here (imports before it are small).
_START = time.monotonic()

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, summaries, results.json.')
MODES = ('pretrain', 'linear_eval', 'finetune', 'distill', 'adapt', 'embed',
         'export')
flags.DEFINE_enum('mode', 'pretrain', MODES, 'What to run.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for jax.distributed.initialize.')
flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
flags.DEFINE_integer('process_id', None, 'This process (0..num_processes-1).')
flags.DEFINE_integer('stop_after_steps', None,
                     'Checkpoint and exit after this many steps (for '
                     'time-limited job slots); re-run to continue.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() with no arguments, '
                  'letting JAX detect the cluster (Cloud TPU, Slurm).')
flags.DEFINE_bool('allow_cpu', False,
                  'Run an accelerator recipe (config.requires_accelerator) '
                  'or a run under an accelerator launch script even though '
                  'JAX sees only CPU devices.')
flags.DEFINE_integer('initialization_timeout', 300,
                     'Seconds to wait for the coordinator and every process '
                     'to join a multi-process job before exiting with one '
                     'line on stderr.')
flags.DEFINE_integer('peer_timeout', 60,
                     'Seconds a multi-process job runs on after one process '
                     'dies (killed, out of memory, host lost) before every '
                     'other process exits non-zero with one line on stderr; '
                     're-running resumes from the last checkpoint.')
flags.DEFINE_bool('preflight', False,
                  'Print what the run will need on the target machine (per-'
                  'device memory of each program, per-host memory, '
                  'checkpoint size, steps) from the config alone, without '
                  'data or training; refuse a plan that does not fit.')
flags.DEFINE_integer('preflight_devices', 8, 'Target: devices in the job.')
flags.DEFINE_float('preflight_device_memory_gb', 16.0,
                   'Target: memory of one device, GiB.')
flags.DEFINE_integer('preflight_hosts', 1, 'Target: hosts in the job.')
flags.DEFINE_integer('preflight_num_train_examples', 0,
                     'Train split size when its metadata cannot be read '
                     'here (0 = from metadata or the known sizes).')
flags.DEFINE_float('preflight_host_memory_gb', 0.0,
                   'Target: memory of one host, GiB (0 = not checked).')


def _stop_after_steps() -> int | None:
  """--stop_after_steps, or None when called as a library (flags unparsed)."""
  return FLAGS.stop_after_steps if FLAGS.is_parsed() else None


def _report(config, mode: str, workdir: str, results: dict,
            omit: tuple[str, ...]) -> dict:
  """Adds provenance, writes results.json and logs it (less `omit`)."""
  from simclr_jax.runtime import provenance  # pylint: disable=g-import-not-at-top
  results['provenance'] = provenance.for_mode(
      config, mode, time.monotonic() - _START, workdir)
  path = results_lib.write_results(workdir, results)
  logging.info('Results: %s', results_lib.summary(
      results, omit=('provenance', *omit)))
  logging.info('Wrote %s', path)
  return results


def _resolve(config, mode: str):
  """The config with its splits (and, for pretraining, gradient caching)
  settled once, before any mode starts (config/resolve.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from simclr_jax.config import resolve  # pylint: disable=g-import-not-at-top
  with entry.exit_on_error():
    return resolve.resolve(config, num_devices=jax.device_count(),
                           process_count=jax.process_count(), mode=mode)


def run_pretrain(config, workdir: str) -> dict:
  """Pretrains (or resumes), then evaluates; returns what results.json holds."""
  from simclr_jax.training import pretrain as train  # pylint: disable=g-import-not-at-top
  with entry.exit_on_error(diverged=(train.NonFiniteError,)):
    setup = train.build(config)
    train.prepare_workdir(workdir)
    out = train.pretrain(config, workdir, setup,
                         stop_after_steps=_stop_after_steps())
  state = out.pop('state')
  results = dict(out)
  if not out['interrupted']:
    results.update(train.evaluate_encoder(setup, state))
  # setup.config: the config as the run resolved it (its gradient caching,
  # its splits), which is what the provenance block describes.
  return _report(setup.config, 'pretrain', workdir, results,
                 omit=('final_metrics',))


def run_downstream(mode: str, config, workdir: str) -> dict:
  """Runs a mode that starts from another run's checkpoint."""
  # Imported lazily: each mode pulls in only what it needs.
  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import loop
  from simclr_jax.training import workdir as workdir_lib
  if mode == 'export':
    from simclr_jax import export
    runner = export.run_export
  else:
    from simclr_jax import downstream
    runner = downstream.RUNNERS[mode]
    if mode in downstream.TRAINING_RUNNERS:
      runner = functools.partial(runner, stop_after_steps=_stop_after_steps())
  # A missing or unfinished run to start from is a FileNotFoundError.
  with entry.exit_on_error(usage=(ValueError, FileNotFoundError),
                           diverged=(loop.NonFiniteError,)):
    workdir_lib.prepare_workdir(workdir)
    results = runner(config, workdir)
  return _report(config, mode, workdir, results, omit=())


def run_preflight(config) -> None:
  """Prints the plan of `config` on the target the flags describe, or one
  line naming the stage that does not fit and the field to change."""
  from simclr_jax.tools import preflight  # pylint: disable=g-import-not-at-top
  with entry.exit_on_error():
    try:
      plan = preflight.preflight(
          config, devices=FLAGS.preflight_devices,
          device_memory_gb=FLAGS.preflight_device_memory_gb,
          hosts=FLAGS.preflight_hosts,
          num_train_examples=FLAGS.preflight_num_train_examples or None,
          host_memory_gb=FLAGS.preflight_host_memory_gb or None)
    except preflight.PlanError as e:
      if e.plan:
        print(preflight.format_table(e.plan))
      raise
  print(preflight.format_table(plan))


def main(argv):
  entry.reconfigure_logs(FLAGS.verbosity)
  if len(argv) > 1:
    entry.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    entry.fail('--config is required, e.g. --config=configs/digits.py')
  if FLAGS.preflight:  # Before the CPU refusal: it plans for the target.
    run_preflight(FLAGS.config)
    return
  if not FLAGS.workdir:
    entry.fail('--workdir is required')
  entry.join_job(FLAGS.coordinator_address, FLAGS.num_processes,
                 FLAGS.process_id, auto=FLAGS.distributed,
                 timeout_s=FLAGS.initialization_timeout,
                 peer_timeout_s=FLAGS.peer_timeout)
  entry.check_accelerator(FLAGS.config, FLAGS.allow_cpu)
  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import distributed
  from simclr_jax.runtime import provenance
  from simclr_jax.training import workdir as workdir_lib
  with entry.exit_on_error():
    workdir_lib.prepare_workdir(FLAGS.workdir)
  provenance.record_start(FLAGS.workdir)  # Before any step: what code ran.
  # A killed peer makes collectives here fail at once; the job then ends
  # with the peer watch's one line, not this process's traceback.
  with distributed.errors_await_peer_watch():
    config = _resolve(FLAGS.config, FLAGS.mode)
    if FLAGS.mode == 'pretrain':
      run_pretrain(config, FLAGS.workdir)
    else:
      run_downstream(FLAGS.mode, config, FLAGS.workdir)


def run():
  # Quiet unless --verbosity>=1 or SIMCLR_JAX_VERBOSE=1, set before anything
  # imports TensorFlow or starts a JAX backend; main() re-applies it from
  # the parsed flag.
  entry.run_absl(main, config_cli.parse_flags)


if __name__ == '__main__':
  run()
