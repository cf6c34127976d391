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

The training features are sharded over the devices of the mesh's 'data'
axis and the test points go to every device in fixed-size chunks; each
device ranks its own rows and the per-device top k are merged. Device memory
is then bounded by its share of the features plus batch_size x n_train /
devices similarities, a single compilation serves every chunk, and the
predictions are those of one device holding everything, ties included.
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np

from simclr_jax.evaluation import features as features_lib
from simclr_jax.runtime import parallel
from simclr_jax.runtime.parallel import DATA_AXIS

# Same floor as torch.nn.functional.normalize: an all-zero feature vector
# stays zero (similarity 0 to everything) instead of becoming NaN.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm, so a dot product is a cosine similarity."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


# Jitted so a sharded input stays sharded row-wise (no gather to one device).
_normalize = jax.jit(lambda x: l2_normalize(x.astype(jnp.float32)))


def _local_top_k(train_features: jax.Array, train_labels: jax.Array,
                 test: jax.Array, *, k: int, n_train: int
                 ) -> tuple[jax.Array, jax.Array]:
  """One shard's k most similar training points: (similarities, labels).

  Runs inside shard_map on this device's rows of the training features.
  Rows past n_train are the padding that makes the shards equal; they get
  similarity -inf, so they are never chosen while a real row is left.
  """
  # HIGHEST: the default float32 matmul on TPU (bf16 passes) and GPU (TF32)
  # keeps ~3 significant digits, enough to reorder close neighbours; the
  # similarities decide the output here, so they get full float32.
  sims = jnp.matmul(test, train_features.T,
                    precision=jax.lax.Precision.HIGHEST)
  n_local = train_features.shape[0]
  rows = jax.lax.axis_index(DATA_AXIS) * n_local + jnp.arange(n_local)
  sims = jnp.where(rows[None, :] < n_train, sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, min(k, n_local))
  return top_sims, train_labels[top_idx]


@functools.partial(jax.jit,
                   static_argnames=('k', 'num_classes', 'n_train', 'mesh'))
def _knn_chunk_predict(train_features: jax.Array, train_labels: jax.Array,
                       test_features: jax.Array, temperature: jax.Array, *,
                       k: int, num_classes: int, n_train: int,
                       mesh: Mesh) -> jax.Array:
  """Predicted classes of a replicated chunk of test points, shape (chunk,).

  train_features (L2-normalised once, outside the loop over chunks) and
  train_labels are sharded over the mesh's 'data' axis, so no device holds
  more than its share of the training set. Each device takes the top k of
  its own rows; the shards' candidates are gathered (devices x k per test
  point, small) and the global top k taken from them.

  That is exactly the single-device top k, ties included: lax.top_k puts
  the lower index first among equal values, each shard's list is in that
  order, and the gathered lists are concatenated in shard order, which is
  the order of the global row index. Only (chunk,) ints cross to the host.
  """

  def per_device(train_f, train_y, test_f, temp):
    test = l2_normalize(test_f.astype(jnp.float32))
    local_sims, local_labels = _local_top_k(train_f, train_y, test, k=k,
                                            n_train=n_train)
    gather = lambda x: jax.lax.all_gather(x, DATA_AXIS, axis=1, tiled=True)
    top_sims, pos = jax.lax.top_k(gather(local_sims), k)
    neighbour_labels = jnp.take_along_axis(gather(local_labels), pos, axis=1)
    # exp((s - s_max) / T) is exp(s / T) up to a per-row positive factor, so
    # the argmax is unchanged, but it cannot overflow float32 for small T
    # (exp(1 / 0.01) already would).
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temp)
    rows = jnp.arange(test.shape[0])[:, None]
    # Scatter-add instead of a one-hot (chunk, k, classes) tensor, which
    # would be ~800 MB per 1024-point chunk for ImageNet with k = 200.
    votes = jnp.zeros((test.shape[0], num_classes), jnp.float32)
    votes = votes.at[rows, neighbour_labels].add(weights)
    return jnp.argmax(votes, axis=-1)

  return jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()), out_specs=P(),
      check_vma=False)(train_features, train_labels, test_features,
                       temperature)


