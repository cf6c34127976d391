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
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _initialize_distributed() -> None:
  """Joins a multi-process job (if the flags ask) before any device use."""
  from simclr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        auto=FLAGS.distributed, timeout_s=FLAGS.initialization_timeout)
  except distributed.InitializationError as e:
    _fail(str(e))


def _json_safe(x):
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if hasattr(x, 'item'):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(workdir: str, results: dict, name: str = 'results.json'
                  ) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    with epath.Path(path).open('w') as f:
      json.dump(_json_safe(results), f, indent=2, sort_keys=True)
  return path


def _provenance(config, mode: str = 'pretrain') -> dict:
  """results.json's provenance block; wall time counts from program start."""
  from simclr_jax.runtime import provenance  # pylint: disable=g-import-not-at-top
  section = config.get(mode)
  batch = (section.get('batch_size') if section is not None and
           hasattr(section, 'get') else None)
  return provenance.collect(config, time.monotonic() - _START, batch)


def _stop_after_steps() -> int | None:
  """--stop_after_steps, or None when called as a library (flags unparsed)."""
  return FLAGS.stop_after_steps if FLAGS.is_parsed() else None


def run_pretrain(config, workdir: str) -> dict:
  """Pretrains (or resumes), then evaluates; returns what results.json holds."""
  from simclr_jax.training import pretrain as train  # pylint: disable=g-import-not-at-top
  try:
    setup = train.build(config)
    train.prepare_workdir(workdir)
  except ValueError as e:  # ConfigError, DatasetError: one line, no trace.
    _fail(str(e))
  try:
    out = train.pretrain(config, workdir, setup,
                         stop_after_steps=_stop_after_steps())
  except train.NonFiniteError as e:
    _fail(str(e), code=1)
  except ValueError as e:
    _fail(str(e))
  state = out.pop('state')
  results = dict(out)
  if not out['interrupted']:
    results.update(train.evaluate_encoder(setup, state))
  results['provenance'] = _provenance(config)
  path = write_results(workdir, results)
  logging.info('Results: %s', json.dumps(_json_safe(
      {k: v for k, v in results.items()
       if k not in ('final_metrics', 'provenance')})))
  logging.info('Wrote %s', path)
  return results


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
  try:
    workdir_lib.prepare_workdir(workdir)
    results = runner(config, workdir)
  except loop.NonFiniteError as e:
    _fail(str(e), code=1)
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  results['provenance'] = _provenance(config, mode)
  path = write_results(workdir, results)
  logging.info('Results: %s', json.dumps(_json_safe(
      {k: v for k, v in results.items() if k != 'provenance'})))
  logging.info('Wrote %s', path)
  return results


def main(argv):
  from simclr_jax.runtime import logs  # pylint: disable=g-import-not-at-top
  logs.configure(FLAGS.verbosity >= 1 or logs.env_verbose())
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config=configs/digits.py')
  if not FLAGS.workdir:
    _fail('--workdir is required')
  _initialize_distributed()
  from simclr_jax.runtime import accelerator  # pylint: disable=g-import-not-at-top
  try:
    accelerator.check(FLAGS.config, FLAGS.allow_cpu)
  except accelerator.AcceleratorError as e:
    _fail(str(e))
  if FLAGS.mode != 'export':  # Export reads no data.
    from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
    try:
      datasets.resolve_splits(FLAGS.config)
    except ValueError as e:
      _fail(str(e))
  if FLAGS.mode == 'pretrain':
    run_pretrain(FLAGS.config, FLAGS.workdir)
  else:
    run_downstream(FLAGS.mode, FLAGS.config, FLAGS.workdir)


def run():
  # Before anything imports TensorFlow or starts a JAX backend (the
  # validation module imports JAX): quiet unless --verbosity>=1 or
  # SIMCLR_JAX_VERBOSE=1; main() re-applies it from the parsed flag.
  from simclr_jax.runtime import logs  # pylint: disable=g-import-not-at-top
  logs.configure(logs.verbose_from_argv(sys.argv))
  from simclr_jax.config import validation as config_validation  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=config_validation.parse_flags)


if __name__ == '__main__':
  run()
