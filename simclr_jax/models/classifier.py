"""Classifier for linear evaluation, fine-tuning and distillation.

encoder f -> the first `head_layers` layers of the projection head g ->
linear classifier, with the parameter tree {'encoder', 'projection_head',
'classifier'}. The encoder and head layers carry exactly the names and shapes
of `SimCLRModel`'s, so a pretrained run's weights copy in by key and the
fine-tuned encoder exports like a pretrained one (params['encoder']).

`head_layers` is the reference's ft_proj_selector: 0 puts the
classifier on the encoder output h, k on the output of head layer k (after its
ReLU for hidden layers), i.e. on `SimCLRModel(...)['head_hiddens'][k]`.
SimCLRv2 fine-tunes from layer 1.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax.losses import alignment
from simclr_jax.models import encoders
from simclr_jax.models import heads
from simclr_jax.models import resnet

Dtype = Any

class HeadLayers(nn.Module):
  """The first `num_layers` of a `heads.ProjectionHead` of `total_layers`.

  The same layers as ProjectionHead (`heads.projection_layers`: names
  dense{i}, bn{i}; the last layer of the full head outputs `out_dim` and its
  BN has no beta). The full head cannot be reused as is because its unkept
  layers would need parameters that a fine-tuned model deliberately drops.
  """
  num_layers: int
  total_layers: int
  out_dim: int = 128
  hidden_dim: int | None = None
  out_bn_scale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, train: bool) -> jax.Array:
    outputs = heads.projection_layers(
        h, num_layers=self.num_layers, total_layers=self.total_layers,
        out_dim=self.out_dim, hidden_dim=self.hidden_dim, dtype=self.dtype,
        bn_axis_name=None, train=train, out_bn_scale=self.out_bn_scale)
    return outputs[-1] if outputs else h


class Classifier(nn.Module):
  """Encoder + kept head layers + linear classifier.

  Attributes:
    encoder: the encoder module (`encoders.build_encoder` of the source
      run's config), or None for a `resnet.ResNet` of the five fields below.
    depth, width_multiplier, sk_ratio, cifar_stem, maxpool_padding: that
      ResNet (a fine-tuned encoder keeps its source's padding).
    head_layers: projection-head layers kept (ft_proj_selector).
    total_head_layers: layers of the pretrained head (decides whether the
      last kept layer is the head's output layer).
    proj_out_dim: width of the head's output layer.
    proj_hidden_dim, proj_out_bn_scale: the head's hidden width (0 = the
      encoder's) and whether its output BN has a gamma (heads.head_settings).
    num_classes: classifier outputs.
    domain_hidden_dim: > 0 adds DANN's domain classifier (two ReLU layers
      of this width and one logit) behind a gradient-reversal layer on the
      classifier's input features ('domain_logits'; `--mode=adapt`).
    frozen_encoder: run the encoder in inference mode (BN uses its running
      statistics) behind stop_gradient, as linear evaluation needs (Chen et
      al. 2020a, App. B.6); the optimiser must also leave its weights alone.
    dtype: computation dtype; parameters and logits are float32.
  """
  encoder: nn.Module | None = None
  depth: int = 50
  width_multiplier: float = 1
  sk_ratio: float = 0.0
  cifar_stem: bool = False
  maxpool_padding: str = 'torch'
  head_layers: int = 0
  total_head_layers: int = 2
  proj_out_dim: int = 128
  proj_hidden_dim: int = 0
  proj_out_bn_scale: bool = True
  num_classes: int = 1000
  frozen_encoder: bool = False
  domain_hidden_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               reversal_scale: jax.Array | float = 1.0
               ) -> dict[str, jax.Array]:
    """Returns {'features': classifier input, 'logits': (N, classes)}, and
    'domain_logits' (N, 1) with a domain classifier, whose gradient reaches
    the features multiplied by -reversal_scale."""
    encoder = self.encoder
    if encoder is None:
      encoder = resnet.ResNet(
          depth=self.depth, width_multiplier=self.width_multiplier,
          sk_ratio=self.sk_ratio, cifar_stem=self.cifar_stem,
          maxpool_padding=self.maxpool_padding, dtype=self.dtype,
          name='encoder')
    h = encoder(x, train and not self.frozen_encoder)
    if self.frozen_encoder:
      h = jax.lax.stop_gradient(h)
    if self.head_layers:
      h = HeadLayers(self.head_layers, self.total_head_layers,
                     self.proj_out_dim, hidden_dim=self.proj_hidden_dim or None,
                     out_bn_scale=self.proj_out_bn_scale, dtype=self.dtype,
                     name='projection_head')(h, train)
    h = h.astype(jnp.float32)
    logits = heads.LinearHead(self.num_classes, name='classifier')(h)
    out = {'features': h, 'logits': logits}
    if self.domain_hidden_dim:
      d = alignment.gradient_reversal(h, jnp.asarray(reversal_scale,
                                                     jnp.float32))
      for i in range(2):
        d = nn.relu(nn.Dense(self.domain_hidden_dim,
                             name=f'domain_dense{i + 1}')(d))
      out['domain_logits'] = nn.Dense(1, name='domain_out')(d)
    return out


def build_classifier(run_config: ml_collections.ConfigDict, *,
                     head_layers: int, num_classes: int,
                     frozen_encoder: bool = False,
                     compute_dtype: str | None = None,
                     domain_hidden_dim: int = 0) -> Classifier:
  """A Classifier with the architecture of `run_config.model`.

  `run_config` is the config of the run whose encoder is used (the source
  pretraining run, or the current config for a distillation student), so the
  stem is the one that run was built with even if the downstream image size
  differs.
  """
  m = run_config.model
  dtype = resnet.compute_dtype(compute_dtype or
                               m.get('compute_dtype', 'float32'))
  head = heads.head_settings(m)
  return Classifier(
      encoder=encoders.build_encoder(m, run_config.dataset.image_size,
                                     dtype=dtype),
      head_layers=head_layers, total_head_layers=m.num_proj_layers,
      proj_out_dim=m.proj_out_dim, proj_hidden_dim=head['hidden_dim'] or 0,
      proj_out_bn_scale=head['out_bn_scale'], num_classes=num_classes,
      frozen_encoder=frozen_encoder, domain_hidden_dim=domain_hidden_dim,
      dtype=dtype)
