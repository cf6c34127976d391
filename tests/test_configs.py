"""Every recipe builds (model, optimiser, schedule) without training."""

import glob
import os

import jax
import pytest

from simclr_jax.config import validation as config_validation
from simclr_jax.config import defaults
from simclr_jax import models
from simclr_jax.runtime import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_recipe_builds(path):
  c = defaults.load_recipe(path)
  config_validation.validate(c, num_devices=8)
  with open(path) as f:
    assert 'python -m simclr_jax.main --config=configs/' in f.read()
  model = models.build_model(c, num_classes=10)
  size = c.dataset.image_size
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jax.numpy.zeros((2, size, size, 3)), train=False))
  assert 'encoder' in shapes['params']
  tx, schedule = optim.make_optimizer(c, steps_per_epoch=100,
                                      total_steps=100 * c.num_epochs)
  assert float(schedule(100 * c.num_epochs)) == pytest.approx(0.0, abs=1e-6)


def test_recipe_values_match_reference():
  get = lambda name: defaults.load_recipe(
      os.path.join(ROOT, 'configs', name))
  big = get('imagenet_resnet50_b8192.py')
  assert big.batch_size == 8192 and big.loss.temperature == 0.1
  assert optim.peak_learning_rate(big.optim.base_learning_rate, 8192,
                                  big.optim.lr_scaling) == pytest.approx(
                                      0.075 * 8192 ** 0.5)
  r50 = get('cifar10_resnet50.py')
  assert (r50.model.depth, r50.batch_size, r50.loss.temperature) == (50, 1024,
                                                                     0.5)


def test_simclrv2_recipe_is_sk_with_three_layer_head():
  c = defaults.load_recipe(os.path.join(ROOT, 'configs',
                                        'imagenet_simclrv2_r50_sk.py'))
  assert (c.model.depth, c.model.sk_ratio, c.model.num_proj_layers,
          c.model.ft_proj_selector) == (50, 0.0625, 3, 1)
  assert c.optim.warmup_epochs == pytest.approx(0.05 * c.num_epochs)
  model = models.build_model(c, num_classes=1000)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jax.numpy.zeros((2, 224, 224, 3)),
                         train=False))
  encoder = shapes['params']['encoder']
  assert 'conv_stem1' in encoder and 'sk_conv' in encoder['stage1_block0']
  assert 'dense3' in shapes['params']['projection_head']


def test_moco_v3_vit_b16_recipe_is_the_papers():
  """MoCo v3's ViT-B/16 settings (Chen, Xie, He 2021), and its heads: a
  3-layer 4096-wide projector to 256 and a 2-layer predictor, both ending in
  a BN without affine parameters."""
  from simclr_jax import methods  # pylint: disable=g-import-not-at-top
  c = defaults.load_recipe(os.path.join(ROOT, 'configs',
                                        'imagenet_moco_v3_vit_b16.py'))
  assert (c.method, c.batch_size, c.num_epochs, c.loss.temperature,
          c.moco_v3.momentum) == ('moco_v3', 4096, 300, 0.2, 0.99)
  assert (c.optim.name, c.optim.weight_decay, c.optim.warmup_epochs) == (
      'adamw', 0.1, 40)
  assert optim.peak_learning_rate(c.optim.base_learning_rate, 4096,
                                  c.optim.lr_scaling) == pytest.approx(2.4e-3)
  assert (c.model.name, c.model.vit.size, c.model.vit.patch_size,
          c.model.vit.pos_embed, c.model.vit.frozen_patch_embed) == (
              'vit', 'base', 16, 'sincos', True)
  method = methods.make_method(c, mesh=None, total_steps=10,
                               num_train_examples=0)
  model = models.build_model(c, num_classes=1000,
                             **method.model_overrides())
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jax.numpy.zeros((2, 224, 224, 3)),
                         train=False))['params']
  head, pred = params['projection_head'], params['predictor']
  assert [head[f'dense{i}']['kernel'].shape for i in (1, 2, 3)] == [
      (768, 4096), (4096, 4096), (4096, 256)]
  assert 'bn3' not in head and 'bn2' not in pred
  assert pred['dense2']['kernel'].shape == (4096, 256)
  assert 'bias' not in pred['dense2']


def _changed_fields(base, other) -> set[str]:
  """Names ('section.field' or 'field') of `other`'s values that differ
  from `base`'s."""
  base, changed = base.to_dict(), set()
  for k, v in other.to_dict().items():
    if isinstance(v, dict):
      changed |= {f'{k}.{f}' for f, x in v.items() if base[k][f] != x}
    elif base[k] != v:
      changed.add(k)
  return changed


def test_digits_tiny_recipe_is_the_digits_recipe_shrunk():
  path = os.path.join(ROOT, 'configs', 'digits.py')
  full, tiny = defaults.load_recipe(path), defaults.load_recipe(path, 'tiny')
  config_validation.validate(tiny, num_devices=8)
  assert _changed_fields(full, tiny) == {
      'model.width_multiplier', 'model.proj_out_dim', 'dataset.image_size',
      'batch_size', 'train_steps', 'optim.warmup_epochs',
      'checkpoint_every_steps', 'log_every_steps', 'evals.random_init',
      'eval.fewshot_draws', 'eval.fewshot_shots'}
  assert (tiny.model.width_multiplier, tiny.dataset.image_size,
          tiny.batch_size, tiny.train_steps) == (0.125, 16, 64, 2)
  with pytest.raises(ValueError, match=r"^unknown argument 'huge' of "
                     r'configs/digits.py; it takes none or one of: '
                     r'tiny, validation$'):
    defaults.load_recipe(path, 'huge')
  # validation: the main recipe on 1,077 + 360 of the 1,437 training images.
  val = defaults.load_recipe(path, 'validation')
  assert (val.dataset.train_split, val.dataset.eval_split) == (
      'train[:1077]', 'train[1077:]')
  assert _changed_fields(full, val) == {'dataset.train_split',
                                       'dataset.eval_split'}
