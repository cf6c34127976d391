"""A corrupt newest checkpoint is skipped, not fatal.

Checkpoints are written with real Orbax through `checkpointing.Checkpointer`;
"corrupt" means the files of a step's 'state' item are overwritten with
random bytes under their own names (a bad disk, a copy that went wrong).
Restoring without a step then falls back to the newest readable step, with
one warning line per skipped step and no asyncio tracebacks on stderr.
docs/robustness.md lists the fault.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.runtime import checkpointing
from conftest import TINY_RECIPE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ,
           XLA_FLAGS=xla_flags(),
           JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
           TF_NUM_INTEROP_THREADS='1')
# Never written by a run; they are not array data.
KEEP = ('_METADATA', 'commit_success.txt')


def _values(step: int, wide: int = 0) -> dict:
  """The numpy values saved at `step` (distinct per step).

  In the layout `load_run` reads: 'params' and 'batch_stats'. `wide` adds
  that many arrays: a failed restore of many arrays leaves reads in flight.
  """
  params = {'w': np.arange(64 * 3, dtype=np.float32).reshape(64, 3) + step,
            'head': {'v': np.linspace(0, 1, 16, dtype=np.float32) * step}}
  for i in range(wide):
    params[f'x{i}'] = np.full((64, 33), step + i, np.float32)
  return {'params': params,
          'batch_stats': {'b': np.full((8,), step, np.int32)}}


def _sharded(tree: dict) -> dict:
  """Sharded over all devices, as the train state is (Orbax's array path)."""
  mesh = Mesh(np.array(jax.devices()), ('d',))
  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P('d'))), tree)


def _save(directory, steps=(1, 2, 3), max_to_keep=5, wide=0):
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=max_to_keep,
                                    async_save=False)
  for step in steps:
    ckpt.save(step, _sharded(_values(step, wide)), {'position': step})
  ckpt.close()


def _corrupt(directory, step, arrays_only=False):
  """Overwrites the files of `step`'s state with garbage, names kept.

  `arrays_only` keeps the tree metadata, so the failure comes from
  TensorStore's reads (DATA_LOSS) rather than from decoding the metadata.
  """
  root = os.path.join(str(directory), str(step), 'state')
  count = 0
  for parent, _, files in os.walk(root):
    for name in files:
      if arrays_only and name in KEEP:
        continue
      path = os.path.join(parent, name)
      size = max(os.path.getsize(path), 16)
      with open(path, 'wb') as f:
        f.write(np.random.default_rng(count).bytes(size))
      count += 1
  assert count


def _assert_values(tree, step):
  expected = _values(step)
  assert jax.tree.structure(dict(tree)) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, dict(tree)), expected)


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING]


@pytest.mark.parametrize('arrays_only', [False, True])
def test_restore_falls_back_and_saves_on(tmp_path, caplog, arrays_only):
  directory = str(tmp_path / 'ckpt')
  _save(directory)
  _corrupt(directory, 3, arrays_only)
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=5,
                                    async_save=False)
  with caplog.at_level(logging.WARNING):
    state, position, step = ckpt.restore(_sharded(_values(0)))
  assert step == 2 and position == {'position': 2}
  _assert_values(state, 2)
  skipped = [m for m in _warnings(caplog) if 'unreadable, skipping' in m]
  assert len(skipped) == 1 and 'step 3' in skipped[0], _warnings(caplog)
  assert '\n' not in skipped[0] and len(skipped[0]) < 400
  # The unreadable step is gone, so the run can save step 3 again and on.
  assert sorted(os.listdir(directory)) == ['1', '2']
  assert ckpt.latest_step() == 2
  for new in (3, 4):
    assert ckpt.save(new, _sharded(_values(new)), {'position': new},
                     force=True)
  ckpt.close()
  again = checkpointing.Checkpointer(directory, async_save=False)
  state, position, step = again.restore(_sharded(_values(0)))
  assert step == 4 and position == {'position': 4}
  _assert_values(state, 4)
  state, step = checkpointing.restore_raw(directory, 3)
  assert step == 3
  _assert_values(state, 3)
  again.close()


def test_restore_raw_falls_back_and_leaves_the_run_alone(tmp_path, caplog):
  directory = str(tmp_path / 'ckpt')
  _save(directory)
  _corrupt(directory, 3)
  with caplog.at_level(logging.WARNING):
    state, step = checkpointing.restore_raw(directory)
  assert step == 2
  _assert_values(state, 2)
  assert any('step 3' in m and 'unreadable' in m for m in _warnings(caplog))
  # It reads another run: nothing is deleted there.
  assert sorted(os.listdir(directory)) == ['1', '2', '3']


def test_load_run_falls_back(tmp_path):
  workdir = tmp_path / 'run'
  _save(str(workdir / 'checkpoints'), steps=(1, 2))
  (workdir / 'config.json').write_text(json.dumps({'batch_size': 8}))
  _corrupt(workdir / 'checkpoints', 2)
  config, variables, step = checkpointing.load_run(str(workdir))
  assert step == 1 and config.batch_size == 8
  _assert_values(variables, 1)


