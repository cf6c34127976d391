"""Bad input ends with one clear line on stderr, not a traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, devices=8):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main',
       '--config=' + os.path.join(ROOT, 'configs', 'digits.py'), *args],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize('override,expected', [
    ('--config.batch_size=100',
     'config.batch_size=100 must be a positive multiple of the number of '
     'devices (8)'),
    ('--config.dataset.name=mnist_typo',
     "config.dataset.name='mnist_typo' is not supported"),
    ('--config.model.depth=19', 'config.model.depth=19 is not supported'),
    ('--config.loss.temperature=0', 'config.loss.temperature=0'),
])
def test_bad_config_is_one_line(tmp_path, override, expected):
  r = _main(f'--workdir={tmp_path}', override)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last
  assert 'Traceback' not in r.stderr


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  r = _main(f'--workdir={blocker}/sub', devices=1)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: workdir=') and 'cannot be written' in last
  assert 'Traceback' not in r.stderr
