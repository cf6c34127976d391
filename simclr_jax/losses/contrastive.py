"""Contrastive losses.

`nt_xent` is the SimCLR loss (Chen et al. 2020a) on a whole batch held by one
caller. `nt_xent_local` is the same loss for the rows one device holds,
against keys all-gathered from every device; the train step calls it inside
`jax.shard_map` so each device builds a (2b x 2N) similarity matrix rather than
(2N x 2N). Both follow the paper's normalisation, L = 1/(2N) sum over all 2N
anchors (the reference TF code returns twice this).

The rest of the family lives in `losses.family` (softmax and regression
losses) and `losses.metric` (Euclidean margin losses); the package re-exports
all of them, so `losses.<name>` is the one public access path.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from simclr_jax.losses.normalize import l2_normalize


def masked_cross_entropy(logits: jax.Array, labels: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy over examples with labels >= 0.

  Labels < 0 mark unlabelled examples (STL-10 'unlabelled', distillation's
  unlabelled data); they count in neither number. With no labelled example
  both are 0. Used by the online linear head and the supervised modes.
  """
  valid = (labels >= 0).astype(jnp.float32)
  safe = jnp.maximum(labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == safe) * valid) / count
  return jnp.sum(nll * valid) / count, accuracy


# The reference masks self-similarity by subtracting a large constant.
_LARGE_NUM = 1e9


class ContrastiveStats(NamedTuple):
  """Per-call sums that callers reduce across devices before dividing.

  Sums rather than means so a sharded caller can psum them and divide by the
  global anchor count once.
  """
  loss_sum: jax.Array  # Sum of per-anchor cross-entropies.
  correct_sum: jax.Array  # Anchors whose argmax logit is the positive.
  entropy_sum: jax.Array  # Sum of entropies of the contrastive distributions.
  num_anchors: jax.Array


def _anchor_stats(logits: jax.Array, labels: jax.Array) -> ContrastiveStats:
  """Cross-entropy, top-1 and entropy of rows of `logits` with int `labels`."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  probs = jnp.exp(log_probs)
  # Masked entries have probability exactly 0; 0 * (-1e9) stays finite.
  entropy = -jnp.sum(probs * log_probs, axis=-1)
  return ContrastiveStats(
      loss_sum=jnp.sum(nll),
      correct_sum=jnp.sum(correct),
      entropy_sum=jnp.sum(entropy),
      num_anchors=jnp.asarray(logits.shape[0], jnp.float32))


def nt_xent_local(z_a: jax.Array,
                  z_b: jax.Array,
                  all_a: jax.Array,
                  all_b: jax.Array,
                  offset: jax.Array | int,
                  temperature: float) -> ContrastiveStats:
  """NT-Xent sums for local anchors against the global keys.

  Args:
    z_a, z_b: (b, d) normalised projections of the two views held locally.
    all_a, all_b: (N, d) normalised projections of the whole global batch.
    offset: global index of local row 0 (replica r holds rows r*b .. r*b+b-1);
      the positive of local row j is global row offset + j of the other view.
    temperature: softmax temperature.

  Returns:
    Sums over the 2b local anchors (both views).
  """
  b = z_a.shape[0]
  n = all_a.shape[0]
  labels = offset + jnp.arange(b)
  self_mask = jax.nn.one_hot(labels, n, dtype=z_a.dtype) * _LARGE_NUM
  # Anchor in view a: keys are [all of view b | all of view a minus itself].
  logits_ab = z_a @ all_b.T / temperature
  logits_aa = z_a @ all_a.T / temperature - self_mask
  logits_ba = z_b @ all_a.T / temperature
  logits_bb = z_b @ all_b.T / temperature - self_mask
  stats_a = _anchor_stats(jnp.concatenate([logits_ab, logits_aa], 1), labels)
  stats_b = _anchor_stats(jnp.concatenate([logits_ba, logits_bb], 1), labels)
  return jax.tree.map(jnp.add, stats_a, stats_b)


def nt_xent_with_stats(z_a: jax.Array,
                       z_b: jax.Array,
                       temperature: float = 0.5,
                       normalize: bool = True) -> tuple[jax.Array, dict]:
  """NT-Xent over a batch held in one place, plus the reference diagnostics."""
  z_a = z_a.astype(jnp.float32)
  z_b = z_b.astype(jnp.float32)
  if normalize:
    z_a, z_b = l2_normalize(z_a), l2_normalize(z_b)
  stats = nt_xent_local(z_a, z_b, z_a, z_b, 0, temperature)
  return finalize(stats)


def nt_xent(z_a: jax.Array,
            z_b: jax.Array,
            temperature: float = 0.5,
            normalize: bool = True) -> jax.Array:
  """SimCLR's NT-Xent loss, 1/(2N) * sum over the 2N anchors.

  Args:
    z_a, z_b: (N, d) projections of the two views; row i of each is a pair.
      They need not be normalised (the reference L2-normalises, `hidden_norm`).
    temperature: tau in the paper.
    normalize: L2-normalise rows first (cosine similarity).

  Returns:
    Scalar loss.
  """
  return nt_xent_with_stats(z_a, z_b, temperature, normalize)[0]


def finalize(stats: ContrastiveStats) -> tuple[jax.Array, dict]:
  """Turns (globally reduced) sums into the mean loss and metrics."""
  n = stats.num_anchors
  loss = stats.loss_sum / n
  return loss, {
      'contrastive_loss': loss,
      'contrastive_acc': stats.correct_sum / n,
      'contrastive_entropy': stats.entropy_sum / n,
  }


def sharded_nt_xent(z_a: jax.Array,
                    z_b: jax.Array,
                    *,
                    temperature: float,
                    axis_name: str,
                    normalize: bool = True) -> tuple[jax.Array, dict]:
  """NT-Xent inside shard_map: local anchors against all-gathered keys.

  Call with the per-device blocks of the batch-sharded projections. The
  all_gather's transpose is a reduce-scatter, so the gradient that reaches
  each device's projections is that of the global mean loss: every device's
  contribution to the keys flows back to the device that owns the row (the
  reference gets the same effect by scattering into zeros and summing across
  replicas). The returned loss and metrics are already global.
  """
  z_a = z_a.astype(jnp.float32)
  z_b = z_b.astype(jnp.float32)
  if normalize:
    z_a, z_b = l2_normalize(z_a), l2_normalize(z_b)
  all_a = jax.lax.all_gather(z_a, axis_name, tiled=True)
  all_b = jax.lax.all_gather(z_b, axis_name, tiled=True)
  offset = jax.lax.axis_index(axis_name) * z_a.shape[0]
  stats = nt_xent_local(z_a, z_b, all_a, all_b, offset, temperature)
  stats = jax.lax.psum(stats, axis_name)
  return finalize(stats)