def test_nothing_readable_is_one_line_error(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _save(directory)
  for step in (1, 2, 3):
    _corrupt(directory, step, arrays_only=step == 2)
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore(_sharded(_values(0)))
  message = str(e.value)
  assert '\n' not in message and len(message) < 500, message
  assert directory in message and 'tried steps 3, 2, 1' in message
  assert 'new workdir' in message
  assert isinstance(e.value, ValueError)  # main.py prints it as 'error: ...'.
  # Nothing restored, so nothing deleted.
  assert sorted(os.listdir(directory)) == ['1', '2', '3']
  ckpt.close()
  with pytest.raises(checkpointing.CheckpointError,
                     match='tried steps 3, 2, 1') as e:
    checkpointing.restore_raw(directory)
  assert '\n' not in str(e.value)


def test_explicit_step_does_not_fall_back(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _save(directory, steps=(1, 2))
  _corrupt(directory, 2)
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  with pytest.raises(checkpointing.CheckpointError,
                     match='step 2 .* is unreadable') as e:
    ckpt.restore(_sharded(_values(0)), step=2)
  assert '\n' not in str(e.value)
  with pytest.raises(checkpointing.CheckpointError,
                     match='no checkpoint step 7'):
    ckpt.restore(_sharded(_values(0)), step=7)
  with pytest.raises(checkpointing.CheckpointError, match='step 2'):
    checkpointing.restore_raw(directory, 2)
  assert sorted(os.listdir(directory)) == ['1', '2']
  state, _, step = ckpt.restore(_sharded(_values(0)), step=1)
  assert step == 1
  _assert_values(state, 1)
  ckpt.close()


# Save sharded arrays, corrupt the newest step's array files, restore under
# absl's app.run (the logging set-up of `python -m simclr_jax.main`).
_SCRIPT = textwrap.dedent('''
    import sys
    from absl import app
    sys.path.insert(0, {tests!r})
    import test_checkpoint_fallback as t
    from simclr_jax.runtime import checkpointing

    def main(_):
      t._save({directory!r}, steps=(1, 2, 3, 4), wide=40)
      for step in (4, 3, 2):
        t._corrupt({directory!r}, step, arrays_only=True)
      ckpt = checkpointing.Checkpointer({directory!r}, async_save=False)
      _, _, step = ckpt.restore(t._sharded(t._values(0, wide=40)))
      print('RESTORED', step)
      ckpt.close()

    app.run(main)
''')


def test_fallback_leaves_one_line_per_step_on_stderr(tmp_path):
  """Failed attempts print no asyncio or thread tracebacks."""
  directory = str(tmp_path / 'ckpt')
  script = _SCRIPT.format(tests=os.path.dirname(__file__), directory=directory)
  proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                        text=True, cwd=ROOT, env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'RESTORED 1' in proc.stdout
  err = proc.stderr
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in err, err[-3000:]
  # absl's format: 'W<date> <time> <thread> <file>:<line>] message'.
  skipped = [l for l in err.splitlines() if 'unreadable, skipping' in l]
  assert len(skipped) == 3, err[-3000:]
  assert ['step 4' in skipped[0], 'step 3' in skipped[1],
          'step 2' in skipped[2]] == [True] * 3
  assert all(l.split('skipping it: ')[1] for l in skipped)  # The reason.
  deleted = [l for l in err.splitlines() if 'Deleting unreadable' in l]
  assert len(deleted) == 3, err[-3000:]
  assert all(l.startswith('W') for l in err.splitlines()
             if l[:1] in 'EWF' and l[1:5].isdigit()), err[-3000:]


# The tiny run for 3 steps, 5 checkpoints kept, with the recipe's own
# few-shot read-out (these runs stop before any evaluation).
BASE = (
    '--config.train_steps=3',
    '--config.keep_checkpoints=5',
    '--config.eval.fewshot_draws=10',
    '--config.eval.fewshot_shots=(1, 5, 10)',
)


def _train(workdir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main', f'--config={TINY_RECIPE}',
       f'--workdir={workdir}', *BASE, *flags],
      capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def test_training_resumes_past_a_corrupt_checkpoint(tmp_path):
  """The real command: checkpoints 1 and 2, step 2 corrupt, re-run resumes.

  Both invocations stop after their steps (`--stop_after_steps`), so
  neither pays for the final evaluation.
  """
  workdir = tmp_path / 'run'
  first = _train(workdir, '--stop_after_steps=2')
  assert first.returncode == 0, first.stderr[-3000:]
  ckpts = workdir / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['1', '2']
  _corrupt(ckpts, 2, arrays_only=True)

  second = _train(workdir, '--stop_after_steps=1')
  assert second.returncode == 0, second.stderr[-3000:]
  err = second.stderr
  assert 'Traceback' not in err and 'Event loop is closed' not in err, (
      err[-3000:])
  assert any('step 2' in l and 'unreadable, skipping' in l
             for l in err.splitlines()), err[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['resumed_from_step'] == 1 and results['steps'] == 2
  # Step 2 was trained again and saved over the deleted corrupt one.
  state, step = checkpointing.restore_raw(str(ckpts))
  assert step == 2 and 'params' in state
  with open(workdir / 'metrics.jsonl') as f:
    assert [json.loads(l)['step'] for l in f] == [1, 2]
