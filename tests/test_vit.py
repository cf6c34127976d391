"""The Vision Transformer (models/vit.py) against a NumPy transformer and the
published sizes.

The forward pass is recomputed in float64 NumPy from the module's own
parameters (patchify, class token, position embeddings, pre-norm blocks with
softmax attention and an erf-GELU MLP, final LayerNorm, pooling), so a
mistake in head splitting, the QKV layout, the residuals or the pooling
shows as a mismatch. Big sizes are only traced (jax.eval_shape).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.models import vit

EPS = 1e-6


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'])


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _numpy_vit(params, x, patch, heads, pool, pos_table):
  """Float64 ViT forward from Flax parameters, written from the paper."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  n, s, _, c = x.shape
  g = s // patch
  tokens = []
  for r in range(g):
    for col in range(g):
      # One patch, flattened (row, column, channel) like the kernel's axes.
      tokens.append(x[:, r * patch:(r + 1) * patch,
                      col * patch:(col + 1) * patch, :].reshape(n, -1))
  t = np.stack(tokens, 1) @ params['patch_embed']['kernel'].reshape(
      -1, params['patch_embed']['kernel'].shape[-1])
  t = t + params['patch_embed']['bias']
  d = t.shape[-1]
  cls = np.broadcast_to(params['cls_token'], (n, 1, d))
  t = np.concatenate([cls, t], 1) + pos_table
  hd = d // heads
  i = 0
  while f'blocks_{i}' in params:
    b = params[f'blocks_{i}']
    y = _ln(t, b['norm1'])
    qkv = _dense(y, b['attn']['qkv'])
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    out = np.zeros_like(q)
    for h in range(heads):
      sl = slice(h * hd, (h + 1) * hd)
      logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / math.sqrt(hd)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w = w / w.sum(-1, keepdims=True)
      out[..., sl] = w @ v[..., sl]
    t = t + _dense(out, b['attn']['proj'])
    y = _ln(t, b['norm2'])
    t = t + _dense(_gelu(_dense(y, b['mlp']['fc1'])), b['mlp']['fc2'])
    i += 1
  if pool == 'cls':
    return _ln(t, params['norm'])[:, 0]
  return _ln(t[:, 1:].mean(1), params['fc_norm'])


@pytest.mark.parametrize('pool,pos_embed', [('cls', 'learned'),
                                            ('mean', 'sincos')])
def test_forward_equals_numpy_transformer(pool, pos_embed):
  model = vit.ViT(width=16, depth=2, num_heads=2, patch_size=4, pool=pool,
                  pos_embed=pos_embed)
  x = np.random.default_rng(0).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  params = jax.tree.map(np.asarray, variables['params'])
  # Non-trivial LayerNorm and bias values, so each one is checked.
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda a: (a + 0.1 * rng.normal(size=a.shape)).astype(np.float32),
      params)
  got = jax.jit(model.apply)({'params': params}, x)
  if pos_embed == 'learned':
    pos_table = np.asarray(params['pos_embed'], np.float64)[0]
  else:
    pos_table = _sincos_by_formula(2, 16)
  want = _numpy_vit(params, x.astype(np.float64), 4, 2, pool, pos_table)
  assert got.shape == (3, 16) and model.num_features == 16
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _sincos_by_formula(grid, width):
  """Token (r, c): sin/cos(r w_i) then sin/cos(c w_i), w_i = 1e4^(-i/(d/4))."""
  q = width // 4
  rows = [np.zeros(width)]
  for r in range(grid):
    for c in range(grid):
      w = [10000.0 ** (-i / q) for i in range(q)]
      rows.append(np.array([math.sin(r * f) for f in w] +
                           [math.cos(r * f) for f in w] +
                           [math.sin(c * f) for f in w] +
                           [math.cos(c * f) for f in w]))
  return np.stack(rows)


def test_sincos_table_matches_formula():
  np.testing.assert_allclose(vit.sincos_position_embedding(3, 8),
                             _sincos_by_formula(3, 8), atol=1e-6)


def test_vit_base_16_parameter_count():
  """ViT-B/16 at 224 px without a head: 86M parameters, by hand."""
  d, depth, p, tokens = 768, 12, 16, 1 + (224 // 16) ** 2
  per_block = (2 * 2 * d                 # two LayerNorms
               + d * 3 * d + 3 * d       # qkv
               + d * d + d               # attention projection
               + d * 4 * d + 4 * d       # fc1
               + 4 * d * d + d)          # fc2
  want = p * p * 3 * d + d + d + tokens * d + depth * per_block + 2 * d
  shapes = jax.eval_shape(
      functools.partial(vit.vit('base', patch_size=16).init),
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  got = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes['params']))
  assert got == want
  assert 85.5e6 < got < 86.5e6


@pytest.mark.parametrize('size,width,heads', [('tiny', 192, 3),
                                               ('small', 384, 6)])
def test_standard_sizes(size, width, heads):
  model = vit.vit(size, patch_size=4)
  assert (model.width, model.depth, model.num_heads) == (width, 12, heads)
  out = jax.eval_shape(
      lambda x: model.apply(model.init(jax.random.key(0), x), x),
      jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, width)


def test_frozen_patch_embedding_gets_no_gradient():
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  for frozen in (False, True):
    model = vit.ViT(width=8, depth=1, num_heads=2, patch_size=4,
                    frozen_patch_embed=frozen)
    params = jax.jit(model.init)(jax.random.key(0), x)['params']
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))(params)
    patch = max(float(jnp.abs(g).max())
                for g in jax.tree.leaves(grads['patch_embed']))
    qkv = float(jnp.abs(grads['blocks_0']['attn']['qkv']['kernel']).max())
    assert (patch == 0) == frozen
    assert qkv > 0


def test_remat_keeps_names_and_gradients_and_recomputes_the_blocks():
  """model.vit.remat: the same parameter tree and gradients as without it,
  and the blocks are under jax.checkpoint in the traced program (so the
  flag is not ignored)."""
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  kw = dict(width=8, depth=2, num_heads=2, patch_size=4)
  plain, remat = vit.ViT(**kw), vit.ViT(**kw, remat=True)
  params = jax.jit(plain.init)(jax.random.key(0), x)['params']
  assert (jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(remat.init, jax.random.key(0), x)['params']))
  grad = lambda m: jax.grad(
      lambda p: jnp.sum(jnp.tanh(m.apply({'params': p}, x))))
  # Recomputed activations round differently in the last bits.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               jax.jit(grad(remat))(params), jax.jit(grad(plain))(params))
  # jax.checkpoint traces as the `remat` primitive.
  assert 'remat' in str(jax.make_jaxpr(grad(remat))(params))
  assert 'remat' not in str(jax.make_jaxpr(grad(plain))(params))


def test_qkv_init_is_xavier_over_each_third():
  model = vit.ViT(width=64, depth=1, num_heads=4, patch_size=4)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 8, 8, 3)))['params']
  qkv = np.asarray(params['blocks_0']['attn']['qkv']['kernel'])
  bound = math.sqrt(6 / (64 + 64))   # fan_in 64, fan_out 64 per third
  assert np.abs(qkv).max() <= bound
  assert np.abs(qkv).max() > 0.95 * bound   # not the (64, 192) Xavier bound


def test_bad_settings_raise_one_line_errors():
  with pytest.raises(ValueError, match='size'):
    vit.vit('huge')
  with pytest.raises(ValueError, match='pool'):
    vit.ViT(pool='max')
  with pytest.raises(ValueError, match='patch size 5'):
    vit.ViT(width=8, depth=1, num_heads=2, patch_size=5).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
