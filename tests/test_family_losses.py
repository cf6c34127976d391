"""The contrastive family's losses against NumPy versions of the papers.

Every reference below is written independently of simclr_jax, in float64,
with explicit loops where that reads closest to the paper. JAX runs in its
default float32 (x64 stays off), hence tolerances around 1e-5 on values and
1e-4 on gradients, which are compared with central finite differences of the
NumPy formula.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import losses


def unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numeric_grad(f, x, eps=1e-6):
  """Central differences of a float64 NumPy function."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


def jit(fn, *args):
  """Runs fn(*args) under jit.

  One compile per call instead of one per primitive: eager dispatch compiles
  every op separately, which would dominate the time of this file.
  """
  return jax.jit(fn)(*args)


def value_and_grad(fn, x):
  return jax.jit(jax.value_and_grad(fn))(jnp.asarray(x, jnp.float32))


def check(jax_fn, np_fn, x, rtol=1e-5, atol=0.0, grad_atol=1e-4,
          grad_rtol=1e-3):
  """Value against np_fn(x); jax.grad against finite differences of np_fn."""
  value, grad = value_and_grad(jax_fn, x)
  np.testing.assert_allclose(value, np_fn(x), rtol=rtol, atol=atol)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, numeric_grad(np_fn, x), atol=grad_atol,
                             rtol=grad_rtol)


def normal(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------- SupCon


def np_supcon(z, labels, t, base_t=None):
  """Khosla et al. eq. 2 (L_out), mean over anchors that have positives."""
  base_t = t if base_t is None else base_t
  n, v, _ = z.shape
  feats, ids = [], []
  for s in range(n):
    for j in range(v):
      feats.append(unit(z[s, j]))
      ids.append(s if labels is None else labels[s])
  m = len(feats)
  total, count = 0.0, 0
  for i in range(m):
    positives = [p for p in range(m) if p != i and ids[p] == ids[i]]
    if not positives:
      continue
    denom = sum(np.exp(feats[i] @ feats[a] / t) for a in range(m) if a != i)
    log_probs = [np.log(np.exp(feats[i] @ feats[p] / t) / denom)
                 for p in positives]
    total += -(t / base_t) * np.mean(log_probs)
    count += 1
  return total / count if count else 0.0


@pytest.mark.parametrize('t,base_t', [(0.1, None), (0.5, None), (0.07, 0.2)])
def test_supcon_value(t, base_t):
  z = normal(0, 5, 3, 4)
  labels = np.array([0, 1, 0, 2, 1])
  got = jit(lambda x: losses.supcon(x, labels, t, base_t), z)
  np.testing.assert_allclose(got, np_supcon(z, labels, t, base_t), rtol=1e-5)


def test_supcon_gradient():
  z = normal(1, 4, 2, 3)
  labels = np.array([0, 1, 0, 2])
  check(lambda x: losses.supcon(x, labels, 0.3),
        lambda x: np_supcon(x, labels, 0.3), z)


def test_supcon_without_labels_is_nt_xent():
  z = normal(2, 6, 2, 5)
  got = jit(lambda x: losses.supcon(x, None, 0.5), z)
  np.testing.assert_allclose(got, np_supcon(z, None, 0.5), rtol=1e-5)
  np.testing.assert_allclose(
      got, jit(lambda x: losses.nt_xent(x[:, 0], x[:, 1], 0.5), z), rtol=1e-5)


def test_supcon_anchors_without_positives():
  # One view each: samples 0 and 3 have labels nobody else has.
  z = normal(3, 4, 1, 3)
  labels = np.array([0, 1, 1, 2])
  value, grad = value_and_grad(lambda x: losses.supcon(x, labels, 0.5), z)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, np_supcon(z, labels, 0.5), rtol=1e-5)
  # Lonely anchors still act as negatives of the others, so they get gradient.
  assert np.any(grad[0] != 0)
  # No positives anywhere: 0 with zero, finite gradient.
  value, grad = value_and_grad(lambda x: losses.supcon(x, np.arange(4), 0.5),
                               z)
  assert value == 0.0 and np.all(grad == 0)


