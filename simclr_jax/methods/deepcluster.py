"""DeepCluster (Caron, Bojanowski, Joulin, Douze 2018, ECCV; arXiv 1807.05520).

Alternates clustering and classification (the paper's Sec. 3):

  * Every `recluster_every_epochs` epochs (or `recluster_every_steps` steps),
    on the host before the step (`host_update`, the loop's before_step hook):
    the whole train split is featurised with the current encoder (evaluation
    preprocessing, BN in inference mode), the features h are PCA-whitened to
    `pca_dim` dimensions (at most the feature width) and L2-normalised, and
    k-means with `num_clusters` centroids runs on device (`kmeans`: seeded
    init from sampled points, a fixed number of jitted Lloyd iterations). The
    cluster ids become the pseudo-labels of the images; a fresh linear
    classifier (weights N(0, 0.01), zero bias) replaces the previous one.
  * Every step: both views of each image are classified into its cluster id
    by that classifier on the encoder features h, with cross-entropy. The
    gradient trains the encoder (through the frozen-for-this-step classifier)
    with the run's optimiser; the classifier itself takes a plain SGD step
    (no momentum, `head_learning_rate`, `head_weight_decay`) on its own
    gradient, as the authors' code trains its re-created top layer.

Empty clusters (Sec. 3.3): after each Lloyd update, an empty cluster takes the
centroid of the largest cluster with a small symmetric perturbation,
c (1 +- eps), and the largest cluster keeps c (1 -+ eps), so the next
assignment splits its points between the two. The paper picks the non-empty
cluster at random; the largest one is used here (deterministic, testable, and
it is the cluster a degenerate solution grows).

Uniform sampling over clusters (Sec. 3.3, "trivial parametrization") is
implemented as a per-example loss weight 1 / |cluster of the example|,
normalised over the batch: drawing images uniformly over clusters picks
image i with probability 1 / (K |C(i)|), so the expected loss under that
sampler is proportional to sum_i CE_i / |C(i)|, which is what the weighted
loss estimates on uniformly drawn (shuffled) batches. The batch
normalisation (dividing by the sum of the weights) makes it a ratio
estimator: consistent, with an O(1 / batch) bias.

No projection head: the classifier reads h (the projection head's
parameters exist, get no gradient, and are unused). State in
`TrainState.extra` (replicated, checkpointed, so a resumed run continues with
the same pseudo-labels and classifier): 'assignments' (num_train_examples,)
int32, 'centroids' (num_clusters, P) float32, 'cluster_sizes'
(num_clusters,) int32 and 'head' {'kernel' (D, K), 'bias' (K,)}.

Needs the train split in memory, where batches carry row ids ('index')
that index the assignments: digits and synthetic, or a TFDS dataset with
config.dataset.in_memory (the CIFAR-10 recipe). A streamed TFDS dataset's
ids are hashes of TFDS example ids, not rows of the featurised split.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from simclr_jax.methods import base
from simclr_jax.runtime import config_checks as checks
from simclr_jax.runtime import durations
from simclr_jax.runtime import parallel

# Relative perturbation of a split centroid (faiss's k-means uses 1/1024).
SPLIT_EPS = 1.0 / 1024
# Points per block when assigning, so memory is block x num_clusters.
ASSIGN_BLOCK = 8192
# Whitening adds this fraction of the largest eigenvalue to every eigenvalue.
WHITEN_EPS = 1e-6
_HIGHEST = jax.lax.Precision.HIGHEST


# -- k-means ------------------------------------------------------------------
def assign(x: jax.Array, centroids: jax.Array,
           block: int = ASSIGN_BLOCK) -> jax.Array:
  """Nearest centroid (squared L2) of each row: argmax x.c - |c|^2 / 2.

  Ties go to the lowest index. Rows are processed `block` at a time.
  """
  half_sq = 0.5 * jnp.sum(centroids * centroids, axis=1)

  def nearest(xb):
    scores = jnp.dot(xb, centroids.T, precision=_HIGHEST) - half_sq
    return jnp.argmax(scores, axis=1).astype(jnp.int32)

  n = x.shape[0]
  if n <= block:
    return nearest(x)
  pad = (-n) % block
  xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, block, x.shape[1])
  return jax.lax.map(nearest, xb).reshape(-1)[:n]


def split_empty(centroids: jax.Array, counts: jax.Array,
                eps: float = SPLIT_EPS) -> tuple[jax.Array, jax.Array]:
  """Gives every empty cluster half of the largest one (paper Sec. 3.3).

  One empty cluster at a time (the first): it takes the largest cluster's
  centroid c as c * (1 + eps s) and the largest keeps c * (1 - eps s), with
  s = +1, -1, +1, ... over the dimensions; their counts split in halves, so
  the next empty cluster may pick another donor. Stops when no cluster is
  empty or none has two points to share.
  """
  d = centroids.shape[1]
  sign = jnp.where(jnp.arange(d) % 2 == 0, 1.0, -1.0).astype(centroids.dtype)

  def has_empty(carry):
    _, n = carry
    return jnp.any(n == 0) & (jnp.max(n) >= 2)

  def split_one(carry):
    c, n = carry
    i = jnp.argmin(n)  # The first empty cluster (counts are >= 0).
    j = jnp.argmax(n)  # The largest cluster.
    cj = c[j]
    c = c.at[i].set(cj * (1 + eps * sign)).at[j].set(cj * (1 - eps * sign))
    half = n[j] // 2
    n = n.at[i].set(half).at[j].set(n[j] - half)
    return c, n

  return jax.lax.while_loop(has_empty, split_one, (centroids, counts))


def cluster_counts(assignments: jax.Array, num_clusters: int) -> jax.Array:
  return jax.ops.segment_sum(jnp.ones_like(assignments), assignments,
                             num_segments=num_clusters)


def kmeans(x: jax.Array, init: jax.Array, iterations: int
           ) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means from `init` (K, P); returns (centroids, assignments).

  Each iteration: assign every point to its nearest centroid, move each
  centroid to the mean of its points (an empty one keeps its place), then
  `split_empty`. The returned assignments are those of the final centroids.
  """
  k = init.shape[0]

  def lloyd(c, _):
    a = assign(x, c)
    n = cluster_counts(a, k)
    sums = jax.ops.segment_sum(x, a, num_segments=k)
    mean = sums / jnp.maximum(n, 1)[:, None].astype(x.dtype)
    c = jnp.where((n > 0)[:, None], mean, c)
    c, _ = split_empty(c, n)
    return c, None

  c, _ = jax.lax.scan(lloyd, init, None, length=iterations)
  return c, assign(x, c)


