"""Flax ResNet variables -> torchvision `state_dict` layout (numpy arrays).

The encoder's parameter names were chosen to be a rename of torchvision's
(see the table in models/resnet.py), so the conversion is: pick the encoder
out of a SimCLRModel tree if needed, rename, transpose conv kernels from HWIO
to OIHW, and add the BN buffer `num_batches_tracked` that torch expects.

Only the architectures torchvision itself defines are converted: depths
18/34/50/101/152 at width 1 with the ImageNet stem. Anything else would give a
file that `torchvision.models.resnetXX()` either rejects (shape mismatch) or,
worse, loads into a different network; those raise a ValueError naming the
reason. The CIFAR stem is allowed on request (`allow_cifar_stem=True`): the
keys stay the same and conv1.weight is 3x3, the common torch recipe that
swaps in `nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and `nn.Identity()` for
`conv1` and `maxpool`.

The stem max-pool's padding is not in the weights: torchvision pads it
(1, 1), i.e. `ResNet(maxpool_padding='torch')`. An ImageNet-stem encoder run
with 'tf' padding (imported TF checkpoints) is refused rather than warned
about, since torchvision would compute different features from the same
file (about 1% at 224 px) with nothing to show for it; pass
maxpool_padding='torch' explicitly to accept that shift.

The projection head goes to its own file (torchvision has no counterpart);
its layout is the one of an `nn.Sequential` of `Linear(bias=False)`,
`BatchNorm1d` and `ReLU` modules, described in `projection_head_to_torch`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from simclr_jax.models import heads
from simclr_jax.models import resnet
from simclr_jax.models.variables import split_variables

# torchvision.models builds these; ResNet-200 has no torchvision constructor.
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)

_BLOCK_RE = re.compile(r'^stage(\d)_block(\d+)$')
_BN_NAMES = {'scale': 'weight', 'bias': 'bias'}
_BN_STATS = {'mean': 'running_mean', 'var': 'running_var'}


def _leaf(x: Any, transpose: tuple[int, ...] | None = None) -> Any:
  """float32 numpy copy of a leaf (a ShapeDtypeStruct stays abstract).

  Abstract leaves let tests and users check the full layout of a ResNet-152
  with `jax.eval_shape` without allocating it.
  """
  if isinstance(x, jax.ShapeDtypeStruct):
    shape = x.shape if transpose is None else tuple(x.shape[i]
                                                    for i in transpose)
    return jax.ShapeDtypeStruct(shape, np.float32)
  x = np.asarray(x, dtype=np.float32)
  return x if transpose is None else np.ascontiguousarray(
      x.transpose(transpose))


def describe_encoder(params: Mapping[str, Any]) -> dict[str, Any]:
  """Infers depth, width, stem and SK from the encoder's parameter shapes."""
  if 'conv_stem1' in params:
    stem, sk = 'resnet_d', True
  else:
    k = params['conv_init']['kernel'].shape[0]
    stem, sk = ('imagenet' if k == 7 else 'cifar'), False
  stages = [0, 0, 0, 0]
  bottleneck = False
  for name, block in params.items():
    match = _BLOCK_RE.match(name)
    if match:
      stage = int(match.group(1))
      stages[stage - 1] = max(stages[stage - 1], int(match.group(2)) + 1)
      bottleneck = 'conv3' in block
      sk = sk or 'sk_conv' in block
  block_type = 'bottleneck' if bottleneck else 'basic'
  depth = next((d for d, (b, sizes) in resnet.STAGE_SIZES.items()
                if b == block_type and list(sizes) == stages), None)
  width = params['conv_init']['kernel'].shape[-1] / 64
  return dict(depth=depth, width_multiplier=width, stem=stem, sk=sk,
              stage_sizes=tuple(stages), block_type=block_type)


def check_torchvision_compatible(params: Mapping[str, Any],
                                 allow_cifar_stem: bool = False,
                                 maxpool_padding: str = 'torch') -> dict:
  """Raises a ValueError saying why torchvision cannot hold this encoder."""
  resnet.check_maxpool_padding(maxpool_padding)
  info = describe_encoder(params)
  if info['sk'] or info['stem'] == 'resnet_d':
    raise ValueError(
        'cannot export a selective-kernel (SK) ResNet to torchvision: '
        'torchvision has no SK convs, ResNet-D stem or average-pool '
        'shortcuts; use the Flax artifact instead')
  if info['depth'] not in TORCHVISION_DEPTHS:
    raise ValueError(
        f'cannot export to torchvision: stage sizes {info["stage_sizes"]} '
        f'({info["block_type"]} blocks) are depth {info["depth"]}, and '
        'torchvision only builds resnet18/34/50/101/152')
  if info['width_multiplier'] != 1:
    raise ValueError(
        f'cannot export width_multiplier={info["width_multiplier"]:g} to '
        'torchvision: its resnets are width 1 only (wide_resnet50_2 widens '
        'only the bottleneck, a different network from SimCLR\'s 2x)')
  if info['stem'] == 'cifar' and not allow_cifar_stem:
    raise ValueError(
        'cannot export the CIFAR stem (3x3 stride-1 conv1, no max-pool) to a '
        'stock torchvision resnet, whose conv1 is 7x7 stride 2 followed by a '
        'max-pool; pass allow_cifar_stem=True for the CIFAR layout (replace '
        'conv1 by nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool by '
        'nn.Identity() before loading)')
  if info['stem'] == 'imagenet' and maxpool_padding != 'torch':
    raise ValueError(
        f'cannot export an encoder with maxpool_padding={maxpool_padding!r} '
        'to torchvision: its stem max-pool pads (1, 1) (maxpool_padding='
        '\'torch\'), so on even-sized feature maps (e.g. 224 px inputs) it '
        'would pool a grid shifted by one pixel and give different features; '
        'use the Flax artifact, or pass maxpool_padding=\'torch\' to accept '
        'the shift')
  return info


