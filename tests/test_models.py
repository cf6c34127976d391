"""Tests for simclr_jax.models: ResNet encoders, heads and the SimCLR model.

Big nets are only traced (jax.eval_shape), never run; forward passes use tiny
widths and images so the file stays fast on a shared 2-core CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax import models
from simclr_jax.models import resnet

BN_EPS = 1e-5


def _key(seed=0):
  """A PRNG key whose generator compiles fast on CPU.

  Init cost in these tests is dominated by XLA compiling one threefry kernel
  per parameter tensor; 'rbg' keys halve it. Model code is impl-agnostic.
  """
  return jax.random.key(seed, impl='rbg')


def _abstract_init(module, image_size=64, **kwargs):
  """Variables' shapes, traced only; parameter shapes ignore image size."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      functools.partial(module.init, train=False, **kwargs),
      _key(0), x)


def _init(module, x, **kwargs):
  """Real `module.init` under one jit (one compile beats op-by-op on CPU)."""
  return jax.jit(functools.partial(module.init, **kwargs))(_key(0), x)


def _cheap_variables(module, x, **kwargs):
  """Random-valued variables without running `init` (no RNG compilation).

  For tests about shapes and padding, where the initialiser is irrelevant.
  """
  shapes = _abstract_init(module, x.shape[1], **kwargs)
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = jax.tree_util.keystr(path[-1:])
    if 'var' in name or 'scale' in name:
      return jnp.ones(s.shape, s.dtype)
    if 'mean' in name or 'bias' in name:
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _conv_nhwc(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------- ResNet ----

# torchvision.models.resnetXX() parameter counts minus the 1000-way fc layer
# (in_features * 1000 + 1000): BN scale+bias count, running stats do not.
@pytest.mark.parametrize('depth, expected', [
    (18, 11_689_512 - (512 * 1000 + 1000)),      # 11,176,512
    (34, 21_797_672 - (512 * 1000 + 1000)),      # 21,284,672
    (50, 25_557_032 - (2048 * 1000 + 1000)),     # 23,508,032
    (101, 44_549_160 - (2048 * 1000 + 1000)),    # 42,500,160
    (152, 60_192_808 - (2048 * 1000 + 1000)),    # 58,143,808
])
def test_param_count_matches_torchvision(depth, expected):
  variables = _abstract_init(models.ResNet(depth=depth))
  assert resnet.count_params(variables['params']) == expected


# Blocks per stage, typed from He et al. 2016 (Table 1; ResNet-200 from
# "Identity Mappings in Deep Residual Networks") / torchvision, not from
# resnet.STAGE_SIZES, which these tests check.
_LAYOUTS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
            50: ('bottleneck', (3, 4, 6, 3)),
            101: ('bottleneck', (3, 4, 23, 3)),
            152: ('bottleneck', (3, 8, 36, 3)),
            200: ('bottleneck', (3, 24, 36, 3))}


def _hand_param_count(depth, width):
  """Encoder parameters of torchvision's ResNet at `width`, layer by layer.

  7x7 stem conv + BN, then per block 3x3/3x3 (basic) or 1x1/3x3/1x1 with
  4x expansion (bottleneck), each conv followed by a BN (scale + bias), and
  a 1x1 projection conv + BN where the stride is 2 or the width changes.
  """
  block, sizes = _LAYOUTS[depth]
  expansion = 4 if block == 'bottleneck' else 1
  w = lambda c: max(1, round(c * width))
  bn = lambda c: 2 * c
  total = 7 * 7 * 3 * w(64) + bn(w(64))
  c_in = w(64)
  for i, num_blocks in enumerate(sizes):
    f = w(64 * 2**i)
    for j in range(num_blocks):
      c_out = f * expansion
      if block == 'basic':
        total += 3 * 3 * c_in * f + bn(f) + 3 * 3 * f * f + bn(f)
      else:
        total += (c_in * f + bn(f) + 3 * 3 * f * f + bn(f) + f * c_out
                  + bn(c_out))
      if (i > 0 and j == 0) or c_in != c_out:
        total += c_in * c_out + bn(c_out)
      c_in = c_out
  return total