# -------------------------------------------------------------------- MoCo


def np_moco(q, k, queue, t):
  q, k = unit(q), unit(k)
  queue = np.asarray(queue, np.float64)
  total = 0.0
  for i in range(len(q)):
    pos = np.exp(q[i] @ k[i] / t)
    neg = sum(np.exp(q[i] @ key / t) for key in queue)
    total += -np.log(pos / (pos + neg))
  return total / len(q)


def test_moco_infonce_value_and_gradient():
  q, k = normal(4, 4, 3), normal(5, 4, 3)
  queue = unit(normal(6, 7, 3)).astype(np.float32)
  check(lambda x: losses.moco_infonce(x, k, queue, 0.2),
        lambda x: np_moco(x, k, queue, 0.2), q)
  # Keys and queue are targets: no gradient reaches them.
  gk, gqueue = jit(jax.grad(losses.moco_infonce, argnums=(1, 2)), q, k, queue)
  assert np.all(gk == 0) and np.all(gqueue == 0)


def np_moco_v3(q1, q2, k1, k2, t):
  def ctr(q, k):
    q, k = unit(q), unit(k)
    total = 0.0
    for i in range(len(q)):
      logits = [q[i] @ k[j] / t for j in range(len(k))]
      total += -np.log(np.exp(logits[i]) / np.sum(np.exp(logits)))
    return 2 * t * total / len(q)
  return ctr(q1, k2) + ctr(q2, k1)


@pytest.mark.parametrize('t', [1.0, 0.2])
def test_moco_v3_value_and_gradient(t):
  q1, q2, k1, k2 = normal(7, 4, 5, 3)
  check(lambda x: losses.moco_v3(x, q2, k1, k2, t),
        lambda x: np_moco_v3(x, q2, k1, k2, t), q1)
  check(lambda x: losses.moco_v3(q1, x, k1, k2, t),
        lambda x: np_moco_v3(q1, x, k1, k2, t), q2)
  g = jit(jax.grad(lambda *a: losses.moco_v3(*a, t), argnums=(2, 3)),
          q1, q2, k1, k2)
  assert all(np.all(gi == 0) for gi in g)


# -------------------------------------------------------------------- BYOL


def np_byol(p1, p2, z1, z2):
  def reg(p, z):
    return np.mean([np.sum((unit(p[i]) - unit(z[i]))**2)
                    for i in range(len(p))])
  return reg(p1, z2) + reg(p2, z1)


def test_byol_value_and_gradient():
  p1, p2, z1, z2 = normal(8, 4, 3, 5)
  check(lambda x: losses.byol(x, p2, z1, z2),
        lambda x: np_byol(x, p2, z1, z2), p1)
  byol_grad = jax.jit(jax.value_and_grad(losses.byol, argnums=(0, 2, 3)))
  _, (_, gz1, gz2) = byol_grad(p1, p2, z1, z2)
  assert np.all(gz1 == 0) and np.all(gz2 == 0)
  # Identical directions give 0; a zero prediction stays finite.
  np.testing.assert_allclose(byol_grad(z2, 2 * z1, z1, z2)[0], 0.0, atol=1e-6)
  g = byol_grad(np.zeros_like(p1), p2, z1, z2)[1][0]
  assert np.all(np.isfinite(g))


# -------------------------------------------------------------------- SwAV


