"""The accelerator check: every figure the project promises, in one command.

  launch/accelerator_check.sh OUT_DIR            # on a GPU/TPU, <= 8 minutes
  launch/accelerator_check.sh OUT_DIR --smoke    # the same stages, toy sizes

Accelerator time comes in short windows on bare machines (no TensorFlow, no
network), so this runs from a plain checkout on synthetic data with the
on-device augmentation backend, imports nothing from TensorFlow, and writes
`accelerator_check.json` and `accelerator_check.md` to OUT_DIR after every
stage, so a window that closes early still leaves what was measured. A stage
that fails or runs past its share of the time budget records why, and the
next one starts. The stages:

  1. correctness: the sharded NT-Xent's value and gradient against a NumPy
     float64 formula; a bfloat16 train step's loss against float32's from the
     same state and batch; 20 bfloat16 steps without a non-finite loss;
  2. resnet50_step: ResNet-50, 224 px, bfloat16, augmentation fused into the
     step, per-device batch 256 (step time, views/s, MFU, memory, compile);
  3. torch_peer: the PyTorch step of the same shape (channels_last, bf16
     autocast, torch.compile) against the JAX step, both with SGD + momentum
     on precomputed views, so neither side pays for augmentation;
  4. grad_cache: global batch 8192 on one device in chunks of 256 against
     the plain step's time per image, and the largest plain batch that fits;
  5. augment_only: the on-device augmentation alone at 224 px.

docs/benchmarks.md#the-accelerator-check says how to run it and holds the
table it fills.
"""

import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.tools import step_benchmark

STAGES = ('correctness', 'resnet50_step', 'torch_peer', 'grad_cache',
          'augment_only')
# Share of the remaining budget each stage may take (the rest is left to
# the stages after it).
_SHARE = {'correctness': 0.25, 'resnet50_step': 0.35, 'torch_peer': 0.5,
          'grad_cache': 0.8, 'augment_only': 1.0}
# The accelerator targets docs/benchmarks.md states.
TARGETS = {'views_per_sec_per_device': 7000.0, 'jax_over_torch': 1.3,
           'grad_cache_time_per_image_vs_plain': 1.35}


class StageTimeout(Exception):
  pass


def sizes(smoke: bool) -> dict[str, Any]:
  """The shapes of every stage; `smoke` shrinks them to run on CPU."""
  if smoke:
    return dict(depth=18, width=0.125, image_size=16, raw_size=20,
                per_device_batch=8, cached_batch=64, chunk=16, steps=2,
                warmup=1, augment_batch=16, torch_compile=False,
                nan_steps=20, proj_layers=2, check_model={})
  return dict(depth=50, width=1.0, image_size=224, raw_size=256,
              per_device_batch=256, cached_batch=8192, chunk=256, steps=10,
              warmup=2, augment_batch=256, torch_compile=True, nan_steps=20,
              proj_layers=3,
              # Stage 1's bf16-vs-f32 steps: a small model (two compiles).
              check_model=dict(depth=18, width=0.25, image_size=32,
                               raw_size=36, per_device_batch=32))


def base_config(sz: dict[str, Any], *, dtype: str = 'bfloat16',
                backend: str = 'jax'):
  """The recipe of stages 2-4: the ImageNet ResNet-50 setup at `sz`."""
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  c.dataset.name = 'synthetic'
  c.dataset.image_size = sz['image_size']
  c.dataset.raw_size = sz['raw_size']
  c.augment.backend = backend
  c.augment.color_strength = 1.0
  c.augment.blur = True
  c.model.depth = sz['depth']
  c.model.width_multiplier = sz['width']
  c.model.num_proj_layers = sz['proj_layers']
  c.model.compute_dtype = dtype
  c.batch_size = sz['per_device_batch'] * jax.device_count()
  c.loss.temperature = 0.1
  return c


# Stage 1: correctness.


