"""Single-network methods: one online network, a loss on its projections.

SimCLR (NT-Xent over the all-gathered batch, inside shard_map so each device
holds a (2b x 2N) similarity matrix), hard-negative NT-Xent (HCL), SupCon,
and the metric-learning triplet and pairwise margin losses. Without labels,
SupCon, triplet and margin use instance labels (the two views of an image are
the positives), which makes them self-supervised; with `use_labels` they use
the dataset's classes (SupCon always does: that is what it is for).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from simclr_jax import losses
from simclr_jax.methods import base
from simclr_jax.runtime import config_checks as checks
from simclr_jax.runtime import parallel


class SimCLR(base.Method):
  """SimCLR (Chen et al. 2020, Eq. 1): NT-Xent over the global batch."""

  name = 'simclr'

  def __init__(self, config, *, mesh, **kw):
    super().__init__(config, **kw)
    self.sharded_loss = jax.shard_map(
        functools.partial(losses.sharded_nt_xent,
                          temperature=config.loss.temperature,
                          axis_name=parallel.DATA_AXIS),
        mesh=mesh,
        in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=(P(), P()))

  def projection_loss(self, z_a, z_b, batch):
    del batch
    return self.sharded_loss(z_a, z_b)


class HardNegativeSimCLR(base.Method):
  """HCL (Robinson et al. 2021): NT-Xent with hard, debiased negatives.

  Computed on the global batch under jit (GSPMD partitions it); at very large
  batches SimCLR's shard_map form is the memory-lean one.
  """

  name = 'hcl'
  section = 'hcl'

  @classmethod
  def validate(cls, config):
    s = config[cls.section]
    checks.positive('hcl.beta', s.beta, allow_zero=True)
    checks.unit_interval('hcl.tau_plus', s.tau_plus)

  def projection_loss(self, z_a, z_b, batch):
    del batch
    loss = losses.hard_negative_nt_xent(
        z_a, z_b, temperature=self.config.loss.temperature,
        beta=self.settings.beta, tau_plus=self.settings.tau_plus)
    return loss, {}


def _instance_or_class_labels(batch: base.StepBatch, use_labels: bool
                              ) -> jax.Array:
  """Class labels, or per-image ids so that only the two views match."""
  if use_labels:
    return batch.labels
  return jnp.arange(batch.labels.shape[0], dtype=jnp.int32)


class SupCon(base.Method):
  """Supervised contrastive L_out (Khosla et al. 2020), labels from the data."""

  name = 'supcon'
  section = 'supcon'
  needs_labels = True

  @classmethod
  def validate(cls, config):
    # 0 = the temperature itself (loss scale T / base_T = 1).
    checks.positive('supcon.base_temperature',
                    config[cls.section].base_temperature, allow_zero=True)

  def projection_loss(self, z_a, z_b, batch):
    z = jnp.stack([z_a, z_b], axis=1)  # (N, 2 views, D)
    loss = losses.supcon(z, batch.labels,
                         temperature=self.config.loss.temperature,
                         base_temperature=self.settings.base_temperature
                         or None)
    return loss, {}


class _MarginMethod(base.Method):
  """Base of the two margin losses.

  Both score the L2-normalised projections of both views, with instance or
  class labels (`margin.use_labels`).
  """

  section = 'margin'

  @classmethod
  def validate(cls, config):
    checks.positive('margin.margin', config[cls.section].margin)

  @property
  def needs_labels(self) -> bool:  # type: ignore[override]
    return bool(self.settings.use_labels)

  def margin_loss(self, embeddings: jax.Array, labels: jax.Array
                  ) -> jax.Array:
    raise NotImplementedError

  def projection_loss(self, z_a, z_b, batch):
    labels = _instance_or_class_labels(batch, self.needs_labels)
    emb = jnp.concatenate([base.normalize(z_a), base.normalize(z_b)])
    return self.margin_loss(emb, jnp.concatenate([labels, labels])), {}


class Triplet(_MarginMethod):
  """Batch-hard triplet margin loss (Hermans et al. 2017)."""

  name = 'triplet'

  def margin_loss(self, embeddings, labels):
    return losses.triplet_margin(embeddings, labels,
                                 margin=self.settings.margin)


class ContrastiveMargin(_MarginMethod):
  """Pairwise contrastive (margin) loss of Siamese networks (Hadsell 2006)."""

  name = 'contrastive_margin'

  def margin_loss(self, embeddings, labels):
    return losses.contrastive_margin(
        embeddings, labels, margin=self.settings.margin,
        batch_hard=self.settings.batch_hard)
