r"""BYOL (predictor, EMA target, no negatives).

  python -m simclr_jax.main --config=configs/methods/byol.py:digits \
      --workdir=/tmp/byol_digits
  python -m simclr_jax.main --config=configs/methods/byol.py:fashion_mnist \
      --workdir=DIR
  python -m simclr_jax.main --config=configs/methods/byol.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

tau 0.996 -> 1 on a cosine on CIFAR-10 with a 4096-wide predictor; on the
short CPU runs (digits, Fashion-MNIST: 60 and 1,638 steps) tau 0.99, so the
target moves (Fashion-MNIST's 0.99 against 0.996 on the validation split:
docs/fashion_mnist.md), and a 256-wide predictor for their narrow encoders.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'byol'
  c.byol.momentum = 0.996 if dataset == 'cifar10' else 0.99
  c.byol.predictor_hidden_dim = 4096 if dataset == 'cifar10' else 256
  return c
