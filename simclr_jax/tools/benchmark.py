r"""Benchmarks: the real train step of a config, or the input pipeline alone.

  python -m simclr_jax.benchmark --config=configs/imagenet_resnet50.py
  python -m simclr_jax.benchmark --config=configs/digits.py --input_only
  python -m simclr_jax.benchmark --config=configs/digits.py \
      --config.grad_cache_chunks=4 --torch_peer --profile=/tmp/trace

Prints one JSON line and writes it to --output (default benchmark.json in the
current directory). The train-step timing compiles the step of the config on
synthetic data already on the devices, runs warm-up steps, then times
--steps steps with device synchronisation at both ends. The JSON holds the
device kind and count, model, image size, per-device and global batch, step
time, views/s, FLOPs per step (XLA cost analysis), achieved FLOP/s and MFU
against the device's bf16 peak (on a CPU, the host's float32 FMA peak
estimated from /proc/cpuinfo; `peak_source` says how), peak device memory,
the input mode and the gradient-caching
setting; --torch_peer adds a PyTorch step of the same shape in the same
process and the jax/torch throughput ratio. Without TensorFlow installed the
synthetic data and the 'jax' augmentation backend still work.
"""

import json

import jax
from absl import flags
from ml_collections import config_flags

from simclr_jax.config import cli as config_cli
from simclr_jax.runtime import entry
from simclr_jax.tools import step_benchmark

FLAGS = flags.FLAGS


def benchmark_input() -> list[dict]:
  """Views/s of both backends from arrays, then both from JPEG records."""
  from simclr_jax.tools import input_benchmark  # pylint: disable=g-import-not-at-top
  rows = []
  for size, batch, n in ((32, 256, 8), (224, 32, 16)):
    for backend in ('tf', 'jax'):
      rows.append(input_benchmark.measure_input_throughput(
          backend, size, batch, n))
  for backend in ('tf', 'jax'):
    rows.append(input_benchmark.measure_jpeg_throughput(backend, 224, 32, 16))
  return rows


def main(argv):
  del argv
  if FLAGS.input_only:
    result = {'mode': 'input', 'rows': benchmark_input()}
  elif FLAGS.suite == 'accelerator':
    from simclr_jax.tools import accelerator_check  # pylint: disable=g-import-not-at-top
    with entry.exit_on_error():
      result = accelerator_check.run_suite(
          FLAGS.output_dir, smoke=FLAGS.smoke, budget_s=FLAGS.budget_s)
    # Its JSON and markdown are in --output_dir; print the table.
    print(accelerator_check.markdown(result))
    return
  elif FLAGS.suite == 'grad_cache':
    if FLAGS.config is None:
      entry.fail('--config is required')
    result = step_benchmark.grad_cache_suite(FLAGS.config, FLAGS.steps,
                                             FLAGS.warmup)
  else:
    if FLAGS.config is None:
      entry.fail('--config is required')
    config = FLAGS.config
    if FLAGS.per_device_batch:
      config.batch_size = FLAGS.per_device_batch * jax.device_count()
    with entry.exit_on_error():
      result = step_benchmark.benchmark_train_step(
          config, FLAGS.steps, FLAGS.warmup, FLAGS.profile,
          FLAGS.profile_steps)
    if FLAGS.breakdown:
      result['breakdown'] = step_benchmark.step_breakdown(
          config.copy_and_resolve_references(), FLAGS.steps, FLAGS.warmup)
    if FLAGS.torch_peer:
      peer = step_benchmark.torch_peer_row(config, FLAGS.steps, FLAGS.warmup,
                                           FLAGS.torch_compile)
      result['torch_peer'] = peer
      if peer.get('views_per_sec'):
        result['torch_views_per_sec'] = peer['views_per_sec']
        result['jax_over_torch'] = (result['views_per_sec'] /
                                    peer['views_per_sec'])
  line = json.dumps(result)
  print(line)
  with open(FLAGS.output, 'w') as f:
    f.write(line + '\n')


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program.

  Defining them at import would clash with simclr_jax.main's flags in any
  process that imports both (the test suite does).
  """
  config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                  lock_config=False)
  flags.DEFINE_bool('input_only', False,
                    'Time view generation only (both backends, 32 and 224 px).')
  flags.DEFINE_enum('suite', '', ['', 'grad_cache', 'accelerator'],
                    'grad_cache: the plain step and gradient-cached steps '
                    'side by side (grad_cache_suite). accelerator: the '
                    'accelerator check (tools/accelerator_check.py; '
                    'launch/accelerator_check.sh), written to --output_dir.')
  flags.DEFINE_string('output_dir', '',
                      '--suite=accelerator: where the JSON and markdown go.')
  flags.DEFINE_bool('smoke', False,
                    '--suite=accelerator: the same stages at toy sizes (CPU).')
  flags.DEFINE_float('budget_s', 480.0,
                     '--suite=accelerator: wall-clock budget for all stages.')
  flags.DEFINE_integer('steps', 10, 'Timed steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_integer('per_device_batch', 0,
                       'Override: images per device (0 = the config batch).')
  flags.DEFINE_string('output', 'benchmark.json', 'Where to write the JSON.')
  flags.DEFINE_string('profile', '',
                      'If set, write a jax.profiler trace of --profile_steps '
                      'steps after the timed ones to this directory '
                      '(TensorBoard / XProf / Perfetto).')
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced by --profile.')
  flags.DEFINE_bool('torch_peer', False,
                    'Also time a PyTorch SimCLR step of the same model, batch '
                    'and image size (simclr_jax/tools/torch_peer.py), when torch is '
                    'importable, and report the jax/torch ratio.')
  flags.DEFINE_bool('breakdown', False,
                    'Also time the parts of the step on their own: the '
                    'views, the forward pass, forward and backward, the rest '
                    '(step_benchmark.step_breakdown).')
  flags.DEFINE_bool('torch_compile', False,
                    'torch.compile the peer step (slow to compile on CPU).')


def run() -> None:
  """Program entry: `python -m simclr_jax.benchmark` (or .tools.benchmark).

  Library logs only with --verbosity>=1 or SIMCLR_JAX_VERBOSE=1; a bad
  --config is one `error:` line (exit 2), as in simclr_jax.main.
  """
  _define_flags()
  entry.run_absl(main, config_cli.parse_flags)


if __name__ == '__main__':
  run()
