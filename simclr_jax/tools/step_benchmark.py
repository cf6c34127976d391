"""The train step of a config, measured: time, throughput, FLOPs, MFU, memory.

What the benchmark command's train-step rows and the accelerator check's
stages both measure (tools/benchmark.py is the command line around it,
tools/accelerator_check.py the fixed-shape suite): the config's real step,
compiled on synthetic data already on the devices, timed with device
synchronisation at both ends, and the PyTorch peer of the same shape.
"""

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from simclr_jax.models import encoders
from simclr_jax.runtime import parallel

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


# float32 lanes that one core's FMA units complete per cycle, by vector
# extension, for x86 server cores: two 512-bit FMA units on Intel Xeon
# with AVX-512 (Skylake-SP and later, Gold/Platinum), two 256-bit units on
# AMD Zen 2 to 4 (Zen 4 runs AVX-512 through them in two halves, CPU family
# 25) and on AVX2-only cores, two 512-bit units on Zen 5 (family 26).
def _fma_lanes(flags: set[str], vendor: str, family: int) -> tuple[int, str]:
  if 'avx512f' in flags:
    if vendor == 'AuthenticAMD' and family < 26:
      return 16, 'AVX-512 on two 256-bit FMA units (AMD Zen 4)'
    return 32, 'AVX-512 on two 512-bit FMA units'
  if 'avx2' in flags and 'fma' in flags:
    return 16, 'AVX2 on two 256-bit FMA units'
  return 4, 'SSE, one 128-bit unit'


def cpu_peak_flops(cpuinfo: str = '/proc/cpuinfo') -> tuple[float | None, str]:
  """float32 peak FLOP/s of the cores this process may use, and how it was
  derived: cores x FMA lanes per cycle x 2 (an FMA is two FLOPs) x clock.

  The clock is /proc/cpuinfo's 'cpu MHz' (the base clock a VM reports;
  turbo can exceed it); the lanes come from the vector extensions it lists
  (_fma_lanes). An estimate, stated as such: it is what the share of peak
  in the benchmark is measured against. None where /proc/cpuinfo is absent.
  """
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return None, 'no /proc/cpuinfo'
  fields = {}
  for line in text.splitlines():
    key, sep, value = line.partition(':')
    if sep and key.strip() not in fields:
      fields[key.strip()] = value.strip()
  try:
    mhz = float(fields['cpu MHz'])
    family = int(fields.get('cpu family', '0'))
  except (KeyError, ValueError):
    return None, 'no clock in /proc/cpuinfo'
  flags = set(fields.get('flags', '').split())
  lanes, how = _fma_lanes(flags, fields.get('vendor_id', ''), family)
  cores = len(os.sched_getaffinity(0))
  peak = cores * lanes * 2 * mhz * 1e6
  return peak, (f'{cores} cores x {lanes} float32 FMA lanes/cycle ({how}) '
                f'x 2 x {mhz / 1000:.2f} GHz')


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
  platform = jax.devices()[0].platform
  peak = peak_flops(kind)
  peak_source = 'data sheet (bf16, dense)' if peak else None
  if platform == 'cpu':
    # Virtual CPU devices share the host's cores: the peak is the host's.
    host_peak, peak_source = cpu_peak_flops()
    peak = host_peak / devices if host_peak else None
  mem, mem_source, mem_analysis = peak_memory(programs)
  m = config.model
  return {
      'mode': 'train_step',
      'device_kind': kind, 'platform': platform,
      'device_count': devices,
      'model': encoders.describe(m, s),
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
      'achieved_flops_per_sec': flops * devices / step_s,
      'peak_flops_per_device': peak,
      'peak_flops': peak * devices if peak else None,
      'peak_source': peak_source,
      'mfu': flops / step_s / peak if peak and flops else None,
      'peak_memory_bytes': mem,
      'peak_memory_source': mem_source,
      'memory_analysis': mem_analysis,
      'final_loss': float(jax.device_get(metrics['loss'])),
      'profile_dir': profile_dir or None,
  }


def _seconds(fn, args, steps: int, warmup: int) -> float:
  """Mean wall time of fn(*args) over `steps` calls after `warmup` (and one
  compiling call), synchronised with the device at both ends."""
  jax.block_until_ready(fn(*args))
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def step_breakdown(config, steps: int, warmup: int, mesh=None) -> dict:
  """Where one train step's time goes, each part jitted on its own.

  views_s: the two views (the on-device augmentation; ~0 for 'tf', whose
  views arrive made); forward_s: the model's forward pass on both views in
  training mode (BatchNorm on batch statistics); forward_backward_s: that
  pass and its gradient with respect to every parameter (a stand-in loss,
  the sum of squared features); step_s: the whole step; rest_s = step_s -
  views_s - forward_backward_s: heads, NT-Xent, metrics and the optimiser.
  The parts overlap nothing, so the shares say where to look, not a sum
  XLA promises (fused together they can cost less).
  """
  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import pretrain as train
  from simclr_jax.training import state as state_lib
  config.dataset.name = 'synthetic'
  setup = train.build(config, mesh=mesh)
  batch = synthetic_batch(config, setup.mesh)
  key = jax.random.key(0)
  state = train.initial_state(setup)
  variables = state_lib.variables_of(state)
  make_views = jax.jit(train.views_fn(setup))
  views = make_views(batch, key)
  s = config.dataset.image_size
  images = views.reshape(-1, s, s, 3)
  model = setup.model

  def features(params, x):
    out, _ = model.apply({**variables, 'params': params}, x, train=True,
                         mutable=['batch_stats'])
    return out['features']

  forward = jax.jit(features)
  backward = jax.jit(jax.grad(
      lambda p, x: jax.numpy.sum(jax.numpy.square(features(p, x)))))
  parts = {
      'views_s': _seconds(make_views, (batch, key), steps, warmup),
      'forward_s': _seconds(forward, (variables['params'], images), steps,
                            warmup),
      'forward_backward_s': _seconds(backward, (variables['params'], images),
                                     steps, warmup)}
  step_fn = train.make_step(setup)
  holder = [state]

  def step():
    holder[0], metrics = step_fn(holder[0], batch, key)
    return metrics

  parts['step_s'] = _seconds(step, (), steps, warmup)
  parts['rest_s'] = (parts['step_s'] - parts['views_s'] -
                     parts['forward_backward_s'])
  parts['shares'] = {k[:-2]: parts[k] / parts['step_s'] for k in (
      'views_s', 'forward_s', 'forward_backward_s', 'rest_s')}
  return parts


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
  if encoders.name_of(m) != 'resnet':
    return {'error': f'the PyTorch peer is a ResNet; model.name is '
                     f'{encoders.name_of(m)!r}'}
  return torch_peer.benchmark_step(
      depth=m.depth, width_multiplier=m.width_multiplier,
      image_size=config.dataset.image_size, batch_size=config.batch_size,
      cifar_stem=resnet.uses_cifar_stem(m, config.dataset.image_size),
      num_proj_layers=m.num_proj_layers, proj_out_dim=m.proj_out_dim,
      temperature=config.loss.temperature, steps=steps, warmup=warmup,
      compile_step=compile_step)
