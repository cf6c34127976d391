"""Domain adaptation (--mode=adapt): alignment losses, domain batches, and
the mode's guarantees (target labels never train; SIGTERM/resume).

Loss values and gradients are checked against NumPy formulas written out
here (float64); the training runs against an uninterrupted in-process run.
"""

import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.data import digits
from simclr_jax.data import digits_m
from simclr_jax.data import in_memory
from simclr_jax.downstream import adapt
from simclr_jax.losses import alignment
from conftest import tiny_config
from test_faults import BASE
from test_faults import Run
from test_faults import _assert_trees_close
from test_faults import _run
from test_faults import _state

# ------------------------------------------------------------- the losses --


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
  x = jax.random.normal(jax.random.key(0), (5, 7))
  g = jax.random.normal(jax.random.key(1), (5, 7))
  for lam in (0.0, 0.3, 1.0, 2.5):
    y, vjp = jax.vjp(lambda v: alignment.gradient_reversal(v, lam), x)
    np.testing.assert_array_equal(y, x)
    (back,) = vjp(g)
    np.testing.assert_array_equal(back, -lam * g)
  # Through a larger graph: d/dx sum(w * GRL(x)) = -lam * w.
  w = jnp.arange(35.0).reshape(5, 7)
  grad = jax.grad(lambda v: jnp.sum(w * alignment.gradient_reversal(v, 0.5)))
  np.testing.assert_array_equal(grad(x), -0.5 * w)


def test_dann_schedule():
  p = np.linspace(0, 1, 11)
  np.testing.assert_allclose(alignment.dann_schedule(jnp.asarray(p), 10.0),
                             2 / (1 + np.exp(-10 * p)) - 1, rtol=1e-6)


def _np_cov(x):
  c = x - x.mean(0)
  return c.T @ c / (len(x) - 1)


def _features(n=12, m=9, d=6):
  rng = np.random.default_rng(3)
  return rng.normal(size=(n, d)), 0.5 + 2 * rng.normal(size=(m, d))


def test_coral_value_and_gradient_against_numpy():
  s, t = _features()
  d = s.shape[1]
  diff = _np_cov(s) - _np_cov(t)
  value = np.sum(diff**2) / (4 * d * d)
  # dL/dS = (S - mean S) (C_s - C_t) / (d^2 (n - 1)); minus that for T.
  grad_s = (s - s.mean(0)) @ diff / (d * d * (len(s) - 1))
  grad_t = -(t - t.mean(0)) @ diff / (d * d * (len(t) - 1))
  got, (gs, gt) = jax.value_and_grad(alignment.coral, argnums=(0, 1))(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, value, rtol=1e-5)
  np.testing.assert_allclose(gs, grad_s, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gt, grad_t, rtol=1e-4, atol=1e-7)


def _np_kernel(a, b, sig2):
  d2 = ((a[:, None, :] - b[None, :, :])**2).sum(-1)
  return sum(np.exp(-d2 / (2 * s)) for s in sig2)


def _np_dkernel(a, b, sig2):
  """d k(a_i, b_j) / d a_i, summed over j: (len(a), dim)."""
  diff = a[:, None, :] - b[None, :, :]
  d2 = (diff**2).sum(-1)
  return sum((-np.exp(-d2 / (2 * s)) / s)[..., None] * diff
             for s in sig2).sum(1)


