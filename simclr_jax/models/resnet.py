"""ResNet encoders for SimCLR v1/v2 (flax.linen), weight-compatible with torch.

The architecture follows docs/algorithms.md#model and the SimCLR TF2 reference
(`tf2/resnet.py`): post-activation ResNet "v1.5" (bottleneck stride on the 3x3
conv), no conv biases, BatchNorm momentum 0.9 / epsilon 1e-5, the last BN gamma
of every residual block zero-initialised, explicit symmetric padding on strided
convs, a CIFAR stem for small images, and the SimCLRv2 selective-kernel (SK)
variant with a ResNet-D stem and average-pool shortcuts. The ImageNet stem's
max-pool pads (1, 1) like torch by default; `maxpool_padding='tf'` gives the
reference's TF 'SAME' padding instead (see `stem_max_pool`).

Projection shortcuts sit exactly where torchvision's `downsample` does (stride
!= 1 or a channel change), so a non-SK encoder exports one-to-one onto
`torchvision.models.resnet{18,34,50,101,152}` and matches their parameter
counts. For bottleneck nets that is "the first block of every stage" as the
reference says; ResNet-18/34 stage 1 has no projection (the TF reference puts
one there, torchvision does not).

Parameter naming and its torchvision equivalent (kernels are HWIO here, OIHW in
torch: transpose (3, 2, 0, 1); BN 'scale' -> weight, 'bias' -> bias, and the
'batch_stats' collection's 'mean'/'var' -> running_mean/running_var; Flax keeps
the biased batch variance in its running average where torch keeps the unbiased
one, a difference of a factor N/(N-1) per update that is negligible at
SimCLR batch sizes):

  | Flax path (params / batch_stats)      | torchvision state_dict key        |
  |---------------------------------------|-----------------------------------|
  | conv_init/kernel                      | conv1.weight                      |
  | bn_init/{scale,bias,mean,var}         | bn1.{weight,bias,running_*}       |
  | stage{i}_block{j}/conv{k}/kernel      | layer{i}.{j}.conv{k}.weight       |
  | stage{i}_block{j}/bn{k}/...           | layer{i}.{j}.bn{k}.*              |
  | stage{i}_block{j}/proj_conv/kernel    | layer{i}.{j}.downsample.0.weight  |
  | stage{i}_block{j}/proj_bn/...         | layer{i}.{j}.downsample.1.*       |

  Stages are numbered 1..4 like torchvision's layer1..layer4 and blocks 0..n-1
  like torchvision's Sequential indices, so the mapping is a rename. k is 1..2
  for basic blocks (ResNet-18/34) and 1..3 for bottlenecks.

The SK variant (sk_ratio > 0) has no torchvision counterpart; its extra names
are: stem 'conv_stem1'/'bn_stem1', 'conv_stem2'/'bn_stem2' before
'conv_init'/'bn_init' (the ResNet-D deep stem), and in bottlenecks 'sk_conv'
(a `SelectiveKernelConv` with 'conv', 'bn', 'reduce_conv', 'reduce_bn',
'expand_conv') in place of 'conv2'/'bn2'.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models import conv as conv_lib

Dtype = Any

BN_MOMENTUM = 0.9  # The TF reference's batch_norm_decay.
BN_EPSILON = 1e-5

# depth -> (block type, blocks per stage), as in the TF reference/torchvision.
STAGE_SIZES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}

# Stem max-pool padding conventions (ResNet.maxpool_padding).
MAXPOOL_PADDINGS = ('torch', 'tf')
# config.model.stem: 'auto' resolves by image size (`uses_cifar_stem`).
STEMS = ('auto', 'cifar', 'imagenet')
# config.model.compute_dtype -> activation dtype; parameters stay float32.
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# He init on fan_out, like torchvision's kaiming_normal_(mode='fan_out'); the
# truncated normal keeps rare huge weights out of a 100+ layer net at init.
conv_kernel_init = nn.initializers.variance_scaling(
    2.0, 'fan_out', 'truncated_normal')


def check_depth(depth: int) -> None:
  """Raises a one-line ValueError for a depth the reference does not define."""
  if depth not in STAGE_SIZES:
    choices = ', '.join(str(d) for d in STAGE_SIZES)
    raise ValueError(
        f'model.depth={depth} is not supported; choose one of {choices}')


def check_maxpool_padding(maxpool_padding: str) -> None:
  """Raises a one-line ValueError for an unknown max-pool padding rule."""
  if maxpool_padding not in MAXPOOL_PADDINGS:
    raise ValueError(
        f'model.maxpool_padding={maxpool_padding!r} is not supported; choose '
        'one of ' + ', '.join(repr(p) for p in MAXPOOL_PADDINGS))


def check_stem(stem: str) -> None:
  """Raises a one-line ValueError for a stem not in STEMS."""
  if stem not in STEMS:
    raise ValueError(f'model.stem={stem!r} is not supported; choose one of '
                     + ', '.join(repr(s) for s in STEMS))


# Encoder submodules before stage 1, "block 0" of fine_tune_after_block.
_STEM_MODULES = ('conv_init', 'bn_init', 'conv_stem1', 'bn_stem1',
                 'conv_stem2', 'bn_stem2')


def fine_tune_block(name: str) -> int | None:
  """fine_tune_after_block index of a top-level ResNet submodule: 0 for the
  stem, i for stage i (torchvision's layer{i}); None for anything else."""
  if name in _STEM_MODULES:
    return 0
  if name.startswith('stage'):
    return int(name[len('stage'):].split('_')[0])
  return None


def uses_cifar_stem(model_config: Any, image_size: int) -> bool:
  """Whether `model_config.stem` means the CIFAR stem at `image_size`.

  'cifar' / 'imagenet' say so; 'auto' picks the CIFAR stem (3x3 stride-1
  conv, no max-pool; Chen et al. 2020, Appendix B.9) for images of size
  <= 32, the threshold of the authors' code.
  """
  if model_config.stem == 'auto':
    return image_size <= 32
  return model_config.stem == 'cifar'


def compute_dtype(name: str) -> Dtype:
  """The dtype `config.model.compute_dtype` names; one-line ValueError else."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
        f'model.compute_dtype={name!r} is not supported; choose one of '
        + ', '.join(repr(d) for d in COMPUTE_DTYPES))
  return COMPUTE_DTYPES[name]


def tf_same_padding(size: int, kernel: int = 3,
                    stride: int = 2) -> tuple[int, int]:
  """(before, after) padding of TF 'SAME' pooling along one axis.

  TF pads just enough for ceil(size / stride) outputs and puts the odd pixel
  after: for the 3x3 stride-2 stem pool that is (0, 1) on an even size and
  (1, 1) on an odd one.
  """
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def stem_max_pool(x: jax.Array, maxpool_padding: str = 'torch') -> jax.Array:
  """The ImageNet stem's 3x3 stride-2 max-pool on NHWC `x`.

  'torch' pads (1, 1) like torch's MaxPool2d(3, 2, 1), so exported weights
  compute the same in torchvision. 'tf' pads like TF 'SAME', which the SimCLR
  reference uses: (0, 1) on an even-sized map, so the pooling grid sits one
  pixel further down/right than torch's there (the two agree on odd sizes).
  Either way the padding is -inf, so it never wins the max.
  """
  check_maxpool_padding(maxpool_padding)
  if maxpool_padding == 'tf':
    padding = tuple(tf_same_padding(n) for n in x.shape[1:3])
  else:
    padding = ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)


def scaled_width(channels: int, width_multiplier: float) -> int:
  """Channel count scaled by the width multiplier.

  Rounds rather than truncates so fractional multipliers (0.25 for CPU-sized
  runs) give the obvious channel counts; for the paper's integer multipliers
  (1, 2, 4) this is exact.
  """
  return max(1, int(round(channels * width_multiplier)))


def _conv(features: int, kernel_size: int, strides: int, dtype: Dtype,
          name: str) -> nn.Conv:
  """Bias-free conv with explicit symmetric padding of (k - 1) // 2 per side.

  The reference pads strided convs by (k-1)//2 on both sides and then runs a
  VALID conv (tf2/resnet.py FixedPadding); Flax's 'SAME' would pad (2, 3) for a
  7x7 stride-2 conv on an even input, shifting the sampling grid and breaking
  weight compatibility with TF and torch. Passing the pad pairs to the conv is
  the same computation as pad-then-VALID without materialising the padded
  array. For odd kernels at stride 1 this equals 'SAME', so one rule covers all.
  """
  pad = (kernel_size - 1) // 2
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
      conv_general_dilated=conv_lib.conv_general_dilated,
      name=name)


def _batch_norm(train: bool, dtype: Dtype, axis_name: str | None, name: str,
                zero_init: bool = False) -> nn.BatchNorm:
  """BatchNorm with the reference's momentum/epsilon and float32 params.

  Under jit over a batch-sharded global array the statistics are global
  already ("global BN", Chen et al. 2020a, Sec. 2.2); `axis_name` is only for
  shard_map/pmap.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      axis_name=axis_name,
      name=name)


