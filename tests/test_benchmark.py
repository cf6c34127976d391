"""The benchmark's JSON line has every field, with sane values, on CPU."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.tools import step_benchmark
from simclr_jax import losses
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What every benchmark line carries (docs/benchmarks.md).
FIELDS = (
    'device_kind', 'device_count', 'model', 'depth', 'width_multiplier',
    'image_size', 'per_device_batch', 'global_batch', 'step_time_s',
    'views_per_sec', 'flops_per_step_per_device', 'flops_per_step', 'mfu',
    'peak_memory_bytes', 'peak_memory_source', 'input_mode',
    'grad_cache_chunks', 'compute_dtype', 'compile_s')


def test_train_step_benchmark_json(tmp_path):
  """One tiny run covers gradient caching, the torch peer and the profiler."""
  out = tmp_path / 'b.json'
  trace = tmp_path / 'trace'
  args = [sys.executable, '-m', 'simclr_jax.benchmark',
          '--config=' + os.path.join(ROOT, 'configs', 'digits.py'),
          '--config.dataset.image_size=8',
          '--config.model.width_multiplier=0.125',
          '--config.batch_size=32', '--config.grad_cache_chunks=2',
          '--steps=2', '--warmup=1', '--profile_steps=1',
          f'--profile={trace}', f'--output={out}', '--torch_peer',
          '--breakdown']
  r = subprocess.run(
      args, capture_output=True, text=True, cwd=ROOT, timeout=600,
      env=dict(os.environ, XLA_FLAGS=xla_flags()))
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(out.read_text())
  assert d == json.loads(r.stdout.strip().splitlines()[-1])
  for k in FIELDS:
    assert k in d, k
  assert d['device_count'] == 8 and d['global_batch'] == 32
  assert d['per_device_batch'] == 4 and d['image_size'] == 8
  assert d['model'] == 'resnet18x0.125' and d['depth'] == 18
  assert d['grad_cache_chunks'] == 2 and d['input_mode'] == 'synthetic+tf'
  assert d['step_time_s'] > 0
  assert abs(d['views_per_sec'] - 64 / d['step_time_s']) < 1e-6 * d['views_per_sec']
  assert d['flops_per_step_per_device'] > 0
  assert d['flops_per_step'] == pytest.approx(8 * d['flops_per_step_per_device'])
  # On a CPU the peak is the host's float32 FMA peak, shared by the virtual
  # devices; the share of it is achieved FLOP/s over that peak. Memory
  # comes from XLA's compiled-memory analysis (no allocator statistics).
  assert d['device_kind'] == 'cpu'
  assert d['achieved_flops_per_sec'] == pytest.approx(
      d['flops_per_step'] / d['step_time_s'])
  peak, how = step_benchmark.cpu_peak_flops()
  if peak:
    assert d['peak_flops'] == pytest.approx(peak) and d['peak_source'] == how
    assert d['mfu'] == pytest.approx(d['achieved_flops_per_sec'] / peak)
  assert d['peak_memory_bytes'] > 0
  assert d['peak_memory_source'] == 'compiled_memory_analysis'
  assert np.isfinite(d['final_loss'])
  assert any(f.endswith('.xplane.pb') for _, _, fs in os.walk(trace)
             for f in fs)
  # The PyTorch peer (torch is in the test extra): the same model and loss.
  peer = d['torch_peer']
  assert peer['framework'] == 'torch' and peer['global_batch'] == 32
  assert peer['views_per_sec'] > 0 and np.isfinite(peer['final_loss'])
  assert d['jax_over_torch'] == pytest.approx(
      d['views_per_sec'] / peer['views_per_sec'])
  # The step's parts, each timed on its own; the rest is the step less the
  # views and the model's forward and backward pass.
  parts = d['breakdown']
  for k in ('views_s', 'forward_s', 'forward_backward_s', 'step_s'):
    assert parts[k] > 0, k
  assert parts['rest_s'] == pytest.approx(
      parts['step_s'] - parts['views_s'] - parts['forward_backward_s'])
  assert parts['shares']['forward'] == pytest.approx(
      parts['forward_s'] / parts['step_s'])


def test_peak_flops_table():
  assert step_benchmark.peak_flops('TPU v4') == 275e12
  assert step_benchmark.peak_flops('TPU v5 lite') == 197e12
  assert step_benchmark.peak_flops('TPU v5p') == 459e12
  assert step_benchmark.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert step_benchmark.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert step_benchmark.peak_flops('NVIDIA H200') == 989e12
  assert step_benchmark.peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
  assert step_benchmark.peak_flops('cpu') is None


@pytest.mark.parametrize('vendor, family, flags, lanes', [
    ('AuthenticAMD', 25, 'fma avx2 avx512f', 16),    # Zen 4
    ('AuthenticAMD', 26, 'fma avx2 avx512f', 32),    # Zen 5
    ('GenuineIntel', 6, 'fma avx2 avx512f', 32),     # Xeon, AVX-512
    ('GenuineIntel', 6, 'fma avx2', 16),             # AVX2 only
    ('GenuineIntel', 6, 'sse2', 4)])
def test_cpu_peak_from_cpuinfo(tmp_path, vendor, family, flags, lanes):
  """cores x lanes x 2 x clock, with the clock and lanes read from the file."""
  info = tmp_path / 'cpuinfo'
  core = (f'vendor_id\t: {vendor}\ncpu family\t: {family}\n'
          f'cpu MHz\t\t: 2500.000\nflags\t\t: {flags}\n\n')
  info.write_text(core * 2)
  peak, how = step_benchmark.cpu_peak_flops(str(info))
  cores = len(os.sched_getaffinity(0))
  assert peak == pytest.approx(cores * lanes * 2 * 2.5e9)
  assert f'{cores} cores x {lanes} float32' in how and '2.50 GHz' in how
  assert step_benchmark.cpu_peak_flops(str(tmp_path / 'none'))[0] is None


def test_torch_peer_loss_is_the_same_nt_xent(tmp_path):
  """The peer's loss in torch equals the project's NT-Xent in JAX.

  torch runs in a subprocess: in a process that has loaded TensorFlow (as
  the test workers have), torch's first op crashes the process.
  """
  rng = np.random.default_rng(0)
  a, b = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
  np.save(tmp_path / 'a.npy', a)
  np.save(tmp_path / 'b.npy', b)
  script = ('import sys, numpy as np, torch\n'
            'from simclr_jax.tools import torch_peer\n'
            'a, b = (torch.from_numpy(np.load(f"{sys.argv[1]}/{n}.npy")) '
            'for n in "ab")\n'
            'print(float(torch_peer.nt_xent(a, b, 0.3)))\n')
  out = subprocess.run([sys.executable, '-c', script, str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=True)
  got = float(out.stdout.strip().splitlines()[-1])
  want = losses.nt_xent(jnp.asarray(a), jnp.asarray(b), temperature=0.3)
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_jpeg_input_benchmark_reads_what_it_wrote(tmp_path):
  from simclr_jax.tools import input_benchmark  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  info = input_benchmark.write_jpeg_records(str(tmp_path), 6, num_shards=2,
                                            height=40, width=48)
  records = [tf.train.Example.FromString(r.numpy()) for p in info['paths']
             for r in tf.data.TFRecordDataset(p)]
  assert len(records) == 6
  images = [tf.io.decode_jpeg(r.features.feature['image'].bytes_list.value[0])
            for r in records]
  assert {tuple(i.shape) for i in images} == {(40, 48, 3)}
  for backend, size in (('tf', 32), ('jax', 32)):
    r = input_benchmark.measure_jpeg_throughput(backend, size, batch_size=4,
                                                num_batches=2, num_images=8)
    assert r['backend'] == backend and r['items_per_sec'] > 0
    assert r['views_fed_per_sec'] == pytest.approx(2 * r['items_per_sec'])
    assert r['cores_for_target'] == pytest.approx(
        7000.0 * r['num_cpu_cores'] / r['views_fed_per_sec'])
    assert r['mean_jpeg_bytes'] > 1000
