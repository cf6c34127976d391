"""The benchmark's JSON line has every field, with sane values, on CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_json(tmp_path):
  out = tmp_path / 'b.json'
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.benchmark',
       '--config=' + os.path.join(ROOT, 'configs', 'digits.py'),
       '--config.dataset.image_size=16', '--config.model.width_multiplier=0.125',
       '--config.batch_size=64', '--steps=2', '--warmup=1', f'--output={out}'],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads(out.read_text())
  assert d == json.loads(r.stdout.strip().splitlines()[-1])
  assert d['device_count'] == 8 and d['global_batch'] == 64
  assert d['per_device_batch'] == 8 and d['image_size'] == 16
  assert d['step_time_s'] > 0
  assert abs(d['views_per_sec'] - 128 / d['step_time_s']) < 1e-6 * d['views_per_sec']
  assert d['flops_per_step_per_device'] > 0
  for k in ('device_kind', 'model', 'compute_dtype', 'input_mode', 'mfu',
            'peak_memory_bytes', 'compile_s'):
    assert k in d
