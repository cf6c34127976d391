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
    depth, width_multiplier, sk_ratio, cifar_stem, maxpool_padding: The
      `resnet.ResNet` encoder.
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
  maxpool_padding: str = 'torch'
  num_proj_layers: int = 2
  proj_out_dim: int = 128
  num_classes: int = 1000
  linear_head: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  # Method extras (simclr_jax/methods): a BYOL / MoCo v3 predictor MLP on z
  # (hidden width; 0 = none) and SwAV prototypes (count; 0 = none).
  predictor_hidden_dim: int = 0
  num_prototypes: int = 0

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
        maxpool_padding=self.maxpool_padding,
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
    out = dict(
        features=h,
        projection=z.astype(jnp.float32),
        head_hiddens=[t.astype(jnp.float32) for t in hiddens],
        logits=logits)
    if self.predictor_hidden_dim:
      p = heads.Predictor(
          self.predictor_hidden_dim, self.proj_out_dim, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, name='predictor')(z, train)
      out['prediction'] = p.astype(jnp.float32)
    if self.num_prototypes:
      # SwAV prototypes: scores are cosine similarities, so both z and the
      # prototype vectors are normalised (the paper renormalises the
      # prototype matrix after every step; normalising here is equivalent).
      kernel = self.param('prototypes', heads.dense_kernel_init,
                          (self.proj_out_dim, self.num_prototypes))
      zn = z.astype(jnp.float32)
      zn = zn / jnp.maximum(jnp.linalg.norm(zn, axis=-1, keepdims=True), 1e-12)
      kn = kernel / jnp.maximum(
          jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
      out['prototype_scores'] = zn @ kn
    return out


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                **method_fields: Any) -> SimCLRModel:
  """Builds the SimCLR model described by `config.model` (see defaults.py).

  `method_fields` are the extra parts a method asks for
  (`Method.model_overrides`: predictor_hidden_dim, num_prototypes).

  Raises:
    ValueError: one line naming the bad field and its allowed values.
  """
  m = config.model
  resnet.check_depth(m.depth)  # Fail before any tracing.
  # Older configs (and their saved config.json) predate the field.
  maxpool_padding = m.get('maxpool_padding', 'torch')
  resnet.check_maxpool_padding(maxpool_padding)
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
      maxpool_padding=maxpool_padding,
      num_proj_layers=m.num_proj_layers,
      proj_out_dim=m.proj_out_dim,
      num_classes=num_classes,
      linear_head=m.linear_eval_while_pretraining,
      dtype=_DTYPES[m.compute_dtype],
      **method_fields)
