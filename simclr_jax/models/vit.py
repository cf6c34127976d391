"""Vision Transformer encoders (Dosovitskiy et al. 2021), as MoCo v3 trains them.

The image is cut into P x P patches, each mapped to a `width`-d token by a
linear patch embedding (a convolution with kernel = stride = P); a class
token is prepended and position embeddings added; `depth` pre-norm blocks
follow (x + MHSA(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP), then a
final LayerNorm (eps 1e-6, as timm's ViTs). The feature is the class token's
output, or with `pool='mean'` the mean of the patch tokens followed by its
own LayerNorm (timm's `global_pool='avg'`, where `fc_norm` replaces `norm`).

Sizes (width / depth / heads, `VIT_SIZES`): Tiny 192/12/3, Small 384/12/6,
Base 768/12/12. Patch 16 suits 224 px images; small images use patch 4 (32
px: 8 x 8 tokens) or 7 (28 px: 4 x 4 tokens).

MoCo v3's choices (Chen, Xie and He 2021, Sec. 4 and its released code):
fixed 2-D sine-cosine position embeddings (`pos_embed='sincos'`); the
patch projection randomly initialised and then frozen
(`frozen_patch_embed=True`, their stop-gradient on the first layer, which
removes the loss spikes of large-batch ViT training); Q, K and V weights
Xavier-initialised as three separate matrices; the class token drawn from
N(0, 1e-6). Attention runs through `jax.nn.dot_product_attention`, so each
accelerator picks its fused kernel.

Parameter names follow timm's `VisionTransformer` (patch_embed, cls_token,
pos_embed, blocks_{i}/{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2},
norm or fc_norm), so an export is a rename plus the (in, out) -> (out, in)
transpose of each kernel.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# name -> (width, depth, heads).
VIT_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12)}
POOLS = ('cls', 'mean')
POS_EMBEDS = ('learned', 'sincos')
LN_EPSILON = 1e-6
MLP_RATIO = 4


def check_size(size: str) -> None:
  """One-line ValueError for a size VIT_SIZES does not define."""
  if size not in VIT_SIZES:
    raise ValueError(f'model.vit.size={size!r} is not supported; choose one '
                     f'of {", ".join(VIT_SIZES)}')


def sincos_position_embedding(grid: int, width: int) -> np.ndarray:
  """(1 + grid^2, width) fixed 2-D sine-cosine embeddings, class token first.

  A quarter of the channels each holds sin and cos of the patch's row and of
  its column, at frequencies 10000^(-i / (width / 4)), as MoCo v3's
  `build_2d_sincos_position_embedding`; the class token's row is zero.
  """
  if width % 4:
    raise ValueError(f'sine-cosine position embeddings need a width divisible '
                     f'by 4, got {width}')
  quarter = width // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  index = np.arange(grid * grid)
  rows = np.outer(index // grid, omega)
  cols = np.outer(index % grid, omega)
  table = np.concatenate(
      [np.sin(rows), np.cos(rows), np.sin(cols), np.cos(cols)], axis=1)
  return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


def _xavier_thirds(key: jax.Array, shape: tuple[int, ...],
                   dtype: Dtype = jnp.float32) -> jax.Array:
  """Xavier-uniform for a fused (d, 3d) QKV kernel taken as three (d, d)."""
  fan_in, fan_out = shape[0], shape[1] // 3
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _patch_embed_init(key: jax.Array, shape: tuple[int, ...],
                      dtype: Dtype = jnp.float32) -> jax.Array:
  """Xavier-uniform over the patch projection as a (P*P*C, width) matrix."""
  fan_in = int(np.prod(shape[:-1]))
  bound = math.sqrt(6.0 / (fan_in + shape[-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


_dense_init = nn.initializers.xavier_uniform()


class Attention(nn.Module):
  """Multi-head self-attention with a fused QKV projection (timm's layout:
  the 3 * width outputs are q, k, v, each split into heads in order)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'ViT width {d} is not divisible by {self.num_heads} '
                       'heads')
    qkv = nn.Dense(3 * d, kernel_init=_xavier_thirds, dtype=self.dtype,
                   param_dtype=jnp.float32, name='qkv')(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d)
    return nn.Dense(d, kernel_init=_dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name='proj')(y)


