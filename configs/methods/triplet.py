r"""Batch-hard triplet margin loss (self-supervised: the other view is the positive).

  python -m simclr_jax.main --config=configs/methods/triplet.py:digits \
      --workdir=/tmp/triplet_digits
  python -m simclr_jax.main --config=configs/methods/triplet.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

Margin 1.0 on L2-normalised projections; --config.margin.use_labels=True
makes it supervised metric learning.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'triplet'
  c.margin.margin = 1.0
  return c
