r"""InvaSpread (Ye et al. 2019): in-batch instance discrimination, no projector.

  python -m simclr_jax.main --config=configs/methods/invaspread.py:digits \
      --workdir=/tmp/invaspread_digits
  python -m simclr_jax.main --config=configs/methods/invaspread.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

T 0.1 and a 128-d embedding from ONE head layer (model.num_proj_layers = 1:
the project's bias-free Dense + BN, in place of the paper's FC with bias; see
simclr_jax/methods/invaspread.py), no MLP projector. Fine-tuning starts from
the encoder output (ft_proj_selector 0: the one head layer is the embedding).
Everything else (encoder, optimiser, schedule, augmentation, evaluation) is
the SimCLR recipe of the dataset, so methods compare at equal budget.

The paper trains with SGD (momentum 0.9, lr 0.03 at batch 128, weight decay
5e-4, lr x0.1 after 120 epochs); the closest the project's optimisers come is
momentum SGD with the same peak lr per image (0.03 x B/128 = base 0.06 with
linear scaling) on a cosine schedule, weight decay on kernels only:
  --config.optim.name=sgd --config.optim.base_learning_rate=0.06 \
  --config.optim.weight_decay=5e-4 --config.optim.warmup_epochs=0 \
  --config.batch_size=128
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'invaspread'
  c.loss.temperature = 0.1
  c.model.num_proj_layers = 1
  c.model.proj_out_dim = 128
  c.model.ft_proj_selector = 0
  c.invaspread.symmetric = True
  return c
