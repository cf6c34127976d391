r"""Benchmarks: the real train step of a config, or the input pipeline alone.

  python -m simclr_jax.benchmark --config=configs/imagenet_resnet50.py
  python -m simclr_jax.benchmark --config=configs/digits.py --input_only

Prints one JSON line and writes it to --output (default benchmark.json in the
current directory). The train-step timing compiles the step of the config on
synthetic data already on the devices, runs warm-up steps, then times
--steps steps with device synchronisation at both ends.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from simclr_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Recipe file.',
                                lock_config=False)
flags.DEFINE_bool('input_only', False,
                  'Time view generation only (both backends, 32 and 224 px).')
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('per_device_batch', 0,
                     'Override: images per device (0 = the config batch).')
flags.DEFINE_string('output', 'benchmark.json', 'Where to write the JSON.')

# Dense bf16 peak FLOP/s per device (vendor figures), for MFU.
PEAK_FLOPS = {
    'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v5p': 459e12, 'A100': 312e12, 'H100': 989e12,
    'H200': 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None


def benchmark_train_step(config, steps: int, warmup: int) -> dict:
  """Times the config's jitted train step on synthetic device data."""
  from simclr_jax import train  # pylint: disable=g-import-not-at-top

  config.dataset.name = 'synthetic'
  setup = train.build(config)
  mesh = setup.mesh
  step_fn = train.make_step(setup)
  state = train.initial_state(setup)
  b, s = config.batch_size, config.dataset.image_size
  rng = np.random.default_rng(0)
  if config.augment.backend == 'jax':
    r = config.dataset.raw_size or s
    host = {'images': rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8)}
  else:
    host = {'views': rng.uniform(size=(b, 2, s, s, 3)).astype(np.float32)}
  host['labels'] = rng.integers(0, 10, (b,)).astype(np.int32)
  batch = parallel.to_global(host, mesh)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))
  for _ in range(warmup):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  devices = mesh.devices.size
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)
  mem = None
  try:
    stats = jax.devices()[0].memory_stats() or {}
    mem = stats.get('peak_bytes_in_use')
  except Exception:  # pylint: disable=broad-except
    pass
  # cost_analysis counts the whole (global) program on CPU/GPU with SPMD
  # partitioning per device; report per-device FLOPs and MFU on that basis.
  return {
      'mode': 'train_step',
      'device_kind': kind, 'device_count': devices,
      'model': f'resnet{config.model.depth}x{config.model.width_multiplier}',
      'image_size': s, 'global_batch': b, 'per_device_batch': b // devices,
      'compute_dtype': config.model.compute_dtype,
      'input_mode': 'synthetic+' + config.augment.backend,
      'compile_s': compile_s, 'step_time_s': step_s,
      'views_per_sec': 2 * b / step_s,
      'flops_per_step_per_device': flops,
      'mfu': flops / step_s / peak if peak and flops else None,
      'peak_memory_bytes': mem,
  }


def benchmark_input() -> list[dict]:
  from simclr_jax import input_benchmark  # pylint: disable=g-import-not-at-top
  rows = []
  for size, batch, n in ((32, 256, 8), (224, 32, 4)):
    for backend in ('tf', 'jax'):
      rows.append(input_benchmark.measure_input_throughput(
          backend, size, batch, n))
  return rows


def main(argv):
  del argv
  if FLAGS.input_only:
    result = {'mode': 'input', 'rows': benchmark_input()}
  else:
    if FLAGS.config is None:
      print('error: --config is required', file=sys.stderr)
      sys.exit(2)
    config = FLAGS.config
    if FLAGS.per_device_batch:
      config.batch_size = FLAGS.per_device_batch * jax.device_count()
    try:
      result = benchmark_train_step(config, FLAGS.steps, FLAGS.warmup)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  line = json.dumps(result)
  print(line)
  with open(FLAGS.output, 'w') as f:
    f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
