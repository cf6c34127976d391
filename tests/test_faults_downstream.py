"""Fault injection for the downstream training modes, through the real command.

linear_eval, finetune and distill train through the same loop as
pretraining; this drives fine-tuning (the family's representative: frozen
stem, trained stages, BN in training mode, a label fraction) through SIGKILL,
SIGTERM and an incompatible re-run, and compares what it leaves behind with
one uninterrupted run. CPU runs with the same flags are deterministic, so
"resumes correctly" means "ends with the reference's parameters".
"""

import json
import os
import re
import signal

import pytest

from simclr_jax.runtime import checkpointing
from conftest import tiny_config
from test_faults import BASE
from test_faults import Run
from test_faults import _assert_trees_close
from test_faults import _complete_steps
from test_faults import _logged_steps
from test_faults import _run
from test_faults import _state

# ceil(2.6 epochs * 145 labels / 64) = 6 steps.
TOTAL = 6
FINETUNE = ('--mode=finetune', '--config.finetune.label_fraction=0.1',
            '--config.finetune.batch_size=64', '--config.finetune.epochs=2.6',
            '--config.finetune.fine_tune_after_block=1',
            '--config.finetune.lr_scaling=linear',
            '--config.finetune.learning_rate=0.1')


@pytest.fixture(scope='module', name='source')
def _source(tmp_path_factory):
  """A pretraining workdir at its initial state, written as pretrain does."""
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('source'))
  c = tiny_config(*BASE)  # The config of test_faults.Run.
  setup = pretrain.build(c)
  state = pretrain.initial_state(setup)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(1, state.replace(step=state.step + 1), {'step': 1}, force=True)
  ckpt.close()
  pretrain.check_resume_compatible(workdir, c)  # Writes config.json.
  return workdir


def _finetune(workdir, source, *extra) -> tuple:
  return (workdir, *FINETUNE, f'--config.init_from={source}', *extra)


@pytest.fixture(scope='module', name='reference')
def _reference(source, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  run = _run(*_finetune(workdir, source))
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['steps'] == TOTAL and not results['interrupted']
  return workdir


def test_finetune_sigkill_then_sigterm_then_resume_equals_reference(
    source, reference, tmp_path):
  workdir = tmp_path / 'run'
  # 1. SIGKILL mid-training, once the (asynchronous) checkpoint of step 2
  #    or later is complete.
  run = Run(*_finetune(workdir, source))
  run.wait_for(lambda r: any(s >= 2 for s in _complete_steps(workdir))
               if os.path.isdir(workdir / 'checkpoints') else False)
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  _, killed_at = checkpointing.restore_raw(
      os.path.join(workdir, 'checkpoints'))
  assert 2 <= killed_at < TOTAL

  # 2. Re-run: resumes from the kill's last checkpoint; SIGTERM after one
  #    more step ends it cleanly (exit 0) with the resume hint.
  run = Run(*_finetune(workdir, source))
  run.wait_for(lambda r: r.last_step_logged() >= killed_at + 1)
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 0, run.log[-3000:]
  assert f'Resumed from step {killed_at} (finetune)' in run.log
  hint = [line for line in run.lines if 'Re-run the same command' in line]
  assert hint and 'signal 15' in hint[0], run.log[-3000:]
  stopped_at = int(re.search(r'at step (\d+)', hint[0]).group(1))
  assert run.results()['interrupted'] is True
  _assert_trees_close(_state(workdir, stopped_at), _state(reference,
                                                          stopped_at))

  # 3. Re-run to the end: the uninterrupted run's parameters, BN statistics
  #    and optimiser state, and each step logged once.
  run = _run(*_finetune(workdir, source))
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  ref_results = json.loads((reference / 'results.json').read_text())
  assert results['resumed_from_step'] == stopped_at
  assert results['steps'] == TOTAL and not results['interrupted']
  _assert_trees_close(_state(workdir, TOTAL), _state(reference, TOTAL))
  assert _logged_steps(workdir) == list(range(1, TOTAL + 1))
  assert results['top1_accuracy'] == pytest.approx(
      ref_results['top1_accuracy'])


def test_incompatible_downstream_rerun_is_refused(source, reference):
  # Another label fraction in the finetune workdir: one line naming it.
  run = _run(*_finetune(reference, source,
                        '--config.finetune.label_fraction=0.5'))
  assert run.proc.returncode == 2, run.log[-3000:]
  last = run.log.strip().splitlines()[-1]
  assert last.startswith('error: cannot resume') and (
      'config.downstream.label_fraction was 0.1' in last), last
  assert 'Traceback' not in run.log
  # Another mode in the same workdir.
  run = _run(reference, '--mode=linear_eval', f'--config.init_from={source}')
  assert run.proc.returncode == 2, run.log[-3000:]
  last = run.log.strip().splitlines()[-1]
  assert 'holds a finetune run and this is a linear_eval run' in last, last
