"""Weighted k-nearest-neighbour classification of frozen features.

This is the kNN monitor of InstDisc (Wu et al. 2018, Sec. 3.4) that the SimCLR
family of libraries reports (docs/algorithms.md#knn-monitor): features are
L2-normalised, each test point takes the k training points of highest cosine
similarity s, every neighbour votes for its class with weight
exp(s / temperature), and the class with the largest summed weight wins.
k = 200 (CIFAR) or 20, temperature 0.1.

It needs no training, so it is a cheap, hyperparameter-light read-out of how
well the representation clusters classes, and it shows pretraining gains
where the all-label linear probe is saturated (docs/benchmarks.md, digits).

The work runs in jax.numpy on the default device, in fixed-size chunks of
test points so that memory is bounded by batch_size x n_train similarities
and a single compilation serves every chunk.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.evaluation import features as features_lib

# Same floor as torch.nn.functional.normalize: an all-zero feature vector
# stays zero (similarity 0 to everything) instead of becoming NaN.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm, so a dot product is a cosine similarity."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_votes(train_features: jax.Array, train_labels: jax.Array,
               test_features: jax.Array, temperature: jax.Array, *, k: int,
               num_classes: int) -> jax.Array:
  """Summed exp(s / T) neighbour weights per class, shape (chunk, classes).

  train_features must already be L2-normalised (done once, outside the loop
  over chunks).
  """
  test = l2_normalize(test_features.astype(jnp.float32))
  # HIGHEST: the default float32 matmul on TPU (bf16 passes) and GPU (TF32)
  # keeps ~3 significant digits, enough to reorder close neighbours; the
  # similarities decide the output here, so they get full float32.
  sims = jnp.matmul(test, train_features.T,
                    precision=jax.lax.Precision.HIGHEST)
  top_sims, top_idx = jax.lax.top_k(sims, k)
  # exp((s - s_max) / T) is exp(s / T) up to a per-row positive factor, so
  # the argmax is unchanged, but it cannot overflow float32 for small T
  # (exp(1 / 0.01) already would).
  weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
  neighbour_labels = train_labels[top_idx]
  rows = jnp.arange(test.shape[0])[:, None]
  # Scatter-add instead of a one-hot (chunk, k, classes) tensor, which would
  # be ~800 MB per 1024-point chunk for ImageNet with k = 200.
  votes = jnp.zeros((test.shape[0], num_classes), jnp.float32)
  return votes.at[rows, neighbour_labels].add(weights)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _knn_chunk_predict(train_features: jax.Array, train_labels: jax.Array,
                       test_features: jax.Array, temperature: jax.Array, *,
                       k: int, num_classes: int) -> jax.Array:
  """Argmax of the votes on device: only (chunk,) ints cross to the host."""
  votes = _knn_votes(train_features, train_labels, test_features, temperature,
                     k=k, num_classes=num_classes)
  return jnp.argmax(votes, axis=-1)


def knn_predict(train_features: np.ndarray | jax.Array,
                train_labels: np.ndarray | jax.Array,
                test_features: np.ndarray | jax.Array,
                num_classes: int,
                k: int = 200,
                temperature: float = 0.1,
                batch_size: int = 1024) -> np.ndarray:
  """Predicted class of every test point by InstDisc-weighted kNN.

  Args:
    train_features: (n_train, d) features of the labelled reference set.
    train_labels: (n_train,) integer labels in [0, num_classes).
    test_features: (n_test, d) features to classify.
    num_classes: number of classes (the width of the vote table).
    k: neighbours per test point; clipped to n_train, so k larger than the
      training set means "every training point votes".
    temperature: weight exp(similarity / temperature); smaller is closer to
      plain nearest-neighbour voting.
    batch_size: test points per chunk; bounds device memory at
      batch_size * n_train floats for the similarity matrix.

  Returns:
    (n_test,) int32 NumPy array of predicted classes. Ties in the vote go to
    the lowest class index (argmax semantics).
  """
  train_features = jnp.asarray(train_features)
  train_labels = jnp.asarray(train_labels).astype(jnp.int32)
  test_features = np.asarray(test_features)
  n_train, n_test = train_features.shape[0], test_features.shape[0]
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError('features must be 2-D (examples, dims), got '
                     f'{train_features.shape} and {test_features.shape}')
  if train_labels.shape != (n_train,):
    raise ValueError(f'train_labels shape {train_labels.shape} does not match '
                     f'{n_train} training features')
  if n_train == 0:
    raise ValueError('kNN needs at least one training example')
  labels_np = np.asarray(train_labels)
  if labels_np.min() < 0 or labels_np.max() >= num_classes:
    # JAX drops out-of-range scatter indices silently; fail loudly instead.
    raise ValueError(f'train_labels must lie in [0, {num_classes}), got '
                     f'[{labels_np.min()}, {labels_np.max()}]')
  if k < 1 or temperature <= 0 or batch_size < 1:
    raise ValueError(f'need k >= 1, temperature > 0, batch_size >= 1; got '
                     f'k={k}, temperature={temperature}, '
                     f'batch_size={batch_size}')
  if n_test == 0:
    return np.zeros((0,), np.int32)
  k = min(k, n_train)
  train_norm = l2_normalize(train_features.astype(jnp.float32))
  temp = jnp.float32(temperature)

  chunk = min(batch_size, n_test)
  predictions = []
  for start in range(0, n_test, chunk):
    # Pad the last chunk to the common shape: one compilation for all.
    block, valid = features_lib.pad_rows(test_features[start:start + chunk],
                                         chunk)
    chunk_predictions = _knn_chunk_predict(
        train_norm, train_labels, jnp.asarray(block), temp, k=k,
        num_classes=num_classes)
    predictions.append(np.asarray(chunk_predictions)[:valid])
  return np.concatenate(predictions).astype(np.int32)


def knn_accuracy(train_features: np.ndarray | jax.Array,
                 train_labels: np.ndarray | jax.Array,
                 test_features: np.ndarray | jax.Array,
                 test_labels: np.ndarray | jax.Array,
                 num_classes: int,
                 k: int = 200,
                 temperature: float = 0.1,
                 batch_size: int = 1024) -> float:
  """Fraction of test points whose kNN prediction equals their label."""
  predictions = knn_predict(train_features, train_labels, test_features,
                            num_classes, k=k, temperature=temperature,
                            batch_size=batch_size)
  test_labels = np.asarray(test_labels)
  if test_labels.shape != predictions.shape:
    raise ValueError(f'test_labels shape {test_labels.shape} does not match '
                     f'{predictions.shape[0]} test features')
  if predictions.size == 0:
    return float('nan')
  return float(np.mean(predictions == test_labels))
