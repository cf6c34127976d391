r"""Pairwise contrastive (margin) loss of Siamese networks.

  python -m simclr_jax.main --config=configs/methods/contrastive_margin.py:digits \
      --workdir=/tmp/contrastive_margin_digits
  python -m simclr_jax.main --config=configs/methods/contrastive_margin.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

Margin 1.0 on L2-normalised projections, batch-hard pairs;
--config.margin.use_labels=True makes it supervised.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'contrastive_margin'
  c.margin.margin = 1.0
  c.margin.batch_hard = True
  return c
