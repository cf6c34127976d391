"""Margin losses on Euclidean distances (metric learning).

The batch-hard triplet loss and the pairwise contrastive loss of Siamese
networks. Embeddings are used as given (not normalised), cast to float32 so
bfloat16 inputs are accepted, and distances use a square root whose value
and gradient stay finite at 0 (coincident points). Anchors without a
positive or a negative are left out of the mean; a batch with none left
gives 0. Re-exported by `simclr_jax.losses`.
"""

import jax
import jax.numpy as jnp


def _safe_sqrt(x: jax.Array) -> jax.Array:
  # sqrt has an infinite derivative at 0; the double where keeps both the
  # value and the gradient finite (gradient 0 at coincident points).
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _pairwise_distances(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(N, N) Euclidean distances and squared distances of the rows of x."""
  sq_norm = jnp.sum(jnp.square(x), axis=-1)
  # HIGHEST: the Gram form cancels, and TPU's default bf16 passes would make
  # small distances meaningless.
  gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.maximum(sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram, 0.0)
  sq = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq)
  return _safe_sqrt(sq), sq


def _label_masks(labels: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  labels = jnp.asarray(labels).reshape(n)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(n, dtype=bool)
  return positive, ~same


def triplet_margin(embeddings: jax.Array,
                   labels: jax.Array,
                   margin: float = 1.0) -> jax.Array:
  """Batch-hard triplet loss (Hermans, Beyer, Leibe 2017, eq. 5).

    L = mean_a max(0, margin + max_{p: y_p = y_a, p != a} d(a, p)
                             - min_{n: y_n != y_a} d(a, n))

  with the plain (not squared) Euclidean d on the embeddings as given, as
  Hermans et al. use; FaceNet (Schroff et al. 2015, eq. 1) instead uses
  squared distances between normalised embeddings. The mean runs over
  anchors that have at least one positive and one negative.

  Args:
    embeddings: (N, D).
    labels: (N,) integer labels.
    margin: hinge margin (1.0).

  Returns:
    Scalar loss.
  """
  x = jnp.asarray(embeddings).astype(jnp.float32)
  n = x.shape[0]
  d, _ = _pairwise_distances(x)
  positive, negative = _label_masks(labels, n)
  hardest_pos = jnp.max(jnp.where(positive, d, 0.0), axis=1)
  hardest_neg = jnp.min(jnp.where(negative, d, jnp.inf), axis=1)
  valid = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
  # Invalid anchors give relu(-inf) = 0 (gradient 0), then are dropped.
  per_anchor = jax.nn.relu(margin + hardest_pos - hardest_neg)
  return (jnp.sum(jnp.where(valid, per_anchor, 0.0)) /
          jnp.maximum(jnp.sum(valid), 1))


def contrastive_margin(embeddings: jax.Array,
                       labels: jax.Array,
                       margin: float = 1.0,
                       batch_hard: bool = False) -> jax.Array:
  """Pairwise contrastive (margin) loss (Hadsell, Chopra, LeCun 2006, eq. 4).

    L = mean_pairs [ y d^2 + (1 - y) max(0, margin - d)^2 ],  y = [same label]

  over the N(N-1)/2 unordered pairs, Euclidean d. The paper writes each term
  with a factor 1/2 and y = 1 for DISSIMILAR pairs; this is the common form
  without the 1/2 (gradients twice the paper's). The positive term uses d^2
  directly, so it is smooth at d = 0.

  batch_hard=True keeps, per anchor, only its farthest positive pair and its
  nearest negative pair (the mining of Hermans et al. 2017), and averages
  over those selected pairs (an anchor without positives or without
  negatives contributes only the pairs it has).

  Args:
    embeddings: (N, D); not normalised here.
    labels: (N,) integer labels.
    margin: m (1.0).
    batch_hard: mine the hardest pairs per anchor instead of using all pairs.

  Returns:
    Scalar loss.
  """
  x = jnp.asarray(embeddings).astype(jnp.float32)
  n = x.shape[0]
  d, sq = _pairwise_distances(x)
  positive, negative = _label_masks(labels, n)
  if not batch_hard:
    per_pair = jnp.where(positive, sq, jnp.square(jax.nn.relu(margin - d)))
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    return (jnp.sum(jnp.where(upper, per_pair, 0.0)) /
            max(n * (n - 1) // 2, 1))
  has_pos = jnp.any(positive, axis=1)
  has_neg = jnp.any(negative, axis=1)
  pos_term = jnp.max(jnp.where(positive, sq, 0.0), axis=1)
  nearest_neg = jnp.min(jnp.where(negative, d, jnp.inf), axis=1)
  neg_term = jnp.square(jax.nn.relu(margin - nearest_neg))
  total = (jnp.sum(jnp.where(has_pos, pos_term, 0.0)) +
           jnp.sum(jnp.where(has_neg, neg_term, 0.0)))
  return total / jnp.maximum(jnp.sum(has_pos) + jnp.sum(has_neg), 1)
