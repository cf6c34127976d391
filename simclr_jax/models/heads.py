"""Projection head g(.) and linear classifier head (docs/algorithms.md).

The projection head follows the TF2 reference's `ProjectionHead` in
'nonlinear' mode: every layer is a bias-free Dense followed by BatchNorm (the
BN beta plays the bias role), hidden layers use ReLU and keep the encoder
width, and the last layer's BN has no beta. All intermediate outputs are
returned so fine-tuning can start from any head layer (SimCLRv2 fine-tunes from
the first one, `ft_proj_selector=1`).

MoCo v3's ViT heads (Chen, Xie and He 2021) are the same layers with a set
hidden width (4096) and an output BN without any affine parameters (no gamma
either): `hidden_dim` and `out_bn_scale=False` here, and the predictor's
`out_bn`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models import resnet

Dtype = Any

# Head Dense kernels are N(0, 0.01), the TF2 reference's LinearLayer init.
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def num_head_layers(head_params: Any) -> int:
  """Layers a projection head's parameter tree holds (dense1, dense2, ...).

  A pretraining run holds all `model.num_proj_layers`; a fine-tuned
  classifier only the `ft_proj_selector` it kept.
  """
  return sum(1 for k in (head_params or {}) if str(k).startswith('dense'))


def head_settings(model_config: Any) -> dict[str, Any]:
  """The projection head's shape settings from `config.model`, as keyword
  arguments of ProjectionHead / projection_layers: one reading for the
  pretraining model, the fine-tuning classifier and the export. A run
  recorded before these fields existed gets the SimCLR head."""
  hidden = int(model_config.get('proj_hidden_dim', 0) or 0)
  return dict(hidden_dim=hidden or None,
              out_bn_scale=bool(model_config.get('proj_out_bn_scale', True)))


def projection_layers(h: jax.Array, *, num_layers: int, total_layers: int,
                      out_dim: int, hidden_dim: int | None, dtype: Dtype,
                      bn_axis_name: str | None, train: bool,
                      out_bn_scale: bool = True) -> list[jax.Array]:
  """The first `num_layers` layers of a `total_layers` projection head.

  Called inside a compact module's __call__, so the layers become that
  module's children 'dense{i}' / 'bn{i}'. Returns every layer's output,
  hidden ones after their ReLU. `hidden_dim` None (or 0) keeps the input
  width; `out_bn_scale` False drops the output BN's gamma too (MoCo v3).
  """
  hidden_dim = hidden_dim or h.shape[-1]
  outputs = []
  x = h
  for i in range(1, num_layers + 1):
    last = i == total_layers
    x = nn.Dense(
        out_dim if last else hidden_dim,
        use_bias=False,  # BN follows; its beta is the bias.
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=dense_kernel_init,
        name=f'dense{i}')(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=resnet.BN_MOMENTUM,
        epsilon=resnet.BN_EPSILON,
        # No beta on the output layer (reference: center=False), so z is
        # not shifted by a learned offset before normalisation in the loss.
        use_bias=not last,
        use_scale=out_bn_scale or not last,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=bn_axis_name,
        name=f'bn{i}')(x)
    if not last:
      x = nn.relu(x)
    outputs.append(x)
  return outputs


class ProjectionHead(nn.Module):
  """SimCLR MLP projection head.

  Attributes:
    num_layers: Number of Dense+BN layers (SimCLRv1: 2, SimCLRv2: 3); 0 makes
      the head the identity (z = h), as the reference's 'none' head.
    out_dim: Width of the last layer's output z (128 in the papers).
    hidden_dim: Width of hidden layers; None (or 0) keeps the input (encoder)
      width, as the reference does; MoCo v3 sets 4096.
    out_bn_scale: Whether the output layer's BN has a gamma (SimCLR's
      reference: yes; MoCo v3's ViT head: no affine parameters at all).
    dtype: Computation dtype; parameters stay float32.
    bn_axis_name: Mapped axis for BN statistics inside shard_map/pmap.
  """
  num_layers: int = 2
  out_dim: int = 128
  hidden_dim: int | None = None
  out_bn_scale: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, h: jax.Array,
               train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """Returns (z, hiddens); hiddens = [h, layer 1 output, ..., z].

    Hidden-layer entries are taken after their ReLU, as in the reference, so
    `hiddens[ft_proj_selector]` is what a fine-tuned classifier would see.
    """
    hiddens = [h] + projection_layers(
        h, num_layers=self.num_layers, total_layers=self.num_layers,
        out_dim=self.out_dim, hidden_dim=self.hidden_dim, dtype=self.dtype,
        bn_axis_name=self.bn_axis_name, train=train,
        out_bn_scale=self.out_bn_scale)
    return hiddens[-1], hiddens


class Predictor(nn.Module):
  """BYOL / MoCo v3 predictor q: Dense-BN-ReLU-Dense (the last with bias).

  BYOL (Grill et al. 2020, §3.3) uses the same MLP shape as its projector but
  without a BN on the output; MoCo v3 follows it for ResNets. For ViTs MoCo
  v3 ends the predictor in a BN without affine parameters (`out_bn`), and
  the last Dense then has no bias (the BN would remove it).
  """
  hidden_dim: int
  out_dim: int
  out_bn: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype,
                 param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                 name='dense1')(z)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                     dtype=self.dtype, param_dtype=jnp.float32,
                     axis_name=self.bn_axis_name, name='bn1')(x)
    x = nn.relu(x)
    x = nn.Dense(self.out_dim, use_bias=not self.out_bn, dtype=self.dtype,
                 param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                 name='dense2')(x)
    if self.out_bn:
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=resnet.BN_MOMENTUM, epsilon=resnet.BN_EPSILON,
                       use_bias=False, use_scale=False, dtype=self.dtype,
                       param_dtype=jnp.float32, axis_name=self.bn_axis_name,
                       name='bn2')(x)
    return x


class LinearHead(nn.Module):
  """Linear classifier with bias: online linear eval or supervised head.

  Computes in float32 regardless of the encoder's dtype: it is tiny and its
  logits feed a softmax cross-entropy.
  """
  num_classes: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return nn.Dense(
        self.num_classes,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=dense_kernel_init,
        bias_init=nn.initializers.zeros,
        name='dense')(h.astype(jnp.float32))
