"""The accelerator check runs end to end at toy sizes, without TensorFlow.

The real check runs only where an accelerator is lent; this smoke run keeps
the script from rotting between those occasions: the same launch script, the
same stages and files, on CPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simclr_jax.tools import accelerator_check
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_numpy_nt_xent_gradient_is_the_finite_difference():
  """The stage-1 reference itself, checked by central differences."""
  rng = np.random.default_rng(0)
  z_a, z_b = rng.normal(size=(2, 5, 3))
  loss, g_a, g_b = accelerator_check.nt_xent_numpy(z_a, z_b, 0.3)
  eps = 1e-6
  for which, grad in ((0, g_a), (1, g_b)):
    numeric = np.zeros_like(grad)
    for idx in np.ndindex(grad.shape):
      plus, minus = [z_a.copy(), z_b.copy()], [z_a.copy(), z_b.copy()]
      plus[which][idx] += eps
      minus[which][idx] -= eps
      numeric[idx] = (accelerator_check.nt_xent_numpy(*plus, 0.3)[0] -
                      accelerator_check.nt_xent_numpy(*minus, 0.3)[0]) / (
                          2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
  # And the loss against the textbook per-anchor form.
  z = np.concatenate([z_a, z_b])
  u = z / np.linalg.norm(z, axis=1, keepdims=True)
  terms = []
  for i in range(10):
    j = (i + 5) % 10
    others = [k for k in range(10) if k != i]
    terms.append(-np.log(np.exp(u[i] @ u[j] / 0.3) /
                         sum(np.exp(u[i] @ u[k] / 0.3) for k in others)))
  assert abs(loss - np.mean(terms)) < 1e-12


def test_smoke_run_writes_every_stage_without_tensorflow(tmp_path):
  # A package named tensorflow that cannot be imported stands in for a
  # machine without TensorFlow: any import on the path fails the run.
  block = tmp_path / 'block'
  for name in ('tensorflow', 'tensorflow_datasets'):
    (block / name).mkdir(parents=True)
    (block / name / '__init__.py').write_text(
        'raise ImportError("blocked: the accelerator path must not import '
        f'{name}")\n')
  out = tmp_path / 'out'
  # PYTHON: the interpreter whose packages `torch_available` looks at.
  env = dict(os.environ, PYTHONPATH=str(block), BUDGET_S='900',
             PYTHON=sys.executable)
  env['XLA_FLAGS'] = xla_flags(1)  # One CPU device, as on a one-GPU machine.
  r = subprocess.run([os.path.join(ROOT, 'launch', 'accelerator_check.sh'),
                      str(out), '--smoke'], capture_output=True, text=True,
                     cwd=str(tmp_path), env=env, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  d = json.loads((out / 'accelerator_check.json').read_text())
  assert d['smoke'] is True and d['tensorflow_imported'] is False
  assert list(d['stages']) == list(accelerator_check.STAGES)
  # Without torch the peer stage cannot produce its figure, so it must be
  # reported as failed (with why), never as ok; every other stage is ok.
  torch_available = all(importlib.util.find_spec(m) is not None
                        for m in ('torch', 'torchvision'))
  expected_status = {name: 'ok' for name in accelerator_check.STAGES}
  if not torch_available:
    expected_status['torch_peer'] = 'failed'
  for name, entry in d['stages'].items():
    assert entry['status'] == expected_status[name], (name, entry.get('why'))
    assert entry['wall_s'] > 0
  cor = d['stages']['correctness']['result']
  assert cor['nt_xent']['loss_rel_err'] < 1e-5
  assert cor['nt_xent']['grad_rel_err'] < 1e-4
  assert cor['bf16_steps']['steps'] == 20 and cor['bf16_steps']['all_finite']
  step = d['stages']['resnet50_step']['result']
  assert step['compute_dtype'] == 'bfloat16'
  assert step['input_mode'] == 'synthetic+jax'
  assert step['views_per_sec'] > 0 and step['compile_s'] > 0
  peer = d['stages']['torch_peer']['result']
  assert peer['jax']['views_per_sec'] > 0
  if torch_available:
    assert peer['torch']['views_per_sec'] > 0
    assert peer['jax_over_torch'] == pytest.approx(
        peer['jax']['views_per_sec'] / peer['torch']['views_per_sec'])
  else:
    assert 'jax_over_torch' not in peer and peer['ok'] is False
    assert 'torch not importable' in peer['torch']['error']
    assert 'torch not importable' in d['stages']['torch_peer']['why']
  gc = d['stages']['grad_cache']['result']
  assert gc['cached']['grad_cache_chunks'] == 4
  assert gc['cached']['global_batch'] == 64
  assert gc['time_per_image_vs_plain'] > 0
  assert d['stages']['augment_only']['result']['views_per_sec'] > 0
  md = (out / 'accelerator_check.md').read_text()
  for name in accelerator_check.STAGES:
    assert f'| {name} | {expected_status[name]} |' in md
  assert md in r.stdout
  assert not os.path.exists(tmp_path / 'benchmark.json')
