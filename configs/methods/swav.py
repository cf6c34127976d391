r"""SwAV (prototypes, Sinkhorn-Knopp codes, swapped prediction).

  python -m simclr_jax.main --config=configs/methods/swav.py:digits \
      --workdir=/tmp/swav_digits
  python -m simclr_jax.main --config=configs/methods/swav.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

3000 prototypes on CIFAR-10 (100 for the 10 digit classes), epsilon 0.05, 3
Sinkhorn iterations, T 0.1, prototypes frozen for the first epoch. On digits
(batch 256, 5 steps an epoch) the codes also use a queue of the 1024 most
recent features per view from epoch 5 on (the end of warmup), as the paper
does for small batches; CIFAR-10 runs without a queue.
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
  if dataset == 'digits':
    c.swav.queue_length = 4 * c.batch_size  # 1024 of 1437 images.
    c.swav.queue_start_epochs = 5
  return c
