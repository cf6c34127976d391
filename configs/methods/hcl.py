r"""Hard-negative NT-Xent (Robinson et al. 2021).

  python -m simclr_jax.main --config=configs/methods/hcl.py:digits \
      --workdir=/tmp/hcl_digits
  python -m simclr_jax.main --config=configs/methods/hcl.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

beta 1.0, tau_plus 0.1, T 0.5 on CIFAR-10 (0.2 on digits, as SimCLR's recipe).
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'hcl'
  c.hcl.beta = 1.0
  c.hcl.tau_plus = 0.1
  return c
