"""Linear and few-shot logistic-regression probes on frozen features.

The reference's linear evaluation trains a linear head with SGD for 90-100
epochs (Chen et al. 2020a, App. B.6); that is the `linear_eval` mode. The
pretraining job needs a read-out that takes seconds, so it fits an
L2-regularised multinomial logistic regression with L-BFGS on precomputed
features instead, as the SimCLR paper does for its transfer linear evaluation
(appendix B.8). The few-shot variant fits the same probe on a handful of labels
per class, which is where pretraining shows on small datasets whose all-label
probe is near its ceiling even at random init
(docs/benchmarks.md#the-main-job-on-digits).
"""

from typing import Sequence

import numpy as np
from sklearn import linear_model
from sklearn import preprocessing

from simclr_jax.data.sampling import fewshot_indices

# Inverse L2 strength of the probe. The SimCLR paper sweeps 45 values of C per
# dataset on a validation split; the monitoring probe cannot afford a sweep,
# so it uses one value. On standardised digits features (raw pixels and
# 512-d random ReLU features) test accuracy was flat, within about one point,
# for C in [0.1, 1] for the all-label and the 1/5/10-shot probes, and fell
# off from 0.01 down. 0.1 takes the more regularised end of that plateau because
# few-shot fits have far fewer examples than feature dimensions (10 vs 2048
# for 1-shot CIFAR-10 on ResNet-50), and L-BFGS converges faster there.
DEFAULT_C = 0.1
_MAX_ITER = 1000


def _fit_predict(train_x: np.ndarray, train_y: np.ndarray,
                 test_x: np.ndarray, *, seed: int, c: float) -> np.ndarray:
  """Standardise on train, fit multinomial logistic regression, predict test.

  Standardising first puts every feature on the same scale, so one C works
  across encoders whose features differ in magnitude, and L-BFGS converges
  in far fewer iterations.
  """
  scaler = preprocessing.StandardScaler().fit(train_x)
  model = linear_model.LogisticRegression(
      C=c, solver='lbfgs', max_iter=_MAX_ITER, random_state=seed)
  model.fit(scaler.transform(train_x), train_y)
  return model.predict(scaler.transform(test_x))


def _check_xy(x: np.ndarray, y: np.ndarray, name: str
              ) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64)
  y = np.asarray(y)
  if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f'{name}: need features (n, d) and labels (n,), got '
                     f'{x.shape} and {y.shape}')
  return x, y


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray,
                          test_x: np.ndarray, test_y: np.ndarray, *,
                          seed: int = 0, c: float = DEFAULT_C) -> float:
  """Test accuracy of a logistic-regression probe fitted on the train split.

  Args:
    train_x: (n_train, d) frozen features.
    train_y: (n_train,) integer labels.
    test_x: (n_test, d) frozen features.
    test_y: (n_test,) integer labels.
    seed: random_state of the classifier (L-BFGS itself is deterministic;
      fixed so that results never depend on a global RNG).
    c: inverse L2 regularisation strength (see DEFAULT_C).

  Returns:
    Fraction of test examples classified correctly.
  """
  train_x, train_y = _check_xy(train_x, train_y, 'train')
  test_x, test_y = _check_xy(test_x, test_y, 'test')
  if np.unique(train_y).size < 2:
    raise ValueError('the probe needs at least two classes in train_y')
  predictions = _fit_predict(train_x, train_y, test_x, seed=seed, c=c)
  return float(np.mean(predictions == test_y))


def fewshot_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray,
                           test_x: np.ndarray, test_y: np.ndarray,
                           shots: Sequence[int] = (1, 5, 10),
                           draws: int = 10, seed: int = 0, *,
                           c: float = DEFAULT_C) -> dict[str, float]:
  """Mean test accuracy of the probe fitted on `shots` labels per class.

  For each shot count, draw d (d = 0..draws-1) takes fewshot_indices with
  seed + d and fits linear_probe_accuracy's probe (standardisation included)
  on those examples only; the value is the mean over draws. Averaging over
  draws matters: a single 1-shot draw swings by several points.

  Args:
    train_x: (n_train, d) features to draw the labelled examples from.
    train_y: (n_train,) integer labels.
    test_x: (n_test, d) features.
    test_y: (n_test,) integer labels.
    shots: labelled examples per class, one result per value.
    draws: seeded draws averaged per shot count.
    seed: seed of draw 0.
    c: inverse L2 regularisation strength (see DEFAULT_C).

  Returns:
    {str(shot): mean accuracy}, e.g. {'1': 0.41, '5': 0.73, '10': 0.82}.
  """
  train_x, train_y = _check_xy(train_x, train_y, 'train')
  test_x, test_y = _check_xy(test_x, test_y, 'test')
  if draws < 1:
    raise ValueError(f'draws must be >= 1, got {draws}')
  results = {}
  for shot in shots:
    accuracies = []
    for d in range(draws):
      idx = fewshot_indices(train_y, shot, seed + d)
      accuracies.append(linear_probe_accuracy(
          train_x[idx], train_y[idx], test_x, test_y, seed=seed + d, c=c))
    results[str(shot)] = float(np.mean(accuracies))
  return results
