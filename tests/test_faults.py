"""Fault injection through the real command line: every run is a subprocess.

`python -m simclr_jax.main` is killed, signalled, fed NaNs, corrupt images
and incompatible resumes, and what it leaves behind is compared with one
uninterrupted reference run (shared by the module). CPU runs with the same
flags are deterministic, so "resumes correctly" means "ends with the
reference's parameters". docs/robustness.md lists the same faults.

Subprocesses cost 20-60 s each (start, compile, evaluation), so the module
keeps their number small: the kill and the SIGTERM scenarios share one
workdir (kill, resume and SIGTERM, resume to the end).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from simclr_jax.runtime import checkpointing
from conftest import TINY_RECIPE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6
# The tiny run (a thin network on 16 px digits, a checkpoint per step, cheap
# evaluation) for TOTAL steps, all checkpoints kept, so any intermediate
# state of the reference can be compared.
BASE = (f'--config.train_steps={TOTAL}', '--config.keep_checkpoints=20')
# The test process's compile settings (tests/conftest.py): test_adapt
# compares these runs with one computed inside the test process, to 1e-6.
ENV = dict(os.environ,
           XLA_FLAGS=xla_flags(),
           JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
           TF_NUM_INTEROP_THREADS='1')
TMP_SUFFIX = '.orbax-checkpoint-tmp'
STEP_LINE = re.compile(r'step (\d+)/\d+ ')


class Run:
  """A `simclr_jax.main` subprocess whose log is read line by line."""

  def __init__(self, workdir, *overrides, config=TINY_RECIPE):
    self.workdir = str(workdir)
    self.lines = []
    self._new_line = threading.Condition()
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'simclr_jax.main', f'--config={config}',
         f'--workdir={self.workdir}', *BASE, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=ROOT, env=ENV)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      with self._new_line:
        self.lines.append(line.rstrip('\n'))
        self._new_line.notify_all()

  def last_step_logged(self) -> int:
    steps = [int(m.group(1)) for line in self.lines
             for m in [STEP_LINE.search(line)] if m]
    return max(steps, default=0)

  def wait_for(self, predicate, timeout=240.0) -> None:
    """Blocks until predicate(self) holds; fails if the run ends first."""
    deadline = time.time() + timeout
    while not predicate(self):
      assert self.proc.poll() is None, 'run ended early:\n' + self.log[-3000:]
      assert time.time() < deadline, 'timed out:\n' + self.log[-3000:]
      time.sleep(0.01)

  def finish(self, timeout=400.0) -> int:
    try:
      code = self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise
    self._reader.join(10)
    return code

  @property
  def log(self) -> str:
    return '\n'.join(self.lines)

  def results(self) -> dict:
    with open(os.path.join(self.workdir, 'results.json')) as f:
      return json.load(f)


def _run(workdir, *overrides, **kw) -> Run:
  run = Run(workdir, *overrides, **kw)
  run.finish()
  return run


def _state(workdir, step=None) -> dict:
  state, got = checkpointing.restore_raw(
      os.path.join(str(workdir), 'checkpoints'), step)
  assert step is None or got == step
  return state


def _assert_trees_close(a, b) -> None:
  """Same structure and values (tight: CPU runs are deterministic)."""
  import jax  # pylint: disable=g-import-not-at-top
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _complete_steps(workdir) -> list[int]:
  ckpts = os.path.join(str(workdir), 'checkpoints')
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


def _tmp_dirs(workdir) -> list[str]:
  ckpts = os.path.join(str(workdir), 'checkpoints')
  if not os.path.isdir(ckpts):
    return []
  return [d for d in os.listdir(ckpts) if d.endswith(TMP_SUFFIX)]


def _logged_steps(workdir) -> list[int]:
  with open(os.path.join(str(workdir), 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


@pytest.fixture(scope='module', name='reference')
def _reference(tmp_path_factory):
  """One uninterrupted run; its checkpoints 1..TOTAL are the expectations."""
  workdir = tmp_path_factory.mktemp('reference')
  run = _run(workdir)
  assert run.proc.returncode == 0, run.log[-3000:]
  assert _complete_steps(workdir) == list(range(1, TOTAL + 1))
  results = run.results()
  assert results['steps'] == TOTAL and results['skipped_steps'] == 0
  return workdir


def test_sigkill_during_checkpoint_write_then_sigterm_then_resume(
    reference, tmp_path):
  workdir = tmp_path / 'run'

  # 1. SIGKILL while Orbax is writing a checkpoint (its tmp directory exists)
  #    of step >= 2, so a complete checkpoint precedes it.
  run = Run(workdir)

  def saving_step_2_or_later(r):
    del r
    return any(int(d.split('.')[0]) >= 2 for d in _tmp_dirs(workdir))

  run.wait_for(saving_step_2_or_later)
  run.proc.send_signal(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  complete = _complete_steps(workdir)
  assert complete, 'no complete checkpoint before the kill'
  last_complete = complete[-1]
  # Make sure a partial write is present for the next start to cope with,
  # even if the kill landed just after Orbax's rename: a truncated copy of a
  # real checkpoint under the tmp name of the step being written.
  fake = os.path.join(workdir, 'checkpoints',
                      f'{last_complete + 1}{TMP_SUFFIX}')
  if not os.path.exists(fake):
    shutil.copytree(os.path.join(workdir, 'checkpoints', str(last_complete)),
                    fake)
    for root, _, files in os.walk(fake):
      for name in files:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(max(0, os.path.getsize(f.name) // 2))
  assert _tmp_dirs(workdir)

  # 2. Restart: resumes from the last complete checkpoint, ignores the
  #    partial one, and stops cleanly on SIGTERM after two more steps.
  run = Run(workdir)
  run.wait_for(lambda r: r.last_step_logged() >= last_complete + 2)
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 0, run.log[-3000:]
  assert f'Resumed from step {last_complete} ' in run.log
  assert not _tmp_dirs(workdir), 'leftover tmp dir was not cleaned up'
  hint = [line for line in run.lines if 'Re-run the same command' in line]
  assert hint and 'signal 15' in hint[0], run.log[-3000:]
  stopped_at = int(re.search(r'at step (\d+)', hint[0]).group(1))
  assert last_complete + 2 <= stopped_at < TOTAL
  assert _complete_steps(workdir)[-1] == stopped_at
  assert run.results()['interrupted'] is True
  # The interrupted state is the reference's state at that step.
  _assert_trees_close(_state(workdir, stopped_at),
                      _state(reference, stopped_at))

  # 3. Re-run the same command: finishes equal to the uninterrupted run.
  run = _run(workdir)
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['resumed_from_step'] == stopped_at
  assert results['steps'] == TOTAL and not results['interrupted']
  _assert_trees_close(_state(workdir, TOTAL), _state(reference, TOTAL))
  # Steps the killed run logged past its checkpoint were dropped on resume.
  assert _logged_steps(workdir) == list(range(1, TOTAL + 1))
  ref_results = json.loads((reference / 'results.json').read_text())
  assert results['final_train_loss'] == pytest.approx(
      ref_results['final_train_loss'], rel=1e-6)


NAN_STEP = 4


def test_nan_stop_writes_diagnostic_and_keeps_last_good_checkpoint(
    reference, tmp_path):
  # Checkpoints and fetches every 3 steps: the NaN of step 4 is first seen
  # at step 6, which must neither be saved nor reported as the bad step.
  run = _run(tmp_path, f'--config.debug.inject_nan_at_step={NAN_STEP}',
             '--config.on_nan=stop', '--config.checkpoint_every_steps=3',
             '--config.log_every_steps=3')
  assert run.proc.returncode == 1, run.log[-3000:]
  last = run.log.strip().splitlines()[-1]
  assert last.startswith(f'error: non-finite ') and (
      f'at step {NAN_STEP} (on_nan=stop)' in last), last
  assert 'last good checkpoint (step 3) is kept' in last, last
  with open(tmp_path / 'nan_diagnostic.json') as f:
    diag = json.load(f)
  assert diag['step'] == NAN_STEP
  assert {'loss', 'contrastive_loss', 'grad_norm'} <= set(diag['non_finite'])
  assert diag['metrics']['loss'] == 'nan'
  assert diag['last_finite_step'] == NAN_STEP - 1
  assert np.isfinite(diag['last_finite_metrics']['loss'])
  assert _complete_steps(tmp_path) == [3]
  _assert_trees_close(_state(tmp_path, 3), _state(reference, 3))


def test_nan_skip_step_leaves_state_unchanged_and_counts(reference, tmp_path):
  """The expectation for on_nan='skip_step'.

  Steps 1..3 are the reference's. The skipped step 4 consumes its batch
  (the step counter advances, so the data stream stays aligned) but leaves
  parameters, BN statistics and optimiser state (including optax's own
  schedule count) exactly as they were after step 3. Steps 5 and 6 then
  train on from that state, so the final state legitimately differs from
  the reference: there is no uninterrupted run it should equal.
  """
  run = _run(tmp_path, f'--config.debug.inject_nan_at_step={NAN_STEP}',
             '--config.on_nan=skip_step')
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['steps'] == TOTAL and results['skipped_steps'] == 1
  before = _state(tmp_path, NAN_STEP - 1)
  after = _state(tmp_path, NAN_STEP)
  _assert_trees_close(before, _state(reference, NAN_STEP - 1))
  for key in ('params', 'batch_stats', 'opt_state'):
    _assert_trees_close(after[key], before[key])
  assert int(after['step']) == NAN_STEP
  final = _state(tmp_path, TOTAL)
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(final['params'])
  assert all(np.isfinite(x).all() for x in leaves)
  assert not np.allclose(leaves[0], jax.tree.leaves(after['params'])[0])
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = {r['step']: r for r in map(json.loads, f)}
  assert [rows[s]['skipped'] for s in range(1, TOTAL + 1)] == [
      0, 0, 0, 1, 0, 0]
  assert [rows[s]['skipped_steps'] for s in range(1, TOTAL + 1)] == [
      0, 0, 0, 1, 1, 1]


def test_resume_with_other_width_is_refused_and_more_steps_accepted(
    reference, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference, workdir)
  run = _run(workdir, '--config.model.width_multiplier=0.25')
  assert run.proc.returncode == 2, run.log[-3000:]
  last = run.log.strip().splitlines()[-1]
  assert last.startswith('error: cannot resume') and (
      'config.model.width_multiplier was 0.125 in the checkpointed run and '
      'is 0.25 now') in last, last
  assert 'Traceback' not in run.log
  # More steps and another log interval: the same run continues.
  run = _run(workdir, f'--config.train_steps={TOTAL + 2}',
             '--config.log_every_steps=2')
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['resumed_from_step'] == TOTAL
  assert results['steps'] == TOTAL + 2
  assert _complete_steps(workdir)[-1] == TOTAL + 2


# ------------------------------------------------------- corrupt images --

N_TRAIN, N_TEST = 66, 20  # 66 // 64: one step per epoch, 2 spare images.
CORRUPT_INDEX = 5


def _prepare_cifar_with_corrupt_file(data_dir) -> None:
  """A prepared TFDS 'cifar10' in data_dir whose one image file is truncated.

  This is how a bad file realistically arrives: the dataset is built from
  image files on disk, TFDS stores their bytes as they are (it does not
  decode them), and the truncation shows only when training decodes it.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  files = os.path.join(data_dir, 'raw')
  os.makedirs(files)
  rng = np.random.default_rng(0)

  def image_file(i: int) -> str:
    path = os.path.join(files, f'img_{i:03d}.png')
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = tf.io.encode_png(pixels).numpy()
    if i == CORRUPT_INDEX:
      data = data[:len(data) // 3]  # A copy cut short.
    with open(path, 'wb') as f:
      f.write(data)
    return path

  class FakeCifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = 'cifar10'
    VERSION = tfds.core.Version('3.0.2')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'id': tfds.features.Text(),
              'image': tfds.features.Image(shape=(32, 32, 3)),
              'label': tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, N_TRAIN),
              'test': self._generate_examples(1000, N_TEST)}

    def _generate_examples(self, start, n):  # pylint: disable=arguments-differ
      for i in range(start, start + n):
        yield str(i), {'id': str(i), 'image': image_file(i), 'label': i % 10}

  tfds.disable_progress_bar()
  FakeCifar10(data_dir=data_dir, file_format='tfrecord').download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=2))


