"""The kNN monitor runs during pretraining and measures what it should."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np

from simclr_jax.config import defaults
from simclr_jax.evaluation import knn_monitor
from simclr_jax.training import pretrain as train
from simclr_jax.training import state as state_lib
from simclr_jax.data import pipeline


def _config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 4
  c.optim.warmup_epochs = 0.1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.eval.knn_k = 7
  c.eval.knn_temperature = 0.1
  c.eval.monitor_max_examples = 256
  c.evals.random_init.enabled = False
  return c


def _numpy_knn_accuracy(train_f, train_y, test_f, test_y, k, temperature,
                        num_classes):
  """InstDisc weighted kNN (Wu et al. 2018, Sec. 3.4), written out directly."""
  a = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  b = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  correct = 0
  for i in range(len(b)):
    sims = a @ b[i]
    nearest = np.argsort(-sims, kind='stable')[:k]
    votes = np.zeros(num_classes)
    for j in nearest:
      votes[train_y[j]] += np.exp(sims[j] / temperature)
    correct += int(np.argmax(votes) == test_y[i])
  return correct / len(b)


def _every(every_epochs, steps_per_epoch, every_steps=0):
  knn = defaults.base_config().evals.knn
  knn.every_epochs = float(every_epochs)
  knn.every_steps = every_steps
  return knn_monitor.interval(knn, steps_per_epoch)


def test_every_steps():
  assert _every(0, 22) == 0
  assert _every(1, 22) == 22
  assert _every(0.5, 22) == 11
  assert _every(0.01, 22) == 1


def test_monitor_during_pretraining_matches_numpy_knn(tmp_path):
  c = _config()
  spe = 1437 // 64  # digits train split / batch.
  c.evals.knn.every_epochs = 2 / spe  # every 2 steps: measured at step 2.
  workdir = str(tmp_path / 'run')
  setup = train.build(c)
  out = train.pretrain(c, workdir, setup)
  history = out['knn_monitor']
  assert [h['step'] for h in history] == [2]  # The final step is the full eval's.
  assert 0.0 <= history[0]['knn_accuracy'] <= 1.0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert any('knn_accuracy' in r and r['step'] == 2 for r in logged)

  # Measured on the final state, the monitor equals a direct NumPy kNN over
  # features of model.apply on the same (capped) evaluation arrays.
  state = out['state']
  monitor = knn_monitor.KnnMonitor(setup, workdir)
  measured = monitor.measure(4, state_lib.variables_of(state))['knn_accuracy']
  variables = jax.device_get({'params': state.params,
                              'batch_stats': state.batch_stats})
  train_x, train_y = pipeline.load_eval_arrays(c, 'train', max_examples=256)
  test_x, test_y = pipeline.load_eval_arrays(c, 'test', max_examples=256)
  feats = [np.asarray(setup.model.apply(variables, x, train=False)['features'])
           for x in (train_x, test_x)]
  expected = _numpy_knn_accuracy(feats[0], train_y, feats[1], test_y, k=7,
                                 temperature=0.1, num_classes=10)
  assert abs(measured - expected) <= 1 / 256 + 1e-9  # at most one float tie
  assert [h['step'] for h in knn_monitor.read_history(workdir)] == [2, 4]

  # Any read-out of the encoder can run during pretraining, on the same
  # features: a few-shot entry's numbers go into the history flattened.
  c = copy.deepcopy(setup.config)
  c.evals.fewshot_probe.every_steps = 2
  c.eval.fewshot_shots, c.eval.fewshot_draws = (1,), 1
  other = str(tmp_path / 'other')
  os.makedirs(other)
  monitor = knn_monitor.KnnMonitor(dataclasses.replace(setup, config=c),
                                   other)
  assert [e.name for e in monitor.entries] == ['fewshot_probe', 'knn']
  assert [e.name for e in monitor.due(2, 4)] == ['fewshot_probe', 'knn']
  assert monitor.due(4, 4) == [] and monitor.due(3, 4) == []
  both = monitor.measure(2, state_lib.variables_of(state))
  assert set(both) == {'fewshot_probe_accuracy/1', 'knn_accuracy'}
  assert both['knn_accuracy'] == measured
  assert knn_monitor.read_history(other) == [
      {'step': 2, 'epoch': 2 / spe, **both}]
