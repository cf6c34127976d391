"""Read-out types: what the `type` of a config.evals entry can name.

A read-out is a function of the frozen (features, labels) of a train and a
test split that returns a dict; an entry named `name` writes each of its
fields `k` to results.json as `{name}_{k}` (the probe's 'accuracy' and
'c' as linear_probe_accuracy and linear_probe_c). `features` says whose
features it reads: the pretrained encoder's, or those of a baseline, the
same network at random init or the raw pixels (training/evals.py computes
them). Each set of features is computed once per dataset, however many
entries read it.

A new read-out of the encoder is one function and one line in TYPES;
nothing in the training code changes (docs/architecture.md#a-new-read-out).
"""

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from simclr_jax.evaluation import features as features_lib
from simclr_jax.evaluation import knn as knn_lib
from simclr_jax.evaluation import probe as probe_lib
from simclr_jax.runtime.config_checks import ConfigError

# (features or images, labels); features may be ShardedFeatures.
Labelled = tuple[np.ndarray | features_lib.ShardedFeatures, np.ndarray]
# Whose features a read-out reads (training/evals.py computes each).
FEATURES = ('encoder', 'random_init', 'pixels')


@dataclasses.dataclass(frozen=True)
class Context:
  """What every read-out may use besides the features.

  eval_config: config.eval, the settings the read-outs share (knn_k,
  fewshot_shots, ...). seed: the run's; the pretrained encoder and its
  baselines use the same one, so they see the same labelled examples.
  record_predictions: also return per-example predictions where a read-out
  has them (debug.record_knn_predictions; the encoder's read-outs only).
  """
  eval_config: ml_collections.ConfigDict
  seed: int
  mesh: Any = None
  record_predictions: bool = False


ReadOut = Callable[[Labelled, Labelled, Context], dict]


@dataclasses.dataclass(frozen=True)
class ReadoutType:
  fn: ReadOut
  features: str = 'encoder'


def _labels(train: Labelled, test: Labelled) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(train[1]), np.asarray(test[1])


def probe(train: Labelled, test: Labelled, ctx: Context) -> dict:
  """The all-label logistic probe; 'c' is the inverse L2 strength it chose
  on held-out training rows (evaluation/probe.py)."""
  train_y, test_y = _labels(train, test)
  accuracy, c = probe_lib.linear_probe(train[0], train_y, test[0], test_y,
                                       seed=ctx.seed, mesh=ctx.mesh)
  return {'accuracy': accuracy, 'c': c}


def fewshot(train: Labelled, test: Labelled, ctx: Context) -> dict:
  """Probes on eval.fewshot_shots labels per class, each the mean over
  eval.fewshot_draws seeded draws: {'accuracy': {'1': ..., '5': ...}}."""
  train_y, test_y = _labels(train, test)
  e = ctx.eval_config
  return {'accuracy': probe_lib.fewshot_probe_accuracy(
      train[0], train_y, test[0], test_y, shots=tuple(e.fewshot_shots),
      draws=e.fewshot_draws, seed=ctx.seed, mesh=ctx.mesh)}


def knn(train: Labelled, test: Labelled, ctx: Context) -> dict:
  """InstDisc's weighted kNN (docs/algorithms.md#knn-monitor)."""
  train_y, test_y = _labels(train, test)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  predictions = knn_lib.knn_predict(
      train[0], train_y, test[0], num_classes, k=ctx.eval_config.knn_k,
      temperature=ctx.eval_config.knn_temperature, mesh=ctx.mesh)
  out = {'accuracy': (float(np.mean(predictions == test_y))
                      if predictions.size else float('nan'))}
  if ctx.record_predictions:
    out['predictions'] = predictions.tolist()
  return out


# The read-outs of a baseline, as (name within it, type): a baseline entry
# `pixel` writes pixel_probe_accuracy, pixel_fewshot_probe_accuracy,
# pixel_knn_accuracy, ...
BASELINE_READOUTS = (('probe', 'probe'), ('fewshot_probe', 'fewshot'),
                     ('knn', 'knn'))


def baseline(train: Labelled, test: Labelled, ctx: Context) -> dict:
  """The encoder's three read-outs of a baseline's features, so the
  numbers compare one to one."""
  out = {}
  for name, kind in BASELINE_READOUTS:
    out.update(named(name, TYPES[kind].fn(train, test, ctx)))
  return out


def named(name: str, results: dict) -> dict:
  """results.json keys of an entry's results: `{name}_{field}`."""
  return {f'{name}_{k}': v for k, v in results.items()}


TYPES: dict[str, ReadoutType] = {
    'probe': ReadoutType(probe),
    'fewshot': ReadoutType(fewshot),
    'knn': ReadoutType(knn),
    'random_init': ReadoutType(baseline, features='random_init'),
    'pixels': ReadoutType(baseline, features='pixels'),
}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an enabled config.evals entry whose type is not
  in TYPES, or that asks a baseline to run during pretraining (its
  features do not change). The rest of an entry is checked with the config
  (config/validation.py), which sits below this registry."""
  for name, entry in config.evals.items():
    if not entry.get('enabled', True):
      continue
    kind = entry.type
    if kind not in TYPES:
      raise ConfigError(f'config.evals.{name}.type={kind!r} is invalid: '
                        f'choose one of {", ".join(TYPES)}')
    for field in ('every_steps', 'every_epochs'):
      if entry.get(field, 0) and TYPES[kind].features != 'encoder':
        raise ConfigError(
            f'config.evals.{name}.{field}={entry[field]!r} is invalid: the '
            f'{kind!r} baseline does not change during pretraining; set it '
            'to 0')
