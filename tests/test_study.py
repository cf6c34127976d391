"""Scaling studies: the grid, running and skipping points, the report.

Most tests run the study against a stub of the main command (a module that
writes what a finished or interrupted run writes), so they test the study's
own logic in seconds; one test runs a real point through simclr_jax.main.
"""

import json
import os
import subprocess
import sys

import pytest

from simclr_jax.tools import study
from conftest import TINY_RECIPE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, 'configs', 'digits.py')

# A stand-in for `python -m simclr_jax.main`: parses --workdir and
# --config.batch_size, counts its calls, and writes results.json. A batch
# listed in FAKE_INTERRUPT_ONCE is interrupted on its first call (as after
# SIGTERM); one listed in FAKE_FAIL exits 3.
FAKE_MAIN = r'''
import json, os, sys
args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if '=' in a)
workdir = args['workdir']
batch = int(args.get('config.batch_size', 256))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, 'calls.txt'), 'a') as f:
  f.write(' '.join(sys.argv[1:]) + '\n')
calls = len(open(os.path.join(workdir, 'calls.txt')).readlines())
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump({'batch_size': batch}, f)
if str(batch) in os.environ.get('FAKE_FAIL', '').split(','):
  sys.exit(3)
interrupted = (str(batch) in os.environ.get('FAKE_INTERRUPT_ONCE', '').split(',')
               and calls == 1)
results = {'interrupted': interrupted, 'steps': 10, 'pretrain_wall_time_s': 4.0,
           'final_train_loss': 1.0 / batch, 'knn_accuracy': batch / 1000.0,
           'pixel_knn_accuracy': 0.3 + int(args.get('config.seed', 0)) ** 2 / 100,
           'linear_probe_accuracy': 0.5, 'fewshot_probe_accuracy': {'1': 0.25},
           'knn_monitor': [{'epoch': 1.0, 'knn_accuracy': 0.1, 'step': 5}],
           'provenance': {'global_batch': batch, 'per_device_batch': batch // 8,
                          'grad_cache_chunks': 0, 'wall_time_s': 5.0,
                          'device_count': 8, 'device_kind': 'cpu',
                          'code': {'version': 'abc'}}}
with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
  f.write(json.dumps({'step': 10, 'loss': 1.0 / batch}) + '\n')
with open(os.path.join(workdir, 'results.json'), 'w') as f:
  json.dump(results, f)
'''


@pytest.fixture
def fake_main(tmp_path, monkeypatch):
  stub = tmp_path / 'stub'
  stub.mkdir()
  (stub / 'fake_main.py').write_text(FAKE_MAIN)
  monkeypatch.setenv('PYTHONPATH', f'{stub}{os.pathsep}{ROOT}')
  return 'fake_main'


def _calls(workdir, name) -> int:
  path = os.path.join(workdir, 'points', name, 'calls.txt')
  return len(open(path).readlines()) if os.path.exists(path) else 0


def test_grid_expansion_and_naming():
  axes = study.parse_sweeps(['batch_size=64,128',
                             'config.optim.lr_scaling=linear,sqrt'])
  assert axes == [('batch_size', [64, 128]),
                  ('optim.lr_scaling', ['linear', 'sqrt'])]
  points = study.expand(axes)
  assert [p['index'] for p in points] == [0, 1, 2, 3]
  # Row-major: the last axis varies fastest.
  assert [p['settings'] for p in points] == [
      {'batch_size': 64, 'optim.lr_scaling': 'linear'},
      {'batch_size': 64, 'optim.lr_scaling': 'sqrt'},
      {'batch_size': 128, 'optim.lr_scaling': 'linear'},
      {'batch_size': 128, 'optim.lr_scaling': 'sqrt'}]
  assert points[1]['name'] == 'batch_size-64__optim.lr_scaling-sqrt'
  assert study.parse_sweeps(['loss.temperature=0.1,0.5'])[0][1] == [0.1, 0.5]
  for bad, says in (('batch_size', 'FIELD=V1,V2'), ('=1,2', 'FIELD=V1,V2'),
                    ('batch size=1', 'not a config field'),
                    ('batch_size=64,64', 'repeats a value')):
    with pytest.raises(study.StudyError, match=says):
      study.parse_sweeps([bad])
  with pytest.raises(study.StudyError, match='twice'):
    study.parse_sweeps(['batch_size=1', 'batch_size=2'])


def test_command_of_a_point_carries_settings_and_fixed_flags(tmp_path):
  spec = study.make_spec(DIGITS, study.parse_sweeps(['batch_size=64,128']),
                         ['--config.num_epochs=2'], max_batch_per_device=16)
  cmd = study.point_command(spec, spec['points'][1], str(tmp_path))
  assert cmd[1:3] == ['-m', 'simclr_jax.main']
  assert f'--config={DIGITS}' in cmd and '--config.num_epochs=2' in cmd
  assert '--config.batch_size=128' in cmd
  assert '--config.max_batch_per_device=16' in cmd
  assert f'--workdir={tmp_path}/points/batch_size-128' in cmd