@pytest.mark.parametrize('depth, width, paper_millions', [
    (50, 2, 94),    # SimCLR (Chen et al. 2020a), Table 6: ResNet-50 (2x) 94M
    (50, 4, 375),   # and ResNet-50 (4x) 375M.
    (200, 1, None),
    (34, 0.25, None),
])
def test_param_count_derived_by_hand(depth, width, paper_millions):
  """Depths torchvision lacks and the paper's wide nets, counted by hand."""
  variables = _abstract_init(
      models.ResNet(depth=depth, width_multiplier=width))
  want = _hand_param_count(depth, width)
  assert resnet.count_params(variables['params']) == want
  if paper_millions is not None:
    assert round(want / 1e6) == paper_millions
  expansion = 4 if _LAYOUTS[depth][0] == 'bottleneck' else 1
  assert models.ResNet(depth=depth, width_multiplier=width).num_features == (
      round(512 * width) * expansion)


def test_sk_resnet50_param_count_derived_by_hand():
  """SimCLRv2 SK ResNet-50 1x (sk_ratio 0.0625), layer by layer."""
  sk_ratio = 0.0625

  def bn(c):  # scale + bias
    return 2 * c

  # ResNet-D deep stem: 3x3 convs 3->32 (stride 2), 32->32, 32->64.
  stem = (3 * 3 * 3 * 32 + bn(32)
          + 3 * 3 * 32 * 32 + bn(32)
          + 3 * 3 * 32 * 64 + bn(64))

  def block(c_in, f, projection):
    mid = max(int(f * sk_ratio), 32)
    n = c_in * f + bn(f)                 # conv1 1x1 + bn1
    n += 3 * 3 * f * (2 * f) + bn(2 * f)  # SK: 3x3 conv to 2f + BN
    n += f * mid + bn(mid)               # SK: squeeze 1x1 conv + BN
    n += mid * (2 * f)                   # SK: expand 1x1 conv (no BN)
    n += f * (4 * f) + bn(4 * f)         # conv3 1x1 + bn3
    if projection:                       # avg-pool, then 1x1 conv + BN
      n += c_in * (4 * f) + bn(4 * f)
    return n

  total = stem
  c_in = 64
  for f, num_blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for j in range(num_blocks):
      total += block(c_in, f, projection=(j == 0))
      c_in = 4 * f

  model = models.ResNet(depth=50, sk_ratio=sk_ratio)
  variables = _abstract_init(model)
  assert resnet.count_params(variables['params']) == total
  # The SimCLRv2 paper lists 35M parameters for R50-SK 1x.
  assert round(total / 1e6) == 35
  out = jax.eval_shape(
      functools.partial(model.apply, train=False), variables,
      jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 2048) and out.dtype == jnp.float32


def test_bad_depth_raises_clear_error():
  msg = ('model.depth=19 is not supported; choose one of '
         '18, 34, 50, 101, 152, 200')
  with pytest.raises(ValueError) as e:
    models.ResNet(depth=19)
  assert str(e.value) == msg
  config = defaults.base_config()
  config.model.depth = 19
  with pytest.raises(ValueError, match='model.depth=19 is not supported'):
    models.build_model(config, num_classes=10)


@pytest.mark.parametrize('depth', sorted(_LAYOUTS))
def test_block_layout_and_names(depth):
  """Blocks per stage, block type and projections follow the papers' tables.

  Width 1/8: stage i has 8 * 2**(i-1) filters; a bottleneck's output is
  4x that (conv3), a basic block's is the same (conv2).
  """
  block, sizes = _LAYOUTS[depth]
  params = _abstract_init(
      models.ResNet(depth=depth, width_multiplier=0.125))['params']
  blocks = {k for k in params if k.startswith('stage')}
  assert blocks == {f'stage{i + 1}_block{j}' for i, n in enumerate(sizes)
                    for j in range(n)}
  projections = {f'stage{i}_block0' for i in (2, 3, 4)}  # torchvision
  if block == 'bottleneck':
    projections.add('stage1_block0')  # 64 -> 256 channels at stride 1.
  assert {k for k in blocks if 'proj_conv' in params[k]} == projections
  assert {'conv_init', 'bn_init'} <= set(params)
  last_conv = 'conv3' if block == 'bottleneck' else 'conv2'
  for i, n in enumerate(sizes):
    f = 8 * 2**i
    out = 4 * f if block == 'bottleneck' else f
    for j in range(n):
      p = params[f'stage{i + 1}_block{j}']
      assert ('conv3' in p) == (block == 'bottleneck')
      assert p['conv1']['kernel'].shape[-1] == f
      assert p[last_conv]['kernel'].shape[-1] == out


