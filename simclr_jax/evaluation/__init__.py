"""Frozen-feature evaluation: linear and few-shot probes, kNN, extraction.

The pretraining job reads its representation out three ways (the README's
results.json fields): an all-label linear probe, few-shot probes (1/5/10 labels
per class, mean over seeded draws) and the InstDisc kNN monitor. It does so for
the pretrained and for a randomly initialised encoder, because on small
datasets such as digits the all-label probe is near its ceiling even at random
init and only the comparison shows what pretraining bought.
"""

from typing import Any, Sequence

import numpy as np

from simclr_jax.data.sampling import fewshot_indices
from simclr_jax.data.sampling import stratified_fraction
from simclr_jax.evaluation.features import extract_features
from simclr_jax.evaluation.features import extract_features_stream
from simclr_jax.evaluation.features import ShardedFeatures
from simclr_jax.evaluation.knn import knn_accuracy
from simclr_jax.evaluation.knn import knn_predict
from simclr_jax.evaluation.probe import fewshot_probe_accuracy
from simclr_jax.evaluation.probe import linear_probe
from simclr_jax.evaluation.probe import linear_probe_accuracy

__all__ = [
    'ShardedFeatures',
    'evaluate_features',
    'extract_features',
    'extract_features_stream',
    'fewshot_indices',
    'fewshot_probe_accuracy',
    'knn_accuracy',
    'knn_predict',
    'linear_probe',
    'linear_probe_accuracy',
    'stratified_fraction',
]


def evaluate_features(train_x: np.ndarray | ShardedFeatures,
                      train_y: np.ndarray,
                      test_x: np.ndarray | ShardedFeatures,
                      test_y: np.ndarray, *,
                      knn_k: int = 200,
                      knn_temperature: float = 0.1,
                      shots: Sequence[int] = (1, 5, 10),
                      draws: int = 10,
                      seed: int = 0,
                      num_classes: int | None = None,
                      mesh: Any = None,
                      knn_predictions: bool = False) -> dict:
  """All three read-outs of one set of frozen features.

  Args:
    train_x: (n_train, d) features of the labelled training split, whole or
      ShardedFeatures (each process holding its own rows).
    train_y: (n_train,) integer labels, the same on every process.
    test_x: (n_test, d) features of the test split, whole or
      ShardedFeatures.
    test_y: (n_test,) integer labels.
    knn_k: kNN neighbours (200 CIFAR, 20 ImageNet; docs/algorithms.md).
    knn_temperature: kNN weight temperature (0.1).
    shots: labelled examples per class for the few-shot probes.
    draws: seeded draws averaged per shot count.
    seed: seed of the rows the all-label probe holds out to choose its L2
      strength and of the first few-shot draw; use the same value for the
      pretrained and the random-init encoder so both see the same labelled
      examples.
    num_classes: kNN vote width; inferred from the labels when None.
    mesh: mesh whose 'data' axis the probes and the kNN shard the features
      over (default: all devices).
    knn_predictions: also return every test example's kNN prediction, so
      that two runs can be compared example by example.

  Returns:
    {'linear_probe_accuracy': float,
     'linear_probe_c': float (the inverse L2 strength the probe chose),
     'fewshot_probe_accuracy': {'1': float, '5': float, '10': float},
     'knn_accuracy': float}, JSON-serialisable; with knn_predictions also
    'knn_predictions': [int] in test order.
  """
  train_y = np.asarray(train_y)
  test_y = np.asarray(test_y)
  if num_classes is None:
    num_classes = int(max(train_y.max(), test_y.max())) + 1
  accuracy, c = linear_probe(train_x, train_y, test_x, test_y, seed=seed,
                             mesh=mesh)
  predictions = knn_predict(train_x, train_y, test_x, num_classes, k=knn_k,
                            temperature=knn_temperature, mesh=mesh)
  results = {
      'linear_probe_accuracy': accuracy,
      'linear_probe_c': c,
      'fewshot_probe_accuracy': fewshot_probe_accuracy(
          train_x, train_y, test_x, test_y, shots=shots, draws=draws,
          seed=seed, mesh=mesh),
      'knn_accuracy': (float(np.mean(predictions == test_y))
                       if predictions.size else float('nan')),
  }
  if knn_predictions:
    results['knn_predictions'] = predictions.tolist()
  return results