def _resnet_d_pool(x: jax.Array, strides: int) -> jax.Array:
  """ResNet-D shortcut pooling: 2x2 average pool before the 1x1 projection.

  Mirrors tf2/resnet.py: at stride 2, pad (0, 1) with zeros then VALID
  average pool (zeros count in the mean); at stride 1, TF 'SAME' pooling,
  which pads (0, 1) and excludes the padding from the mean.
  """
  if strides > 1:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding='VALID')
  return nn.avg_pool(x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)),
                     count_include_pad=False)


class SelectiveKernelConv(nn.Module):
  """SimCLRv2 selective-kernel conv (tf2/resnet.py SK_Conv2D).

  One 3x3 conv to 2f channels is split into two f-channel streams; a
  squeeze (global average pool of their sum) and two 1x1 convs produce per-
  channel logits for each stream, softmaxed across the two streams to mix them.
  Replaces the 3x3 conv + BN-ReLU of a bottleneck, so its output is already
  activated.
  """
  filters: int
  strides: int = 1
  sk_ratio: float = 0.0625
  min_dim: int = 32  # Reference floor on the squeeze width.
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    x = _conv(2 * self.filters, 3, self.strides, self.dtype, 'conv')(x)
    x = nn.relu(bn('bn')(x))
    streams = jnp.stack(jnp.split(x, 2, axis=-1))  # (2, N, H, W, f)
    squeezed = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
    mid_dim = max(int(self.filters * self.sk_ratio), self.min_dim)
    squeezed = _conv(mid_dim, 1, 1, self.dtype, 'reduce_conv')(squeezed)
    squeezed = nn.relu(bn('reduce_bn')(squeezed))
    mixing = _conv(2 * self.filters, 1, 1, self.dtype, 'expand_conv')(squeezed)
    mixing = jnp.stack(jnp.split(mixing, 2, axis=-1))  # (2, N, 1, 1, f)
    mixing = jax.nn.softmax(mixing, axis=0)
    return jnp.sum(streams * mixing, axis=0)


