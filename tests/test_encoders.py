"""The encoder registry (models/encoders.py): a backbone is one module plus
one `register` call, and callers learn what they need from it.

A toy backbone registered here goes through config validation, the SimCLR
model, the pretraining optimiser's weight-decay and frozen-parameter rules
and partial fine-tuning without any other file knowing its names; the ViT
takes the same path.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models
from simclr_jax.config import defaults
from simclr_jax.config import validation
from simclr_jax.models import encoders
from simclr_jax.training import pretrain
from simclr_jax.training import supervised


class Toy(nn.Module):
  """Mean colour -> one dense layer; 'gain' is an embedding-like leaf."""
  features: int = 8
  dtype: object = jnp.float32
  bn_axis_name: str | None = None

  @property
  def num_features(self) -> int:
    return self.features

  @nn.compact
  def __call__(self, x, train=False):
    gain = self.param('gain', nn.initializers.ones, (self.features,))
    h = nn.Dense(self.features, name='proj')(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.features, name='out')(h) * gain


@pytest.fixture
def toy_registered(monkeypatch):
  monkeypatch.setattr(encoders, 'ENCODERS', dict(encoders.ENCODERS))
  encoders.register(encoders.EncoderKind(
      name='toy', module=Toy,
      kwargs=lambda m, size: dict(features=int(m.toy_features)),
      check=lambda m, size: None,
      no_decay_leaves=('gain',),
      frozen_submodules=lambda kw: ('proj',),
      fine_tune_block=lambda kw: {'gain': 0, 'proj': 0, 'out': 1}.get,
      resume_fields=('model.toy_features',),
      describe=lambda kw: f'toy{kw["features"]}'))


def _after_steps(tx, params, grads, steps=3):
  """Params after `steps` optimiser updates with fixed gradients (jitted)."""
  def run(params):
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(grads, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params
  return jax.jit(run)(params)


def _toy_config():
  config = defaults.base_config()
  config.model.name = 'toy'
  config.model.toy_features = 8
  config.dataset.image_size = 8
  config.batch_size = 8
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.5
  return config


def test_a_registered_toy_backbone_trains_through_the_shared_code(
    toy_registered):
  config = _toy_config()
  validation.validate(config, num_devices=1)
  model = models.build_model(config, num_classes=3)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)),
                  jnp.float32)
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out['features'].shape == (4, 8)
  assert set(variables['params']['encoder']) == {'gain', 'proj', 'out'}
  assert encoders.describe(config.model, 8) == 'toy8'
  assert 'model.toy_features' in defaults.resume_fields(config, 'pretrain')

  # One AdamW step with zero gradients: only weight decay moves weights, so
  # a leaf changes iff it is decayed and not frozen.
  tx, _ = pretrain.make_optimizer(config, steps_per_epoch=10,
                                  total_steps=10)
  # Three steps: past the warmup's zero learning rate.
  params = _after_steps(tx, variables['params'],
                        jax.tree.map(jnp.zeros_like, variables['params']))
  enc, enc0 = params['encoder'], variables['params']['encoder']
  assert np.array_equal(enc['gain'], enc0['gain'])        # no_decay leaf
  assert np.array_equal(enc['proj']['kernel'], enc0['proj']['kernel'])  # frozen
  assert not np.array_equal(enc['out']['kernel'], enc0['out']['kernel'])
  assert np.array_equal(enc['out']['bias'], enc0['out']['bias'])

  # Partial fine-tuning numbers the toy's parts by its own rule.
  mask = supervised.frozen_mask(
      variables['params'], fine_tune_after_block=0,
      block_of=encoders.fine_tune_block(config.model, 8))
  assert all(jax.tree.leaves(mask['encoder']['proj']))
  assert not any(jax.tree.leaves(mask['encoder']['out']))


def test_unknown_encoder_is_a_one_line_config_error():
  config = defaults.base_config()
  config.model.name = 'alexnet'
  with pytest.raises(validation.ConfigError,
                     match=r"model.name.*'alexnet'.*resnet.*vit"):
    validation.validate(config, num_devices=1)


def _vit_config(**vit):
  config = defaults.base_config()
  config.model.name = 'vit'
  config.dataset.image_size = 8
  config.model.vit.update(dict(size='tiny', width=16, depth=2, num_heads=2,
                               patch_size=4), **vit)
  return config


def test_simclr_with_a_vit_and_moco_v3_parameter_rules():
  config = _vit_config(frozen_patch_embed=True, pos_embed='learned')
  config.optim.name = 'adamw'
  config.optim.weight_decay = 0.1
  validation.validate(config, num_devices=1)
  model = models.build_model(config, num_classes=3)
  x = jnp.zeros((2, 8, 8, 3))
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(0), x, train=False)
  enc0 = variables['params']['encoder']
  assert model.apply(variables, x, train=False)['features'].shape == (2, 16)
  assert encoders.describe(config.model, 8) == 'vit_16x2_p4'

  tx, _ = pretrain.make_optimizer(config, steps_per_epoch=10,
                                  total_steps=10)
  params = _after_steps(tx, variables['params'],
                        jax.tree.map(jnp.ones_like, variables['params']))
  enc = params['encoder']
  # The frozen patch projection does not move even with gradients.
  for leaf in ('kernel', 'bias'):
    assert np.array_equal(enc['patch_embed'][leaf], enc0['patch_embed'][leaf])
  assert not np.array_equal(enc['blocks_0']['attn']['qkv']['kernel'],
                            enc0['blocks_0']['attn']['qkv']['kernel'])

  # Decay alone (zero gradients) leaves the embeddings where they are.
  params = _after_steps(tx, variables['params'],
                        jax.tree.map(jnp.zeros_like, variables['params']))
  enc = params['encoder']
  for leaf in ('pos_embed', 'cls_token'):
    assert np.array_equal(enc[leaf], enc0[leaf])
  assert not np.array_equal(enc['blocks_0']['mlp']['fc1']['kernel'],
                            enc0['blocks_0']['mlp']['fc1']['kernel'])


def test_vit_resume_fields_and_fine_tune_blocks():
  config = _vit_config()
  fields = defaults.resume_fields(config, 'pretrain')
  assert {'model.name', 'model.vit.size', 'model.vit.patch_size'} <= set(
      fields)
  block = encoders.fine_tune_block(config.model, 8)
  assert [block(n) for n in ('patch_embed', 'cls_token', 'pos_embed')] == [
      0, 0, 0]
  assert (block('blocks_0'), block('blocks_1'), block('norm')) == (1, 3, 4)
  # ViT-Tiny's 12 blocks, a quarter to each stage number.
  twelve = encoders.fine_tune_block(
      _vit_config(width=0, depth=0, num_heads=0).model, 8)
  assert [twelve(f'blocks_{i}') for i in range(12)] == [
      1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


@pytest.mark.parametrize('field,value,message', [
    ('patch_size', 3, 'patch_size=3 is invalid'),
    ('size', 'huge', "size='huge' is not supported"),
    ('pool', 'max', "pool='max' is not supported"),
    ('num_heads', 3, 'not divisible by its 3 heads'),
])
def test_bad_vit_settings_are_one_line_config_errors(field, value, message):
  config = _vit_config(**{field: value})
  with pytest.raises(validation.ConfigError, match=message):
    validation.validate(config, num_devices=1)
