"""Encoder weights in timm's layout, with how to build the timm model.

timm is what a PyTorch user loads a ResNet or a ViT into. `to_timm` returns
the state_dict (NumPy arrays, timm's parameter names) together with the
`timm.create_model` call that builds the matching network:

  model = timm.create_model(spec['model_name'], pretrained=False,
                            **spec['kwargs'])
  model.load_state_dict(state_dict)          # strict: every key, no other
  features = model(images_nchw)              # == the JAX encoder's output

ResNet: timm's `resnet{depth}` names its parameters as torchvision does, so
the state_dict is `torch_layout.to_torchvision`'s (width 1, no SK); a CIFAR
stem is loaded after replacing timm's stem as users do for 32 px images:
`model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)`,
`model.maxpool = nn.Identity()` (the spec's 'note' says so).

ViT: `models.ViT` already uses timm's names (patch_embed.proj, cls_token,
pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
norm or fc_norm); kernels go from (in, out) to (out, in), the patch
kernel from (P, P, C, D) to (D, C, P, P), LayerNorm scale to weight. A
fixed sine-cosine table is written as timm's pos_embed, which timm then
holds as an ordinary parameter.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from simclr_jax.export import torch_layout
from simclr_jax.models import vit


def _np(x: Any, transpose: tuple[int, ...] | None = None) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.ascontiguousarray(x if transpose is None else x.transpose(
      transpose))


def _dense(out: dict, key: str, p: Mapping[str, Any]) -> None:
  out[f'{key}.weight'] = _np(p['kernel'], (1, 0))
  out[f'{key}.bias'] = _np(p['bias'])


def _norm(out: dict, key: str, p: Mapping[str, Any]) -> None:
  out[f'{key}.weight'] = _np(p['scale'])
  out[f'{key}.bias'] = _np(p['bias'])


def vit_to_timm(params: Mapping[str, Any], kwargs: Mapping[str, Any],
                image_size: int) -> tuple[dict[str, np.ndarray], dict]:
  """(state_dict, spec) of a `models.ViT` with settings `kwargs`."""
  out: dict[str, np.ndarray] = {}
  out['patch_embed.proj.weight'] = _np(params['patch_embed']['kernel'],
                                       (3, 2, 0, 1))
  out['patch_embed.proj.bias'] = _np(params['patch_embed']['bias'])
  out['cls_token'] = _np(params['cls_token'])
  grid = image_size // kwargs['patch_size']
  if kwargs['pos_embed'] == 'learned':
    out['pos_embed'] = _np(params['pos_embed'])
  else:
    out['pos_embed'] = vit.sincos_position_embedding(grid, kwargs['width'])[
        None]
  for i in range(kwargs['depth']):
    b, key = params[f'blocks_{i}'], f'blocks.{i}'
    _norm(out, f'{key}.norm1', b['norm1'])
    _dense(out, f'{key}.attn.qkv', b['attn']['qkv'])
    _dense(out, f'{key}.attn.proj', b['attn']['proj'])
    _norm(out, f'{key}.norm2', b['norm2'])
    _dense(out, f'{key}.mlp.fc1', b['mlp']['fc1'])
    _dense(out, f'{key}.mlp.fc2', b['mlp']['fc2'])
  mean = kwargs['pool'] == 'mean'
  _norm(out, 'fc_norm' if mean else 'norm', params['fc_norm' if mean else
                                                   'norm'])
  size = next((s for s, dims in vit.VIT_SIZES.items() if dims == (
      kwargs['width'], kwargs['depth'], kwargs['num_heads'])), 'tiny')
  spec = dict(
      model_name=f'vit_{size}_patch16_224',
      kwargs=dict(img_size=image_size, patch_size=kwargs['patch_size'],
                  embed_dim=kwargs['width'], depth=kwargs['depth'],
                  num_heads=kwargs['num_heads'], num_classes=0,
                  global_pool='avg' if mean else 'token'))
  return out, spec


def resnet_to_timm(variables: Mapping[str, Any], kwargs: Mapping[str, Any]
                   ) -> tuple[dict[str, np.ndarray], dict]:
  """(state_dict, spec) of a `models.ResNet` with settings `kwargs`."""
  out = torch_layout.to_torchvision(
      variables, allow_cifar_stem=True,
      maxpool_padding=kwargs.get('maxpool_padding', 'torch'))
  # timm's ResNet does not count BN updates.
  out = {k: v for k, v in out.items() if not k.endswith('num_batches_tracked')}
  spec = dict(model_name=f'resnet{kwargs["depth"]}',
              kwargs=dict(num_classes=0))
  if kwargs['cifar_stem']:
    spec['note'] = ('CIFAR stem: set model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, '
                    'bias=False) and model.maxpool = nn.Identity() before '
                    'loading')
  return out, spec


def to_timm(encoder_name: str, kwargs: Mapping[str, Any],
            variables: Mapping[str, Any], image_size: int
            ) -> tuple[dict[str, np.ndarray], dict]:
  """(timm state_dict, {'model_name', 'kwargs'[, 'note']}) of an encoder.

  Args:
    encoder_name: The encoder's kind ('resnet' or 'vit').
    kwargs: Its settings (`encoders.encoder_kwargs`).
    variables: The encoder's variables ({'params'[, 'batch_stats']}).
    image_size: The images it reads (a ViT's position table depends on it).

  Raises:
    ValueError: for an encoder timm cannot represent (a ResNet with SK,
      width != 1 or depth 200; another kind).
  """
  if encoder_name == 'resnet':
    return resnet_to_timm(variables, kwargs)
  if encoder_name == 'vit':
    return vit_to_timm(variables['params'], kwargs, image_size)
  raise ValueError(f'no timm layout for a {encoder_name!r} encoder')