def _projection(x: jax.Array, features: int, strides: int, resnet_d: bool,
                train: bool, dtype: Dtype, axis_name: str | None) -> jax.Array:
  """Projection shortcut, called inside a block's compact __call__.

  Without SK this is torchvision's downsample (strided 1x1 conv + BN). With SK
  the reference uses ResNet-D: average-pool first, then a stride-1 1x1 conv, so
  the shortcut sees every input pixel instead of one in four.
  """
  if resnet_d:
    x = _resnet_d_pool(x, strides)
    strides = 1
  x = _conv(features, 1, strides, dtype, 'proj_conv')(x)
  return _batch_norm(train, dtype, axis_name, 'proj_bn')(x)


class BasicBlock(nn.Module):
  """ResNet-18/34 residual block: 3x3 (stride) -> 3x3, expansion 1."""
  filters: int
  strides: int = 1
  use_projection: bool = False
  sk_ratio: float = 0.0  # > 0 only switches the shortcut to ResNet-D.
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    shortcut = x
    if self.use_projection:
      shortcut = _projection(x, self.filters, self.strides, self.sk_ratio > 0,
                             train, self.dtype, self.bn_axis_name)
    y = _conv(self.filters, 3, self.strides, self.dtype, 'conv1')(x)
    y = nn.relu(bn('bn1')(y))
    y = _conv(self.filters, 3, 1, self.dtype, 'conv2')(y)
    # Zero gamma: the block starts as the identity (Goyal et al. 2017).
    y = bn('bn2', zero_init=True)(y)
    return nn.relu(y + shortcut)


