r"""MoCo v3 (predictor, symmetric in-batch loss, no queue).

  python -m simclr_jax.main --config=configs/methods/moco_v3.py:digits \
      --workdir=/tmp/moco_v3_digits
  python -m simclr_jax.main --config=configs/methods/moco_v3.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

T 1.0 for ResNets, loss scaled by 2T, momentum 0.99 -> 1 on a cosine (Chen,
Xie, He 2021).
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'moco_v3'
  c.loss.temperature = 1.0
  c.moco_v3.momentum = 0.99
  c.moco_v3.predictor_hidden_dim = 256 if dataset == 'digits' else 4096
  return c
