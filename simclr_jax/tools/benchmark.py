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
time, views/s, FLOPs per step (XLA cost analysis) and MFU against the device's
bf16 peak, peak device memory, the input mode and the gradient-caching
setting; --torch_peer adds a PyTorch step of the same shape in the same
process and the jax/torch throughput ratio. Without TensorFlow installed the
synthetic data and the 'jax' augmentation backend still work.
"""

import dataclasses
import json
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from simclr_jax.runtime import parallel

FLAGS = flags.FLAGS
# Dense (no sparsity) bf16 peak FLOP/s per device from the vendors' data
# sheets, for MFU. Matched as substrings of `device_kind`, first match wins,
# so the more specific names come first. A100 and H100/H200 are the SXM parts;
# H100 PCIe is lower. TPU v5e reports itself as 'TPU v5 lite'.
PEAK_FLOPS = {
    'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12,
    'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
    'A100': 312e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return flops
  return None


def _cost_flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def model_flops_per_device(config, setup, compiled, state, batch, key
                           ) -> tuple[float, str]:
  """FLOPs of one step per device, and where the figure comes from.

  The compiled SPMD program is the per-device program, so its cost analysis
  is per device. With gradient caching the step is several programs, some
  run once per chunk, and the useful work is the plain step's anyway (MFU
  counts model FLOPs; the recomputed forward pass is overhead), so there the
  figure is that of the plain step, from its lowered (global, unpartitioned)
  program divided by the device count.
  """
  from simclr_jax.training import pretrain as train  # pylint: disable=g-import-not-at-top
  if not config.get('grad_cache_chunks', 0):
    return _cost_flops(compiled.cost_analysis()), 'compiled_cost_analysis'
  plain = config.copy_and_resolve_references()
  plain.grad_cache_chunks = 0
  plain_setup = dataclasses.replace(setup, config=plain)
  lowered = train.make_step(plain_setup).lower(state, batch, key)
  flops = _cost_flops(lowered.cost_analysis()) / setup.mesh.devices.size
  return flops, 'lowered_cost_analysis_of_plain_step'


def _memory_analysis(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
    analysis = {k: int(getattr(m, k)) for k in (
        'argument_size_in_bytes', 'output_size_in_bytes',
        'alias_size_in_bytes', 'temp_size_in_bytes',
        'generated_code_size_in_bytes')}
  except Exception:  # pylint: disable=broad-except
    return {}
  analysis['estimate_bytes'] = (
      analysis['argument_size_in_bytes'] + analysis['output_size_in_bytes'] -
      analysis['alias_size_in_bytes'] + analysis['temp_size_in_bytes'])
  return analysis


def peak_memory(programs: list[tuple[str, Any]]
                ) -> tuple[int | None, str | None, dict]:
  """Peak device memory: the allocator's high-water mark where the backend
  reports one (GPU, TPU), else XLA's static estimate for the largest of the
  step's compiled programs (arguments + outputs + temporaries - donated
  aliases; CPU has no memory_stats). The plain step is one program; a
  gradient-cached step is several, run one after another, and its arguments
  (parameters, one chunk, the gradient accumulator) are what stays live
  between them."""
  analyses = {name: _memory_analysis(c) for name, c in programs}
  largest = max(analyses, key=lambda n: analyses[n].get('estimate_bytes', -1))
  analysis = dict(analyses[largest], program=largest)
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get('peak_bytes_in_use'):
    return int(stats['peak_bytes_in_use']), 'memory_stats', analysis
  if 'estimate_bytes' in analysis:
    return analysis['estimate_bytes'], 'compiled_memory_analysis', analysis
  return None, None, analysis


def _abstract(tree: Any) -> Any:
  """Arrays -> ShapeDtypeStruct with their shardings (survives donation)."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
      if isinstance(a, jax.Array) else a, tree)