def test_mmd_value_and_gradient_against_numpy():
  s, t = _features()
  n, m = len(s), len(t)
  sig2 = np.array([0.5, 2.0, 8.0])
  value = (_np_kernel(s, s, sig2).mean() + _np_kernel(t, t, sig2).mean()
           - 2 * _np_kernel(s, t, sig2).mean())
  # Each s_i appears twice in the s-s sum (as a and as b), once in s-t.
  grad_s = 2 * _np_dkernel(s, s, sig2) / n**2 - 2 * _np_dkernel(
      s, t, sig2) / (n * m)
  grad_t = 2 * _np_dkernel(t, t, sig2) / m**2 - 2 * _np_dkernel(
      t, s, sig2) / (n * m)
  fn = lambda a, b: alignment.mmd(a, b, jnp.asarray(sig2, jnp.float32))
  got, (gs, gt) = jax.value_and_grad(fn, argnums=(0, 1))(
      jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, value, rtol=1e-4)
  np.testing.assert_allclose(gs, grad_s, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(gt, grad_t, rtol=1e-3, atol=1e-6)
  # Default bandwidths: the multipliers x the joint batch's mean squared
  # pairwise distance (zero diagonal included).
  joint = np.concatenate([s, t])
  base = ((joint[:, None] - joint[None])**2).sum(-1).mean()
  np.testing.assert_allclose(
      alignment.mmd_bandwidths(jnp.asarray(s), jnp.asarray(t)),
      base * np.asarray(alignment.MMD_BANDWIDTH_MULTIPLIERS), rtol=1e-4)
  assert float(alignment.mmd(jnp.asarray(s), jnp.asarray(s))) == (
      pytest.approx(0.0, abs=1e-5))


# ---------------------------------------------------------------- the data --


def test_digits_m_is_the_digits_on_textures():
  for split in digits.SPLITS:
    x, y = digits.load_digits(split)
    xm, ym = digits_m.load_digits_m(split)
    np.testing.assert_array_equal(y, ym)
    tex = digits_m.textures(len(y), x.shape[1], 0 if split == 'train' else 1)
    expect = np.clip(np.round(np.abs(tex - x / 255.0) * 255), 0, 255)
    np.testing.assert_array_equal(xm, expect.astype(np.uint8))
  # Deterministic and not the plain digits.
  assert digits_m.textures(2, 8, 0).tolist() == digits_m.textures(
      2, 8, 0).tolist()
  assert np.abs(xm.astype(int) - x).mean() > 40


def test_domain_batches_balanced_and_disjoint_across_processes():
  n_src, n_tgt, batch = 40, 56, 8
  src = (np.zeros((n_src, 2, 2, 3), np.uint8), np.arange(n_src) % 10)
  tgt = np.zeros((n_tgt, 2, 2, 3), np.uint8)
  tgt[:, 0, 0, 0], tgt[:, 0, 0, 1] = np.arange(n_tgt) // 256, np.arange(
      n_tgt) % 256
  src_ids = (np.arange(n_src), src[1])

  def stream(p, count, start=0):
    # Source rows are identified through a labels array holding row ids.
    it = adapt.domain_batches((src[0], src_ids[0].astype(np.int32)), tgt,
                              global_batch=batch, seed=5, process_index=p,
                              process_count=count, start_step=start)
    return [next(it) for _ in range(n_src // batch)]

  seen = {}
  for p in (0, 1):
    batches = stream(p, 2)
    for b in batches:
      assert len(b['source_images']) == len(b['target_images']) == batch // 2
      assert 'target_labels' not in b
    seen[p] = (np.concatenate([b['source_labels'] for b in batches]),
               np.concatenate([b['target_images'][:, 0, 0, 0].astype(int)
                               * 256 + b['target_images'][:, 0, 0, 1]
                               for b in batches]))
  # One epoch of the source: the two processes' rows are disjoint and cover
  # it; the target rows of the same steps are disjoint too.
  assert not set(seen[0][0]) & set(seen[1][0])
  assert sorted(np.concatenate([seen[0][0], seen[1][0]])) == list(
      range(n_src))
  assert not set(seen[0][1]) & set(seen[1][1])
  # The two processes together make the 1-process global batches.
  single = stream(0, 1)
  for k, b in enumerate(single):
    np.testing.assert_array_equal(
        b['source_labels'],
        np.concatenate([seen[0][0][k * 4:k * 4 + 4],
                        seen[1][0][k * 4:k * 4 + 4]]))


# --------------------------------------------------------------- the mode --

TOTAL = 8  # ceil(0.35 epochs * 1437 source images / 64).
ADAPT = ('--mode=adapt', '--config.adapt.method=dann',
         '--config.adapt.batch_size=64', '--config.adapt.epochs=0.35',
         '--config.adapt.domain_hidden_dim=16')


def _config():
  """The config of `Run(workdir, *ADAPT)`."""
  return tiny_config(*BASE, *ADAPT[1:])


def _adapt_in_process(workdir, poison_target_labels=False):
  from simclr_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  original = in_memory.DigitsSource._load  # pylint: disable=protected-access

  def poisoned(source, split):
    images, labels = original(source, split)
    if source.name == 'digits_m' and split == 'train':
      labels = np.random.default_rng(1).integers(0, 10, len(labels)).astype(
          np.int32)
    return images, labels

  workdir_lib.prepare_workdir(str(workdir))
  if poison_target_labels:
    in_memory.DigitsSource._load = poisoned  # pylint: disable=protected-access
  try:
    return adapt.run_adapt(_config(), str(workdir))
  finally:
    in_memory.DigitsSource._load = original  # pylint: disable=protected-access


@pytest.fixture(scope='module', name='reference')
def _reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('adapt_reference')
  results = _adapt_in_process(workdir)
  assert results['steps'] == TOTAL and not results['interrupted']
  return workdir, results


def test_poisoned_target_labels_give_bit_identical_training(reference,
                                                            tmp_path):
  workdir, results = reference
  poisoned = _adapt_in_process(tmp_path, poison_target_labels=True)
  a, b = _state(workdir, TOTAL), _state(tmp_path, TOTAL)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Evaluation reads the target's test split, whose labels were kept.
  assert poisoned['target_top1_accuracy'] == results['target_top1_accuracy']
  assert 0.0 <= results['source_top1_accuracy'] <= 1.0


def test_adapt_survives_sigterm_and_resumes_to_the_reference(reference,
                                                             tmp_path):
  ref_dir, ref_results = reference
  workdir = tmp_path / 'run'
  run = Run(workdir, *ADAPT)
  run.wait_for(lambda r: r.last_step_logged() >= 1)
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == 0, run.log[-3000:]
  hint = [line for line in run.lines if 'Re-run the same command' in line]
  assert hint and 'signal 15' in hint[0], run.log[-3000:]
  stopped_at = int(re.search(r'at step (\d+)', hint[0]).group(1))
  assert stopped_at < TOTAL
  assert run.results()['interrupted'] is True
  run = _run(workdir, *ADAPT)
  assert run.proc.returncode == 0, run.log[-3000:]
  results = run.results()
  assert results['resumed_from_step'] == stopped_at
  assert results['steps'] == TOTAL and not results['interrupted']
  _assert_trees_close(_state(workdir, TOTAL), _state(ref_dir, TOTAL))
  assert results['target_top1_accuracy'] == pytest.approx(
      ref_results['target_top1_accuracy'])
  assert os.path.isfile(os.path.join(workdir, 'results.json'))


def test_batch_stats_recalibration_reaches_the_data_statistics():
  """AdaBN's core (training/state.recalibrate_batch_stats): after enough
  passes the BN running mean/var are the NumPy mean/var of the BN input."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      h = nn.Dense(4, name='dense')(x)
      return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                          name='bn')(h)

  net = Net()
  x = np.random.default_rng(0).normal(3.0, 2.0, (256, 5)).astype(np.float32)
  variables = net.init(jax.random.key(0), x[:8], train=False)
  out = state_lib.recalibrate_batch_stats(net, variables, x, batch_size=64,
                                          num_devices=8, passes=20)
  h = x @ np.asarray(variables['params']['dense']['kernel']) + np.asarray(
      variables['params']['dense']['bias'])
  stats = out['batch_stats']['bn']
  np.testing.assert_allclose(stats['mean'], h.mean(0), rtol=0.05, atol=0.05)
  np.testing.assert_allclose(stats['var'], h.var(0), rtol=0.1)
  assert out['params'] is variables['params']
  assert adapt.parse_method('adabn') == (False, 'none')