def knn_predict(train_features: np.ndarray | jax.Array,
                train_labels: np.ndarray | jax.Array,
                test_features: np.ndarray | jax.Array,
                num_classes: int,
                k: int = 200,
                temperature: float = 0.1,
                batch_size: int = 1024,
                mesh: Mesh | None = None) -> np.ndarray:
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
      batch_size * n_train / devices floats for the similarity matrix.
    mesh: mesh with a 'data' axis; the training features are sharded over
      it (ImageNet's 1.28M x 2048 float32 features are 10 GB, too much for
      one device next to the similarities). Default: all devices.

  Returns:
    (n_test,) int32 NumPy array of predicted classes, the same whatever the
    number of devices. Among equally similar training points the lower row
    wins a top-k place; ties in the vote go to the lowest class index
    (argmax semantics).
  """
  train_features = np.asarray(train_features)
  labels_np = np.asarray(train_labels).astype(np.int32)
  test_features = np.asarray(test_features)
  n_train, n_test = train_features.shape[0], test_features.shape[0]
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError('features must be 2-D (examples, dims), got '
                     f'{train_features.shape} and {test_features.shape}')
  if labels_np.shape != (n_train,):
    raise ValueError(f'train_labels shape {labels_np.shape} does not match '
                     f'{n_train} training features')
  if n_train == 0:
    raise ValueError('kNN needs at least one training example')
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
  mesh = parallel.make_mesh() if mesh is None else mesh
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f'mesh needs a {DATA_AXIS!r} axis, got '
                     f'{mesh.axis_names}')
  k = min(k, n_train)
  shards = mesh.shape[DATA_AXIS]
  rows = -(-n_train // shards) * shards  # Equal shards; padding is masked.
  train_features, _ = features_lib.pad_rows(
      train_features.astype(np.float32), rows)
  labels_np, _ = features_lib.pad_rows(labels_np, rows)
  train_norm = _normalize(
      features_lib.on_mesh(train_features, mesh, P(DATA_AXIS)))
  train_y = features_lib.on_mesh(labels_np, mesh, P(DATA_AXIS))
  temp = jnp.float32(temperature)

  chunk = min(batch_size, n_test)
  predictions = []
  for start in range(0, n_test, chunk):
    # Pad the last chunk to the common shape: one compilation for all.
    block, valid = features_lib.pad_rows(test_features[start:start + chunk],
                                         chunk)
    chunk_predictions = _knn_chunk_predict(
        train_norm, train_y, features_lib.on_mesh(block, mesh, P()), temp,
        k=k, num_classes=num_classes, n_train=n_train, mesh=mesh)
    # Replicated: every process has the whole answer locally.
    predictions.append(
        np.asarray(chunk_predictions.addressable_data(0))[:valid])
  return np.concatenate(predictions).astype(np.int32)


def knn_accuracy(train_features: np.ndarray | jax.Array,
                 train_labels: np.ndarray | jax.Array,
                 test_features: np.ndarray | jax.Array,
                 test_labels: np.ndarray | jax.Array,
                 num_classes: int,
                 k: int = 200,
                 temperature: float = 0.1,
                 batch_size: int = 1024,
                 mesh: Mesh | None = None) -> float:
  """Fraction of test points whose kNN prediction equals their label."""
  predictions = knn_predict(train_features, train_labels, test_features,
                            num_classes, k=k, temperature=temperature,
                            batch_size=batch_size, mesh=mesh)
  test_labels = np.asarray(test_labels)
  if test_labels.shape != predictions.shape:
    raise ValueError(f'test_labels shape {test_labels.shape} does not match '
                     f'{predictions.shape[0]} test features')
  if predictions.size == 0:
    return float('nan')
  return float(np.mean(predictions == test_labels))