class Mlp(nn.Module):
  """width -> MLP_RATIO * width -> width, exact (erf) GELU as torch's."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(MLP_RATIO * d, kernel_init=_dense_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name='fc1')(x)
    x = jax.nn.gelu(x, approximate=False)
    return nn.Dense(d, kernel_init=_dense_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name='fc2')(x)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


class Block(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(self.num_heads, self.dtype, name='attn')(
        _layer_norm(self.dtype, 'norm1')(x))
    return x + Mlp(self.dtype, name='mlp')(_layer_norm(self.dtype, 'norm2')(x))


class PatchEmbed(nn.Module):
  """Linear patch embedding: a P x P stride-P convolution, written as the
  patches' pixels (row-major, channels last) times one matrix."""
  patch_size: int
  width: int
  frozen: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, s, _, c = x.shape
    p, grid = self.patch_size, x.shape[1] // self.patch_size
    kernel = self.param('kernel', _patch_embed_init, (p, p, c, self.width),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.width,),
                      jnp.float32)
    if self.frozen:
      kernel, bias = jax.lax.stop_gradient((kernel, bias))
    patches = x.astype(self.dtype).reshape(n, grid, p, grid, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
    tokens = patches @ kernel.reshape(-1, self.width).astype(self.dtype)
    return tokens + bias.astype(self.dtype)


class ViT(nn.Module):
  """A Vision Transformer encoder: images (N, S, S, C) -> features (N, width).

  Attributes:
    width, depth, num_heads: The transformer's size (VIT_SIZES has the
      standard ones).
    patch_size: P; the image side must be a multiple of it.
    pool: 'cls' (the class token's output) or 'mean' (the patch tokens'
      mean, then `fc_norm`).
    pos_embed: 'learned' (timm's default) or 'sincos' (fixed, MoCo v3).
    remat: Recompute each block's activations in the backward pass instead
      of keeping them (jax.checkpoint): the same numbers for about one more
      forward pass of compute, keeping only each block's input between the
      passes, where the accelerator's scheduler honours it.
    frozen_patch_embed: No gradient reaches the patch projection (MoCo v3's
      random, frozen patch projection). The optimiser must also leave it out
      of weight decay for it to stay where it was initialised.
    dtype: Computation dtype; parameters and the output stay float32.
    bn_axis_name: Unused (a ViT has no BatchNorm); accepted so a ViT is
      built with the same arguments as a ResNet.
  """
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  pool: str = 'cls'
  pos_embed: str = 'learned'
  frozen_patch_embed: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def __post_init__(self):
    if self.pool not in POOLS:
      raise ValueError(f'model.vit.pool={self.pool!r} is not supported; '
                       f'choose one of {", ".join(POOLS)}')
    if self.pos_embed not in POS_EMBEDS:
      raise ValueError(f'model.vit.pos_embed={self.pos_embed!r} is not '
                       f'supported; choose one of {", ".join(POS_EMBEDS)}')
    super().__post_init__()

  @property
  def num_features(self) -> int:
    """Width of the features the encoder returns."""
    return self.width

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No BatchNorm or dropout: train and eval are one function.
    n, s = x.shape[:2]
    p = self.patch_size
    if s % p:
      raise ValueError(f'ViT patch size {p} does not divide the {s} px image')
    grid = s // p
    tokens = PatchEmbed(p, self.width, self.frozen_patch_embed, self.dtype,
                        name='patch_embed')(x)
    cls = self.param('cls_token', nn.initializers.normal(1e-6),
                     (1, 1, self.width), jnp.float32)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.width)), tokens],
        axis=1)
    if self.pos_embed == 'learned':
      pos = self.param('pos_embed', nn.initializers.truncated_normal(0.02),
                       (1, 1 + grid * grid, self.width), jnp.float32)
    else:
      pos = jnp.asarray(sincos_position_embedding(grid, self.width))[None]
    tokens = tokens + pos.astype(self.dtype)
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      tokens = block(self.num_heads, self.dtype, name=f'blocks_{i}')(tokens)
    if self.pool == 'cls':
      h = _layer_norm(self.dtype, 'norm')(tokens)[:, 0]
    else:
      h = _layer_norm(self.dtype, 'fc_norm')(jnp.mean(tokens[:, 1:], axis=1))
    return h.astype(jnp.float32)


def fine_tune_block(name: str, depth: int) -> int | None:
  """fine_tune_after_block index of a top-level ViT submodule, on the
  ResNet's 0..4 scale: 0 for the embeddings (patches, class token,
  positions), 1..4 for each quarter of the `depth` blocks, 4 for the final
  norm; None for anything else."""
  if name in ('patch_embed', 'cls_token', 'pos_embed'):
    return 0
  if name.startswith('blocks_'):
    return 1 + 4 * int(name[len('blocks_'):]) // depth
  if name in ('norm', 'fc_norm'):
    return 4
  return None


def vit(size: str, **kwargs: Any) -> ViT:
  """The ViT of a standard size ('tiny', 'small', 'base'), other fields as
  keyword arguments."""
  check_size(size)
  width, depth, heads = VIT_SIZES[size]
  return ViT(width=width, depth=depth, num_heads=heads, **kwargs)
