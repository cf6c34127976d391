"""SimCLR model: encoder f, projection head g and online linear head.

One module holds all three so a single init/apply and one optimizer state
cover them, as in the TF2 reference's `Model`. The linear head reads
stop_gradient(h) (REFERENCE §2, `lineareval_while_pretraining`): it is trained
together with pretraining to monitor representation quality, but its loss
never reaches the encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.models import heads
from simclr_jax.models import resnet

Dtype = Any

_STEMS = ('auto', 'cifar', 'imagenet')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class SimCLRModel(nn.Module):
  """Encoder + projection head + (optional) linear head on detached features.

  Attributes:
    depth, width_multiplier, sk_ratio, cifar_stem: The `resnet.ResNet` encoder.
    num_proj_layers, proj_out_dim: The `heads.ProjectionHead`.
    num_classes: Output classes of the linear head.
    linear_head: Whether to build the linear head (logits is None otherwise).
    dtype: Computation dtype; parameters and all outputs are float32.
    bn_axis_name: Mapped axis for BN statistics inside shard_map/pmap.
  """
  depth: int = 50
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  num_proj_layers: int = 2
  proj_out_dim: int = 128
  num_classes: int = 1000
  linear_head: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    """Returns features h, projection z, head hiddens and linear-head logits.

    Both augmented views should be passed as one batch so BN statistics cover
    both (REFERENCE §2).
    """
    h = resnet.ResNet(
        depth=self.depth,
        width_multiplier=self.width_multiplier,
        sk_ratio=self.sk_ratio,
        cifar_stem=self.cifar_stem,
        dtype=self.dtype,
        bn_axis_name=self.bn_axis_name,
        name='encoder')(x, train)
    z, hiddens = heads.ProjectionHead(
        num_layers=self.num_proj_layers,
        out_dim=self.proj_out_dim,
        dtype=self.dtype,
        bn_axis_name=self.bn_axis_name,
        name='projection_head')(h, train)
    logits = None
    if self.linear_head:
      logits = heads.LinearHead(self.num_classes, name='linear_head')(
          jax.lax.stop_gradient(h))
    return dict(
        features=h,
        projection=z.astype(jnp.float32),
        head_hiddens=[t.astype(jnp.float32) for t in hiddens],
        logits=logits)


def build_model(config: ml_collections.ConfigDict,
                num_classes: int) -> SimCLRModel:
  """Builds the SimCLR model described by `config.model` (see defaults.py).

  Raises:
    ValueError: one line naming the bad field and its allowed values.
  """
  m = config.model
  resnet.check_depth(m.depth)  # Fail before any tracing.
  if m.stem not in _STEMS:
    raise ValueError(f'model.stem={m.stem!r} is not supported; choose one of '
                     + ', '.join(repr(s) for s in _STEMS))
  if m.compute_dtype not in _DTYPES:
    raise ValueError(
        f'model.compute_dtype={m.compute_dtype!r} is not supported; choose one '
        'of ' + ', '.join(repr(d) for d in _DTYPES))
  if m.stem == 'auto':
    # REFERENCE §2: the CIFAR stem is for image size <= 32.
    cifar_stem = config.dataset.image_size <= 32
  else:
    cifar_stem = m.stem == 'cifar'
  return SimCLRModel(
      depth=m.depth,
      width_multiplier=m.width_multiplier,
      sk_ratio=m.sk_ratio,
      cifar_stem=cifar_stem,
      num_proj_layers=m.num_proj_layers,
      proj_out_dim=m.proj_out_dim,
      num_classes=num_classes,
      linear_head=m.linear_eval_while_pretraining,
      dtype=_DTYPES[m.compute_dtype])
