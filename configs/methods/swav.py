r"""SwAV (prototypes, Sinkhorn-Knopp codes, swapped prediction).

  python -m simclr_jax.main --config=configs/methods/swav.py:digits \
      --workdir=/tmp/swav_digits
  python -m simclr_jax.main --config=configs/methods/swav.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

3000 prototypes on CIFAR-10 (100 for the 10 digit classes), epsilon 0.05, 3
Sinkhorn iterations, T 0.1, prototypes frozen for the first epoch.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'swav'
  c.loss.temperature = 0.1
  c.swav.num_prototypes = 100 if dataset == 'digits' else 3000
  c.swav.freeze_prototypes_steps = 5 if dataset == 'digits' else 97
  return c
