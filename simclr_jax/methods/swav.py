"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp codes.

Scores are cosine similarities between the projections and K learnable
prototypes (SimCLRModel's `prototypes`). The codes of each view come from
Sinkhorn-Knopp on the detached scores of the GLOBAL batch (under jit the
batch sums are global), and each view predicts the other's codes. The
prototypes stay frozen for the first `freeze_prototypes_steps` steps, as in
the paper, which keeps them from collapsing before the encoder learns.
The optional feature queue of the paper (for small batches) is not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from simclr_jax import losses
from simclr_jax.methods import base


class SwAV(base.Method):
  """Swapped assignments between views, no pairwise comparisons."""

  name = 'swav'

  def model_overrides(self):
    return {'num_prototypes': int(self.config.swav.num_prototypes)}

  def loss(self, model, params, batch_stats, extra, batch):
    s = self.config.swav
    out, new_stats = self.forward(model, params, batch_stats, batch.x)
    scores_a, scores_b = base.pairs(out['prototype_scores'])
    q_a = losses.sinkhorn(scores_a, epsilon=s.epsilon,
                          iterations=s.sinkhorn_iterations)
    q_b = losses.sinkhorn(scores_b, epsilon=s.epsilon,
                          iterations=s.sinkhorn_iterations)
    loss = losses.swav(scores_a, scores_b, q_a, q_b,
                       temperature=self.config.loss.temperature)
    total, metrics = self.add_linear_head(loss, {}, out, batch)
    return total, base.LossOutput(metrics, new_stats)

  def mask_frozen(self, tree, step):
    frozen = step < self.config.swav.freeze_prototypes_steps
    tree = dict(tree)
    tree['prototypes'] = jnp.where(frozen, 0.0, tree['prototypes'])
    return tree