def np_sinkhorn(scores, eps, iters):
  """The SwAV reference loop (distributed_sinkhorn, one process)."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T  # K x B
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  q *= b
  return q.T


@pytest.mark.parametrize('iters', [1, 3])
def test_sinkhorn_matches_reference_and_rows_sum_to_one(iters):
  scores = np.random.default_rng(9).uniform(-1, 1, (6, 4)).astype(np.float32)
  q = jit(lambda s: losses.sinkhorn(s, 0.05, iters), scores)
  np.testing.assert_allclose(q, np_sinkhorn(scores, 0.05, iters), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  assert np.all(q >= 0)


def test_sinkhorn_columns_converge_to_b_over_k():
  b, k = 8, 4
  scores = np.random.default_rng(10).uniform(-1, 1, (b, k)).astype(np.float32)
  errors = []
  for iters in (1, 3, 10, 300):
    q = jit(functools.partial(losses.sinkhorn, epsilon=0.3,
                              iterations=iters), scores)
    col = np.asarray(q).sum(axis=0)
    errors.append(np.max(np.abs(col - b / k)))
  assert errors == sorted(errors, reverse=True)
  assert errors[-1] < 1e-4
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)


def test_sinkhorn_is_stable_and_has_no_gradient():
  # exp(50 / 0.05) overflows any direct implementation.
  scores = np.random.default_rng(11).uniform(-50, 50, (5, 3)).astype(np.float32)
  w = normal(12, 5, 3)
  q = jit(losses.sinkhorn, scores)
  assert np.all(np.isfinite(q))
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
  g = jit(jax.grad(lambda s: jnp.sum(losses.sinkhorn(s) * w)), scores)
  assert np.all(g == 0)


def np_swav(s1, s2, q1, q2, t):
  def ce(q, s):
    total = 0.0
    for i in range(len(s)):
      logits = np.asarray(s[i], np.float64) / t
      log_softmax = logits - np.log(np.sum(np.exp(logits)))
      total += -np.sum(q[i] * log_softmax)
    return total / len(s)
  return ce(q2, s1) + ce(q1, s2)


def test_swav_value_and_gradient():
  rng = np.random.default_rng(13)
  s1, s2 = rng.uniform(-1, 1, (2, 5, 4)).astype(np.float32)
  q1, q2 = np.asarray(jit(jax.vmap(losses.sinkhorn), np.stack([s1, s2])),
                      np.float64)
  check(lambda x: losses.swav(x, s2, q1, q2, 0.1),
        lambda x: np_swav(x, s2, q1, q2, 0.1), s1)
  gq = jit(jax.grad(losses.swav, argnums=(2, 3)), s1, s2, q1, q2)
  assert all(np.all(g == 0) for g in gq)


# ---------------------------------------------------------------- InstDisc


def np_instdisc(f, negatives, positives, t):
  f = unit(f)
  total = 0.0
  for i in range(len(f)):
    negs = negatives if negatives.ndim == 2 else negatives[i]
    pos = np.exp(positives[i] @ f[i] / t)
    denom = pos + sum(np.exp(v @ f[i] / t) for v in negs)
    total += -np.log(pos / denom)
  return total / len(f)


@pytest.mark.parametrize('per_sample', [False, True])
def test_instdisc_softmax_value_and_gradient(per_sample):
  f = normal(14, 3, 4)
  positives = unit(normal(15, 3, 4)).astype(np.float32)
  shape = (3, 6, 4) if per_sample else (6, 4)
  negatives = unit(normal(16, *shape)).astype(np.float32)
  t = 0.2
  check(lambda x: losses.instdisc_softmax(x, negatives, positives, t),
        lambda x: np_instdisc(x, negatives, positives, t), f)


def np_instdisc_nce(f, negatives, positives, n_data, z, t):
  f = unit(f)
  m = len(negatives)
  noise = m / n_data  # M * P_n
  total = 0.0
  for i in range(len(f)):
    p_pos = np.exp(positives[i] @ f[i] / t) / z
    total += np.log(p_pos / (p_pos + noise))
    for v in negatives:
      p = np.exp(v @ f[i] / t) / z
      total += np.log(1 - p / (p + noise))
  return -total / len(f)


def test_instdisc_nce_value_and_gradient():
  f = normal(17, 3, 4)
  positives = unit(normal(18, 3, 4)).astype(np.float32)
  negatives = unit(normal(19, 5, 4)).astype(np.float32)
  n_data, t, z = 100, 0.1, 700.0
  check(lambda x: losses.instdisc_nce(x, negatives, positives, n_data, z, t),
        lambda x: np_instdisc_nce(x, negatives, positives, n_data, z, t), f)
  # Z=None: the Monte Carlo estimate n * mean exp(logits) over this batch.
  fu = unit(f)
  logits = np.concatenate([np.sum(fu * positives, 1, keepdims=True),
                           fu @ negatives.T.astype(np.float64)], 1) / t
  z_hat = n_data * np.mean(np.exp(logits))
  np.testing.assert_allclose(
      jit(lambda x: losses.instdisc_nce(x, negatives, positives, n_data, None,
                                        t), f),
      np_instdisc_nce(f, negatives, positives, n_data, z_hat, t), rtol=1e-5)


def test_memory_bank_update():
  bank = unit(normal(20, 6, 4)).astype(np.float32)
  features = normal(21, 2, 4)
  indices = np.array([4, 1])
  new = np.asarray(jit(losses.memory_bank_update, bank, indices, features))
  expected = bank.astype(np.float64)
  for row, i in enumerate(indices):
    v = 0.5 * expected[i] + 0.5 * unit(features[row])
    expected[i] = v / np.linalg.norm(v)
  np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, rtol=1e-6)
  untouched = [0, 2, 3, 5]
  np.testing.assert_array_equal(new[untouched], bank[untouched])


# ------------------------------------------------------------------ HCL


def np_hcl(za, zb, t, beta, tau_plus):
  """The HCL authors' criterion, written out per anchor."""
  z = np.concatenate([unit(za), unit(zb)])
  n2 = len(z)
  n = n2 // 2
  q = n2 - 2
  total = 0.0
  for i in range(n2):
    partner = (i + n) % n2
    pos = np.exp(z[i] @ z[partner] / t)
    neg = np.array([np.exp(z[i] @ z[j] / t) for j in range(n2)
                    if j not in (i, partner)])
    imp = np.exp(beta * np.log(neg))
    reweight = np.sum(imp * neg) / np.mean(imp)
    ng = (-tau_plus * q * pos + reweight) / (1 - tau_plus)
    ng = max(ng, q * np.exp(-1 / t))
    total += -np.log(pos / (pos + ng))
  return total / n2


