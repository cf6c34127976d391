"""Encoders exported to timm load where users load them and compute the same.

Each test builds the timm model from the export's own spec
(`timm.create_model(model_name, **kwargs)`), loads the state_dict strictly
(every key present, none left over) and compares timm's features with the
JAX encoder's on the same images, within 1e-5 of their scale. Random values
for every variable (BN statistics and LayerNorm gains included) make a
wrong mapping or transpose show.
"""

import json
import os

import jax
import numpy as np
import pytest

from simclr_jax import export
from simclr_jax import models
from simclr_jax.config import defaults
from simclr_jax.export import timm_layout
from simclr_jax.models import encoders
from test_export import _fake_run, _random_variables, _tiny_run_config

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')


def _timm_features(state_dict, spec, images, cifar_stem=False):
  model = timm.create_model(spec['model_name'], pretrained=False,
                            **spec['kwargs'])
  if cifar_stem:  # As the spec's note tells users.
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v))
                         for k, v in state_dict.items()}, strict=True)
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize('pool,pos_embed', [('cls', 'learned'),
                                            ('mean', 'sincos')])
def test_vit_export_loads_into_timm_and_matches(pool, pos_embed):
  kwargs = dict(width=24, depth=2, num_heads=3, patch_size=4, pool=pool,
                pos_embed=pos_embed, frozen_patch_embed=False)
  module = models.ViT(**kwargs)
  variables = _random_variables(module, size=12)
  images = np.random.default_rng(0).uniform(
      size=(3, 12, 12, 3)).astype(np.float32)
  want = np.asarray(jax.jit(module.apply)(variables, images))
  state_dict, spec = timm_layout.to_timm('vit', kwargs, variables, 12)
  got = _timm_features(state_dict, spec, images)
  assert got.shape == want.shape == (3, 24)
  _assert_close(got, want)


def test_resnet_export_with_the_cifar_stem_loads_into_timm_and_matches():
  module = models.ResNet(depth=18, width_multiplier=1, cifar_stem=True)
  variables = _random_variables(module, size=16)
  images = np.random.default_rng(1).uniform(
      size=(2, 16, 16, 3)).astype(np.float32)
  want = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, images))
  kwargs = dict(depth=18, width_multiplier=1.0, sk_ratio=0.0,
                cifar_stem=True, maxpool_padding='torch')
  state_dict, spec = timm_layout.to_timm('resnet', kwargs, variables, 16)
  assert spec['model_name'] == 'resnet18' and 'nn.Identity()' in spec['note']
  got = _timm_features(state_dict, spec, images, cifar_stem=True)
  _assert_close(got, want)


def test_run_export_of_a_vit_run_writes_a_timm_file_users_can_load(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = _tiny_run_config()
  config.model.name = 'vit'
  config.model.vit.update(size='tiny', width=16, depth=1, num_heads=2,
                          patch_size=8, pool='mean', pos_embed='sincos')
  run = _fake_run(str(tmp_path / 'run'), config)
  export_config = defaults.base_config()
  export_config.init_from = run
  results = export.run_export(export_config, str(tmp_path / 'out'))
  assert 'no layout for a vit' in results['torchvision_skipped']
  with open(results['timm_spec']) as f:
    spec = json.load(f)
  assert os.path.basename(results['timm_state_dict']) == spec['state_dict']
  images = np.random.default_rng(2).uniform(
      size=(2, 16, 16, 3)).astype(np.float32)
  # The Flax artifact of the same export gives the reference features.
  encoder, variables = export.load_encoder(str(tmp_path / 'out'))
  assert isinstance(encoder, models.ViT)
  want = np.asarray(jax.jit(encoder.apply)(variables, images))
  got = _timm_features(load_file(results['timm_state_dict']), spec, images)
  _assert_close(got, want)
  assert encoders.encoder_kwargs(config.model, 16)['pos_embed'] == 'sincos'