def test_last_bn_gamma_of_every_block_is_zero(tiny_variables):
  encoder = tiny_variables['params']['encoder']
  blocks = [name for name in encoder if name.startswith('stage')]
  assert len(blocks) == 8
  for name in blocks:
    assert np.all(np.asarray(encoder[name]['bn2']['scale']) == 0), name
    assert np.all(np.asarray(encoder[name]['bn1']['scale']) == 1), name


def test_basic_block_starts_as_identity():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  block = resnet.BasicBlock(filters=8)
  variables = _init(block, x, train=False)
  assert 'proj_conv' not in variables['params']
  out = block.apply(variables, x, train=False)
  np.testing.assert_allclose(out, jax.nn.relu(x), atol=1e-6)


@pytest.mark.parametrize('sk_ratio', [0.0, 0.0625])
def test_bottleneck_starts_as_relu_of_shortcut(sk_ratio):
  """Zero gamma on bn3 silences the residual branch: out = relu(shortcut)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 8))
  block = resnet.BottleneckBlock(
      filters=4, strides=2, use_projection=True, sk_ratio=sk_ratio)
  variables = _init(block, x, train=False)
  params = variables['params']
  kernel = params['proj_conv']['kernel']  # (1, 1, 8, 16)
  if sk_ratio > 0:
    # ResNet-D: 2x2 average pool (stride 2) then a stride-1 1x1 conv.
    pooled = x.reshape(2, 4, 2, 4, 2, 8).mean(axis=(2, 4))
    projected = _conv_nhwc(pooled, kernel, 1, 'VALID')
    assert 'sk_conv' in params and 'conv2' not in params
  else:
    projected = _conv_nhwc(x, kernel, 2, 'VALID')
  # Fresh BN in inference mode: mean 0, var 1, scale 1, bias 0.
  shortcut = projected / np.sqrt(1.0 + BN_EPS)
  out = block.apply(variables, x, train=False)
  assert out.shape == (2, 4, 4, 16)
  np.testing.assert_allclose(out, jax.nn.relu(shortcut), atol=1e-5)


def test_bn_axis_name_gives_statistics_over_all_shards():
  """With bn_axis_name, per-shard BN inside a mapped axis equals global BN."""
  x = jax.random.normal(jax.random.key(1), (8, 4, 4, 8))
  variables = _init(resnet.BasicBlock(filters=8), x, train=False)
  variables = jax.tree_util.tree_map(lambda a: a + 0.5, variables)  # bn2 != 0

  @functools.partial(jax.jit, static_argnums=0)
  def apply(block, inputs):
    return block.apply(variables, inputs, train=True,
                       mutable=['batch_stats'])[0]

  global_out = apply(resnet.BasicBlock(filters=8), x)
  sharded = jax.vmap(
      functools.partial(apply, resnet.BasicBlock(filters=8, bn_axis_name='d')),
      axis_name='d')(x.reshape(2, 4, 4, 4, 8))
  np.testing.assert_allclose(sharded.reshape(x.shape), global_out, atol=1e-4)
  local = jax.vmap(functools.partial(apply, resnet.BasicBlock(filters=8)))(
      x.reshape(2, 4, 4, 4, 8))
  assert not np.allclose(local.reshape(x.shape), global_out, atol=1e-3)


def test_selective_kernel_conv_mixes_two_streams():
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  sk = resnet.SelectiveKernelConv(filters=4, strides=2, sk_ratio=0.0625)
  variables = _init(sk, x, train=False)
  p = variables['params']
  assert p['conv']['kernel'].shape == (3, 3, 4, 8)
  assert p['reduce_conv']['kernel'].shape == (1, 1, 4, 32)  # max(4*r, 32)
  assert p['expand_conv']['kernel'].shape == (1, 1, 32, 8)
  # With zero mixing logits the softmax weights are 1/2 each.
  p = jax.tree_util.tree_map(lambda a: a, p)
  p['expand_conv']['kernel'] = jnp.zeros_like(p['expand_conv']['kernel'])
  out = sk.apply({**variables, 'params': p}, x, train=False)
  streams = jax.nn.relu(
      _conv_nhwc(x, p['conv']['kernel'], 2, ((1, 1), (1, 1)))
      / np.sqrt(1.0 + BN_EPS))
  expected = 0.5 * (streams[..., :4] + streams[..., 4:])
  assert out.shape == (2, 3, 3, 4)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def _final_feature_map(model, x):
  """Shapes of the pooled features and the last block's map, traced only."""
  def run(variables, x):
    feats, state = model.apply(
        variables, x, train=False,
        capture_intermediates=lambda mdl, _: mdl.name == 'stage4_block1',
        mutable=['intermediates'])
    return feats, state['intermediates']['stage4_block1']['__call__'][0]
  return jax.eval_shape(run, _abstract_init(model, x.shape[1]), x)