@pytest.fixture(scope='module', name='corrupt_data_dir')
def _corrupt_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  _prepare_cifar_with_corrupt_file(data_dir)
  return data_dir


def _cifar_args(data_dir, on_corrupt):
  return ('--config.dataset.name=cifar10',
          f'--config.dataset.data_dir={data_dir}',
          '--config.train_steps=3', '--config.eval.knn_k=5',
          f'--config.dataset.on_corrupt={on_corrupt}')


def test_corrupt_image_skip_counts_and_finishes(corrupt_data_dir, tmp_path):
  run = _run(tmp_path, *_cifar_args(corrupt_data_dir, 'skip'))
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['steps'] == 3
  # Counted once per epoch the stream read (one step per epoch, and the
  # stream reads ahead of training), unless the shuffle put it among the 2
  # images an epoch leaves out.
  assert results['corrupt_images_skipped'] >= 1
  warnings = [line for line in run.lines
              if 'Skipped a corrupt or undecodable image' in line]
  assert warnings and re.search(r'record cifar10-train\.tfrecord-\d+-of-\d+__'
                                r'\d+', warnings[0]), warnings
  assert 'linear_probe_accuracy' in results  # Evaluation read it too.


def test_corrupt_image_fail_names_the_record(corrupt_data_dir, tmp_path):
  run = _run(tmp_path, *_cifar_args(corrupt_data_dir, 'fail'))
  assert run.proc.returncode == 2, run.log[-3000:]
  last = run.log.strip().splitlines()[-1]
  assert last.startswith('error: Corrupt or undecodable image in cifar10 '
                         "split 'train': record cifar10-train.tfrecord-"), last
  assert "config.dataset.on_corrupt='skip'" in last
  assert 'Traceback' not in run.log


