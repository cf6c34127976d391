"""kNN monitor: representation quality during pretraining, cheaply.

Every `config.eval.eval_every_steps` steps or `eval_every_epochs` epochs
(config/durations.py) the pretraining loop featurises the
(evaluation-preprocessed, streamed) training and test splits with the current encoder
and scores the weighted kNN classifier of InstDisc on L2-normalised features
(k 200 CIFAR / 20 ImageNet, temperature 0.1; docs/algorithms.md#knn-monitor).
Unlike a linear probe it needs no training, so it can run every few epochs and
shows when a run stops improving or collapses.

Each measurement is appended to workdir/knn_monitor.jsonl (process 0), so the
history survives preemption and a resumed run reports all of it in
results.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging
from etils import epath

from simclr_jax.config import durations
from simclr_jax.evaluation import readout
from simclr_jax.runtime import paths

_FILE = 'knn_monitor.jsonl'


def interval(config: Any, steps_per_epoch: float) -> int:
  """Steps between measurements (config.eval.eval_every_steps, or
  eval_every_epochs, at least 1); 0 when the monitor is off."""
  return durations.steps(config.eval, 'eval_every', steps_per_epoch,
                         minimum=1)


def read_history(workdir: str) -> list[dict[str, Any]]:
  """All measurements so far, one per step (a re-measured step keeps the last)."""
  path = epath.Path(workdir) / _FILE
  if not path.exists():
    return []
  by_step = {}
  with path.open() as f:
    for line in f:
      line = line.strip()
      if line:
        record = json.loads(line)
        by_step[record['step']] = record
  return [by_step[s] for s in sorted(by_step)]


class KnnMonitor:
  """Measures kNN accuracy of the encoder features of a train state."""

  def __init__(self, setup: Any, workdir: str,
               eval_config: Any | None = None):
    """eval_config: whose dataset to score on (default the run's)."""
    c = setup.config if eval_config is None else eval_config
    self._config = c
    self._setup = setup
    self._workdir = workdir
    self.every = interval(c, setup.steps_per_epoch)
    self._limit = int(c.eval.monitor_max_examples) or None
    self._apply = readout.feature_fn(setup.model)

  def due(self, step: int, total_steps: int) -> bool:
    """Whether to measure after `step` (the final step is the full eval's)."""
    return bool(self.every) and step % self.every == 0 and step < total_steps

  def _features(self, variables: Any, split: str) -> readout.Labelled:
    """Features of a (capped) split, streamed: no images are kept between
    measurements, only this measurement's features, spread over the hosts
    when they exceed eval.feature_gather_max_bytes."""
    return readout.featurize_split(
        self._apply, variables, self._config, split,
        batch_size=self._config.eval.batch_size, mesh=self._setup.mesh,
        max_examples=self._limit,
        gather_max_bytes=self._config.eval.feature_gather_max_bytes)

  def measure(self, step: int, variables: Any) -> float:
    """kNN top-1 on the test split; logs it and appends it to the history."""
    c = self._config
    train = self._features(variables, c.dataset.train_split)
    test = self._features(variables, c.dataset.eval_split)
    accuracy = readout.knn_frozen(
        train, test, eval_config=c.eval,
        num_classes=int(max(train[1].max(), test[1].max())) + 1,
        mesh=self._setup.mesh)
    epoch = step / self._setup.steps_per_epoch
    logging.info('kNN monitor at step %d (epoch %.2f): top-1 %.4f', step,
                 epoch, accuracy)
    if jax.process_index() == 0:
      # A remote workdir's file is rewritten whole (paths.append_text).
      paths.append_text(os.path.join(self._workdir, _FILE),
                        json.dumps({'step': step, 'epoch': epoch,
                                    'knn_accuracy': float(accuracy)}) + '\n')
    return accuracy