def test_output_shapes_cifar_vs_imagenet_stem():
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  feats, fmap = _final_feature_map(
      models.ResNet(depth=18, width_multiplier=0.25, cifar_stem=True), x)
  assert feats.shape == (2, 128) and feats.dtype == jnp.float32
  assert fmap.shape == (2, 4, 4, 128)  # 32 / 8: the CIFAR stem keeps 32x32.
  feats, fmap = _final_feature_map(
      models.ResNet(depth=18, width_multiplier=0.25, cifar_stem=False), x)
  assert feats.shape == (2, 128)
  assert fmap.shape == (2, 1, 1, 128)  # 32 / 32: stride-2 conv + max-pool.


def test_strided_stem_conv_pads_symmetrically():
  """conv_init equals a conv padded (3, 3), not Flax/TF 'SAME' ((2, 3))."""
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
  model = models.ResNet(depth=18, width_multiplier=0.125)
  variables = _cheap_variables(model, x)
  _, state = model.apply(
      variables, x, train=False,
      capture_intermediates=lambda mdl, _: mdl.name == 'conv_init',
      mutable=['intermediates'])
  got = state['intermediates']['conv_init']['__call__'][0]
  kernel = variables['params']['conv_init']['kernel']
  assert kernel.shape == (7, 7, 3, 8)
  want = _conv_nhwc(x, kernel, 2, ((3, 3), (3, 3)))
  assert got.shape == want.shape == (1, 8, 8, 8)
  np.testing.assert_allclose(got, want, atol=1e-5)
  same = _conv_nhwc(x, kernel, 2, 'SAME')
  assert not np.allclose(got, same, atol=1e-3)


# ----------------------------------------------------------------- heads ----

def test_projection_head_structure():
  h = jax.random.normal(jax.random.key(1), (4, 24))
  head = models.ProjectionHead(num_layers=3, out_dim=16)
  variables = _init(head, h, train=False)
  p = variables['params']
  assert sorted(p) == ['bn1', 'bn2', 'bn3', 'dense1', 'dense2', 'dense3']
  for i in (1, 2, 3):
    assert set(p[f'dense{i}']) == {'kernel'}  # no Dense bias
  assert p['dense1']['kernel'].shape == (24, 24)  # hidden = encoder width
  assert p['dense2']['kernel'].shape == (24, 24)
  assert p['dense3']['kernel'].shape == (24, 16)
  assert set(p['bn1']) == set(p['bn2']) == {'scale', 'bias'}
  assert set(p['bn3']) == {'scale'}  # last BN has no beta
  assert 0.005 < float(np.std(p['dense1']['kernel'])) < 0.02  # N(0, 0.01)
  (z, hiddens), _ = head.apply(variables, h, train=True,
                               mutable=['batch_stats'])
  assert z.shape == (4, 16)
  assert len(hiddens) == 4
  assert hiddens[0] is h and hiddens[-1] is z
  assert all(np.all(np.asarray(t) >= 0) for t in hiddens[1:3])  # post-ReLU

  wide = models.ProjectionHead(num_layers=2, out_dim=8, hidden_dim=32)
  p = _init(wide, h, train=False)['params']
  assert p['dense1']['kernel'].shape == (24, 32)

  identity = models.ProjectionHead(num_layers=0)
  z, hiddens = identity.apply({}, h, train=False)
  assert z is h and len(hiddens) == 1


def test_linear_head():
  h = jnp.ones((3, 8))
  head = models.LinearHead(num_classes=5)
  p = _init(head, h)['params']
  assert p['dense']['kernel'].shape == (8, 5)
  assert p['dense']['bias'].shape == (5,)
  assert head.apply({'params': p}, h).shape == (3, 5)


# ---------------------------------------------------------- SimCLR model ----

def _tiny_model(**kwargs):
  kwargs = dict(depth=18, width_multiplier=0.125, cifar_stem=True,
                num_proj_layers=2, proj_out_dim=8, num_classes=3) | kwargs
  return models.SimCLRModel(**kwargs)