def pca_whiten(features: jax.Array, dim: int) -> jax.Array:
  """PCA to `dim` dims, whitened (eigenvalue^-1/2), rows L2-normalised.

  As the paper preprocesses features before k-means (its implementation
  details; the authors' code: faiss's PCAMatrix with eigen_power -0.5, then
  L2 normalisation).
  """
  x = features.astype(jnp.float32)
  x = x - jnp.mean(x, axis=0)
  cov = jnp.dot(x.T, x, precision=_HIGHEST) / x.shape[0]
  evals, evecs = jnp.linalg.eigh(cov)  # Ascending.
  evals, evecs = evals[::-1][:dim], evecs[:, ::-1][:, :dim]
  evals = jnp.maximum(evals, 0.0) + WHITEN_EPS * jnp.maximum(evals[0], 1e-12)
  y = jnp.dot(x, evecs, precision=_HIGHEST) / jnp.sqrt(evals)
  return y / jnp.maximum(jnp.linalg.norm(y, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('num_clusters', 'pca_dim',
                                             'iterations'))
def cluster_features(features: jax.Array, rng: jax.Array, *,
                     num_clusters: int, pca_dim: int, iterations: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(assignments (N,), centroids (K, P), sizes (K,)) of raw features (N, D).

  k-means starts from `num_clusters` distinct points drawn with `rng`.
  """
  x = pca_whiten(features, pca_dim)
  idx = jax.random.choice(rng, x.shape[0], (num_clusters,), replace=False)
  centroids, assignments = kmeans(x, x[idx], iterations)
  return assignments, centroids, cluster_counts(assignments, num_clusters)


# -- the loss -----------------------------------------------------------------
def weighted_cross_entropy(logits: jax.Array, labels: jax.Array,
                           weights: jax.Array) -> jax.Array:
  """sum_i w_i (-log softmax(logits_i)[y_i]) / sum_i w_i."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * nll) / jnp.sum(weights)


def classify(head: dict, h: jax.Array) -> jax.Array:
  return jnp.dot(h.astype(jnp.float32), head['kernel'],
                 precision=_HIGHEST) + head['bias']


def init_head(rng: jax.Array, feature_dim: int, num_clusters: int) -> dict:
  """The paper's fresh top layer: weights N(0, 0.01^2), zero bias."""
  return {'kernel': 0.01 * jax.random.normal(rng, (feature_dim, num_clusters),
                                             jnp.float32),
          'bias': jnp.zeros((num_clusters,), jnp.float32)}


class DeepCluster(base.Method):
  """k-means pseudo-labels of the whole train split, learned by a classifier."""

  name = 'deepcluster'
  section = 'deepcluster'
  # Assignments have one row per training image; centroids and the head are
  # sized by the clusters and the PCA width (the encoder width is checked
  # for every method).
  resume_shape_fields = ('deepcluster.num_clusters', 'deepcluster.pca_dim',
                         'dataset.train_split')
  needs_index = True

  @classmethod
  def validate(cls, config):
    from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
    s = config[cls.section]
    checks.integer('deepcluster.num_clusters', s.num_clusters, 2)
    checks.integer('deepcluster.pca_dim', s.pca_dim, 1)
    checks.integer('deepcluster.kmeans_iterations', s.kmeans_iterations, 1)
    # Unlike other durations, the epochs must be > 0 even with the steps
    # set, as they always had to be here.
    checks.positive('deepcluster.recluster_every_epochs',
                    s.recluster_every_epochs)
    durations.check(s, 'recluster_every', 'deepcluster', allow_off=False)
    checks.positive('deepcluster.head_learning_rate', s.head_learning_rate)
    checks.positive('deepcluster.head_weight_decay', s.head_weight_decay,
                    allow_zero=True)
    name = config.dataset.name
    source = datasets.source_for(config)
    if not source.holds_arrays:
      raise checks.ConfigError(
          f"method='deepcluster' on config.dataset.name={name!r} needs "
          'config.dataset.in_memory=True: it holds a pseudo-label per image '
          'of the train split, which a streamed TFDS dataset has no row ids '
          'for (in memory, CIFAR-10 takes about 150 MB per host)')
    n = source.info().num_train_examples
    if s.num_clusters > n:
      raise checks.ConfigError(
          f'config.deepcluster.num_clusters={s.num_clusters} is invalid: '
          f'must be <= the {n} training examples of {name}')

  def __init__(self, config, *, total_steps, num_train_examples):
    super().__init__(config, total_steps=total_steps,
                     num_train_examples=num_train_examples)
    from simclr_jax.models import encoders  # pylint: disable=g-import-not-at-top
    self.feature_dim = encoders.build_encoder(
        config.model, config.dataset.image_size).num_features
    self.pca_dim = min(int(self.settings.pca_dim), self.feature_dim)

  def recluster_every(self, steps_per_epoch: float) -> int:
    """Steps between two clusterings."""
    return durations.steps(self.settings, 'recluster_every', steps_per_epoch,
                           minimum=1)

  def init_extra(self, params, batch_stats, rng):
    del params, batch_stats
    k, n = int(self.settings.num_clusters), self.num_train_examples
    # Placeholders until the first clustering (host_update at step 0): a
    # valid round-robin labelling, so a bare step still has a finite loss.
    assignments = jnp.arange(n, dtype=jnp.int32) % k
    return {'assignments': assignments,
            'centroids': jnp.zeros((k, self.pca_dim), jnp.float32),
            'cluster_sizes': cluster_counts(assignments, k),
            'head': init_head(rng, self.feature_dim, k)}

  def loss(self, model, params, batch_stats, extra, batch):
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    h = out['features']
    # Rows 2i, 2i+1 are the two views of image i: same pseudo-label.
    labels = jnp.repeat(extra['assignments'][batch.index], 2)
    weights = 1.0 / extra['cluster_sizes'][labels].astype(jnp.float32)
    head = jax.lax.stop_gradient(extra['head'])

    def head_loss(head, h):
      logits = classify(head, h)
      return weighted_cross_entropy(logits, labels, weights), logits

    loss, logits = head_loss(head, h)
    # The classifier's own gradient (it is not in params): applied by
    # update_extra with plain SGD.
    head_grads, _ = jax.grad(head_loss, has_aux=True)(
        head, jax.lax.stop_gradient(h))
    acc = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))
    total, metrics = self.add_linear_head(loss, {'pseudo_label_acc': acc},
                                          out, batch)
    return total, base.LossOutput(metrics, new_stats,
                                  payload={'head_grads': head_grads})

  def update_extra(self, extra, params, payload, step):
    del params, step
    lr = self.settings.head_learning_rate
    wd = self.settings.head_weight_decay
    head = jax.tree.map(lambda p, g: p - lr * (g + wd * p), extra['head'],
                        payload['head_grads'])
    return dict(extra, head=head)

  def cluster(self, features: np.ndarray, step: int) -> dict:
    """New extra arrays (host NumPy) from train-split features at `step`."""
    s = self.settings
    if features.shape[0] != self.num_train_examples:
      raise ValueError(f'deepcluster: {features.shape[0]} features for '
                       f'{self.num_train_examples} training examples')
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(self.config.seed), 0xDC), step)
    kmeans_key, head_key = jax.random.split(key)
    assignments, centroids, sizes = cluster_features(
        jnp.asarray(features, jnp.float32), kmeans_key,
        num_clusters=int(s.num_clusters), pca_dim=self.pca_dim,
        iterations=int(s.kmeans_iterations))
    head = init_head(head_key, self.feature_dim, int(s.num_clusters))
    return jax.device_get({'assignments': assignments, 'centroids': centroids,
                           'cluster_sizes': sizes, 'head': head})

  def host_update(self, step, state, context):
    if step % self.recluster_every(context.steps_per_epoch):
      return state
    t0 = time.time()
    features = context.featurize({'params': state.params,
                                  'batch_stats': state.batch_stats})
    new = self.cluster(np.asarray(features), step)
    sizes = new['cluster_sizes']
    logging.info('deepcluster step %d: %d clusters of %d images (%d empty, '
                 'largest %d) in %.1f s', step, len(sizes), int(sizes.sum()),
                 int((sizes == 0).sum()), int(sizes.max()), time.time() - t0)
    extra = dict(state.extra, **new)
    return state.replace(
        extra=jax.device_put(extra, parallel.replicated(context.mesh)))
