"""SimCLR model: encoder f, projection head g and online linear head.

One module holds all three so a single init/apply and one optimizer state
cover them, as in the TF2 reference's `Model`. The linear head reads
stop_gradient(h) (Chen et al. 2020a, Appendix B.6; the TF2 reference's
`lineareval_while_pretraining`): it is trained together with pretraining to
monitor representation quality, but its loss never reaches the encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import losses
from simclr_jax.models import encoders
from simclr_jax.models import heads
from simclr_jax.models import resnet

Dtype = Any

class SimCLRModel(nn.Module):
  """Encoder + projection head + (optional) linear head on detached features.

  Attributes:
    encoder: The encoder module (`encoders.build_encoder`), or None for a
      `resnet.ResNet` built from the five fields below (the constructor's
      first form, which the released-checkpoint importer uses).
    depth, width_multiplier, sk_ratio, cifar_stem, maxpool_padding: That
      ResNet, when `encoder` is None.
    num_proj_layers, proj_out_dim, proj_hidden_dim, proj_out_bn_scale: The
      `heads.ProjectionHead` (hidden width 0 = the encoder's).
    num_classes: Output classes of the linear head.
    linear_head: Whether to build the linear head (logits is None otherwise).
    dtype: Computation dtype; parameters and all outputs are float32.
    bn_axis_name: Mapped axis for BN statistics inside shard_map/pmap.
  """
  encoder: nn.Module | None = None
  depth: int = 50
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  maxpool_padding: str = 'torch'
  num_proj_layers: int = 2
  proj_out_dim: int = 128
  proj_hidden_dim: int = 0
  proj_out_bn_scale: bool = True
  num_classes: int = 1000
  linear_head: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  # Method extras (simclr_jax/methods): a BYOL / MoCo v3 predictor MLP on z
  # (hidden width; 0 = none; ending in an affine-free BN for MoCo v3's
  # ViT) and SwAV prototypes (count; 0 = none).
  predictor_hidden_dim: int = 0
  predictor_out_bn: bool = False
  num_prototypes: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    """Returns features h, projection z, head hiddens and linear-head logits.

    Both augmented views should be passed as one batch so BN statistics cover
    both (docs/algorithms.md#batch-normalisation).
    """
    encoder = self.encoder
    if encoder is None:
      encoder = resnet.ResNet(
          depth=self.depth,
          width_multiplier=self.width_multiplier,
          sk_ratio=self.sk_ratio,
          cifar_stem=self.cifar_stem,
          maxpool_padding=self.maxpool_padding,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name='encoder')
    h = encoder(x, train)
    z, hiddens = heads.ProjectionHead(
        num_layers=self.num_proj_layers,
        out_dim=self.proj_out_dim,
        hidden_dim=self.proj_hidden_dim or None,
        out_bn_scale=self.proj_out_bn_scale,
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
          self.predictor_hidden_dim, self.proj_out_dim,
          out_bn=self.predictor_out_bn, dtype=self.dtype,
          bn_axis_name=self.bn_axis_name, name='predictor')(z, train)
      out['prediction'] = p.astype(jnp.float32)
    if self.num_prototypes:
      # SwAV prototypes, one unit-norm column each. The forward pass uses the
      # stored prototypes as they are: the paper renormalises them outside
      # the gradient after every optimiser step (Caron et al. 2020, App. A;
      # SwAV.project_params here), which is NOT the same as normalising them
      # in the forward pass (that would put the normalisation's Jacobian in
      # the gradient and never reset the stored norm). They start unit-norm.
      kernel = self.param('prototypes', _unit_prototypes_init,
                          (self.proj_out_dim, self.num_prototypes))
      zn = losses.l2_normalize(z.astype(jnp.float32))
      out['prototype_scores'] = zn @ kernel
    return out


def normalize_prototypes(kernel: jax.Array) -> jax.Array:
  """(D, K) prototypes with each column (prototype) scaled to unit L2 norm."""
  return losses.l2_normalize(kernel.T).T


def _unit_prototypes_init(rng: jax.Array, shape: tuple[int, ...],
                          dtype: Dtype = jnp.float32) -> jax.Array:
  return normalize_prototypes(heads.dense_kernel_init(rng, shape, dtype))


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                **method_fields: Any) -> SimCLRModel:
  """Builds the SimCLR model described by `config.model` (see defaults.py).

  `method_fields` are the extra parts a method asks for
  (`Method.model_overrides`: predictor_hidden_dim, predictor_out_bn,
  num_prototypes).

  Raises:
    ValueError: one line naming the bad field and its allowed values.
  """
  m = config.model
  dtype = resnet.compute_dtype(m.compute_dtype)
  # Checks the encoder's settings before any tracing.
  encoder = encoders.build_encoder(m, config.dataset.image_size, dtype=dtype)
  head = heads.head_settings(m)
  return SimCLRModel(
      encoder=encoder,
      num_proj_layers=m.num_proj_layers,
      proj_out_dim=m.proj_out_dim,
      proj_hidden_dim=head['hidden_dim'] or 0,
      proj_out_bn_scale=head['out_bn_scale'],
      num_classes=num_classes,
      linear_head=m.linear_eval_while_pretraining,
      dtype=dtype,
      **method_fields)