def _add_bn(out: dict, prefix: str, params: Mapping[str, Any],
            stats: Mapping[str, Any]) -> None:
  for flax_name, torch_name in _BN_NAMES.items():
    out[f'{prefix}.{torch_name}'] = _leaf(params[flax_name])
  for flax_name, torch_name in _BN_STATS.items():
    out[f'{prefix}.{torch_name}'] = _leaf(stats[flax_name])
  # torch counts BN updates here; it only matters for momentum=None
  # (cumulative averaging), which nothing downstream of an export uses.
  out[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)


def _add_conv(out: dict, key: str, params: Mapping[str, Any]) -> None:
  out[key] = _leaf(params['kernel'], transpose=(3, 2, 0, 1))  # HWIO -> OIHW


def to_torchvision(variables: Mapping[str, Any],
                   allow_cifar_stem: bool = False,
                   maxpool_padding: str = 'torch') -> dict[str, Any]:
  """Encoder variables -> {torchvision state_dict key: np.ndarray}.

  Args:
    variables: {'params', 'batch_stats'} of a `models.ResNet` or of a whole
      `SimCLRModel` (its 'encoder' is used). Leaves may be arrays or
      `jax.ShapeDtypeStruct`s (then the values are ShapeDtypeStructs with the
      torch shapes, for checking a layout without allocating it).
    allow_cifar_stem: Convert a CIFAR-stem encoder too (see module doc).
    maxpool_padding: The `ResNet.maxpool_padding` the variables were run
      with (it is not in the weights); 'tf' (e.g. `import_tf_checkpoint`'s
      config) is refused for the ImageNet stem, see the module doc.

  Returns:
    A dict that `torchvision.models.resnet{depth}().load_state_dict(d,
    strict=False)` accepts with only fc.weight and fc.bias missing. Values
    are float32 (num_batches_tracked int64).

  Raises:
    ValueError: for encoders torchvision cannot represent (SK, width != 1,
      depth 200, CIFAR stem unless allowed, 'tf' max-pool padding), never a
      silently wrong file.
  """
  enc = split_variables(variables, 'encoder')
  params, stats = enc['params'], enc['batch_stats']
  check_torchvision_compatible(params, allow_cifar_stem, maxpool_padding)
  out: dict[str, Any] = {}
  _add_conv(out, 'conv1.weight', params['conv_init'])
  _add_bn(out, 'bn1', params['bn_init'], stats['bn_init'])
  blocks = sorted((k for k in params if _BLOCK_RE.match(k)),
                  key=lambda k: tuple(map(int, _BLOCK_RE.match(k).groups())))
  for name in blocks:
    stage, index = _BLOCK_RE.match(name).groups()
    prefix = f'layer{stage}.{index}'
    p, s = params[name], stats[name]
    for k in (1, 2, 3):
      if f'conv{k}' in p:
        _add_conv(out, f'{prefix}.conv{k}.weight', p[f'conv{k}'])
        _add_bn(out, f'{prefix}.bn{k}', p[f'bn{k}'], s[f'bn{k}'])
    if 'proj_conv' in p:
      _add_conv(out, f'{prefix}.downsample.0.weight', p['proj_conv'])
      _add_bn(out, f'{prefix}.downsample.1', p['proj_bn'], s['proj_bn'])
  return out


def projection_head_to_torch(variables: Mapping[str, Any]
                             ) -> dict[str, np.ndarray]:
  """Projection head -> keys of a torch `nn.Sequential` MLP.

  Layout, for a head of L layers (layer i = 1..L, Sequential index
  j = 3 * (i - 1)):
    {j}.weight              Linear(d_in, d_out, bias=False), (out, in)
    {j+1}.weight/.bias/.running_mean/.running_var/.num_batches_tracked
                            BatchNorm1d(d_out)
    (index j+2 is the ReLU of hidden layers; it has no parameters)
  The last layer's BN has no beta in SimCLR (the reference's center=False);
  its `.bias` is written as zeros so a stock `BatchNorm1d` computes the same.
  MoCo v3's ViT head has no gamma there either: `.weight` is written as
  ones.

  Accepts a SimCLRModel tree (uses 'projection_head') or the head's own
  {'params', 'batch_stats'}.
  """
  if 'projection_head' in variables['params']:
    head = split_variables(variables, 'projection_head')
  else:
    head = variables
  params, stats = head['params'], head['batch_stats']
  num_layers = heads.num_head_layers(params)
  out: dict[str, np.ndarray] = {}
  for i in range(1, num_layers + 1):
    j = 3 * (i - 1)
    out[f'{j}.weight'] = _leaf(params[f'dense{i}']['kernel'], (1, 0))
    bn = dict(params.get(f'bn{i}', {}))
    if 'scale' not in bn:
      bn['scale'] = np.ones(np.shape(stats[f'bn{i}']['mean']), np.float32)
    if 'bias' not in bn:
      bn['bias'] = np.zeros(np.shape(bn['scale']), np.float32)
    _add_bn(out, str(j + 1), bn, stats[f'bn{i}'])
  return out