def compile_programs(step_fn, state, batch, key):
  """Compiles every program of one step.

  Returns (programs [(name, compiled)], seconds, state, step to time). The
  plain step is one jitted program, timed through its compiled form, and the
  seconds are its compile time. The gradient-cached step
  (pretrain_step.HostChunkedStep) is several programs dispatched from the
  host: its first step (which compiles them all) records their arguments,
  and the seconds are that first step's wall time; the caller subtracts one
  step's time. Each distinct program is then lowered again for its analyses
  (jit's cache makes that cheap), and the timed step is the host-driven one.
  """
  if hasattr(step_fn, 'lower'):
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, key).compile()
    return [('step', compiled)], time.perf_counter() - t0, state, compiled
  recorded = {}

  def record(name, program, args):
    recorded.setdefault(name, (program, _abstract(args)))

  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch, key, record=record)
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t0
  programs = [(name, program.lower(*args).compile())
              for name, (program, args) in recorded.items()]
  return programs, first_step_s, state, step_fn


def synthetic_batch(config, mesh, seed: int = 0) -> dict:
  """A global batch of the config's input mode: raw uint8 images for the
  'jax' backend (views made in the step), ready views for 'tf'."""
  rng = np.random.default_rng(seed)
  b, s = config.batch_size, config.dataset.image_size
  if config.augment.backend == 'jax':
    r = config.dataset.raw_size or s
    host = {'images': rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8)}
  else:
    host = {'views': rng.uniform(size=(b, 2, s, s, 3)).astype(np.float32)}
  host['labels'] = rng.integers(0, 10, (b,)).astype(np.int32)
  return parallel.to_global(host, mesh)


def benchmark_train_step(config, steps: int, warmup: int,
                         profile_dir: str = '', profile_steps: int = 3,
                         mesh=None) -> dict:
  """Times the config's train step on synthetic device data.

  `mesh` defaults to every device (the accelerator check passes a
  one-device mesh for like-for-like comparisons).
  """
  from simclr_jax.training import pretrain as train  # pylint: disable=g-import-not-at-top

  config.dataset.name = 'synthetic'
  setup = train.build(config, mesh=mesh)
  mesh = setup.mesh
  step_fn = train.make_step(setup)
  state = train.initial_state(setup)
  b, s = config.batch_size, config.dataset.image_size
  batch = synthetic_batch(config, mesh)
  key = jax.random.key(0)
  programs, compile_s, state, compiled = compile_programs(step_fn, state, batch,
                                                      key)
  flops, flops_source = model_flops_per_device(config, setup, programs[0][1],
                                               state, batch, key)
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  if compiled is step_fn:  # Host-driven: the first step's time less one.
    compile_s = max(0.0, compile_s - step_s)
  if profile_dir:
    # After the timed steps, so tracing overhead never enters the timing.
    with jax.profiler.trace(profile_dir):
      for _ in range(profile_steps):
        state, metrics = compiled(state, batch, key)
      jax.block_until_ready(metrics)
  devices = mesh.devices.size
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)
  mem, mem_source, mem_analysis = peak_memory(programs)
  m = config.model
  return {
      'mode': 'train_step',
      'device_kind': kind, 'platform': jax.devices()[0].platform,
      'device_count': devices,
      'model': f'resnet{m.depth}x{m.width_multiplier}',
      'depth': m.depth, 'width_multiplier': m.width_multiplier,
      'image_size': s, 'global_batch': b, 'per_device_batch': b // devices,
      'compute_dtype': m.compute_dtype,
      'input_mode': 'synthetic+' + config.augment.backend,
      'augment_backend': config.augment.backend,
      'grad_cache_chunks': config.get('grad_cache_chunks', 0),
      'grad_cache_bn': config.get('grad_cache_bn', 'per_chunk'),
      'compile_s': compile_s, 'step_time_s': step_s,
      'views_per_sec': 2 * b / step_s,
      'views_per_sec_per_device': 2 * b / step_s / devices,
      'flops_per_step_per_device': flops,
      'flops_per_step': flops * devices,
      'flops_source': flops_source,
      'peak_flops_per_device': peak,
      'mfu': flops / step_s / peak if peak and flops else None,
      'peak_memory_bytes': mem,
      'peak_memory_source': mem_source,
      'memory_analysis': mem_analysis,
      'final_loss': float(jax.device_get(metrics['loss'])),
      'profile_dir': profile_dir or None,
  }


