"""Bad input ends with one clear line on stderr, not a traceback."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import tiny_config, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A project log line in the default (quiet) mode: `10:32:01 message`.
PROJECT_LINE = re.compile(r'^\d\d:\d\d:\d\d ')
# absl's own prefix (`I1129 10:32:01.123 ...`), which library lines keep.
ABSL_LINE = re.compile(r'^[DIWEF]\d{4} ')


def _main(*args, devices=8, config='digits.py', env=None):
  env = dict(os.environ, **(env or {}),
             XLA_FLAGS=xla_flags(devices))
  return subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main',
       '--config=' + os.path.join(ROOT, 'configs', config), *args],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _lines(r) -> list[str]:
  return [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize('override,expected', [
    ('--config.batch_size=100',
     'config.batch_size=100 must be a positive multiple of the number of '
     'devices (8)'),
    ('--config.dataset.name=mnist_typo',
     "Unknown dataset 'mnist_typo': not one of digits, digits_m, "
     'fashion_mnist, synthetic, folder and not a dataset of '
     'tensorflow-datasets'),
    ('--config.model.depth=19', 'config.model.depth=19 is not supported'),
    ('--config.loss.temperature=0', 'config.loss.temperature=0'),
])
def test_bad_config_is_one_line(tmp_path, override, expected):
  r = _main(f'--workdir={tmp_path}', override)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, last
  assert 'Traceback' not in r.stderr
  # Nothing else: no JAX backend, Orbax or TensorFlow lines before it.
  assert _lines(r) == [last], _lines(r)[:20]


def test_unwritable_workdir_is_one_line(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  r = _main(f'--workdir={blocker}/sub', devices=1)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: workdir=') and 'cannot be written' in last
  assert 'Traceback' not in r.stderr


def test_missing_recipe_is_one_line_listing_the_recipes(tmp_path):
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', '--config=configs/nosuch.py',
       f'--workdir={tmp_path}'],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  assert _lines(r) == [r.stderr.strip()], r.stderr[-2000:]
  line = r.stderr.strip()
  assert line.startswith('error: --config=configs/nosuch.py: ') and (
      'configs/nosuch.py does not exist' in line), line
  assert 'configs/digits.py' in line and 'configs/methods/byol.py' in line


@pytest.mark.parametrize('source,expected', [
    ('import no_such_module_xyz\n',
     "failed to load (line 1): ModuleNotFoundError: No module named "
     "'no_such_module_xyz'"),
    ('CONFIG = 1\n', 'defines no get_config() function'),
    ('def get_config():\n  return {}["x"]\n', 'get_config() of '),
])
def test_broken_recipe_is_one_line(tmp_path, source, expected):
  recipe = tmp_path / 'recipe.py'
  recipe.write_text(source)
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', f'--config={recipe}',
       f'--workdir={tmp_path}/run'],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  line = r.stderr.strip()
  assert _lines(r) == [line] and line.startswith('error: '), r.stderr[-2000:]
  assert str(recipe) in line and expected in line, line


def test_unknown_recipe_argument_is_one_line_naming_the_known_ones(tmp_path):
  r = _main(f'--workdir={tmp_path}', config='digits.py:tyni')
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  line = r.stderr.strip()
  assert _lines(r) == [line], r.stderr[-2000:]
  assert line.startswith('error: --config=') and "get_config('tyni')" in line
  assert "ValueError: unknown argument 'tyni'" in line, line
  assert line.endswith('takes none or one of: tiny, validation'), line


def test_verbosity_brings_library_logs_back(tmp_path):
  """A config error after JAX and Orbax have started: the error alone by
  default (checked above), their log lines too with --verbosity=1 or
  SIMCLR_JAX_VERBOSE=1."""
  for args, env in ((('--verbosity=1',), None),
                    ((), {'SIMCLR_JAX_VERBOSE': '1'})):
    r = _main(f'--workdir={tmp_path}', '--config.batch_size=100', *args,
              env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = _lines(r)
    assert any(line.startswith('error: config.batch_size=100')
               for line in lines), lines[-5:]
    assert any(ABSL_LINE.match(line) for line in lines), lines[:20]


def test_default_run_prints_only_the_projects_lines(tmp_path):
  # A thin net on 16 px digits, two steps, cheap evaluation.
  r = _main(f'--workdir={tmp_path}', config='digits.py:tiny')
  assert r.returncode == 0, r.stderr[-3000:]
  lines = _lines(r)
  foreign = [line for line in lines if not PROJECT_LINE.match(line)]
  assert not foreign, foreign[:20]
  text = '\n'.join(lines)
  for noise in ('orbax', 'absl::InitializeLog', 'oneDNN', 'xla_bridge',
                'tensorflow', 'Traceback'):
    assert noise not in text, noise
  for own in ('Pretraining digits: 2 steps', 'step 2/2', 'checkpoint',
              'Results: ', 'results.json', 'on 8 x cpu (cpu), 1 process'):
    assert own in text, (own, lines)
  # results.json says what made it.
  with open(tmp_path / 'results.json') as f:
    prov = json.load(f)['provenance']
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'],
                        capture_output=True, text=True).stdout.strip()
  if head:  # The suite runs from a checkout (CI clones the repository).
    assert prov['code']['source'] == 'git'
    assert prov['code']['version'] in (head, head + '-dirty')
    assert prov['code']['commit'] == head
    dirty = subprocess.run(['git', '-C', ROOT, 'status', '--porcelain',
                            '--untracked-files=no'], capture_output=True,
                           text=True).stdout.strip()
    assert prov['code']['clean'] == (not dirty)
  # The version was read at the start, and the start recorded in the workdir.
  assert [s['version'] for s in prov['code_starts']] == [
      prov['code']['version']]
  assert prov['code_at_finish']['version'] == prov['code']['version']
  assert prov['platform'] == 'cpu' and prov['device_count'] == 8
  assert prov['process_count'] == 1 and prov['compute_dtype'] == 'float32'
  batch = tiny_config().batch_size
  assert prov['global_batch'] == batch
  assert prov['per_device_batch'] == batch // 8
  assert prov['libraries']['jax'] == importlib.metadata.version('jax')
  assert prov['wall_time_s'] > 0


def test_results_credit_the_code_a_run_started_with(tmp_path, monkeypatch):
  """A tree changed while a run trains: results.json names the version at
  the start, the one at the finish, and every start in the workdir."""
  from simclr_jax.runtime import provenance  # pylint: disable=g-import-not-at-top
  versions = iter([{'source': 'git', 'version': 'aaa', 'clean': True},
                   {'source': 'git', 'version': 'bbb-dirty', 'clean': False},
                   {'source': 'git', 'version': 'ccc', 'clean': True}])
  monkeypatch.setattr(provenance, 'code_version', lambda: next(versions))
  monkeypatch.setattr(provenance, '_AT_START', None)
  provenance.record_start(str(tmp_path))  # aaa
  provenance.record_start(str(tmp_path))  # bbb-dirty: a resume
  prov = provenance.collect(workdir=str(tmp_path))  # ccc at the finish
  assert prov['code']['version'] == 'bbb-dirty'
  assert prov['code_at_finish']['version'] == 'ccc'
  assert [s['version'] for s in prov['code_starts']] == ['aaa', 'bbb-dirty']


def test_accelerator_recipe_on_cpu_is_refused_unless_asked(tmp_path):
  r = _main(f'--workdir={tmp_path}/a', devices=1,
            config='imagenet_resnet50.py')
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: this recipe sets config.requires_accelerator')
  assert "pip install -e '.[cuda]'" in last and '--allow_cpu' in last
  assert '1 x cpu (cpu), 1 process' in last
  # An accelerator launch script's variable refuses any recipe.
  r = _main(f'--workdir={tmp_path}/b', devices=1,
            env={'SIMCLR_JAX_REQUIRE_ACCELERATOR': '1'})
  assert r.returncode == 2
  assert 'SIMCLR_JAX_REQUIRE_ACCELERATOR=1' in r.stderr.strip().splitlines(
  )[-1]
  # --allow_cpu gets past the check: the run goes on to look for ImageNet
  # (not prepared here), which is a different error.
  r = _main(f'--workdir={tmp_path}/c', '--allow_cpu',
            f'--config.dataset.data_dir={tmp_path}/tfds', devices=1,
            config='imagenet_resnet50.py')
  assert r.returncode != 0
  assert 'requires_accelerator' not in r.stderr
  assert 'imagenet2012' in r.stderr.strip().splitlines()[-1]
