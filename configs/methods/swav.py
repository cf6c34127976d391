r"""SwAV (prototypes, Sinkhorn-Knopp codes, swapped prediction).

  python -m simclr_jax.main --config=configs/methods/swav.py:digits \
      --workdir=/tmp/swav_digits
  python -m simclr_jax.main --config=configs/methods/swav.py:fashion_mnist \
      --workdir=DIR
  python -m simclr_jax.main --config=configs/methods/swav.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

3000 prototypes on CIFAR-10 (100 for the 10 classes of digits and
Fashion-MNIST), epsilon 0.05, 3 Sinkhorn iterations, T 0.1, prototypes
frozen for the first epoch. The digits run at batch 256 also gives the
codes a queue of 1024 recent features per view from epoch 5 (the end of
warmup; 5 steps an epoch), as the paper does for small batches. Fashion-MNIST
and CIFAR-10 run without a queue: on Fashion-MNIST's validation split a
queue of 3840 from epoch 0.5 left SwAV far behind no queue (the figures are
in docs/fashion_mnist.md); its 15 batches of features, made by an encoder
that is still changing fast, spoil the codes of so short a run.
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
  c.swav.num_prototypes = 3000 if dataset == 'cifar10' else 100
  # Frozen for the first epoch: 5 steps on digits, 234 on Fashion-MNIST, 97
  # on CIFAR-10 at batch 512.
  c.swav.freeze_prototypes_steps, c.swav.freeze_prototypes_epochs = 0, 1.0
  if dataset == 'digits':
    c.swav.queue_length = 4 * c.batch_size  # 1024 of 1437 images.
    c.swav.queue_start_epochs = 5
  return c
