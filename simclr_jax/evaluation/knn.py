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
The features may come whole (a NumPy array on every host) or spread over
the hosts (features.ShardedFeatures, each host holding its own rows): the
devices' rows then come in another order, and every row carries its index
in the split so that ties still go to the lower row.
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


# Sort key of a padding row: after every real row.
_PAD_KEY = np.iinfo(np.int32).max


def _local_top_k(train_features: jax.Array, train_labels: jax.Array,
                 train_index: jax.Array, test: jax.Array, *, k: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One shard's k most similar training points: (similarities, labels,
  split rows).

  Runs inside shard_map on this device's rows of the training features,
  which are in increasing split order (padding rows, index -1, after them).
  Padding rows get similarity -inf, so they are never chosen while a real
  row is left, and sort key _PAD_KEY.
  """
  # HIGHEST: the default float32 matmul on TPU (bf16 passes) and GPU (TF32)
  # keeps ~3 significant digits, enough to reorder close neighbours; the
  # similarities decide the output here, so they get full float32.
  sims = jnp.matmul(test, train_features.T,
                    precision=jax.lax.Precision.HIGHEST)
  real = train_index >= 0
  # -0.0 becomes 0.0: the merge sorts floats in IEEE total order, where
  # -0.0 < 0.0, and equal similarities must tie there as they do here.
  sims = jnp.where(sims == 0, 0.0, sims)
  sims = jnp.where(real[None, :], sims, -jnp.inf)
  top_sims, top_idx = jax.lax.top_k(sims, min(k, train_features.shape[0]))
  key = jnp.where(real, train_index, _PAD_KEY)
  return top_sims, train_labels[top_idx], key[top_idx]


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'mesh'))
def _knn_chunk_predict(train_features: jax.Array, train_labels: jax.Array,
                       train_index: jax.Array, test_features: jax.Array,
                       temperature: jax.Array, *, k: int, num_classes: int,
                       mesh: Mesh) -> jax.Array:
  """Predicted classes of a replicated chunk of test points, shape (chunk,).

  train_features (L2-normalised once, outside the loop over chunks),
  train_labels and train_index (each row's split row, -1 for padding) are
  sharded over the mesh's 'data' axis, so no device holds more than its
  share of the training set. Each device takes the top k of its own rows;
  the shards' candidates are gathered (devices x k per test point, small)
  and the global top k taken from them.

  That is exactly the single-device top k, ties included: lax.top_k puts
  the lower position first among equal values and a device's rows are in
  split order, so each shard's list holds its lowest rows among ties; the
  merge sorts the candidates by similarity, then split row. Only (chunk,)
  ints cross to the host.
  """

  def per_device(train_f, train_y, train_i, test_f, temp):
    test = l2_normalize(test_f.astype(jnp.float32))
    local = _local_top_k(train_f, train_y, train_i, test, k=k)
    gather = lambda x: jax.lax.all_gather(x, DATA_AXIS, axis=1, tiled=True)
    sims, labels, key = (gather(x) for x in local)
    # Descending similarity, ascending split row among equal ones.
    neg_sims, _, neighbour_labels = jax.lax.sort(
        (-sims, key, labels), dimension=1, num_keys=2)
    top_sims, neighbour_labels = -neg_sims[:, :k], neighbour_labels[:, :k]
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
      in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P(), P()),
      out_specs=P(), check_vma=False)(train_features, train_labels,
                                      train_index, test_features, temperature)


Features = np.ndarray | jax.Array | features_lib.ShardedFeatures


def _train_on_mesh(train_features: Features, labels: np.ndarray, mesh: Mesh
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(features, labels, split rows) sharded over the mesh's 'data' axis.

  Whole features are padded to equal shards (index -1); host-sharded ones
  are assembled from every process's own rows.
  """
  if isinstance(train_features, features_lib.ShardedFeatures):
    index = train_features.index
    local_labels = np.where(index >= 0, labels[np.maximum(index, 0)], 0)
    return (train_features.on_mesh(mesh),
            train_features.on_mesh(mesh, local_labels.astype(np.int32)),
            train_features.on_mesh(mesh, index, -1))
  n_train = train_features.shape[0]
  shards = mesh.shape[DATA_AXIS]
  rows = -(-n_train // shards) * shards  # Equal shards; padding is masked.
  x, _ = features_lib.pad_rows(
      np.asarray(train_features, np.float32), rows)
  y, _ = features_lib.pad_rows(labels, rows)
  index = np.where(np.arange(rows) < n_train, np.arange(rows), -1)
  return tuple(features_lib.on_mesh(v, mesh, P(DATA_AXIS))
               for v in (x, y, index.astype(np.int32)))


def knn_predict(train_features: Features,
                train_labels: np.ndarray | jax.Array,
                test_features: Features,
                num_classes: int,
                k: int = 200,
                temperature: float = 0.1,
                batch_size: int = 1024,
                mesh: Mesh | None = None) -> np.ndarray:
  """Predicted class of every test point by InstDisc-weighted kNN.

  Args:
    train_features: (n_train, d) features of the labelled reference set,
      whole or features.ShardedFeatures (each process holding its rows).
    train_labels: (n_train,) integer labels in [0, num_classes), in split
      order, the same on every process.
    test_features: (n_test, d) features to classify, whole or
      ShardedFeatures (read a chunk at a time).
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
  sharded = lambda x: isinstance(x, features_lib.ShardedFeatures)
  if not sharded(train_features):
    train_features = np.asarray(train_features)
  if not sharded(test_features):
    test_features = np.asarray(test_features)
  labels_np = np.asarray(train_labels).astype(np.int32)
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
  train_x, train_y, train_i = _train_on_mesh(train_features, labels_np, mesh)
  train_norm = _normalize(train_x)
  temp = jnp.float32(temperature)

  chunk = min(batch_size, n_test)
  predictions = []
  for start in range(0, n_test, chunk):
    stop = min(start + chunk, n_test)
    if sharded(test_features):
      rows = test_features.take(np.arange(start, stop), mesh)
    else:
      rows = test_features[start:stop]
    # Pad the last chunk to the common shape: one compilation for all.
    block, valid = features_lib.pad_rows(rows, chunk)
    chunk_predictions = _knn_chunk_predict(
        train_norm, train_y, train_i, features_lib.on_mesh(block, mesh, P()),
        temp, k=k, num_classes=num_classes, mesh=mesh)
    # Replicated: every process has the whole answer locally.
    predictions.append(
        np.asarray(chunk_predictions.addressable_data(0))[:valid])
  return np.concatenate(predictions).astype(np.int32)


def knn_accuracy(train_features: Features,
                 train_labels: np.ndarray | jax.Array,
                 test_features: Features,
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
