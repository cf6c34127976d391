"""The monitor: read-outs during pretraining, cheaply (the kNN monitor).

A config.evals entry with `every_steps` or `every_epochs` > 0
(config/durations.py) also runs during pretraining: at that interval the
loop featurises the (evaluation-preprocessed, streamed) training and test
splits of the entry's dataset with the current encoder, at most
eval.monitor_max_examples images each, and reads them out. The recipes'
monitor is a 'knn' entry: the weighted kNN classifier of InstDisc on
L2-normalised features (k 200 CIFAR / 20 ImageNet, temperature 0.1;
docs/algorithms.md#knn-monitor) needs no training, so it can run every few
epochs and shows when a run stops improving or collapses. The final step is
left to the end-of-run read-outs, which read the whole splits.

Each measurement is appended to workdir/knn_monitor.jsonl (process 0; the
name kept from when kNN was its only read-out), so the history survives
preemption and a resumed run reports all of it in results.json.
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
from simclr_jax.evaluation import registry
from simclr_jax.runtime import paths

_FILE = 'knn_monitor.jsonl'


def interval(entry: Any, steps_per_epoch: float) -> int:
  """Steps between an entry's measurements (its every_steps, or
  every_epochs, at least 1); 0 when it runs at the end only."""
  return durations.steps(entry, 'every', steps_per_epoch, minimum=1)


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


def scalars(results: dict) -> dict[str, float]:
  """results as metrics: nested dicts flattened with '/'
  (fewshot_probe_accuracy/1), anything but numbers left out."""
  out = {}
  for k, v in results.items():
    if isinstance(v, dict):
      out.update(scalars({f'{k}/{s}': x for s, x in v.items()}))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[k] = float(v)
  return out


class KnnMonitor:
  """Measures the periodic read-outs of the encoder of a train state."""

  def __init__(self, setup: Any, workdir: str,
               entries: list[readout.Entry] | None = None):
    """entries: the periodic config.evals entries (default: the run's)."""
    c = setup.config
    self._setup = setup
    self._workdir = workdir
    self.entries = (readout.entries(c, setup.steps_per_epoch, periodic=True)
                    if entries is None else entries)
    self._limit = int(c.eval.monitor_max_examples) or None
    self._apply = readout.feature_fn(setup.model)

  def due(self, step: int, total_steps: int) -> list[readout.Entry]:
    """The entries to measure after `step` (the final step is the full
    read-outs')."""
    if step >= total_steps:
      return []
    return [e for e in self.entries if e.every and step % e.every == 0]

  def _features(self, variables: Any, config: Any,
                split: str) -> readout.Labelled:
    """Features of a (capped) split, streamed: no images are kept between
    measurements, only this measurement's features, spread over the hosts
    when they exceed eval.feature_gather_max_bytes."""
    e = self._setup.config.eval
    return readout.featurize_split(
        self._apply, variables, config, split, batch_size=e.batch_size,
        mesh=self._setup.mesh, max_examples=self._limit,
        gather_max_bytes=e.feature_gather_max_bytes)

  def measure(self, step: int, variables: Any,
              entries: list[readout.Entry] | None = None) -> dict:
    """Reads out `entries` (default all periodic ones) on the test splits;
    logs the numbers, appends them to the history and returns them."""
    c = self._setup.config
    ctx = registry.Context(c.eval, c.seed, self._setup.mesh)
    features, out = {}, {}
    for entry in self.entries if entries is None else entries:
      if entry.dataset not in features:  # Once per dataset.
        d = entry.config.dataset
        features[entry.dataset] = [
            self._features(variables, entry.config, split)
            for split in (d.train_split, d.eval_split)]
      out.update(registry.named(entry.name, entry.type.fn(
          *features[entry.dataset], ctx)))
    out = scalars(out)
    epoch = step / self._setup.steps_per_epoch
    logging.info('Monitor at step %d (epoch %.2f): %s', step, epoch,
                 ', '.join(f'{k} {v:.4f}' for k, v in out.items()))
    if jax.process_index() == 0:
      # A remote workdir's file is rewritten whole (paths.append_text).
      paths.append_text(os.path.join(self._workdir, _FILE),
                        json.dumps({'step': step, 'epoch': epoch, **out})
                        + '\n')
    return out
