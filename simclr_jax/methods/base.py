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
  - how its parameters are projected after the optimiser step
    (`project_params`: SwAV's unit-norm prototypes),
  - how its state moves after the optimiser step (`update_extra`), from a
    payload the loss returned (the keys to enqueue, the features to store).

SimCLR is one method among them (methods/contrastive.py). The two views of
image i are rows 2i and 2i+1 of the (2N, S, S, 3) batch the encoder sees, so
each device keeps both views of its own images and BN statistics cover both
views of the global batch (docs/algorithms.md#batch-normalisation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import losses

Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class StepBatch:
  """What the step hands a method (a pytree, so programs can pass it on).

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


@dataclasses.dataclass(frozen=True)
class HostContext:
  """What `Method.host_update` may use besides the train state.

  Attributes:
    config: the run's config.
    mesh: the device mesh; the state is replicated on it.
    model: the SimCLRModel the step trains.
    steps_per_epoch: optimiser steps per pass over the train split.
    total_steps: steps of the whole run.
    featurize: `variables -> (num_train_examples, D)` float32 NumPy features
      h of the whole train split with evaluation preprocessing and BN in
      inference mode, row i = the example whose batch 'index' is i.
  """
  config: ml_collections.ConfigDict
  mesh: Any
  model: nn.Module
  steps_per_epoch: int
  total_steps: int
  featurize: Callable[[Any], Any]


class LossOutput(NamedTuple):
  """A method's loss with what the step needs besides the gradient.

  A NamedTuple so it is a pytree (it is jax.grad's auxiliary output).
  """
  metrics: Metrics  # Must hold 'contrastive_loss' (the method's own loss).
  batch_stats: Any  # Online network's updated BN statistics.
  payload: Any = None  # Handed to `update_extra` (outside the gradient).


def normalize(z: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm, in float32 (cosine similarities)."""
  return losses.l2_normalize(z.astype(jnp.float32))


def pairs(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(2N, ...) interleaved views -> (view a (N, ...), view b (N, ...))."""
  t = t.reshape((t.shape[0] // 2, 2) + t.shape[1:])
  return t[:, 0], t[:, 1]


# Online linear head: cross-entropy and accuracy, unlabelled rows left out.
linear_head_loss = losses.masked_cross_entropy


class Method:
  """Base class; SimCLR-style methods only override `projection_loss`.

  A method class owns every fact about itself the rest of the project needs:
  its `name` (config.method), its config `section`, the checks of that
  section (`validate`), whether gradient caching can compute its gradient
  (`supports_grad_cache`) and the config fields that fix the shapes of its
  checkpointed state (`resume_shape_fields`).
  """

  name = 'base'
  # The config section holding this method's settings ('' = none: it reads
  # only loss.temperature); by convention the method's own name.
  section = ''
  # Dotted config fields fixing the shapes of this method's extra state or
  # extra parts (a queue, a predictor, prototypes); a run cannot resume
  # with other values.
  resume_shape_fields: tuple[str, ...] = ()
  needs_index = False  # The input pipeline must yield dataset ids.
  needs_labels = False  # The loss uses class labels.
  # Gradient caching (training/grad_cache.py) needs a loss of one online
  # output per view (`cached_output`) and, for methods with a target
  # network, that network's outputs (`cached_targets`): true for methods
  # that only define `projection_loss` (SimCLR, HCL, SupCon, triplet,
  # margin). A subclass that overrides `loss` (a queue, prototypes, a memory
  # bank) is not supported unless it says so and defines `cached_loss`.
  supports_grad_cache = True
  cached_output = 'projection'
  has_targets = False  # `cached_targets` runs a target network.

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # A class that overrides `loss` without saying it supports gradient
    # caching does not; one that keeps its parent's loss keeps its answer.
    if 'supports_grad_cache' not in vars(cls) and 'loss' in vars(cls):
      cls.supports_grad_cache = False

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """Checks this method's settings; raises a one-line ConfigError.

    Runs before anything is built (config/validation.py calls it for the
    selected method). Subclasses extend it with their section's rules.
    """
    del config

  @property
  def settings(self) -> ml_collections.ConfigDict:
    """This method's config section."""
    return self.config[self.section]

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

  def cached_targets(self, model: nn.Module, extra: Any, x: jax.Array,
                     train: bool) -> tuple[jax.Array, Any]:
    """Under gradient caching, a target network's outputs for the views x
    of one chunk (no gradient) and its payload for `update_extra`.

    Only for `has_targets` methods. `train` is False under frozen BN. The
    payloads of the chunks are averaged (BN statistic updates are linear in
    the chunk statistics, as for the online network's).
    """
    raise NotImplementedError(f'{self.name} has no target network')

  def cached_loss(self, a: jax.Array, b: jax.Array, targets: Any,
                  batch: StepBatch) -> tuple[jax.Array, Metrics]:
    """The loss under gradient caching, from the whole batch's cached
    online outputs of the two views, a and b (N, D) each, and the target
    outputs of all 2N views (None without a target network); the same value
    as `loss` computes (less the linear head, which the cache adds)."""
    del targets
    return self.projection_loss(a, b, batch)

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

  def project_params(self, params: Any, step: jax.Array) -> Any:
    """Parameters after the optimiser step, projected onto a constraint set.

    The step applies it right after `optax.apply_updates`, inside the jitted
    step but outside the gradient (e.g. SwAV's prototypes back to unit norm,
    Caron et al. 2020, App. A). `step` is the global step before the update.
    The default is the identity.
    """
    del step
    return params

  def update_extra(self, extra: Any, params: Any, payload: Any,
                   step: jax.Array) -> Any:
    """Method state after the optimiser step; `params` are the new ones."""
    del params, payload, step
    return extra

  # -- host side ------------------------------------------------------------
  def host_update(self, step: int, state: Any, context: HostContext) -> Any:
    """The train state to run step `step` from (the loop's before_step).

    Runs on the host before every step, outside jit, and may replace
    `state.extra` with state computed over the whole dataset (DeepCluster's
    k-means pseudo-labels). It must be a pure function of (step, state,
    config) so a resumed run redoes exactly what the uninterrupted one did.
    Methods that do not override it get no hook at all.
    """
    del step, context
    return state
