"""Instance discrimination with a memory bank (Wu et al. 2018).

The bank holds one unit-norm feature per training image (`TrainState.extra`,
replicated, checkpointed: a resumed run keeps it, where peer libraries lose
it). Each view's feature is scored against its image's bank row (positive)
and `num_negatives` rows drawn uniformly at random (shared by the batch),
with the non-parametric softmax at temperature T. After the step the bank
rows of the batch move towards the mean of the two views' features with
momentum 0.5 and are renormalised (docs/algorithms.md#instdisc).

The bank costs num_train_examples x proj_out_dim floats per device
(ImageNet: 1.28M x 128 x 4 B = 655 MB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simclr_jax import losses
from simclr_jax.methods import base
from simclr_jax.runtime import config_checks as checks


class InstDisc(base.Method):
  """Non-parametric softmax over a memory bank of all training images."""

  name = 'instdisc'
  section = 'instdisc'
  # The bank has one row per training image: the split fixes its length
  # (dataset.name and model.proj_out_dim are checked for every method).
  resume_shape_fields = ('dataset.train_split',)
  needs_index = True

  @classmethod
  def validate(cls, config):
    s = config[cls.section]
    checks.integer('instdisc.num_negatives', s.num_negatives, 1)
    checks.unit_interval('instdisc.bank_momentum', s.bank_momentum)

  def init_extra(self, params, batch_stats, rng):
    del params, batch_stats
    dim = self.config.model.proj_out_dim
    bank = jax.random.normal(rng, (self.num_train_examples, dim), jnp.float32)
    return {'memory_bank': base.normalize(bank)}

  def loss(self, model, params, batch_stats, extra, batch):
    s = self.settings
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    f_a, f_b = base.pairs(base.normalize(out['projection']))
    bank = jax.lax.stop_gradient(extra['memory_bank'])
    positives = bank[batch.index]
    neg_index = jax.random.randint(batch.rng, (s.num_negatives,), 0,
                                   bank.shape[0])
    negatives = bank[neg_index]
    t = self.config.loss.temperature
    loss = 0.5 * (losses.instdisc_softmax(f_a, negatives, positives, t) +
                  losses.instdisc_softmax(f_b, negatives, positives, t))
    total, metrics = self.add_linear_head(loss, {}, out, batch)
    features = jax.lax.stop_gradient(base.normalize(f_a + f_b))
    return total, base.LossOutput(metrics, new_stats,
                                  payload={'features': features,
                                           'index': batch.index})

  def update_extra(self, extra, params, payload, step):
    del params, step
    bank = losses.memory_bank_update(
        extra['memory_bank'], payload['index'], payload['features'],
        momentum=self.settings.bank_momentum)
    return {'memory_bank': bank}
