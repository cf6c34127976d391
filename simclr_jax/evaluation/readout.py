"""Featurise a train and a test split with a frozen network, then read out.

The one path from (network, variables, split) to the probe/few-shot/kNN
numbers: the read-outs config.evals declares (at the end of pretraining and,
as the kNN monitor, during it) and linear_eval's fast probes all use it, so
the same images always go through the same extraction. `entries` reads
config.evals.

Splits are read as a stream of bounded chunks (data.pipeline.eval_batches)
and only their features are kept: host memory grows with the features of a
split, never with its images (ImageNet's 1.28M training images would be
~600 GB as float32). Features larger than eval.feature_gather_max_bytes stay
spread over the hosts, each holding its own rows, and the kNN and the probes
read them from there (features.ShardedFeatures).
"""

import dataclasses
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from simclr_jax.evaluation import features as features_lib
from simclr_jax.evaluation import registry
from simclr_jax.runtime import durations

Labelled = registry.Labelled


def feature_fn(model: Any, output: str = 'features') -> Callable:
  """Jitted `(variables, images) -> model output`, BN in inference mode.

  Variables are an argument, not a closed-over constant, so they are not
  baked into the compiled program and one compilation serves every state.
  """
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[output])


def featurize_split(apply: Callable, variables: Any,
                    config: ml_collections.ConfigDict, split: str, *,
                    batch_size: int, mesh: Any,
                    max_examples: int | None = None,
                    gather_max_bytes: int | None = None) -> Labelled:
  """(features, labels) of a split, read batch_size images at a time.

  The images come from data.pipeline.eval_batches in split order, so row i
  of the features is example i of the split (what methods featurising the
  train split index by). Features over `gather_max_bytes` come back as
  ShardedFeatures (None: always a whole array, for callers that index
  it on the host).
  """
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  size = int(config.dataset.image_size)
  chunks = pipeline.eval_batches(config, split, batch_size,
                                 max_examples=max_examples)
  features, labels = features_lib.extract_features_stream(
      apply, chunks, batch_size, mesh, variables=variables,
      example_shape=(size, size, 3), gather_max_bytes=gather_max_bytes)
  return features, labels


def bytes_per_process(features: np.ndarray | features_lib.ShardedFeatures
                      ) -> list[int]:
  """Bytes of `features` each process holds, in process order.

  A collective when there are several processes: every process calls it.
  """
  local = int(features.nbytes)
  if jax.process_count() == 1:
    return [local]
  everyone = multihost_utils.process_allgather(np.int64(local))
  return [int(b) for b in np.asarray(everyone).reshape(-1)]


def evaluate_frozen(train: Labelled, test: Labelled, *,
                    eval_config: ml_collections.ConfigDict, seed: int,
                    mesh: Any = None, knn_predictions: bool = False) -> dict:
  """All-label probe, few-shot probes and kNN of frozen (features, labels);
  with knn_predictions, also every test example's kNN prediction."""
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.evaluate_features(
      train[0], train[1], test[0], test[1], knn_k=eval_config.knn_k,
      knn_temperature=eval_config.knn_temperature,
      shots=tuple(eval_config.fewshot_shots), draws=eval_config.fewshot_draws,
      seed=seed, mesh=mesh, knn_predictions=knn_predictions)


def sample_pixels(config: ml_collections.ConfigDict, split: str, *,
                  max_examples: int, seed: int, batch_size: int) -> Labelled:
  """Flattened eval images of a split: the pixel baseline's features.

  With max_examples 0 (the default eval.pixel_max_examples) the whole split,
  the images the encoder is read out on. A positive max_examples smaller
  than the split keeps a seeded uniform subsample without replacement, in
  split order; only the kept rows are held. A grey dataset (its source's
  `grey`) gives one channel, each pixel once.
  """
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = datasets.source_for(config)
  n = source.split_size(split)
  channels = slice(0, 1) if source.grey else slice(None)
  keep = None
  if 0 < max_examples < n:
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, max_examples,
                                            replace=False)] = True
  xs, ys, start = [], [], 0
  for x, y in pipeline.eval_batches(config, split, batch_size):
    rows = slice(None) if keep is None else keep[start:start + len(y)]
    start += len(y)
    x = np.asarray(x, np.float32)[rows][..., channels]
    xs.append(x.reshape(len(x), int(np.prod(x.shape[1:]))))
    ys.append(np.asarray(y, np.int32)[rows])
  if not xs:
    size = int(config.dataset.image_size)
    return (np.zeros((0, size * size * (1 if source.grey else 3)), np.float32),
            np.zeros(0, np.int32))
  return np.concatenate(xs), np.concatenate(ys)


def evaluate_pixels(train: Labelled, test: Labelled, *,
                    eval_config: ml_collections.ConfigDict, seed: int,
                    mesh: Any = None) -> dict:
  """The same read-outs of the raw pixels: the baseline to beat.

  On small datasets such as digits the flattened images are a strong
  representation already (a logistic probe on 8x8 digits is near 96%), so a
  pretrained encoder is only worth its cost where it beats them. Images are
  flattened here if they are not already (`sample_pixels` gives them flat).
  """
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
  return evaluation.evaluate_features(
      flat(train[0]), train[1], flat(test[0]), test[1],
      knn_k=eval_config.knn_k, knn_temperature=eval_config.knn_temperature,
      shots=tuple(eval_config.fewshot_shots), draws=eval_config.fewshot_draws,
      seed=seed, mesh=mesh)


def prefixed(prefix: str, results: dict) -> dict:
  """`evaluate_pixels`' results as a baseline's names: `prefix` + the field,
  with 'linear_probe' shortened to 'probe' (pixel_probe_accuracy,
  pixel_fewshot_probe_accuracy, ...), the names the runs' baseline entries
  write (registry.BASELINE_READOUTS)."""
  return {prefix + k.replace('linear_probe', 'probe'): v
          for k, v in results.items()}


@dataclasses.dataclass(frozen=True)
class Entry:
  """A config.evals entry as the run reads it.

  config: the run's config with the entry's dataset (its `dataset` fields
  replacing config.dataset's, splits resolved). dataset: the fields it
  overrides (() = the pretraining dataset); entries with the same ones
  share their features. every: steps between its measurements during
  pretraining, 0 = at the end of the run only.
  """
  name: str
  type: registry.ReadoutType
  config: ml_collections.ConfigDict
  dataset: tuple[tuple[str, str], ...]
  every: int


def entries(config: ml_collections.ConfigDict, steps_per_epoch: float, *,
            periodic: bool = False) -> list[Entry]:
  """The enabled entries of config.evals (periodic: only those with an
  interval), each with the config of the dataset it reads."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  out = []
  for name, e in config.evals.items():
    every = durations.steps(e, 'every', steps_per_epoch, minimum=1)
    if not e.get('enabled', True) or (periodic and not every):
      continue
    key = datasets.overridden(e.get('dataset'))
    ec = (datasets.with_overrides(config, e.dataset, resolve_splits=True)
          if key else config)
    out.append(Entry(name, registry.TYPES[e.type], ec, key, every))
  return out
