"""InvaSpread (Ye, Zhang, Yuen, Chang 2019, CVPR; arXiv 1904.03436).

In-batch instance discrimination with one encoder, SimCLR's predecessor: no
memory bank, no momentum encoder; each image's other view is its positive and
the other images of the batch its negatives (`losses.invaspread`, eq. 2-5).

What matches the paper:
  * the loss of eq. 5 (a softmax over the batch's features for the positive,
    log(1 - P) terms spreading the other instances), divided by the batch
    size as the released code does, over the GLOBAL batch (the step runs
    the encoder under jit on the whole sharded batch, so the (m x m)
    similarities cover every device's images, as for HCL);
  * T = 0.1 and a 128-d L2-normalised embedding;
  * no MLP projector: the recipes (configs/methods/invaspread.py) set
    model.num_proj_layers = 1, a single linear layer from the encoder output
    to 128-d, with no hidden layer and no ReLU.

What differs:
  * that layer is the project's head layer, a bias-free Dense followed by
    BatchNorm (learned scale, no shift), not the paper's plain FC with bias.
    At inference it is an affine map like the FC; in training BN
    standardises each of the 128 dimensions over the global batch before
    the L2 normalisation. A plain FC would change the head's parameter tree
    (no bn1), which fine-tuning from a head layer, the PyTorch export of the
    head and the TF checkpoint import all assume, so it is not built;
  * both views are random augmentations (as in the released code); eq. 5
    names one the "original" x_i and the other the augmented x^_i. With
    `invaspread.symmetric` (default) the loss is the mean of eq. 5 with
    either view as the original, so both views are queries and both spread;
    symmetric=False is eq. 5 with view a as the original;
  * gradients flow through both sides of every similarity, the paper's
    objective (the released code detaches the keys);
  * the optimiser and schedule are the dataset's SimCLR recipe (equal
    budget with the other methods), not the paper's SGD (lr 0.03, batch
    128, weight decay 5e-4, step decay); see the recipe for the flags.
"""

from __future__ import annotations

from simclr_jax import losses
from simclr_jax.methods import base
from simclr_jax.runtime import config_checks as checks


class InvaSpread(base.Method):
  """Invariant and spreading instance features (Ye et al. 2019, eq. 5)."""

  name = 'invaspread'
  section = 'invaspread'

  @classmethod
  def validate(cls, config):
    # The negatives are the batch's other images: one image has none.
    checks.integer('batch_size', config.batch_size, 2)
    checks.choice('invaspread.symmetric', config[cls.section].symmetric,
                  (True, False))

  def projection_loss(self, z_a, z_b, batch):
    del batch
    t = self.config.loss.temperature
    loss = losses.invaspread(z_a, z_b, temperature=t)
    if self.settings.symmetric:
      loss = 0.5 * (loss + losses.invaspread(z_b, z_a, temperature=t))
    return loss, {}
