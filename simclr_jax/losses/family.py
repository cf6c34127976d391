"""Losses of the contrastive family beyond NT-Xent (docs/algorithms.md).

SupCon, MoCo v2/v3, BYOL, SwAV (with Sinkhorn-Knopp), InstDisc (memory bank),
hard-negative NT-Xent (HCL) and InvaSpread; the margin losses of metric
learning are in `losses.metric`. Every function is pure jax.numpy, jittable,
and casts its inputs to float32 (so bfloat16 activations are accepted and the
softmaxes run in float32); the losses return a float32 scalar, `sinkhorn` the
(B, K) codes and `memory_bank_update` the new bank. Re-exported by
`simclr_jax.losses`, which is the public access path (`losses.supcon`, ...).

Conventions shared by all of them:
  * "Normalised inside" means rows are L2-normalised here, so callers may pass
    raw projections; inputs documented as "assumed normalised" (queues, memory
    banks) are used as they are, because they are stored normalised.
  * Targets that the paper computes without gradient (MoCo keys and queue,
    BYOL targets, SwAV codes, memory-bank rows) go through
    `jax.lax.stop_gradient` here, so a caller cannot leak gradient into them.
  * Anchors with nothing to contrast against (no positive, no negative) are
    left out of the mean instead of producing NaN; a batch with none left
    gives 0.
"""

import math

import jax
import jax.numpy as jnp

from simclr_jax.losses.normalize import l2_normalize

# Self-similarity is masked out by a large negative logit, as in losses/contrastive.py.
_LARGE_NUM = 1e9


