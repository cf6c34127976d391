"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes.

Scores are the normalised projections times K learnable unit-norm
prototypes (SimCLRModel's `prototypes`, used as stored). As in the paper
(Caron et al. 2020, App. A), the prototypes are put back to unit norm after
every optimiser step, outside the gradient (`project_params`), and start
unit-norm. The codes of each view come from Sinkhorn-Knopp on the detached
scores of the GLOBAL batch (under jit the batch sums are global), and each
view predicts the other's codes. The prototypes stay frozen for the first
`freeze_prototypes_steps` steps (or `freeze_prototypes_epochs` epochs), as in
the paper, which keeps them from collapsing before the encoder learns.

The feature queue (paper Sec. 3.1, "Working with small batches";
`swav.queue_length` > 0): one queue per view of the `queue_length` most
recent detached, normalised projections of the global batch, newest first,
in `TrainState.extra` (replicated, checkpointed). From epoch
`swav.queue_start_epochs` (or step `queue_start_steps`) on, and once the
queue is full, each view's codes are Sinkhorn-Knopp over [queue scores; batch
scores] (the queue scored against the current prototypes), of which only the
batch rows are used.
The queue is filled from step 0 (the paper allocates it at the start epoch
and uses it once full), so at the start epoch it already holds the most
recent batches; the queue used by a step is the one from before its enqueue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simclr_jax import losses
from simclr_jax.methods import base
from simclr_jax.models import simclr as simclr_model
from simclr_jax.runtime import config_checks as checks
from simclr_jax.runtime import durations


class SwAV(base.Method):
  """Swapped assignments between views, no pairwise comparisons."""

  name = 'swav'
  section = 'swav'
  resume_shape_fields = ('swav.num_prototypes', 'swav.queue_length')

  @classmethod
  def validate(cls, config):
    s = config[cls.section]
    checks.integer('swav.num_prototypes', s.num_prototypes, 2)
    checks.integer('swav.sinkhorn_iterations', s.sinkhorn_iterations, 1)
    checks.positive('swav.epsilon', s.epsilon)
    durations.check(s, 'freeze_prototypes', 'swav')
    checks.integer('swav.queue_length', s.queue_length, 0)
    durations.check(s, 'queue_start', 'swav')
    b = config.batch_size
    if s.queue_length % b:
      raise checks.ConfigError(
          f'config.swav.queue_length={s.queue_length} is invalid: must be a '
          f'multiple of batch_size = {b} (each step enqueues the global '
          'batch\'s features of each view), or 0 for no queue')

  def __init__(self, config, *, total_steps, num_train_examples):
    super().__init__(config, total_steps=total_steps,
                     num_train_examples=num_train_examples)
    # Full global batches per epoch, as data/pipeline.steps_per_epoch.
    steps_per_epoch = num_train_examples // config.batch_size
    self.queue_start_step = durations.steps(self.settings, 'queue_start',
                                            steps_per_epoch)
    self.freeze_prototypes_step = durations.steps(
        self.settings, 'freeze_prototypes', steps_per_epoch)

  def model_overrides(self):
    return {'num_prototypes': int(self.settings.num_prototypes)}

  def init_extra(self, params, batch_stats, rng):
    del params, batch_stats, rng
    length = self.settings.queue_length
    if not length:
      return {}
    dim = self.config.model.proj_out_dim
    # One queue per view, newest rows first; `queue_filled` counts the valid
    # rows (the queue is used only once it is full).
    return {'queue': jnp.zeros((2, length, dim), jnp.float32),
            'queue_filled': jnp.zeros((), jnp.int32)}

  def codes(self, params, extra, scores_a, scores_b, step):
    """Sinkhorn-Knopp codes (q_a, q_b) of the two views' (N, K) scores.

    With a queue in use: Sinkhorn over [queue_v @ prototypes; scores_v] for
    each view v, restricted to the batch rows (the last N).
    """
    s = self.settings

    def sinkhorn(scores):
      return losses.sinkhorn(scores, epsilon=s.epsilon,
                             iterations=s.sinkhorn_iterations)

    q_a, q_b = sinkhorn(scores_a), sinkhorn(scores_b)
    if not s.queue_length:
      return q_a, q_b
    queue = jax.lax.stop_gradient(extra['queue'])
    prototypes = jax.lax.stop_gradient(params['prototypes'])
    use = ((step >= self.queue_start_step) &
           (extra['queue_filled'] >= s.queue_length))
    n = scores_a.shape[0]
    with_queue = [
        sinkhorn(jnp.concatenate([queue[v] @ prototypes, scores], 0))[-n:]
        for v, scores in enumerate((scores_a, scores_b))]
    return (jnp.where(use, with_queue[0], q_a),
            jnp.where(use, with_queue[1], q_b))

  def loss(self, model, params, batch_stats, extra, batch):
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    scores_a, scores_b = base.pairs(out['prototype_scores'])
    q_a, q_b = self.codes(params, extra, scores_a, scores_b, batch.step)
    loss = losses.swav(scores_a, scores_b, q_a, q_b,
                       temperature=self.config.loss.temperature)
    total, metrics = self.add_linear_head(loss, {}, out, batch)
    payload = None
    if self.settings.queue_length:
      z_a, z_b = base.pairs(base.normalize(out['projection']))
      payload = {'features': jax.lax.stop_gradient(jnp.stack([z_a, z_b]))}
    return total, base.LossOutput(metrics, new_stats, payload=payload)

  def update_extra(self, extra, params, payload, step):
    del params, step
    if not self.settings.queue_length:
      return extra
    features = payload['features']  # (2, N, D), the global batch.
    n, length = features.shape[1], self.settings.queue_length
    # Newest first; the oldest N rows drop out (length is a multiple of N).
    queue = jnp.concatenate([features, extra['queue'][:, :length - n]], 1)
    return {'queue': queue,
            'queue_filled': jnp.minimum(extra['queue_filled'] + n, length)}

  def project_params(self, params, step):
    # Unit-norm prototypes after each step (Caron et al. 2020, App. A); while
    # frozen they do not move and stay exactly as they are.
    frozen = step < self.freeze_prototypes_step
    params = dict(params)
    p = params['prototypes']
    params['prototypes'] = jnp.where(
        frozen, p, simclr_model.normalize_prototypes(p))
    return params

  def mask_frozen(self, tree, step):
    frozen = step < self.freeze_prototypes_step
    tree = dict(tree)
    tree['prototypes'] = jnp.where(frozen, 0.0, tree['prototypes'])
    return tree
