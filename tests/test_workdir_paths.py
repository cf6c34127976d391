"""Workdir I/O on a remote (gs://) path, offline.

A fake `gs://` backend for etils.epath maps gs://BUCKET/... to a local
directory and, like GCS, refuses to append to an object. The workdir helpers
must write there (and not into a local 'gs:' directory, which os.makedirs
would create) without any network access. Orbax's array I/O (tensorstore)
cannot be faked this way, so the checkpointer is checked for keeping the URI
unmangled, and saves and restores on a local path.
"""
# pylint: disable=protected-access

import json
import os
import sys
import subprocess

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from simclr_jax.runtime import checkpointing
from simclr_jax.config import defaults
from simclr_jax.evaluation import embedding
from simclr_jax.evaluation import knn_monitor
from simclr_jax.runtime import metric_writer
from simclr_jax.runtime import paths
from simclr_jax.runtime import results as results_lib
from simclr_jax.training import workdir as workdir_lib
from simclr_jax.training import loop
from simclr_jax.training import pretrain as train
from simclr_jax.config.validation import ConfigError
from simclr_jax.export import flax_artifact
from simclr_jax.export import run as export_run


class _FakeGcs(epath_backend._OsPathBackend):
  """gs://... on a local root; objects cannot be opened for appending."""

  def __init__(self, root):
    self.root = root
    self.opened = []

  def _local(self, path):
    path = os.fspath(path)
    if path.startswith('gs://'):
      return os.path.join(self.root, path[len('gs://'):])
    return path

  def open(self, path, mode):
    if 'a' in mode:
      raise OSError('GCS objects cannot be appended to')
    self.opened.append((os.fspath(path), mode))
    return super().open(self._local(path), mode)

  def exists(self, path):
    return super().exists(self._local(path))

  def isdir(self, path):
    return super().isdir(self._local(path))

  def listdir(self, path):
    return super().listdir(self._local(path))

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self._local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self._local(path), exist_ok=exist_ok)

  def remove(self, path):
    return super().remove(self._local(path))

  def rename(self, path, dst):
    return super().rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    return super().replace(self._local(path), self._local(dst))

  def copy(self, path, dst, overwrite):
    return super().copy(self._local(path), self._local(dst),
                        overwrite=overwrite)

  def stat(self, path):
    return super().stat(self._local(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """Installs the fake backend; cwd is tmp_path, to catch local 'gs:' dirs."""
  fake = _FakeGcs(str(tmp_path / 'bucket_store'))
  os.makedirs(fake.root)
  monkeypatch.setattr(gpath, '_PREFIX_TO_BACKEND',
                      dict(gpath._PREFIX_TO_BACKEND, gs=fake))
  monkeypatch.setattr(gpath, '_GCS_BACKENDS', frozenset({fake}))
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  monkeypatch.chdir(tmp_path)
  yield fake
  assert not os.path.exists(tmp_path / 'gs:'), 'wrote a local gs: directory'


def _read_lines(fake, rel):
  with open(os.path.join(fake.root, rel)) as f:
    return [json.loads(line) for line in f]


def _config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  return c


def test_paths_helpers():
  assert paths.is_local('/tmp/x') and paths.is_local('rel/x')
  assert not paths.is_local('gs://b/x')
  assert not paths.is_local(epath.Path('gs://b/x'))
  assert paths.abspath('gs://b/x') == 'gs://b/x'
  assert paths.abspath('rel') == os.path.abspath('rel')


def test_prepare_workdir_and_config_json(gcs):
  workdir = 'gs://bucket/run'
  train.prepare_workdir(workdir)
  local = os.path.join(gcs.root, 'bucket', 'run')
  assert os.path.isdir(local) and not os.listdir(local)  # Probe removed.
  c = _config()
  train.check_resume_compatible(workdir, c)
  with open(os.path.join(local, 'config.json')) as f:
    assert json.load(f)['model']['width_multiplier'] == 0.125
  assert os.listdir(local) == ['config.json']
  train.check_resume_compatible(workdir, c)  # Same shapes: resumable.
  c.model.width_multiplier = 0.25
  with pytest.raises(ConfigError, match='model.width_multiplier was 0.125'):
    train.check_resume_compatible(workdir, c)


def test_metric_writer_rewrites_instead_of_appending(gcs, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorboard', None)  # No TF summaries.
  workdir = 'gs://bucket/run'
  train.prepare_workdir(workdir)
  writer = metric_writer.MetricWriter(workdir, enabled=True)
  writer.write(1, {'loss': 2.0})
  writer.write(2, {'loss': 1.5})
  assert [r['step'] for r in _read_lines(gcs, 'bucket/run/metrics.jsonl')
          ] == [1, 2]  # Durable after each write, before close.
  writer.close()
  # A run killed after step 3 resumes from a checkpoint at step 2.
  writer = metric_writer.MetricWriter(workdir, enabled=True)
  writer.write(3, {'loss': 1.0})
  writer.close()
  loop.truncate_metrics_log(workdir, 2)
  assert [r['step'] for r in _read_lines(gcs, 'bucket/run/metrics.jsonl')
          ] == [1, 2]
  writer = metric_writer.MetricWriter(workdir, enabled=True)
  writer.write(3, {'loss': 0.5})
  writer.close()
  rows = _read_lines(gcs, 'bucket/run/metrics.jsonl')
  assert [(r['step'], r['loss']) for r in rows] == [(1, 2.0), (2, 1.5),
                                                     (3, 0.5)]


def test_progress_line_shows_acc_only_when_the_method_reports_it():
  spec = loop.LoopSpec(name='pretrain', step_fn=None, batches=None,
                       total_steps=936, steps_per_epoch=234.0, batch_size=256,
                       rng=None, mesh=None, accuracy_key='contrastive_acc')
  scalars = dict(epoch=100 / 234, loss=7.49191, learning_rate=0.84617,
                 examples_per_sec=154.93)
  without = loop.progress_line(spec, 100, scalars, 1381.0)
  assert without == ('pretrain step 100/936  epoch 0.4  loss 7.4919  '
                     'lr 0.8462  154.9 img/s  ETA 0:23:01')
  with_acc = loop.progress_line(spec, 100, dict(scalars, contrastive_acc=0.5),
                                1381.0)
  assert with_acc == without.replace('lr ', 'acc 0.500  lr ')


def test_results_nan_diagnostic_and_knn_history(gcs):
  workdir = 'gs://bucket/run'
  train.prepare_workdir(workdir)
  path = results_lib.write_results(workdir, {'top1': np.float32(0.5),
                                             'bad': float('nan')})
  assert path == 'gs://bucket/run/results.json'
  with open(os.path.join(gcs.root, 'bucket/run/results.json')) as f:
    assert json.load(f) == {'top1': 0.5, 'bad': None}
  seen = {'bad_metrics': {'loss': float('nan')}, 'first_bad_step': 3,
          'last_finite_step': 2, 'last_finite_metrics': {'loss': 1.0}}
  path, bad = loop._write_nan_diagnostic(workdir, seen)
  assert bad == ['loss'] and path.startswith('gs://')
  with open(os.path.join(gcs.root, 'bucket/run/nan_diagnostic.json')) as f:
    assert json.load(f)['step'] == 3
  assert knn_monitor.read_history(workdir) == []
  target = os.path.join(workdir, knn_monitor._FILE)
  for step, acc in ((10, 0.2), (20, 0.4), (20, 0.5)):
    paths.append_text(target, json.dumps({'step': step,
                                          'knn_accuracy': acc}) + '\n')
  assert knn_monitor.read_history(workdir) == [
      {'step': 10, 'knn_accuracy': 0.2}, {'step': 20, 'knn_accuracy': 0.5}]


def test_downstream_helpers(gcs):
  workdir = 'gs://bucket/down'
  train.prepare_workdir(workdir)
  # A downstream run records its config on gs:// like pretraining does, and
  # a workdir holding another mode's run is refused there too.
  c = defaults.base_config()
  workdir_lib.check_and_record(workdir, c, ('model.depth',))
  c.downstream = {'mode': 'finetune'}
  with pytest.raises(ConfigError, match='holds a pretrain run and this is a '
                     'finetune run'):
    workdir_lib.check_and_record(workdir, c, ('model.depth',))
  with pytest.raises(FileNotFoundError, match='gs://bucket/none'):
    checkpointing.load_run('gs://bucket/none')
  with pytest.raises(FileNotFoundError, match='gs://bucket/none/checkpoints'):
    checkpointing.restore_raw('gs://bucket/none/checkpoints')
  png = embedding.plot_embedding(np.zeros((4, 2)), np.arange(4),
                                 'gs://bucket/down/e.png', 'title')
  assert png == 'gs://bucket/down/e.png'
  with open(os.path.join(gcs.root, 'bucket/down/e.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_export_files(gcs):
  encoder = {'params': {'conv': {'kernel': np.ones((3, 3, 3, 4), np.float32)}},
             'batch_stats': {}}
  config = dict(depth=18, width_multiplier=0.125, sk_ratio=0.0,
                cifar_stem=True)
  paths_ = flax_artifact.save('gs://bucket/exp/flax', config, encoder, None,
                              None, {'init_from': 'gs://bucket/run'})
  assert paths_['model_json'] == 'gs://bucket/exp/flax/model.json'
  meta, tree = flax_artifact.load('gs://bucket/exp')
  assert meta['source'] == {'init_from': 'gs://bucket/run'}
  np.testing.assert_array_equal(
      tree['encoder']['params']['conv']['kernel'], np.ones((3, 3, 3, 4)))
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  export_run.save_safetensors('gs://bucket/exp/w.safetensors',
                              {'w': np.arange(3, dtype=np.float32)}, {})
  loaded = load_file(os.path.join(gcs.root, 'bucket/exp/w.safetensors'))
  np.testing.assert_array_equal(loaded['w'], np.arange(3))


def test_checkpointer_keeps_remote_uri(monkeypatch):
  made = []

  class _Manager:

    def __init__(self, directory, **kwargs):
      del kwargs
      made.append(directory)

  monkeypatch.setattr(checkpointing.ocp, 'CheckpointManager', _Manager)
  ckpt = checkpointing.Checkpointer('gs://bucket/run/checkpoints')
  assert ckpt.directory == 'gs://bucket/run/checkpoints'
  assert made == ['gs://bucket/run/checkpoints']
  ckpt = checkpointing.Checkpointer('rel/checkpoints')
  assert ckpt.directory == os.path.abspath('rel/checkpoints')


def test_checkpointer_local_save_restore(tmp_path):
  state = {'w': jax.numpy.arange(4.0), 'b': jax.numpy.ones((2,))}
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  assert ckpt.save(3, state, {'epoch': 1}, force=True)
  ckpt.close()
  ckpt = checkpointing.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  assert ckpt.latest_step() == 3
  restored, position, step = ckpt.restore(state)
  ckpt.close()
  assert step == 3 and position == {'epoch': 1}
  jax.tree.map(np.testing.assert_array_equal, state, restored)
  raw, step = checkpointing.restore_raw(str(tmp_path / 'ckpt'))
  assert step == 3
  np.testing.assert_array_equal(raw['w'], np.arange(4.0))


def test_tensorboard_curves_without_tensorflow(tmp_path):
  """The event files come from tensorboard's own writer: a process where
  TensorFlow cannot be imported still writes curves TensorBoard reads."""
  block = tmp_path / 'block'
  (block / 'tensorflow').mkdir(parents=True)
  (block / 'tensorflow' / '__init__.py').write_text(
      'raise ImportError("blocked")\n')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  code = ('import sys\n'
          'from simclr_jax.runtime import metric_writer\n'
          f'w = metric_writer.MetricWriter({str(workdir)!r}, enabled=True)\n'
          'w.write(1, {"loss": 2.5, "lr": 0.1})\n'
          'w.write(2, {"loss": 1.25, "lr": 0.2})\n'
          'w.close()\n'
          'assert "tensorflow" not in sys.modules or '
          'sys.modules["tensorflow"] is None\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, '-c', code], capture_output=True,
                     text=True, cwd=root,
                     env=dict(os.environ, PYTHONPATH=f'{block}:{root}'))
  assert r.returncode == 0, r.stderr[-2000:]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
  acc.Reload()
  assert sorted(acc.Tags()['scalars']) == ['loss', 'lr']
  assert [(e.step, e.value) for e in acc.Scalars('loss')] == [(1, 2.5),
                                                              (2, 1.25)]
  assert [e.value for e in acc.Scalars('lr')] == pytest.approx([0.1, 0.2])
