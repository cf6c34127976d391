r"""InstDisc (memory bank of every training image, sampled negatives).

  python -m simclr_jax.main --config=configs/methods/instdisc.py:digits \
      --workdir=/tmp/instdisc_digits
  python -m simclr_jax.main --config=configs/methods/instdisc.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

T 0.07, 4096 negatives (1024 on the 1437 digits), bank momentum 0.5.
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'instdisc'
  c.loss.temperature = 0.07
  c.instdisc.num_negatives = 1024 if dataset == 'digits' else 4096
  return c
