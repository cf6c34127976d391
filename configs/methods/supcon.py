r"""SupCon (supervised contrastive, labels from the dataset).

  python -m simclr_jax.main --config=configs/methods/supcon.py:digits \
      --workdir=/tmp/supcon_digits
  python -m simclr_jax.main --config=configs/methods/supcon.py:fashion_mnist \
      --workdir=DIR
  python -m simclr_jax.main --config=configs/methods/supcon.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

T 0.1 (SupContrast uses 0.07-0.1); positives are all views of the same class.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'supcon'
  c.loss.temperature = 0.1
  return c