@pytest.mark.parametrize('t,beta,tau_plus',
                         [(0.5, 1.0, 0.1), (0.2, 0.5, 0.05), (0.5, 2.0, 0.0)])
def test_hard_negative_value_and_gradient(t, beta, tau_plus):
  za, zb = normal(22, 2, 4, 3)
  check(lambda x: losses.hard_negative_nt_xent(x, zb, t, beta, tau_plus),
        lambda x: np_hcl(x, zb, t, beta, tau_plus), za)


def test_hard_negative_clamp_is_applied():
  # Positive pairs identical and tau_plus large: the debiased estimate goes
  # below Q e^(-1/T) for every anchor and the floor decides the loss.
  za = normal(23, 4, 3)
  t, beta, tau_plus = 0.5, 0.0, 0.9
  zu = unit(za)
  for i in range(4):  # Both copies of each other sample are negatives.
    others = np.delete(zu, i, axis=0)
    sum_neg = 2 * np.sum(np.exp(others @ zu[i] / t))
    assert sum_neg - tau_plus * 6 * np.exp(1 / t) < 0
  got = jit(lambda x: losses.hard_negative_nt_xent(x, x, t, beta, tau_plus),
            za)
  np.testing.assert_allclose(got, np_hcl(za, za, t, beta, tau_plus), rtol=1e-5)
  np.testing.assert_allclose(got, np.log1p(6 * np.exp(-2 / t)), rtol=1e-5)


def test_hard_negative_reduces_to_nt_xent():
  za, zb = normal(24, 2, 6, 5)
  for t in (0.1, 0.5):
    hcl = functools.partial(losses.hard_negative_nt_xent, temperature=t,
                            beta=0.0, tau_plus=0.0)
    both = jit(lambda a, b, f=hcl, t=t: (f(a, b), losses.nt_xent(a, b, t)),
               za, zb)
    np.testing.assert_allclose(both[0], both[1], rtol=1e-5)