class BottleneckBlock(nn.Module):
  """ResNet-50+ bottleneck: 1x1 -> 3x3 (stride, v1.5) -> 1x1 (4f)."""
  filters: int
  strides: int = 1
  use_projection: bool = False
  sk_ratio: float = 0.0  # > 0: SK conv in place of the 3x3, ResNet-D shortcut.
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    out_features = self.filters * self.expansion
    shortcut = x
    if self.use_projection:
      shortcut = _projection(x, out_features, self.strides, self.sk_ratio > 0,
                             train, self.dtype, self.bn_axis_name)
    y = _conv(self.filters, 1, 1, self.dtype, 'conv1')(x)
    y = nn.relu(bn('bn1')(y))
    if self.sk_ratio > 0:
      y = SelectiveKernelConv(
          self.filters, self.strides, self.sk_ratio, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, name='sk_conv')(y, train)
    else:
      # v1.5: the stride lives on the 3x3 conv, not the first 1x1.
      y = _conv(self.filters, 3, self.strides, self.dtype, 'conv2')(y)
      y = nn.relu(bn('bn2')(y))
    y = _conv(out_features, 1, 1, self.dtype, 'conv3')(y)
    y = bn('bn3', zero_init=True)(y)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet encoder returning globally average-pooled features (N, C) float32.

  Attributes:
    depth: One of 18, 34, 50, 101, 152, 200.
    width_multiplier: Scales every channel count (64 * w at stage 1); the
      paper uses 1, 2, 4; fractions such as 0.25 make CPU-sized nets.
    sk_ratio: > 0 selects the SimCLRv2 selective-kernel variant (released
      models use 0.0625): ResNet-D stem and shortcuts, SK convs in bottlenecks.
    cifar_stem: One 3x3 stride-1 conv and no max-pool, for images <= 32 px.
    maxpool_padding: Padding of the ImageNet stem's max-pool: 'torch' (1, 1),
      what torchvision computes, or 'tf', TF 'SAME' as in the SimCLR
      reference, which pads (0, 1) on even-sized maps. Imported TF
      checkpoints use 'tf' to match the reference at every input size; no
      parameter depends on it. Unused with the CIFAR stem.
    dtype: Computation dtype (e.g. bfloat16); parameters stay float32.
    bn_axis_name: Mapped axis for BN statistics inside shard_map/pmap; leave
      None under jit, where statistics over a sharded batch are already global.
  """
  depth: int = 50
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  maxpool_padding: str = 'torch'
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def __post_init__(self):
    # Fail at construction, not deep inside the first init/jit trace.
    check_depth(self.depth)
    check_maxpool_padding(self.maxpool_padding)
    super().__post_init__()

  @property
  def num_features(self) -> int:
    """Width of the pooled output features (e.g. 2048 for ResNet-50 1x)."""
    block, _ = STAGE_SIZES[self.depth]
    expansion = 4 if block == 'bottleneck' else 1
    return scaled_width(512, self.width_multiplier) * expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    w = self.width_multiplier
    x = jnp.asarray(x, self.dtype)

    if self.cifar_stem:
      # The reference's CIFAR stem wins over the SK deep stem (tf2/resnet.py).
      x = _conv(scaled_width(64, w), 3, 1, self.dtype, 'conv_init')(x)
      x = nn.relu(bn('bn_init')(x))
    else:
      if self.sk_ratio > 0:
        # ResNet-D deep stem: 32w (stride 2) -> 32w -> 64w, all 3x3
        # (docs/algorithms.md#stems; tf2/resnet.py: 64 * w // 2 = 32w channels).
        x = _conv(scaled_width(32, w), 3, 2, self.dtype, 'conv_stem1')(x)
        x = nn.relu(bn('bn_stem1')(x))
        x = _conv(scaled_width(32, w), 3, 1, self.dtype, 'conv_stem2')(x)
        x = nn.relu(bn('bn_stem2')(x))
        x = _conv(scaled_width(64, w), 3, 1, self.dtype, 'conv_init')(x)
      else:
        x = _conv(scaled_width(64, w), 7, 2, self.dtype, 'conv_init')(x)
      x = nn.relu(bn('bn_init')(x))
      x = stem_max_pool(x, self.maxpool_padding)

    block_name, stage_sizes = STAGE_SIZES[self.depth]
    block_cls = BottleneckBlock if block_name == 'bottleneck' else BasicBlock
    in_features = x.shape[-1]
    for i, num_blocks in enumerate(stage_sizes):
      filters = scaled_width(64 * 2**i, w)
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        out_features = filters * block_cls.expansion
        # torchvision's rule for `downsample`, so export maps one-to-one.
        use_projection = strides != 1 or in_features != out_features
        x = block_cls(
            filters, strides, use_projection, self.sk_ratio, dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f'stage{i + 1}_block{j}')(x, train)
        in_features = out_features

    # Pool in float32: a bf16 mean over 49+ positions loses precision.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def count_params(params: Any) -> int:
  """Number of scalars in a params tree (works on ShapeDtypeStructs too)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


__all__ = [
    'BasicBlock', 'BottleneckBlock', 'MAXPOOL_PADDINGS', 'ResNet',
    'SelectiveKernelConv', 'STAGE_SIZES', 'check_depth',
    'check_maxpool_padding', 'count_params', 'scaled_width', 'stem_max_pool',
    'tf_same_padding'
]