def grad_cache_suite(config, steps: int, warmup: int,
                     cached_batch_multiplier: int = 4) -> dict:
  """The plain step and gradient-cached steps side by side, in one process.

  Rows: the config's batch B without caching; B in 2 chunks (the cost of
  caching itself: one extra forward pass, ideally 4/3 of the time); and
  B x `cached_batch_multiplier` in 8 chunks (a batch larger than the plain
  step's, in chunks of B x multiplier / 8 images). Each row's
  `time_per_image_vs_plain` is its step time per image over the plain row's.
  """
  b = config.batch_size
  rows = []
  for batch, chunks in ((b, 0), (b, 2), (cached_batch_multiplier * b, 8)):
    c = config.copy_and_resolve_references()
    c.batch_size, c.grad_cache_chunks = batch, chunks
    rows.append(benchmark_train_step(c, steps, warmup))
  per_image = rows[0]['step_time_s'] / rows[0]['global_batch']
  for r in rows:
    r['time_per_image_vs_plain'] = (r['step_time_s'] / r['global_batch'] /
                                    per_image)
  return {'mode': 'grad_cache', 'rows': rows}


def torch_peer_row(config, steps: int, warmup: int, compile_step: bool
                   ) -> dict:
  """The PyTorch peer on the same model, batch and image size, or why not."""
  try:
    from simclr_jax.tools import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'error': f'torch not importable: {e}'}
  from simclr_jax.models import resnet  # pylint: disable=g-import-not-at-top
  m = config.model
  return torch_peer.benchmark_step(
      depth=m.depth, width_multiplier=m.width_multiplier,
      image_size=config.dataset.image_size, batch_size=config.batch_size,
      cifar_stem=resnet.uses_cifar_stem(m, config.dataset.image_size),
      num_proj_layers=m.num_proj_layers, proj_out_dim=m.proj_out_dim,
      temperature=config.loss.temperature, steps=steps, warmup=warmup,
      compile_step=compile_step)


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
    try:
      result = accelerator_check.run_suite(
          FLAGS.output_dir, smoke=FLAGS.smoke, budget_s=FLAGS.budget_s)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    # Its JSON and markdown are in --output_dir; print the table.
    print(accelerator_check.markdown(result))
    return
  elif FLAGS.suite == 'grad_cache':
    if FLAGS.config is None:
      print('error: --config is required', file=sys.stderr)
      sys.exit(2)
    result = grad_cache_suite(FLAGS.config, FLAGS.steps, FLAGS.warmup)
  else:
    if FLAGS.config is None:
      print('error: --config is required', file=sys.stderr)
      sys.exit(2)
    config = FLAGS.config
    if FLAGS.per_device_batch:
      config.batch_size = FLAGS.per_device_batch * jax.device_count()
    try:
      result = benchmark_train_step(config, FLAGS.steps, FLAGS.warmup,
                                    FLAGS.profile, FLAGS.profile_steps)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    if FLAGS.torch_peer:
      peer = torch_peer_row(config, FLAGS.steps, FLAGS.warmup,
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
  flags.DEFINE_bool('torch_compile', False,
                    'torch.compile the peer step (slow to compile on CPU).')


def run() -> None:
  """Program entry: `python -m simclr_jax.benchmark` (or .tools.benchmark)."""
  from simclr_jax.runtime import logs  # pylint: disable=g-import-not-at-top
  # Library logs only with --verbosity>=1 or SIMCLR_JAX_VERBOSE=1; a bad
  # --config is one `error:` line (exit 2), as in simclr_jax.main.
  logs.configure(logs.verbose_from_argv(sys.argv))
  from simclr_jax.config import validation as config_validation  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main, flags_parser=config_validation.parse_flags)


if __name__ == '__main__':
  run()
