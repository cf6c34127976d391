"""Methods with a momentum (EMA) target network: MoCo v2, MoCo v3, BYOL.

The target network is the online encoder and projection head with parameters
that follow the online ones by an exponential moving average; it gets no
gradient. Its parameters and BN statistics live in `TrainState.extra`, so a
checkpoint holds them and a resumed run continues with the same target (and,
for MoCo v2, the same queue).

BN is global under jit (docs/algorithms.md#batch-normalisation), so MoCo's
shuffling BN is not needed: its purpose, keeping the key encoder's batch
statistics from leaking which sample is the positive within one device's
sub-batch, does not arise when statistics cover the whole global batch.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import losses
from simclr_jax.methods import base
from simclr_jax.runtime import config_checks as checks

_TARGET_PARTS = ('encoder', 'projection_head')


def cosine_momentum(base_momentum: float, step: jax.Array,
                    total_steps: int) -> jax.Array:
  """BYOL's schedule: tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - (1.0 - base_momentum) * (jnp.cos(math.pi * progress) + 1) / 2


class _MomentumMethod(base.Method):
  """Shared target-network plumbing; subclasses define the loss."""

  supports_grad_cache = False  # _PredictorMethod's subclasses do.
  cosine_schedule = True
  has_predictor = True  # BYOL, MoCo v3: {section}.predictor_hidden_dim.

  @classmethod
  def validate(cls, config):
    s = config[cls.section]
    checks.unit_interval(f'{cls.section}.momentum', s.momentum)
    if cls.has_predictor:
      checks.integer(f'{cls.section}.predictor_hidden_dim',
                     s.predictor_hidden_dim, 1)

  def model_overrides(self) -> dict[str, Any]:
    if not self.has_predictor:
      return {}
    return {'predictor_hidden_dim': int(self.settings.predictor_hidden_dim)}

  def init_extra(self, params, batch_stats, rng):
    del rng
    # Copies (not aliases): the target starts equal to the online network.
    return {
        'target_params': jax.tree.map(jnp.array,
                                      {k: params[k] for k in _TARGET_PARTS}),
        'target_batch_stats': jax.tree.map(
            jnp.array, {k: batch_stats[k] for k in _TARGET_PARTS
                        if k in batch_stats}),
    }

  def momentum(self, step: jax.Array) -> jax.Array:
    m = self.settings.momentum
    if self.cosine_schedule:
      return cosine_momentum(m, step, self.total_steps)
    return jnp.asarray(m, jnp.float32)

  def target_projections(self, model: nn.Module, extra: Any, x: jax.Array,
                         train: bool = True) -> tuple[jax.Array, Any]:
    """Target network's projections (no gradient) and its new BN stats
    (unchanged when not `train`: BN on its running statistics)."""
    target = model.clone(linear_head=False, predictor_hidden_dim=0,
                         num_prototypes=0)
    variables = {'params': extra['target_params'],
                 'batch_stats': extra['target_batch_stats']}
    if not train:
      out = target.apply(variables, x, train=False)
      return (jax.lax.stop_gradient(out['projection']),
              extra['target_batch_stats'])
    out, new_state = target.apply(variables, x, train=True,
                                  mutable=['batch_stats'])
    return (jax.lax.stop_gradient(out['projection']),
            jax.lax.stop_gradient(new_state['batch_stats']))

  def update_extra(self, extra, params, payload, step):
    m = self.momentum(step)
    online = {k: params[k] for k in _TARGET_PARTS}
    new = dict(extra)
    new['target_params'] = jax.tree.map(
        lambda t, o: m * t + (1.0 - m) * o, extra['target_params'], online)
    new['target_batch_stats'] = payload['target_batch_stats']
    return new


class _PredictorMethod(_MomentumMethod):
  """MoCo v3 and BYOL: `pair_loss(p1, p2, z1, z2)` of the online
  predictions p and the target projections z of the two views; they differ
  only in that function. Gradient caching caches the predictions and runs
  the target network chunk by chunk beside the online one."""

  supports_grad_cache = True
  cached_output = 'prediction'
  has_targets = True

  def pair_loss(self, p1: jax.Array, p2: jax.Array, z1: jax.Array,
                z2: jax.Array) -> jax.Array:
    raise NotImplementedError

  def loss(self, model, params, batch_stats, extra, batch):
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    p1, p2 = base.pairs(out['prediction'])
    z, target_stats = self.target_projections(model, extra, batch.x)
    z1, z2 = base.pairs(z)
    total, metrics = self.add_linear_head(self.pair_loss(p1, p2, z1, z2), {},
                                          out, batch)
    return total, base.LossOutput(metrics, new_stats,
                                  payload={'target_batch_stats': target_stats})

  def cached_targets(self, model, extra, x, train):
    z, stats = self.target_projections(model, extra, x, train)
    return z, {'target_batch_stats': stats}

  def cached_loss(self, a, b, targets, batch):
    z1, z2 = base.pairs(targets)
    return self.pair_loss(a, b, z1, z2), {}


