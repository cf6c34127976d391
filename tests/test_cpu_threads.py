"""XLA's CPU pool has room for two multi-device programs in flight.

Without it, un-synchronised calls of a jitted function with two collectives
on 8 virtual devices of a 2-core machine deadlock within seconds and XLA
aborts the process (runtime/cpu_threads.py).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, xla_flags
from simclr_jax.runtime import cpu_threads

# A mean over the batch (all-reduce) and a replicated slice (all-gather),
# called without waiting for results, so steps overlap as in a train loop.
# XLA's rendezvous watchdog is cut from 40 to 20 seconds so a deadlock
# aborts sooner.
_OVERLAPPING_CALLS = """
import simclr_jax
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ('d',))
assert len(jax.devices()) == 8

@jax.jit
def f(x, w):
  h = jnp.tanh(x @ w)
  g = jax.lax.with_sharding_constraint(x[:, :4], NamedSharding(mesh, P()))
  return jnp.mean(h, axis=0).sum() + g.sum() + jnp.mean(x @ w.T @ w)

x = jax.device_put(np.ones((64, 128), np.float32), NamedSharding(mesh, P('d')))
w = jax.device_put(np.eye(128, dtype=np.float32), NamedSharding(mesh, P()))
for _ in range(3000):
  r = f(x, w)
print('result', float(r))
"""


def test_overlapping_collective_programs_finish_on_8_virtual_devices():
  env = dict(os.environ, XLA_FLAGS=' '.join((
      xla_flags(8),
      '--xla_cpu_collective_call_terminate_timeout_seconds=20',
      '--xla_cpu_collective_call_warn_stuck_timeout_seconds=10')))
  env.pop('NPROC', None)
  p = subprocess.run([sys.executable, '-c', _OVERLAPPING_CALLS],
                     capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  # x of ones and w = I: 128 columns of tanh(1), 64 * 4 ones, mean(x) = 1
  # (x @ I @ I = x).
  expected = 128 * np.tanh(1.0) + 64 * 4 + 1
  assert abs(float(p.stdout.split()[-1]) - expected) < 1e-3


@pytest.mark.parametrize('environ,cores,expected', [
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, 2, '16'),
    ({'JAX_NUM_CPU_DEVICES': '4'}, 2, '8'),
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=2 --x=1',
      'JAX_NUM_CPU_DEVICES': '8'}, 2, '16'),
    # The user's choice stands.
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
      'NPROC': '3'}, 2, '3'),
    # One device has no collectives; many cores already give room.
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}, 2, None),
    ({}, 2, None),
    ({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, 64, None),
])
def test_reserve_sets_nproc_to_twice_the_virtual_devices(monkeypatch, environ,
                                                          cores, expected):
  monkeypatch.setattr(os, 'cpu_count', lambda: cores)
  env = dict(environ)
  cpu_threads.reserve(env)
  assert env.get('NPROC') == expected


def test_the_test_process_runs_with_the_larger_pool():
  """The suite's own processes (8 devices, imported simclr_jax first)."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  threads = [open(f'/proc/self/task/{t}/comm', encoding='utf-8').read().strip()
             for t in os.listdir('/proc/self/task')]
  if (os.cpu_count() or 1) < 16:
    assert threads.count('tf_XLAEigen') >= 16
