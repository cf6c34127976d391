"""The method interface: what a contrastive method adds to the shared trainer.

Every method runs on the same sharded train step (train_step.py), input
pipeline, evaluation and export. A method only says
  - which extra trainable parts the online network has (`model_overrides`:
    a predictor, prototypes),
  - what extra state it carries between steps (`init_extra`: a momentum
    encoder, a queue, a memory bank), kept in `TrainState.extra`, replicated
    on the mesh and saved in every checkpoint, so a resumed run continues
    with the same queue and momentum encoder,
  - how two views of a batch become a loss and metrics (`loss`),
  - how its state moves after the optimiser step (`update_extra`), from a
    payload the loss returned (the keys to enqueue, the features to store).

SimCLR is one method among them (methods/contrastive.py). The two views of
image i are rows 2i and 2i+1 of the (2N, S, S, 3) batch the encoder sees, so
each device keeps both views of its own images and BN statistics cover both
views of the global batch (REFERENCE §2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import losses

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepBatch:
  """What the step hands a method.

  Attributes:
    x: (2N, S, S, 3) views in compute dtype; rows 2i, 2i+1 = image i.
    labels: (N,) class labels, -1 where unknown.
    index: (N,) dataset ids of the images (only when `needs_index`).
    rng: per-step key (negatives sampling, ...).
    step: the global step before this update.
  """
  x: jax.Array
  labels: jax.Array
  index: jax.Array | None
  rng: jax.Array
  step: jax.Array


class LossOutput(NamedTuple):
  """A method's loss with what the step needs besides the gradient.

  A NamedTuple so it is a pytree (it is jax.grad's auxiliary output).
  """
  metrics: Metrics  # Must hold 'contrastive_loss' (the method's own loss).
  batch_stats: Any  # Online network's updated BN statistics.
  payload: Any = None  # Handed to `update_extra` (outside the gradient).


def normalize(z: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm, in float32 (cosine similarities)."""
  z = z.astype(jnp.float32)
  return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def pairs(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(2N, ...) interleaved views -> (view a (N, ...), view b (N, ...))."""
  t = t.reshape((t.shape[0] // 2, 2) + t.shape[1:])
  return t[:, 0], t[:, 1]


# Online linear head: cross-entropy and accuracy, unlabelled rows left out.
linear_head_loss = losses.masked_cross_entropy


class Method:
  """Base class; SimCLR-style methods only override `projection_loss`."""

  name = 'base'
  needs_index = False  # The input pipeline must yield dataset ids.
  needs_labels = False  # The loss uses class labels.

  def __init__(self, config: ml_collections.ConfigDict, *,
               total_steps: int, num_train_examples: int):
    self.config = config
    self.total_steps = total_steps
    self.num_train_examples = num_train_examples

  # -- construction ---------------------------------------------------------
  def model_overrides(self) -> dict[str, Any]:
    """SimCLRModel fields this method sets (predictor, prototypes)."""
    return {}

  def init_extra(self, params: Any, batch_stats: Any, rng: jax.Array) -> Any:
    """Method state besides the optimised parameters (a pytree)."""
    del params, batch_stats, rng
    return {}

  # -- the step -------------------------------------------------------------
  def forward(self, model: nn.Module, params: Any, batch_stats: Any,
              x: jax.Array) -> tuple[dict[str, Any], Any]:
    """Online network on both views in one batch (global BN)."""
    out, new_state = model.apply({'params': params, 'batch_stats': batch_stats},
                                 x, train=True, mutable=['batch_stats'])
    return out, new_state['batch_stats']

  def loss(self, model: nn.Module, params: Any, batch_stats: Any, extra: Any,
           batch: StepBatch) -> tuple[jax.Array, LossOutput]:
    """Total loss to differentiate w.r.t. params, and its LossOutput.

    The default runs the online network and scores its projections with
    `projection_loss`; the online linear head's loss is added (it sees
    stop_gradient features, so it never shapes the encoder).
    """
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    z_a, z_b = pairs(out['projection'])
    loss, metrics = self.projection_loss(z_a, z_b, batch)
    total, metrics = self.add_linear_head(loss, metrics, out, batch)
    return total, LossOutput(metrics, new_stats)

  def projection_loss(self, z_a: jax.Array, z_b: jax.Array, batch: StepBatch
                      ) -> tuple[jax.Array, Metrics]:
    """Loss of the two views' projections (N, D) each, and extra metrics."""
    raise NotImplementedError(f'{self.name} defines no projection_loss')

  @property
  def supports_grad_cache(self) -> bool:
    """Gradient caching needs a loss of the projections alone.

    True for methods that only define `projection_loss` (SimCLR, HCL,
    SupCon, triplet, margin); methods with a target network or prototypes
    override `loss` and are not supported.
    """
    return type(self).loss is Method.loss

  def add_linear_head(self, loss: jax.Array, metrics: Metrics,
                      out: dict[str, Any], batch: StepBatch
                      ) -> tuple[jax.Array, Metrics]:
    metrics = dict(metrics, contrastive_loss=loss)
    if out.get('logits') is None:
      return loss, metrics
    lin_loss, lin_acc = linear_head_loss(out['logits'],
                                         jnp.repeat(batch.labels, 2))
    return loss + lin_loss, dict(metrics, linear_loss=lin_loss,
                                 linear_acc=lin_acc)

  def mask_frozen(self, tree: Any, step: jax.Array) -> Any:
    """Zeroes the entries of params-shaped `tree` frozen at `step`.

    The step applies it to the gradients AND to the optimiser's updates, so a
    frozen parameter does not move even under weight decay (e.g. SwAV's
    prototypes early in training).
    """
    del step
    return tree

  def update_extra(self, extra: Any, params: Any, payload: Any,
                   step: jax.Array) -> Any:
    """Method state after the optimiser step; `params` are the new ones."""
    del params, payload, step
    return extra
