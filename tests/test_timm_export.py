"""Encoders exported to timm load where users load them and compute the same.

Each case builds the timm model from the export's own spec
(`timm.create_model(model_name, **kwargs)`), loads the state_dict strictly
(every key present, none left over) and compares timm's features with the
JAX encoder's on the same images, within 1e-5 of their scale. Random values
for every variable (BN statistics and LayerNorm gains included) make a
wrong mapping or transpose show.

timm runs in one subprocess for all cases: importing torch._dynamo (which
timm's torchvision import does) after TensorFlow is loaded segfaults with
torch 2.14 / TF 2.21, and other tests in this suite load TensorFlow first
(as tests/test_export.py's torchvision parity does).
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from simclr_jax import export
from simclr_jax import models
from simclr_jax.config import defaults
from simclr_jax.export import timm_layout
from test_export import _fake_run, _random_variables, _tiny_run_config

_TIMM_SCRIPT = r"""
import json, sys
import numpy as np
import timm, torch
from safetensors.torch import load_file
d = sys.argv[1]
for case in json.load(open(f'{d}/cases.json')):
  spec = json.load(open(f'{d}/{case}.json'))
  net = timm.create_model(spec['model_name'], pretrained=False,
                          **spec['kwargs'])
  if spec.get('note'):  # The CIFAR stem, swapped as the note tells users.
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  net.load_state_dict(load_file(f'{d}/{spec["state_dict"]}'), strict=True)
  net.eval()
  x = torch.from_numpy(np.load(f'{d}/{case}_x.npy').transpose(0, 3, 1, 2)
                       .copy())
  with torch.no_grad():
    np.save(f'{d}/{case}_timm.npy', net(x).numpy())
"""


def _add_case(d, name, state_dict, spec, images, want, cases):
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
            os.path.join(d, f'{name}.safetensors'))
  with open(os.path.join(d, f'{name}.json'), 'w') as f:
    json.dump(dict(spec, state_dict=f'{name}.safetensors'), f)
  np.save(os.path.join(d, f'{name}_x.npy'), images)
  cases[name] = np.asarray(want)


def _vit_case(d, cases, pool, pos_embed):
  kwargs = dict(width=24, depth=2, num_heads=3, patch_size=4, pool=pool,
                pos_embed=pos_embed, frozen_patch_embed=False)
  module = models.ViT(**kwargs)
  variables = _random_variables(module, size=12)
  images = np.random.default_rng(0).uniform(
      size=(3, 12, 12, 3)).astype(np.float32)
  want = jax.jit(module.apply)(variables, images)
  state_dict, spec = timm_layout.to_timm('vit', kwargs, variables, 12)
  _add_case(d, f'vit_{pool}_{pos_embed}', state_dict, spec, images, want,
            cases)


def _resnet_case(d, cases):
  module = models.ResNet(depth=18, width_multiplier=1, cifar_stem=True)
  variables = _random_variables(module, size=16)
  images = np.random.default_rng(1).uniform(
      size=(2, 16, 16, 3)).astype(np.float32)
  want = jax.jit(lambda v, x: module.apply(v, x, train=False))(
      variables, images)
  kwargs = dict(depth=18, width_multiplier=1.0, sk_ratio=0.0,
                cifar_stem=True, maxpool_padding='torch')
  state_dict, spec = timm_layout.to_timm('resnet', kwargs, variables, 16)
  assert spec['model_name'] == 'resnet18' and 'nn.Identity()' in spec['note']
  _add_case(d, 'resnet18_cifar', state_dict, spec, images, want, cases)


def _run_export_case(d, tmp, cases):
  """A `--mode=export` of a ViT run: its own files, as a user gets them."""
  config = _tiny_run_config()
  config.model.name = 'vit'
  config.model.vit.update(size='tiny', width=16, depth=1, num_heads=2,
                          patch_size=8, pool='mean', pos_embed='sincos')
  run = _fake_run(os.path.join(tmp, 'run'), config)
  export_config = defaults.base_config()
  export_config.init_from = run
  out = os.path.join(tmp, 'out')
  results = export.run_export(export_config, out)
  assert 'no layout for a vit' in results['torchvision_skipped']
  with open(results['timm_spec']) as f:
    spec = json.load(f)
  assert os.path.basename(results['timm_state_dict']) == spec['state_dict']
  # The Flax artifact of the same export gives the reference features.
  encoder, variables = export.load_encoder(out)
  assert isinstance(encoder, models.ViT)
  images = np.random.default_rng(2).uniform(
      size=(2, 16, 16, 3)).astype(np.float32)
  want = jax.jit(encoder.apply)(variables, images)
  name = 'run_export_vit'
  os.replace(results['timm_state_dict'], os.path.join(d, spec['state_dict']))
  with open(os.path.join(d, f'{name}.json'), 'w') as f:
    json.dump(spec, f)
  np.save(os.path.join(d, f'{name}_x.npy'), images)
  cases[name] = np.asarray(want)


@pytest.fixture(scope='module')
def timm_features(tmp_path_factory):
  """{case: (timm features, JAX features)} for every export below."""
  # timm is in the test extra: missing, these tests fail rather than skip.
  for name in ('torch', 'timm'):
    assert importlib.util.find_spec(name) is not None, (
        f"{name} is not installed: pip install -e '.[test]'")
  d = str(tmp_path_factory.mktemp('timm'))
  cases = {}
  _vit_case(d, cases, 'cls', 'learned')
  _vit_case(d, cases, 'mean', 'sincos')
  _resnet_case(d, cases)
  _run_export_case(d, str(tmp_path_factory.mktemp('export')), cases)
  with open(os.path.join(d, 'cases.json'), 'w') as f:
    json.dump(sorted(cases), f)
  subprocess.run([sys.executable, '-c', _TIMM_SCRIPT, d], check=True,
                 timeout=600)
  return {name: (np.load(os.path.join(d, f'{name}_timm.npy')), want)
          for name, want in cases.items()}


@pytest.mark.parametrize('case', ['vit_cls_learned', 'vit_mean_sincos',
                                  'resnet18_cifar', 'run_export_vit'])
def test_export_loads_into_timm_and_matches(timm_features, case):
  got, want = timm_features[case]
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-5 * float(np.abs(want).max()))