def test_hard_negative_is_stable_at_low_temperature():
  za, zb = normal(25, 2, 4, 3)
  value, g = value_and_grad(
      lambda x: losses.hard_negative_nt_xent(x, zb, 0.05, 5.0, 0.1), za)
  assert np.isfinite(value) and np.all(np.isfinite(g))


# ------------------------------------------------------------- InvaSpread


def np_invaspread(f, f_hat, t):
  """Ye et al. 2019, eq. 2-5, divided by the batch size m."""
  f, f_hat = unit(f), unit(f_hat)
  m = len(f)

  def p(i, query):  # P(i | query): softmax over the m features f_k.
    den = sum(np.exp(f[k] @ query / t) for k in range(m))
    return np.exp(f[i] @ query / t) / den

  total = 0.0
  for i in range(m):
    total -= np.log(p(i, f_hat[i]))  # eq. 2: x^_i recognised as i.
    for j in range(m):
      if j != i:
        total -= np.log(1.0 - p(i, f[j]))  # eq. 3: x_j not recognised as i.
  return total / m


@pytest.mark.parametrize('t', [0.1, 0.5])
def test_invaspread_value_and_gradient(t):
  f, f_hat = normal(40, 2, 5, 3)
  # Gradient with respect to each view in turn.
  check(lambda x: losses.invaspread(x, f_hat, t),
        lambda x: np_invaspread(x, f_hat, t), f)
  check(lambda x: losses.invaspread(f, x, t),
        lambda x: np_invaspread(f, x, t), f_hat)


def test_invaspread_is_stable_at_low_temperature_and_collapse():
  # Every feature equal: P(i | x_j) = 1/m for all i, j (k = j included).
  m = 4
  f = np.tile(normal(41, 1, 3), (m, 1))
  value, g = value_and_grad(lambda x: losses.invaspread(x, x, 0.01), f)
  expected = math.log(m) - (m - 1) * math.log1p(-1.0 / m)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert np.all(np.isfinite(g))
  f, f_hat = normal(42, 2, 6, 3)
  value, g = value_and_grad(lambda x: losses.invaspread(x, f_hat, 0.01), f)
  assert np.isfinite(value) and np.all(np.isfinite(g))


def test_invaspread_needs_two_instances():
  with pytest.raises(ValueError, match='m >= 2'):
    losses.invaspread(np.ones((1, 3)), np.ones((1, 3)))


# ------------------------------------------------------------ Margin losses


def np_dist(a, b):
  return math.sqrt(np.sum((np.asarray(a, np.float64) - b)**2))


def np_triplet(x, labels, margin):
  """Batch-hard triplet loss, Hermans et al. eq. 5, anchor by anchor."""
  total, count = 0.0, 0
  for a in range(len(x)):
    pos = [np_dist(x[a], x[p]) for p in range(len(x))
           if p != a and labels[p] == labels[a]]
    neg = [np_dist(x[a], x[n]) for n in range(len(x)) if labels[n] != labels[a]]
    if not pos or not neg:
      continue
    total += max(0.0, margin + max(pos) - min(neg))
    count += 1
  return total / count if count else 0.0


def test_triplet_value_and_gradient():
  x = normal(26, 7, 3)
  labels = np.array([0, 0, 1, 1, 1, 2, 3])  # 2 and 3 have no positive.
  np.testing.assert_allclose(
      jit(lambda e: losses.triplet_margin(e, labels, 1.0), x),
      np_triplet(x, labels, 1.0), rtol=1e-5)
  check(lambda e: losses.triplet_margin(e, labels, 3.0),
        lambda e: np_triplet(e, labels, 3.0), x)


def np_contrastive(x, labels, margin, batch_hard):
  terms = []
  if not batch_hard:
    for i in range(len(x)):
      for j in range(i + 1, len(x)):
        d = np_dist(x[i], x[j])
        y = float(labels[i] == labels[j])
        terms.append(y * d**2 + (1 - y) * max(0.0, margin - d)**2)
  else:
    for a in range(len(x)):
      pos = [np_dist(x[a], x[p]) for p in range(len(x))
             if p != a and labels[p] == labels[a]]
      neg = [np_dist(x[a], x[n]) for n in range(len(x))
             if labels[n] != labels[a]]
      if pos:
        terms.append(max(pos)**2)
      if neg:
        terms.append(max(0.0, margin - min(neg))**2)
  return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize('batch_hard', [False, True])
