r"""BYOL (predictor, EMA target, no negatives).

  python -m simclr_jax.main --config=configs/methods/byol.py:digits \
      --workdir=/tmp/byol_digits
  python -m simclr_jax.main --config=configs/methods/byol.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

tau 0.996 -> 1 on a cosine (0.99 on the short digits run).
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'byol'
  c.byol.momentum = 0.99 if dataset == 'digits' else 0.996
  c.byol.predictor_hidden_dim = 256 if dataset == 'digits' else 4096
  return c
