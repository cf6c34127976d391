r"""MoCo v2 (momentum key encoder + queue of keys; docs/algorithms.md).

  python -m simclr_jax.main --config=configs/methods/moco_v2.py:digits \
      --workdir=/tmp/moco_v2_digits
  python -m simclr_jax.main --config=configs/methods/moco_v2.py:fashion_mnist \
      --workdir=DIR
  python -m simclr_jax.main --config=configs/methods/moco_v2.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

T 0.2. The queue holds 65536 keys on CIFAR-10 (a multiple of 2N: both views'
keys are enqueued), 8192 on Fashion-MNIST (16 steps of keys, fresh next to
the key encoder's lag), 1024 on digits; m 0.999 on CIFAR-10, 0.99 for the
short CPU runs (60 and 1,638 steps), where 0.999 would leave 94% and 19% of
the key encoder at its initial weights (Fashion-MNIST's 0.99 against 0.999
on the validation split: docs/fashion_mnist.md).
Everything else (model, optimiser, schedule, augmentation, evaluation) is the
SimCLR recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'moco_v2'
  c.loss.temperature = 0.2
  c.moco_v2.momentum = 0.999 if dataset == 'cifar10' else 0.99
  c.moco_v2.queue_size = {'digits': 1024, 'fashion_mnist': 8192}.get(
      dataset, 65536)
  return c