def test_skips_finished_points_and_resumes_interrupted_ones(tmp_path,
                                                            fake_main,
                                                            monkeypatch):
  w = str(tmp_path / 'study')
  args = [f'--config={DIGITS}', f'--workdir={w}', '--sweep=batch_size=64,128',
          '--config.num_epochs=3', f'--main_module={fake_main}']
  monkeypatch.setenv('FAKE_INTERRUPT_ONCE', '128')
  assert study.main(args) == 0
  names = ['batch_size-64', 'batch_size-128']
  assert [_calls(w, n) for n in names] == [1, 1]
  rows = json.load(open(os.path.join(w, 'study.json')))['points']
  assert [r['status'] for r in rows] == ['finished', 'interrupted']
  # The same command again: the finished point is skipped, the interrupted
  # one runs again (its own resume) and finishes.
  assert study.main(args) == 0
  assert [_calls(w, n) for n in names] == [1, 2]
  out = json.load(open(os.path.join(w, 'study.json')))
  assert out['counts']['finished'] == 2
  # Every call got the fixed flag and its own setting.
  first = open(os.path.join(w, 'points', names[1], 'calls.txt')).readline()
  assert '--config.num_epochs=3' in first and '--config.batch_size=128' in first
  # Another grid for the same study is refused with one line.
  r = subprocess.run([sys.executable, '-m', 'simclr_jax.study',
                      f'--config={DIGITS}', f'--workdir={w}',
                      '--sweep=batch_size=64,256'], capture_output=True,
                     text=True, cwd=ROOT)
  assert r.returncode == 2
  assert r.stderr.strip().startswith('error: ') and 'axes' in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_point_k_from_two_processes_writes_disjoint_points(tmp_path,
                                                           fake_main):
  w = str(tmp_path / 'study')
  plan = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.study', f'--config={DIGITS}',
       f'--workdir={w}', '--sweep=batch_size=32,64,128', '--plan'],
      capture_output=True, text=True, cwd=ROOT, check=True)
  assert plan.stdout.splitlines() == ['0\tbatch_size-32', '1\tbatch_size-64',
                                      '2\tbatch_size-128']
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'simclr_jax.study', f'--workdir={w}',
       f'--point={k}', f'--main_module={fake_main}'], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k in (0, 2)]
  for p in procs:
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
  assert [_calls(w, n) for n in ('batch_size-32', 'batch_size-64',
                                 'batch_size-128')] == [1, 0, 1]
  for name, batch in (('batch_size-32', 32), ('batch_size-128', 128)):
    calls = open(os.path.join(w, 'points', name, 'calls.txt')).read()
    assert f'--config.batch_size={batch}' in calls
  # No report from single points; --report then covers all three.
  assert not os.path.exists(os.path.join(w, 'study.json'))
  assert study.main([f'--report={w}']) == 0
  rows = json.load(open(os.path.join(w, 'study.json')))['points']
  assert [r['status'] for r in rows] == ['finished', 'pending', 'finished']
  r = subprocess.run([sys.executable, '-m', 'simclr_jax.study',
                      f'--workdir={w}', '--point=3'], capture_output=True,
                     text=True, cwd=ROOT)
  assert r.returncode == 2 and 'out of range' in r.stderr