def test_corrupt_image_skip_keeps_the_stream_resumable(corrupt_data_dir):
  """In-process: dropping a bad image does not shift a resumed stream.

  Corrupt images are dropped before positions in the epoch are counted, so
  batch k read from the start equals batch k of a stream started at k.
  """
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = defaults.base_config()
  c.dataset.name = 'cifar10'
  c.dataset.data_dir = corrupt_data_dir
  c.augment.backend = 'jax'
  c.batch_size = 16  # 4 steps per epoch: 64 of the 65 good images.

  def take(n, start_step=0, stats=None):
    it = pipeline.make_pretrain_iterator(
        c, process_index=0, process_count=1, start_step=start_step,
        include_index=True, stats=stats)
    return [next(it) for _ in range(n)]

  stats = {}
  full = take(8, stats=stats)
  assert 1 <= stats['corrupt_images_skipped'] <= 2
  for epoch in (full[:4], full[4:]):
    ids = np.concatenate([b['index'] for b in epoch])
    assert len(set(ids.tolist())) == 64
  for k in (1, 3, 6):
    for a, b in zip(full[k:k + 2], take(2, start_step=k)):
      assert a.keys() == b.keys() == {'images', 'labels', 'index'}
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{k} {key}')
  c.dataset.on_corrupt = 'fail'
  with pytest.raises(pipeline.DatasetError, match='record cifar10-train'):
    take(8)