_TINY_X = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))


@pytest.fixture(scope='module')
def tiny_variables():
  """One real init shared by the tests below (init compile time dominates)."""
  return jax.jit(_tiny_model().init, static_argnames='train')(
      _key(0), _TINY_X, train=False)


def test_simclr_model_outputs_and_names(tiny_variables):
  model = _tiny_model()
  assert set(tiny_variables['params']) == {'encoder', 'projection_head',
                                           'linear_head'}
  out, _ = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats']))(
          tiny_variables, _TINY_X)
  assert out['features'].shape == (4, 64)
  assert out['projection'].shape == (4, 8)
  assert len(out['head_hiddens']) == 3
  assert out['head_hiddens'][0].shape == (4, 64)
  assert out['logits'].shape == (4, 3)
  for key in ('features', 'projection', 'logits'):
    assert out[key].dtype == jnp.float32, key

  no_head = _tiny_model(linear_head=False)
  shapes = jax.eval_shape(functools.partial(no_head.init, train=False),
                          _key(0), _TINY_X)
  assert 'linear_head' not in shapes['params']
  variables = dict(tiny_variables)
  variables['params'] = {k: v for k, v in tiny_variables['params'].items()
                         if k != 'linear_head'}
  assert no_head.apply(variables, _TINY_X, train=False)['logits'] is None


def test_linear_head_does_not_train_encoder(tiny_variables):
  model = _tiny_model()

  def loss(params):
    out, _ = model.apply({**tiny_variables, 'params': params}, _TINY_X,
                         train=True, mutable=['batch_stats'])
    return jnp.sum(out['logits'] ** 2) + jnp.sum(out['logits'])

  grads = jax.jit(jax.grad(loss))(tiny_variables['params'])
  for leaf in jax.tree_util.tree_leaves(grads['encoder']):
    assert np.all(np.asarray(leaf) == 0)
  for leaf in jax.tree_util.tree_leaves(grads['projection_head']):
    assert np.all(np.asarray(leaf) == 0)
  assert np.any(np.asarray(grads['linear_head']['dense']['kernel']) != 0)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny_variables):
  model = _tiny_model(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          _key(0), _TINY_X)
  for leaf in jax.tree_util.tree_leaves(shapes):
    assert leaf.dtype == jnp.float32
  # Parameters do not depend on dtype, so the float32 init serves here.
  out, state = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'conv_init'))(
          tiny_variables, _TINY_X)
  for key in ('features', 'projection', 'logits'):
    assert out[key].dtype == jnp.float32, key
  assert all(t.dtype == jnp.float32 for t in out['head_hiddens'])
  for leaf in jax.tree_util.tree_leaves(state['batch_stats']):
    assert leaf.dtype == jnp.float32
  # The computation really ran in bfloat16: the stem conv output says so.
  conv_out = state['intermediates']['encoder']['conv_init']['__call__'][0]
  assert conv_out.dtype == jnp.bfloat16


def test_build_model_from_config():
  config = defaults.base_config()
  model = models.build_model(config, num_classes=10)
  assert isinstance(model, models.SimCLRModel)
  # image_size 32 -> CIFAR stem
  assert model.encoder.depth == 18 and model.encoder.cifar_stem
  assert model.num_classes == 10 and model.linear_head
  assert model.dtype == jnp.float32
  config.dataset.image_size = 224
  config.model.compute_dtype = 'bfloat16'
  config.model.linear_eval_while_pretraining = False
  model = models.build_model(config, num_classes=1000)
  assert not model.encoder.cifar_stem and model.dtype == jnp.bfloat16
  assert model.encoder.dtype == jnp.bfloat16
  assert not model.linear_head
  config.model.stem = 'cifar'
  assert models.build_model(config, num_classes=10).encoder.cifar_stem

  config.model.stem = 'tiny'
  with pytest.raises(ValueError, match=r"model.stem='tiny' is not supported; "
                     r"choose one of 'auto', 'cifar', 'imagenet'"):
    models.build_model(config, num_classes=10)
  config.model.stem = 'auto'
  config.model.compute_dtype = 'float16'
  with pytest.raises(ValueError, match=r"model.compute_dtype='float16' is not "
                     r"supported; choose one of 'float32', 'bfloat16'"):
    models.build_model(config, num_classes=10)