def test_contrastive_margin_value_and_gradient(batch_hard):
  x = normal(27, 6, 3)
  labels = np.array([0, 0, 1, 1, 1, 2])
  margin = 2.5  # Some negative pairs inside the margin, some outside.
  check(lambda e: losses.contrastive_margin(e, labels, margin, batch_hard),
        lambda e: np_contrastive(e, labels, margin, batch_hard), x)


def test_margin_losses_at_zero_distance_and_degenerate_labels():
  x = normal(28, 4, 3)
  x[1] = x[0]  # A coincident positive pair ...
  x[3] = x[2]  # ... and a coincident negative pair.
  labels = np.array([0, 0, 1, 2])
  fns = (losses.triplet_margin,
         lambda e, l: losses.contrastive_margin(e, l),
         lambda e, l: losses.contrastive_margin(e, l, batch_hard=True))
  for fn in fns:
    # Labels are traced, so one compile per loss covers all three labelings.
    vg = jax.jit(jax.value_and_grad(fn))
    for lab in (labels, np.zeros(4, int), np.arange(4)):
      value, g = vg(x, lab)
      assert np.isfinite(value) and np.all(np.isfinite(g)), (fn, lab)
      if fn is losses.triplet_margin and np.all(lab == 0):
        assert value == 0.0  # One class: no anchor has a negative.
  # A coincident negative pair costs the full margin^2.
  np.testing.assert_allclose(
      jit(losses.contrastive_margin, x[2:], np.array([1, 2])), 1.0, rtol=1e-6)


# ------------------------------------------------------ jit and bfloat16


@functools.lru_cache(maxsize=None)
def _family_calls():
  a, b, c, d = normal(29, 4, 4, 3)
  queue = unit(normal(30, 5, 3)).astype(np.float32)
  labels = np.array([0, 1, 0, 1])
  s1, s2 = normal(31, 2, 4, 6)
  q1, q2 = np.asarray(jit(jax.vmap(losses.sinkhorn), np.stack([s1, s2])))
  return {
      'supcon': (lambda x, y: losses.supcon(jnp.stack([x, y], 1), labels),
                 (a, b)),
      'moco_infonce': (lambda x, y: losses.moco_infonce(x, y, queue), (a, b)),
      'moco_v3': (losses.moco_v3, (a, b, c, d)),
      'byol': (losses.byol, (a, b, c, d)),
      'swav': (lambda x, y: losses.swav(x, y, q1, q2), (s1, s2)),
      'sinkhorn': (lambda x: jnp.sum(losses.sinkhorn(x) * q1), (s1,)),
      'instdisc_softmax': (lambda x, y: losses.instdisc_softmax(x, queue, y),
                           (a, unit(b).astype(np.float32))),
      'instdisc_nce': (lambda x: losses.instdisc_nce(x, queue, queue[:4], 50),
                       (a,)),
      'hard_negative_nt_xent': (losses.hard_negative_nt_xent, (a, b)),
      'invaspread': (losses.invaspread, (a, b)),
      'triplet_margin': (lambda x: losses.triplet_margin(x, labels), (a,)),
      'contrastive_margin': (lambda x: losses.contrastive_margin(x, labels),
                             (a,)),
  }


@pytest.mark.parametrize('name', sorted(_family_calls()))
def test_jit_and_bfloat16(name):
  fn, args = _family_calls()[name]  # Same fn object across calls: cached.
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in args]
  rounded = [np.asarray(x, np.float32) for x in bf16]
  fn = jax.jit(fn)
  got = fn(*bf16)
  assert got.dtype == jnp.float32
  # Inside, bfloat16 inputs are upcast, so the result equals float32 on the
  # rounded values.
  np.testing.assert_allclose(got, fn(*rounded), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, fn(*args), rtol=5e-2, atol=5e-2)