class MoCoV2(_MomentumMethod):
  """MoCo v2 (Chen et al. 2020b): momentum key encoder and a queue of keys.

  Symmetrised: each view's query is scored against the other view's key and
  the queue, and both views' keys are enqueued (2N per step) after the loss,
  as in He et al. 2020, Algorithm 1. The queue holds all-gathered (global)
  keys: under jit the keys are one global array, so every device enqueues the
  same keys.
  """

  name = 'moco_v2'
  section = 'moco_v2'
  resume_shape_fields = ('moco_v2.queue_size',)
  cosine_schedule = False  # MoCo v2 keeps m = 0.999 fixed.
  has_predictor = False

  @classmethod
  def validate(cls, config):
    super().validate(config)
    k, b = config.moco_v2.queue_size, config.batch_size
    checks.integer('moco_v2.queue_size', k, 1)
    if k % (2 * b):
      raise checks.ConfigError(
          f'config.moco_v2.queue_size={k} is invalid: must be a multiple of '
          f'2 x batch_size = {2 * b} (both views\' keys are enqueued each '
          'step)')

  def init_extra(self, params, batch_stats, rng):
    extra = super().init_extra(params, batch_stats, rng)
    size, dim = self.settings.queue_size, self.config.model.proj_out_dim
    queue = jax.random.normal(rng, (size, dim), jnp.float32)
    extra['queue'] = base.normalize(queue)
    extra['queue_ptr'] = jnp.zeros((), jnp.int32)
    return extra

  def loss(self, model, params, batch_stats, extra, batch):
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    q_a, q_b = base.pairs(base.normalize(out['projection']))
    k, target_stats = self.target_projections(model, extra, batch.x)
    k = base.normalize(k)
    k_a, k_b = base.pairs(k)
    queue = jax.lax.stop_gradient(extra['queue'])
    t = self.config.loss.temperature
    loss = 0.5 * (losses.moco_infonce(q_a, k_b, queue, t) +
                  losses.moco_infonce(q_b, k_a, queue, t))
    total, metrics = self.add_linear_head(loss, {}, out, batch)
    return total, base.LossOutput(
        metrics, new_stats,
        payload={'keys': k, 'target_batch_stats': target_stats})

  def update_extra(self, extra, params, payload, step):
    new = super().update_extra(extra, params, payload, step)
    keys = payload['keys']
    ptr = extra['queue_ptr']
    # Queue size is a multiple of 2N (validated), so a write never wraps.
    new['queue'] = jax.lax.dynamic_update_slice(extra['queue'], keys,
                                                (ptr, 0))
    new['queue_ptr'] = (ptr + keys.shape[0]) % extra['queue'].shape[0]
    return new


class MoCoV3(_PredictorMethod):
  """MoCo v3 (Chen, Xie, He 2021): predictor, symmetric in-batch loss.

  No queue; the keys are the other view's target projections of the same
  global batch; momentum rises from m to 1 on a cosine schedule.
  """

  name = 'moco_v3'
  section = 'moco_v3'
  resume_shape_fields = ('moco_v3.predictor_hidden_dim',
                         'moco_v3.predictor_out_bn')

  @classmethod
  def validate(cls, config):
    super().validate(config)
    checks.choice('moco_v3.predictor_out_bn',
                  config.moco_v3.get('predictor_out_bn', False),
                  (True, False))

  def model_overrides(self) -> dict[str, Any]:
    # The ViT recipe's predictor ends in a BN without affine parameters.
    return {**super().model_overrides(), 'predictor_out_bn':
            bool(self.settings.get('predictor_out_bn', False))}

  def pair_loss(self, p1, p2, z1, z2):
    return losses.moco_v3(p1, p2, z1, z2, self.config.loss.temperature)


class BYOL(_PredictorMethod):
  """BYOL (Grill et al. 2020): predict the other view's target projection.

  No negatives; tau rises from 0.996 to 1 on a cosine schedule.
  """

  name = 'byol'
  section = 'byol'
  resume_shape_fields = ('byol.predictor_hidden_dim',)

  def pair_loss(self, p1, p2, z1, z2):
    return losses.byol(p1, p2, z1, z2)