def nt_xent_numpy(z_a: np.ndarray, z_b: np.ndarray, temperature: float
                  ) -> tuple[float, np.ndarray, np.ndarray]:
  """NT-Xent (Chen et al. 2020a, Alg. 1) and its gradient, float64 NumPy.

  Written out by hand (softmax cross-entropy over the 2N - 1 others, then
  the chain rule through the l2 normalisation), independent of the package.
  """
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  n2 = len(z)
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  u = z / norm
  s = u @ u.T / temperature
  np.fill_diagonal(s, -np.inf)
  pos = np.concatenate([np.arange(n2 // 2, n2), np.arange(n2 // 2)])
  s_max = s.max(axis=1, keepdims=True)
  p = np.exp(s - s_max)
  p /= p.sum(axis=1, keepdims=True)
  loss = float(-np.mean(np.log(p[np.arange(n2), pos])))
  g = p.copy()
  g[np.arange(n2), pos] -= 1.0
  g /= n2  # dL/ds, zero on the diagonal.
  d_u = (g + g.T) @ u / temperature
  d_z = (d_u - u * np.sum(u * d_u, axis=1, keepdims=True)) / norm
  return loss, d_z[:n2 // 2], d_z[n2 // 2:]


def stage_correctness(sz: dict[str, Any]) -> dict[str, Any]:
  import functools  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from simclr_jax import losses  # pylint: disable=g-import-not-at-top
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top

  out: dict[str, Any] = {}
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  rng = np.random.default_rng(0)
  n, dim, temperature = 64 * devices, 128, 0.1
  z_a, z_b = (rng.normal(size=(n, dim)).astype(np.float32) for _ in range(2))
  loss_fn = jax.shard_map(
      functools.partial(losses.sharded_nt_xent, temperature=temperature,
                        axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
      out_specs=(P(), P()))
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda a, b: loss_fn(a, b)[0], argnums=(0, 1)))
  sharding = parallel.data_sharding(mesh)
  loss, (g_a, g_b) = value_and_grad(jax.device_put(z_a, sharding),
                                    jax.device_put(z_b, sharding))
  want, w_a, w_b = nt_xent_numpy(z_a, z_b, temperature)
  grad_err = max(float(np.max(np.abs(np.asarray(g) - w)))
                 for g, w in ((g_a, w_a), (g_b, w_b)))
  grad_scale = max(float(np.max(np.abs(w_a))), float(np.max(np.abs(w_b))))
  out['nt_xent'] = {'n': n, 'devices': devices, 'loss': float(loss),
                    'numpy_float64_loss': want,
                    'loss_rel_err': abs(float(loss) - want) / want,
                    'grad_max_abs_err': grad_err,
                    'grad_rel_err': grad_err / grad_scale}
  out['nt_xent']['ok'] = (out['nt_xent']['loss_rel_err'] < 1e-5 and
                          out['nt_xent']['grad_rel_err'] < 1e-4)

  # A bf16 step against a float32 step: same initial state, batch and key.
  small = dict(sz, **sz['check_model'])
  first = {}
  for dtype in ('float32', 'bfloat16'):
    setup = pretrain.build(base_config(small, dtype=dtype))
    step, state = pretrain.make_step(setup), pretrain.initial_state(setup)
    batch = step_benchmark.synthetic_batch(setup.config, setup.mesh, seed=1)
    losses_seen = []
    for i in range(sz['nan_steps'] if dtype == 'bfloat16' else 1):
      state, metrics = step(state, batch, jax.random.key(i))
      losses_seen.append(float(jax.device_get(metrics['loss'])))
    first[dtype] = losses_seen[0]
    if dtype == 'bfloat16':
      out['bf16_steps'] = {'steps': len(losses_seen),
                           'all_finite': bool(np.all(np.isfinite(
                               losses_seen))),
                           'first_loss': losses_seen[0],
                           'last_loss': losses_seen[-1]}
  rel = abs(first['bfloat16'] - first['float32']) / abs(first['float32'])
  out['bf16_vs_f32'] = {'float32_loss': first['float32'],
                        'bfloat16_loss': first['bfloat16'], 'rel_diff': rel,
                        'tolerance': 2e-2, 'ok': rel < 2e-2}
  out['ok'] = bool(out['nt_xent']['ok'] and out['bf16_vs_f32']['ok'] and
                   out['bf16_steps']['all_finite'])
  return out


# Stages 2-5.


def stage_resnet50_step(sz: dict[str, Any]) -> dict[str, Any]:
  return step_benchmark.benchmark_train_step(base_config(sz), sz['steps'],
                                             sz['warmup'])


def stage_torch_peer(sz: dict[str, Any]) -> dict[str, Any]:
  # One device on both sides, precomputed views, SGD + momentum on both.
  config = base_config(sz, backend='tf')
  config.batch_size = sz['per_device_batch']
  config.optim.name = 'sgd'
  row = step_benchmark.benchmark_train_step(
      config, sz['steps'], sz['warmup'], mesh=_one_device_mesh())
  peer = step_benchmark.torch_peer_row(config, sz['steps'], sz['warmup'],
                                       sz['torch_compile'])
  out = {'optimizer': 'sgd_momentum (both sides)', 'jax': row,
         'torch': peer}
  if peer.get('views_per_sec'):
    out['jax_over_torch'] = row['views_per_sec'] / peer['views_per_sec']
  else:  # No torch figure (e.g. torch not importable): the stage failed.
    out['ok'] = False
    out['why'] = f"the torch step did not run: {peer.get('error')}"
  return out


def _one_device_mesh():
  from simclr_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh(jax.devices()[:1])


def stage_grad_cache(sz: dict[str, Any]) -> dict[str, Any]:
  mesh = _one_device_mesh()
  plain_config = base_config(sz)
  plain_config.batch_size = sz['per_device_batch']
  plain = step_benchmark.benchmark_train_step(plain_config, sz['steps'],
                                              sz['warmup'], mesh=mesh)
  cached_config = base_config(sz)
  cached_config.batch_size = sz['cached_batch']
  cached_config.grad_cache_chunks = sz['cached_batch'] // sz['chunk']
  cached = step_benchmark.benchmark_train_step(
      cached_config, max(1, sz['steps'] // 5), 1, mesh=mesh)
  per_image = lambda r: r['step_time_s'] / r['global_batch']
  out = {'plain': plain, 'cached': cached,
         'time_per_image_vs_plain': per_image(cached) / per_image(plain)}
  # The largest plain batch: the compiled program's bytes per image, scaled
  # to the device's memory (an estimate; compiling each size would take
  # minutes of the window).
  est = plain['memory_analysis'].get('estimate_bytes')
  try:
    limit = (jax.devices()[0].memory_stats() or {}).get('bytes_limit')
  except Exception:  # pylint: disable=broad-except
    limit = None
  if est and limit:
    out['largest_plain_batch_estimate'] = int(
        limit / (est / plain['global_batch']))
    out['device_bytes_limit'] = int(limit)
  return out


def stage_augment_only(sz: dict[str, Any]) -> dict[str, Any]:
  from simclr_jax.tools import input_benchmark  # pylint: disable=g-import-not-at-top
  return input_benchmark.measure_input_throughput(
      'jax', sz['image_size'], sz['augment_batch'], 2 * sz['steps'],
      raw_size=sz['raw_size'])


_STAGE_FNS: dict[str, Callable[[dict], dict]] = {
    'correctness': stage_correctness,
    'resnet50_step': stage_resnet50_step,
    'torch_peer': stage_torch_peer,
    'grad_cache': stage_grad_cache,
    'augment_only': stage_augment_only,
}


# Report.


def _fmt(value: Any, spec: str = '.3g') -> str:
  return '' if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
  """The table rows docs/benchmarks.md#the-accelerator-check holds."""
  st = result['stages']
  get = lambda name: st.get(name, {}).get('result') or {}
  step, peer, gc = get('resnet50_step'), get('torch_peer'), get('grad_cache')
  aug, cor = get('augment_only'), get('correctness')
  mib = lambda b: None if b is None else b / 2**20
  rows = [
      '| stage | status | figure | target |',
      '|---|---|---|---|',
      f"| correctness | {st.get('correctness', {}).get('status', '')} | "
      f"NT-Xent rel. err {_fmt(cor.get('nt_xent', {}).get('loss_rel_err'))}, "
      f"grad rel. err {_fmt(cor.get('nt_xent', {}).get('grad_rel_err'))}; "
      f"bf16 vs f32 loss {_fmt(cor.get('bf16_vs_f32', {}).get('rel_diff'))};"
      f" {cor.get('bf16_steps', {}).get('steps', '')} bf16 steps finite: "
      f"{cor.get('bf16_steps', {}).get('all_finite', '')} | pass |",
      f"| resnet50_step | {st.get('resnet50_step', {}).get('status', '')} | "
      f"{_fmt(step.get('views_per_sec_per_device'), '.0f')} views/s/device, "
      f"step {_fmt(step.get('step_time_s'))} s, MFU {_fmt(step.get('mfu'))},"
      f" peak {_fmt(mib(step.get('peak_memory_bytes')), '.0f')} MiB, "
      f"compile {_fmt(step.get('compile_s'), '.0f')} s | >= "
      f"{TARGETS['views_per_sec_per_device']:.0f} views/s/device |",
      f"| torch_peer | {st.get('torch_peer', {}).get('status', '')} | "
      f"jax/torch {_fmt(peer.get('jax_over_torch'))} "
      f"({peer.get('optimizer', '')}) | >= {TARGETS['jax_over_torch']} |",
      f"| grad_cache | {st.get('grad_cache', {}).get('status', '')} | "
      f"batch {gc.get('cached', {}).get('global_batch', '')}: "
      f"{_fmt(gc.get('time_per_image_vs_plain'))}x plain per image, "
      f"largest plain batch ~{gc.get('largest_plain_batch_estimate', '')} | "
      f"<= {TARGETS['grad_cache_time_per_image_vs_plain']}x |",
      f"| augment_only | {st.get('augment_only', {}).get('status', '')} | "
      f"{_fmt(aug.get('views_per_sec'), '.0f')} views/s at "
      f"{aug.get('image_size', '')} px | |",
  ]
  head = (f"Device: {result.get('device_kind')} x "
          f"{result.get('device_count')}, jax {result.get('jax_version')}, "
          f"smoke={result.get('smoke')}, {result.get('started')}.\n\n")
  return head + '\n'.join(rows) + '\n'


def _write(out_dir: str, result: dict[str, Any]) -> None:
  for name, text in (('accelerator_check.json',
                      json.dumps(result, indent=1, default=str)),
                     ('accelerator_check.md', markdown(result))):
    tmp = os.path.join(out_dir, name + '.tmp')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))


def _on_alarm(signum, frame):
  del signum, frame
  raise StageTimeout()


def run_suite(out_dir: str, *, smoke: bool = False, budget_s: float = 480.0,
              stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
  """Runs the stages in order within `budget_s`; returns the result dict."""
  if not out_dir:
    raise ValueError('--output_dir is required for --suite=accelerator')
  os.makedirs(out_dir, exist_ok=True)
  sz = sizes(smoke)
  device = jax.devices()[0]
  result: dict[str, Any] = {
      'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'smoke': smoke,
      'budget_s': budget_s, 'platform': device.platform,
      'device_kind': device.device_kind, 'device_count': jax.device_count(),
      'jax_version': jax.__version__, 'sizes': sz,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'tensorflow_imported': 'tensorflow' in sys.modules,
      'targets': TARGETS, 'stages': {}}
  deadline = time.monotonic() + budget_s
  _write(out_dir, result)
  previous = signal.signal(signal.SIGALRM, _on_alarm)
  try:
    for name in stages:
      remaining = deadline - time.monotonic()
      entry: dict[str, Any] = {}
      if remaining < 1:
        entry = {'status': 'skipped', 'why': 'the time budget was spent'}
      else:
        limit = max(1, int(remaining * _SHARE[name]))
        t0 = time.monotonic()
        signal.alarm(limit)
        try:
          entry = {'status': 'ok', 'result': _STAGE_FNS[name](sz)}
          if entry['result'].get('ok') is False:
            entry['status'] = 'failed'
            entry['why'] = entry['result'].get(
                'why', 'a check is outside its tolerance')
        except StageTimeout:
          entry = {'status': 'timeout',
                   'why': f'ran past its share of the budget ({limit} s)'}
        except Exception as e:  # pylint: disable=broad-except
          entry = {'status': 'error', 'why': f'{type(e).__name__}: {e}',
                   'traceback': traceback.format_exc()[-4000:]}
        finally:
          signal.alarm(0)
        entry['wall_s'] = time.monotonic() - t0
      result['stages'][name] = entry
      result['tensorflow_imported'] = 'tensorflow' in sys.modules
      _write(out_dir, result)
      print(f"accelerator check: {name}: {entry['status']}"
            f"{' (' + entry['why'] + ')' if entry.get('why') else ''}",
            file=sys.stderr, flush=True)
  finally:
    signal.signal(signal.SIGALRM, previous)
  return result