def test_report_from_results(tmp_path, fake_main, monkeypatch):
  w = str(tmp_path / 'study')
  monkeypatch.setenv('FAKE_FAIL', '256')
  rc = study.main([f'--config={DIGITS}', f'--workdir={w}',
                   '--sweep=batch_size=64,128,256',
                   '--sweep=num_epochs=1,2', f'--main_module={fake_main}'])
  assert rc == 1  # A point failed.
  out = json.load(open(os.path.join(w, 'study.json')))
  rows = {(r['settings']['batch_size'], r['settings']['num_epochs']): r
          for r in out['points']}
  assert len(rows) == 6 and out['counts'] == {
      'finished': 4, 'interrupted': 0, 'started': 0, 'failed': 2,
      'pending': 0}
  for (batch, _), r in rows.items():
    if batch == 256:
      assert r['status'] == 'failed' and r.get('knn_accuracy') is None
      continue
    # What the stub wrote, and the throughput computed here independently.
    assert r['knn_accuracy'] == batch / 1000.0
    assert r['final_loss'] == 1.0 / batch
    assert r['images_per_sec'] == pytest.approx(10 * batch / 4.0)
    assert r['loss_curve'] == [[10, 1.0 / batch]]
    assert r['knn_monitor'][0]['knn_accuracy'] == 0.1
  md = open(os.path.join(w, 'study.md')).read()
  assert md.count('| failed |') == 2 and md.count('| finished |') == 4
  assert '| 128 | 2 | finished | 10 | 50.0 | 12.8 | 25.0 |' in md
  # num_epochs is an axis too: the learning-curve plot.
  assert out['plots'] == ['accuracy_vs_batch.png', 'throughput_vs_batch.png',
                          'accuracy_vs_epochs.png', 'curves.png']
  for name in out['plots']:
    with open(os.path.join(w, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert out['warnings'] == []
  # Points made by different code are flagged in the report.
  path = os.path.join(w, 'points', 'batch_size-64__num_epochs-1',
                      'results.json')
  r = json.load(open(path))
  r['provenance']['code']['version'] = 'def'
  json.dump(r, open(path, 'w'))
  out = study.report(w)
  assert len(out['warnings']) == 1 and 'abc; def' in out['warnings'][0]
  assert 'different code versions' in open(
      os.path.join(w, 'study.md')).read()
  # A point still running (its run wrote config.json, no results yet) is
  # reported as such, not dropped.
  running = os.path.join(w, 'points', 'batch_size-128__num_epochs-1')
  os.remove(os.path.join(running, 'results.json'))
  out = study.report(w)
  row = next(r for r in out['points']
             if r['name'] == 'batch_size-128__num_epochs-1')
  assert row['status'] == 'started' and row.get('knn_accuracy') is None
  assert out['counts']['started'] == 1 and out['counts']['finished'] == 3
  assert '| 128 | 1 | started |' in open(os.path.join(w, 'study.md')).read()


def test_seed_axis_gives_mean_and_std_per_setting(tmp_path, fake_main):
  """Seeds are repetition: the summary's mean and sample std per setting,
  checked against NumPy on the values the stub wrote."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = str(tmp_path / 'study')
  assert study.main([f'--config={DIGITS}', f'--workdir={w}',
                     '--sweep=batch_size=64,128', '--sweep=seed=0,1,3',
                     f'--main_module={fake_main}']) == 0
  out = json.load(open(os.path.join(w, 'study.json')))
  assert [g['settings'] for g in out['summary']] == [{'batch_size': 64},
                                                     {'batch_size': 128}]
  pixel = np.array([0.3 + s ** 2 / 100 for s in (0, 1, 3)])
  for g in out['summary']:
    assert g['seeds'] == [0, 1, 3]
    m = g['metrics']['pixel_knn_accuracy']
    assert m['n'] == 3 and m['values'] == pytest.approx(list(pixel))
    assert m['mean'] == pytest.approx(pixel.mean())
    assert m['std'] == pytest.approx(pixel.std(ddof=1))
    knn = g['metrics']['knn_accuracy']
    assert knn['mean'] == g['settings']['batch_size'] / 1000 and knn['std'] == 0
    assert g['metrics']['fewshot_probe_accuracy/1']['mean'] == 0.25
  # The small JSON docs/results/ keeps: the same summary, the points'
  # accuracies, and the command that re-makes the study.
  small = json.load(open(os.path.join(w, study.COMPACT)))
  assert small['summary'] == out['summary']
  assert [p['accuracies']['pixel_knn_accuracy'] for p in small['points']
          ] == pytest.approx(list(pixel) * 2)
  assert small['command'].startswith('python -m simclr_jax.study --config=')
  assert '--sweep=batch_size=64,128 --sweep=seed=0,1,3' in small['command']
  assert 'loss_curve' not in json.dumps(small)
  md = open(os.path.join(w, 'study.md')).read()
  # Columns in name order: few-shot, kNN, probe, pixel kNN.
  assert (f'| 64 | 3 | 25.00 ± 0.00 | 6.40 ± 0.00 | 50.00 ± 0.00 | '
          f'{100 * pixel.mean():.2f} ± {100 * pixel.std(ddof=1):.2f} |') in md


def test_seeds_pool_only_from_one_clean_commit(tmp_path, fake_main):
  """The paired encoder-minus-pixels differences against NumPy, with their
  verdict; a point from a dirty tree or another commit stops the pooling
  unless asked, and the report names it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = str(tmp_path / 'study')
  assert study.main([f'--config={DIGITS}', f'--workdir={w}',
                     '--sweep=batch_size=64,512', '--sweep=seed=0,1,3',
                     f'--main_module={fake_main}']) == 0
  out = json.load(open(os.path.join(w, 'study.json')))
  pixel = np.array([0.3 + s ** 2 / 100 for s in (0, 1, 3)])
  for g in out['summary']:
    p = next(p for p in g['paired'] if p['metric'] == 'knn_accuracy')
    assert p['baseline'] == 'pixel_knn_accuracy' and p['n'] == 3
    diffs = g['settings']['batch_size'] / 1000 - pixel
    assert p['mean'] == pytest.approx(diffs.mean())
    assert p['std'] == pytest.approx(diffs.std(ddof=1))
    # 64: -0.24 ± 0.05 is behind; 512: +0.21 ± 0.05 is ahead.
    assert p['verdict'] == ('behind' if diffs.mean() < 0 else 'ahead')
  assert '| 512 | knn_accuracy | pixel_knn_accuracy | 3 |' in open(
      os.path.join(w, 'study.md')).read()
  for version, why in (('abc-dirty', 'uncommitted changes'),
                       ('def', 'ran def, the others abc')):
    path = os.path.join(w, 'points', 'batch_size-64__seed-1', 'results.json')
    r = json.load(open(path))
    r['provenance']['code']['version'] = version
    json.dump(r, open(path, 'w'))
    with pytest.raises(study.StudyError, match=why) as e:
      study.report(w)
    assert 'batch_size-64__seed-1' in str(e.value)
    assert study.main([f'--report={w}']) == 2
    out = study.report(w, allow_mixed_code=True)
    assert any('batch_size-64__seed-1' in x for x in out['warnings'])
  # A run resumed on other code says so through its recorded starts.
  r['provenance']['code']['version'] = 'abc'
  r['provenance']['code_starts'] = [{'version': 'old'}, {'version': 'abc'}]
  json.dump(r, open(path, 'w'))
  with pytest.raises(study.StudyError, match='resumed on other code'):
    study.report(w)


def test_mode_and_per_point_settings_reach_the_command(tmp_path, fake_main):
  """--mode goes to every point; {seed} in a fixed setting is the point's
  seed; a placeholder naming no axis is refused before anything runs."""
  w = str(tmp_path / 'study')
  assert study.main([f'--config={DIGITS}', f'--workdir={w}', '--mode=finetune',
                     '--sweep=seed=0,2', '--config.init_from=PRE/seed-{seed}',
                     f'--main_module={fake_main}']) == 0
  for seed in (0, 2):
    line = open(os.path.join(w, 'points', f'seed-{seed}', 'calls.txt')).read()
    assert f'--config.init_from=PRE/seed-{seed} ' in line
    assert '--mode=finetune' in line and f'--config.seed={seed}' in line
  # Re-running the study in another mode is refused (the grid is fixed).
  assert study.main([f'--config={DIGITS}', f'--workdir={w}',
                     '--sweep=seed=0,2', '--config.init_from=PRE/seed-{seed}',
                     f'--main_module={fake_main}']) == 2
  with pytest.raises(study.StudyError, match=r'\{sed\}.*names no --sweep'):
    study.make_spec(DIGITS, study.parse_sweeps(['seed=0,1']),
                    ['--config.init_from=X/{sed}'], 0)


def test_a_real_two_point_study_runs_through_the_main_command(tmp_path):
  """Two tiny points through simclr_jax.main; the larger one is above
  max_batch_per_device, so it uses gradient caching and says so."""
  w = str(tmp_path / 'study')
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.study', f'--config={TINY_RECIPE}',
       f'--workdir={w}', '--sweep=batch_size=32,64',
       '--max_batch_per_device=4',
       # The tiny run at the recipe's log and checkpoint intervals.
       '--config.log_every_steps=20', '--config.checkpoint_every_steps=100',
       '--config.evals.pixel.enabled=False', '--config.evals.knn.every_epochs=0'],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env=dict(os.environ,
               XLA_FLAGS=xla_flags()))
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  out = json.load(open(os.path.join(w, 'study.json')))
  small, big = out['points']
  for row in (small, big):
    assert row['status'] == 'finished' and row['steps'] == 2
    assert 0 <= row['knn_accuracy'] <= 1 and row['images_per_sec'] > 0
  assert small['per_device_batch'] == 4 and small['grad_cache_chunks'] == 0
  assert big['global_batch'] == 64 and big['per_device_batch'] == 8
  assert big['grad_cache_chunks'] == 2  # 8 per device > 4: two chunks.
  log = open(os.path.join(w, 'points', 'batch_size-64', 'log.txt')).read()
  assert 'gradient caching in 2 chunks of 4 images per device' in log
  for name in out['plots']:
    with open(os.path.join(w, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # Run again: both points are finished, so nothing runs.
  r = subprocess.run([sys.executable, '-m', 'simclr_jax.study',
                      f'--workdir={w}'], capture_output=True, text=True,
                     cwd=ROOT, timeout=120)
  assert r.returncode == 0 and r.stdout.count('skipped') == 2