def _f32(*xs: jax.Array) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def _cross_entropy_label0(logits: jax.Array) -> jax.Array:
  """Mean cross-entropy of rows of `logits` whose target is column 0."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


# --------------------------------------------------------------------------
# SupCon (Khosla et al. 2020, arXiv 2004.11362).


def supcon(z: jax.Array,
           labels: jax.Array | None,
           temperature: float = 0.1,
           base_temperature: float | None = None) -> jax.Array:
  """Supervised contrastive loss L_out (Khosla et al. 2020, eq. 2).

    L_out = sum_i -1/|P(i)| sum_{p in P(i)}
              log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

  over all N*V views i; P(i) = every other view of every sample with the
  same label. The mean over positives sits OUTSIDE the log, the variant the
  paper finds better (L_out vs L_in).

  Normalisation: the mean (not the sum) over anchors that have at least one
  positive, times T/base_T as the SupContrast reference does (base_T defaults
  to T, i.e. scale 1; the reference's defaults T = base_T = 0.07 are also
  scale 1). Anchors without positives (V == 1 and a label seen once) are left
  out instead of dividing 0/0; the current SupContrast code instead counts
  them with loss 0, which is this value times the fraction of anchors that
  have positives (identical whenever V >= 2).

  Args:
    z: (N, V, D) projections, V views per sample; normalised here.
    labels: (N,) integer class labels, or None for the unsupervised (SimCLR)
      case where the positives of a view are the other views of its sample.
      With labels=None and V=2 this equals `losses.nt_xent` at the same T.
    temperature: T.
    base_temperature: base_T of the reference's T/base_T scaling.

  Returns:
    Scalar loss.
  """
  if base_temperature is None:
    base_temperature = temperature
  (z,) = _f32(z)
  n, v, d = z.shape
  feats = l2_normalize(z).reshape(n * v, d)  # row s*V + j: view j of s.
  ids = jnp.arange(n) if labels is None else jnp.asarray(labels).reshape(n)
  ids = jnp.repeat(ids, v)
  not_self = ~jnp.eye(n * v, dtype=bool)
  positive = (ids[:, None] == ids[None, :]) & not_self
  logits = feats @ feats.T / temperature
  logits = jnp.where(not_self, logits, -_LARGE_NUM)
  log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  num_pos = jnp.sum(positive, axis=1)
  # where, not multiply: log_prob of the masked self entry is about -1e9.
  mean_log_prob_pos = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) /
                       jnp.maximum(num_pos, 1))
  has_pos = num_pos > 0
  per_anchor = -(temperature / base_temperature) * mean_log_prob_pos
  return (jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) /
          jnp.maximum(jnp.sum(has_pos), 1))


# --------------------------------------------------------------------------
# MoCo v2 (Chen et al. 2020, arXiv 2003.04297) and v3 (arXiv 2104.02057).


def moco_infonce(q: jax.Array,
                 k: jax.Array,
                 queue: jax.Array,
                 temperature: float = 0.2) -> jax.Array:
  """MoCo's InfoNCE (He et al. 2020, eq. 1; Algorithm 1).

    L_q = -log( exp(q.k+ / T) /
                (exp(q.k+ / T) + sum_{k- in queue} exp(q.k- / T)) )

  i.e. cross-entropy of logits [q.k+ | q.queue^T] / T with label 0, averaged
  over the batch.

  Args:
    q: (N, D) queries from the query encoder; normalised here.
    k: (N, D) keys of the same images from the momentum encoder; normalised
      here and detached (Algorithm 1: "no gradient to keys").
    queue: (K, D) keys of earlier batches, assumed normalised (they are
      enqueued normalised); detached. Enqueue the current keys AFTER the loss.
    temperature: T (0.2 in MoCo v2).

  Returns:
    Scalar loss.
  """
  q, k, queue = _f32(q, k, queue)
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  queue = jax.lax.stop_gradient(queue)
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  return _cross_entropy_label0(jnp.concatenate([l_pos, l_neg], 1) /
                               temperature)


def _moco_v3_ctr(q: jax.Array, k: jax.Array, temperature: float) -> jax.Array:
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  logits = q @ k.T / temperature  # Positives on the diagonal.
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.mean(jnp.diagonal(log_probs))
  return 2.0 * temperature * ce


def moco_v3(q1: jax.Array,
            q2: jax.Array,
            k1: jax.Array,
            k2: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """MoCo v3 symmetric loss (Chen, Xie, He 2021, Algorithm 1).

    ctr(q, k) = 2T * CrossEntropy(q k^T / T, labels = range(N))
    loss = ctr(q1, k2) + ctr(q2, k1)

  In-batch keys, no queue; q_i from the query encoder (with predictor) on view
  i, k_i from the momentum encoder on view i. The 2T factor keeps the
  gradient scale independent of T. Multi-device callers pass the
  all-gathered keys' rows in place of k (not done here).

  Args:
    q1, q2: (N, D) queries of the two views; normalised here.
    k1, k2: (N, D) keys of the two views; normalised here and detached.
    temperature: T (1.0 for ResNet in MoCo v3).

  Returns:
    Scalar loss.
  """
  q1, q2, k1, k2 = _f32(q1, q2, k1, k2)
  return (_moco_v3_ctr(q1, k2, temperature) +
          _moco_v3_ctr(q2, k1, temperature))


# --------------------------------------------------------------------------
# BYOL (Grill et al. 2020, arXiv 2006.07733).


def byol(p1: jax.Array, p2: jax.Array, z1: jax.Array,
         z2: jax.Array) -> jax.Array:
  """BYOL regression loss, symmetrised (Grill et al. 2020, eq. 2).

    L(p, z) = || p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)
    loss = mean_batch L(p1, sg(z2)) + mean_batch L(p2, sg(z1))

  The prediction of one view regresses the target projection of the OTHER
  view; the two directions are summed (the paper's L + L~, so the range is
  [0, 8]) and each is a mean over the batch.

  Args:
    p1, p2: (N, D) online predictions for views 1 and 2.
    z1, z2: (N, D) target-network projections for views 1 and 2; detached.

  Returns:
    Scalar loss.
  """
  p1, p2, z1, z2 = _f32(p1, p2, z1, z2)

  def regression(p, z):
    z = jax.lax.stop_gradient(l2_normalize(z))
    cos = jnp.sum(l2_normalize(p) * z, axis=-1)
    return jnp.mean(2.0 - 2.0 * cos)

  return regression(p1, z2) + regression(p2, z1)


# --------------------------------------------------------------------------
# SwAV (Caron et al. 2020, arXiv 2006.09882).


def sinkhorn(scores: jax.Array,
             epsilon: float = 0.05,
             iterations: int = 3) -> jax.Array:
  """SwAV's Sinkhorn-Knopp codes Q (Caron et al. 2020, eq. 3 and App. A.1).

  Q* = Diag(u) exp(C^T Z / eps) Diag(v), alternately rescaled so that every
  prototype gets total mass 1/K and every sample 1/B, then multiplied by B so
  each sample's row is a distribution over the K prototypes. This is the
  reference loop (normalise prototypes, then samples, `iterations` times) in
  the log domain, so exp(scores/eps) cannot overflow at eps = 0.05; the
  reference's initial division by the total sum is a constant shift that the
  first prototype normalisation removes, so it is omitted.

  What holds: each row sums to 1 (up to float rounding) for any
  iterations >= 1, because the last step normalises rows. Column sums are
  B/K only approximately after 3 iterations and converge to B/K as
  iterations grow. No gradient flows through the codes (they are targets).

  Args:
    scores: (B, K) prototype scores C^T z (cosines of normalised features and
      prototypes).
    epsilon: entropic regularisation eps (0.05).
    iterations: Sinkhorn iterations (3); at least 1.

  Returns:
    (B, K) float32 assignments Q.
  """
  if iterations < 1:
    raise ValueError(f'sinkhorn needs iterations >= 1, got {iterations}')
  (scores,) = _f32(scores)
  b, k = scores.shape
  log_q = jax.lax.stop_gradient(scores) / epsilon

  def iteration(_, log_q):
    # Each prototype (column) gets mass 1/K ...
    log_q = log_q - (jax.nn.logsumexp(log_q, axis=0, keepdims=True) +
                     math.log(k))
    # ... then each sample (row) gets mass 1/B.
    return log_q - (jax.nn.logsumexp(log_q, axis=1, keepdims=True) +
                    math.log(b))

  # A loop, not Python unrolling: the graph stays small for many iterations.
  log_q = jax.lax.fori_loop(0, iterations, iteration, log_q)
  return jnp.exp(log_q + math.log(b))


def swav(scores1: jax.Array,
         scores2: jax.Array,
         q1: jax.Array,
         q2: jax.Array,
         temperature: float = 0.1) -> jax.Array:
  """SwAV swapped prediction (Caron et al. 2020, eq. 1-2).

    l(z_t, q_s) = -sum_k q_s^(k) log softmax_k(z_t^T c_k / T)
    loss = mean_batch [ l(z_1, q_2) + l(z_2, q_1) ]

  Each view predicts the other view's code. The two terms are summed as in
  eq. 1; the reference code averages them over the views used for
  assignment, i.e. reports half this value for two views.

  Args:
    scores1, scores2: (B, K) prototype scores of views 1 and 2.
    q1, q2: (B, K) codes of views 1 and 2 (e.g. from `sinkhorn`); detached.
    temperature: T (0.1).

  Returns:
    Scalar loss.
  """
  scores1, scores2, q1, q2 = _f32(scores1, scores2, q1, q2)
  q1, q2 = jax.lax.stop_gradient(q1), jax.lax.stop_gradient(q2)
  l12 = -jnp.sum(q2 * jax.nn.log_softmax(scores1 / temperature, axis=-1), -1)
  l21 = -jnp.sum(q1 * jax.nn.log_softmax(scores2 / temperature, axis=-1), -1)
  return jnp.mean(l12 + l21)


# --------------------------------------------------------------------------
# InstDisc (Wu et al. 2018, arXiv 1805.01978).


def _instdisc_logits(features, bank_negatives, positives_from_bank):
  """Dot products f.v_i (B, 1) and f.v_j for the sampled negatives (B, M)."""
  features, bank_negatives, positives_from_bank = _f32(
      features, bank_negatives, positives_from_bank)
  f = l2_normalize(features)
  pos = jax.lax.stop_gradient(positives_from_bank)
  neg = jax.lax.stop_gradient(bank_negatives)
  l_pos = jnp.sum(f * pos, axis=-1, keepdims=True)
  if neg.ndim == 2:  # (M, D) negatives shared by the batch.
    l_neg = f @ neg.T
  else:  # (B, M, D) negatives drawn per sample.
    l_neg = jnp.einsum('bd,bmd->bm', f, neg)
  return l_pos, l_neg


def instdisc_softmax(features: jax.Array,
                     bank_negatives: jax.Array,
                     positives_from_bank: jax.Array,
                     temperature: float = 0.07) -> jax.Array:
  """InstDisc non-parametric softmax (Wu et al. 2018, eq. 2).

    P(i | f_i) = exp(v_i.f_i / T) / sum_j exp(v_j.f_i / T)
    loss = -mean_batch log P(i | f_i)

  with the sum over the memory bank approximated by the sample's own bank row
  v_i plus M sampled bank rows (the paper's full sum, or NCE, is what makes
  the n-way softmax affordable; Wu et al. sample 4096 negatives).

  Args:
    features: (B, D) current features f_i; normalised here.
    bank_negatives: (M, D) shared or (B, M, D) per-sample sampled bank rows
      v_j; assumed normalised; detached.
    positives_from_bank: (B, D) bank rows v_i of the batch's own images;
      assumed normalised; detached.
    temperature: T (0.07).

  Returns:
    Scalar loss.
  """
  l_pos, l_neg = _instdisc_logits(features, bank_negatives,
                                  positives_from_bank)
  return _cross_entropy_label0(jnp.concatenate([l_pos, l_neg], 1) /
                               temperature)


def instdisc_nce(features: jax.Array,
                 bank_negatives: jax.Array,
                 positives_from_bank: jax.Array,
                 num_data: int,
                 normalizer: jax.Array | float | None = None,
                 temperature: float = 0.07) -> jax.Array:
  """InstDisc NCE form (Wu et al. 2018, eq. 3-6).

    P(i|v) = exp(v.f_i / T) / Z,   h(i, v) = P(i|v) / (P(i|v) + M P_n),
    P_n = 1 / n (uniform noise over the n bank rows),
    J_NCE = -mean_batch [ log h(i, v_i) + sum_{j=1..M} log(1 - h(i, v_j)) ].

  Computed in the log domain (log h = -softplus(log(M/n) - log P)).

  Args:
    features, bank_negatives, positives_from_bank, temperature: as in
      `instdisc_softmax`.
    num_data: n, the number of rows of the memory bank (training images).
    normalizer: the constant Z. The paper estimates it once by Monte Carlo,
      Z ~ n * mean_j exp(v_j.f_i / T), and then keeps it fixed; pass that
      value. None estimates it from this batch's logits (detached), which is
      what the first step of the reference does.

  Returns:
    Scalar loss.
  """
  l_pos, l_neg = _instdisc_logits(features, bank_negatives,
                                  positives_from_bank)
  logits = jnp.concatenate([l_pos, l_neg], 1) / temperature
  if normalizer is None:
    log_z = jax.lax.stop_gradient(
        jax.nn.logsumexp(logits) - math.log(logits.size) + math.log(num_data))
  else:
    log_z = jnp.log(jnp.asarray(normalizer, jnp.float32))
  log_p = logits - log_z
  log_noise = math.log(l_neg.shape[1] / num_data)  # log(M * P_n).
  log_h_pos = -jax.nn.softplus(log_noise - log_p[:, 0])
  log_1mh_neg = -jax.nn.softplus(log_p[:, 1:] - log_noise)
  return -jnp.mean(log_h_pos + jnp.sum(log_1mh_neg, axis=1))


def memory_bank_update(bank: jax.Array,
                       indices: jax.Array,
                       features: jax.Array,
                       momentum: float = 0.5) -> jax.Array:
  """InstDisc proximal memory update (Wu et al. 2018, Sec. 3.4).

    v_i <- normalise( m * v_i + (1 - m) * f_i / ||f_i|| )

  Detached (the bank is not a parameter). Rows not in `indices` are
  unchanged. Indices must be distinct within a call (with duplicates, which
  update wins is unspecified, as for any scatter).

  Args:
    bank: (n, D) memory bank of unit-norm rows.
    indices: (B,) dataset indices of the batch's images.
    features: (B, D) their current features; normalised here.
    momentum: m (0.5).

  Returns:
    The updated bank, in bank's dtype.
  """
  (f,) = _f32(features)
  f = l2_normalize(jax.lax.stop_gradient(f))
  bank = jnp.asarray(bank)
  old = bank[indices].astype(jnp.float32)
  new = l2_normalize(momentum * old + (1.0 - momentum) * f)
  return bank.at[indices].set(new.astype(bank.dtype))


# --------------------------------------------------------------------------
# Hard-negative NT-Xent (Robinson, Chuang, Sra, Jegelka 2021, arXiv 2010.04592).


def hard_negative_nt_xent(z_a: jax.Array,
                          z_b: jax.Array,
                          temperature: float = 0.5,
                          beta: float = 1.0,
                          tau_plus: float = 0.1) -> jax.Array:
  """Hard-negative, debiased NT-Xent ("HCL", Robinson et al. 2021, eq. 4-6).

  For each of the 2N anchors, with s = cosine/T, pos = exp(s+), its Q = 2N-2
  negatives neg_j = exp(s_j) and importance weights imp_j = exp(beta * s_j):

    reweight = sum_j imp_j neg_j / mean_j imp_j     (Q * E_{q_beta}[e^s])
    Ng = max( (reweight - tau_plus * Q * pos) / (1 - tau_plus), Q e^(-1/T) )
    loss = mean_anchors -log( pos / (pos + Ng) )

  This is the authors' code: beta multiplies s = sim/T (the paper writes
  exp(beta f(x).f(x-)) with the temperature absorbed into f), and the floor
  Q e^(-1/T) is the smallest value the true negative sum can take. Computed
  as log(1 + Ng/pos) with log-sum-exps, so large (1+beta)/T cannot overflow.

  With beta = 0 and tau_plus = 0 the weights are uniform, Ng is the plain
  sum over the 2N-2 negatives, the floor is never active, and the loss is
  exactly `losses.nt_xent(z_a, z_b, temperature)` (same 1/(2N) mean).

  Args:
    z_a, z_b: (N, D) projections of the two views, N >= 2; normalised here.
    temperature: T.
    beta: concentration of the hard-negative sampling distribution.
    tau_plus: class prior tau+ for debiasing (probability that a "negative"
      shares the anchor's class); must be < 1.

  Returns:
    Scalar loss.
  """
  z_a, z_b = _f32(z_a, z_b)
  n = z_a.shape[0]
  if n < 2:
    raise ValueError('hard_negative_nt_xent needs N >= 2 (no negatives).')
  z = jnp.concatenate([l2_normalize(z_a), l2_normalize(z_b)])
  s = z @ z.T / temperature
  idx = jnp.arange(2 * n)
  partner = (idx + n) % (2 * n)
  s_pos = s[idx, partner]
  negative = ~(jnp.eye(2 * n, dtype=bool) |
               jax.nn.one_hot(partner, 2 * n, dtype=bool))
  q = 2 * n - 2
  log_reweight = (
      jax.nn.logsumexp((1.0 + beta) * s, axis=1, where=negative) -
      jax.nn.logsumexp(beta * s, axis=1, where=negative) + math.log(q))
  # Everything divided by pos = exp(s_pos).
  ng_over_pos = ((jnp.exp(log_reweight - s_pos) - tau_plus * q) /
                 (1.0 - tau_plus))
  floor_over_pos = q * jnp.exp(-1.0 / temperature - s_pos)
  return jnp.mean(jnp.log1p(jnp.maximum(ng_over_pos, floor_over_pos)))


# --------------------------------------------------------------------------
# InvaSpread (Ye, Zhang, Yuen, Chang 2019, CVPR; arXiv 1904.03436).


def invaspread(f: jax.Array,
               f_hat: jax.Array,
               temperature: float = 0.1) -> jax.Array:
  """Invariant-and-spreading instance loss (Ye et al. 2019, eq. 2-5).

  With the m instances' features f_k (one view) and f^_k (the other view),
  both L2-normalised:

    P(i | x^_i) = exp(f_i.f^_i / T) / sum_k exp(f_k.f^_i / T)       (eq. 2)
    P(i | x_j)  = exp(f_i.f_j / T)  / sum_k exp(f_k.f_j / T), j != i (eq. 3)
    J = - sum_i log P(i | x^_i) - sum_i sum_{j != i} log(1 - P(i | x_j))
                                                                    (eq. 5)

  returned divided by m (the paper writes the sum; its released code divides
  by the batch size). The sums over k run over the m features f of the
  batch, k = j included in eq. 3 as the paper writes it, so
  P(i | x_j) <= 1/2 (f_j.f_j = 1 is the largest logit) and log1p(-P) is
  finite and well conditioned for every T > 0. Gradients flow through both
  views (the released code detaches the keys; the paper's objective does
  not).

  Args:
    f, f_hat: (m, D) features of the "original" and the augmented view of the
      same m instances, m >= 2; normalised here.
    temperature: T (0.1 in the paper).

  Returns:
    Scalar loss.
  """
  f, f_hat = _f32(f, f_hat)
  m = f.shape[0]
  if m < 2:
    raise ValueError('invaspread needs m >= 2 instances (no negatives).')
  f, f_hat = l2_normalize(f), l2_normalize(f_hat)
  # Row i: query f^_i against the keys f_k (eq. 2).
  s_hat = f_hat @ f.T / temperature
  log_p_pos = jnp.diagonal(s_hat) - jax.nn.logsumexp(s_hat, axis=1)
  # Row j, column i: log P(i | x_j) (eq. 3).
  s = f @ f.T / temperature
  log_p = s - jax.nn.logsumexp(s, axis=1, keepdims=True)
  # The diagonal (i = j) is no term of eq. 5; masking it before the log
  # keeps its gradient 0 where P(j | x_j) rounds to 1 (log1p(-1) = -inf).
  log_p = jnp.where(jnp.eye(m, dtype=bool), -_LARGE_NUM, log_p)
  log_not = jnp.log1p(-jnp.exp(log_p))
  return -(jnp.sum(log_p_pos) + jnp.sum(log_not)) / m
