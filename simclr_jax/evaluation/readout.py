"""Featurise a train and a test split with a frozen network, then read out.

The one path from (network, variables, images) to the probe/few-shot/kNN
numbers: the main job's evaluation (pretrained and random-init encoder), the
kNN monitor during pretraining and linear_eval's fast probes all use it, so
the same images always go through the same extraction.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from simclr_jax.evaluation import features as features_lib
from simclr_jax.evaluation import knn as knn_lib

Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)


def feature_fn(model: Any, output: str = 'features') -> Callable:
  """Jitted `(variables, images) -> model output`, BN in inference mode.

  Variables are an argument, not a closed-over constant, so they are not
  baked into the compiled program and one compilation serves every state.
  """
  return jax.jit(lambda v, x: model.apply(v, x, train=False)[output])


def featurize(apply: Callable, variables: Any, splits: tuple[Arrays, ...],
              batch_size: int, mesh: Any) -> tuple[np.ndarray, ...]:
  """Features of each split's images, in order."""
  return tuple(features_lib.extract_features(apply, x, batch_size, mesh,
                                             variables=variables)
               for x, _ in splits)


def evaluate_frozen(apply: Callable, variables: Any, train: Arrays,
                    test: Arrays, *, eval_config: ml_collections.ConfigDict,
                    seed: int, mesh: Any) -> dict:
  """All-label probe, few-shot probes and kNN of frozen features."""
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  f_train, f_test = featurize(apply, variables, (train, test),
                              eval_config.batch_size, mesh)
  return evaluation.evaluate_features(
      f_train, train[1], f_test, test[1], knn_k=eval_config.knn_k,
      knn_temperature=eval_config.knn_temperature,
      shots=tuple(eval_config.fewshot_shots), draws=eval_config.fewshot_draws,
      seed=seed)


def evaluate_pixels(train: Arrays, test: Arrays, *,
                    eval_config: ml_collections.ConfigDict, seed: int) -> dict:
  """The same read-outs of the raw pixels: the baseline to beat.

  On small datasets such as digits the flattened images are a strong
  representation already (a logistic probe on 8x8 digits is near 96%), so a
  pretrained encoder is only worth its cost where it beats them.
  """
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)
  return evaluation.evaluate_features(
      flat(train[0]), train[1], flat(test[0]), test[1],
      knn_k=eval_config.knn_k, knn_temperature=eval_config.knn_temperature,
      shots=tuple(eval_config.fewshot_shots), draws=eval_config.fewshot_draws,
      seed=seed)


def prefixed(prefix: str, results: dict) -> dict:
  """results.json names of a baseline's read-outs: `prefix` + the field, with
  'linear_probe' shortened to 'probe' (random_init_probe_accuracy,
  pixel_fewshot_probe_accuracy, pixel_knn_accuracy, ...)."""
  return {prefix + k.replace('linear_probe', 'probe'): v
          for k, v in results.items()}


def knn_frozen(apply: Callable, variables: Any, train: Arrays, test: Arrays,
               *, eval_config: ml_collections.ConfigDict, num_classes: int,
               mesh: Any) -> float:
  """kNN top-1 of frozen features (the pretraining monitor)."""
  f_train, f_test = featurize(apply, variables, (train, test),
                              eval_config.batch_size, mesh)
  return float(np.asarray(knn_lib.knn_accuracy(
      f_train, train[1], f_test, test[1], num_classes=num_classes,
      k=eval_config.knn_k, temperature=eval_config.knn_temperature)))
