r"""MoCo v3 (predictor, symmetric in-batch loss, no queue).

  python -m simclr_jax.main --config=configs/methods/moco_v3.py:digits \
      --workdir=/tmp/moco_v3_digits
  python -m simclr_jax.main --config=configs/methods/moco_v3.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR
  python -m simclr_jax.main \
      --config=configs/methods/moco_v3.py:fashion_mnist_vit --workdir=DIR

ResNets (digits, fashion_mnist, cifar10): T 1.0, loss scaled by 2T,
momentum 0.99 -> 1 on a cosine (Chen, Xie, He 2021). Everything else
(model, optimiser, schedule, augmentation, evaluation) is the SimCLR recipe
of the dataset, so methods compare at equal budget.

`fashion_mnist_vit`: the paper's ViT recipe (`vit_recipe` below) on a
4-block ViT-Tiny-wide network with 7 px patches at 28 px for 3 epochs, at
the Fashion-MNIST recipe's images, augmentation and batch. Width against
length was chosen on the validation split at one pretraining time
(docs/fashion_mnist.md); the learning rate and warmup are scaled down from
the paper's by reasoning, not searched. configs/imagenet_moco_v3_vit_b16.py
is the paper's ViT-B/16 run at batch 4096.
"""

import os

import ml_collections

from simclr_jax.config import defaults

ARGUMENTS = ('digits', 'fashion_mnist', 'cifar10', 'fashion_mnist_vit')


def vit_recipe(c: ml_collections.ConfigDict, *, size: str, patch_size: int,
               warmup_epochs: float) -> ml_collections.ConfigDict:
  """MoCo v3's ViT settings (Chen, Xie, He 2021, Sec. 4 and App. A) on `c`.

  A ViT with the class token as the feature, fixed 2-D sine-cosine position
  embeddings and a random patch projection that stays frozen (the paper's
  fix for the training instability it traces to the patch projection); a
  3-layer projector and a 2-layer predictor, 4096 wide, each ending in a BN
  without affine parameters; T 0.2; AdamW at 1.5e-4 x B/256 with weight
  decay 0.1 (biases, norms, the class token and position embedding
  excluded), linear warmup then cosine; momentum 0.99 -> 1 on a cosine.
  """
  c.method = 'moco_v3'
  c.model.name = 'vit'
  c.model.vit.update(dict(size=size, patch_size=patch_size, pool='cls',
                          pos_embed='sincos', frozen_patch_embed=True))
  c.model.num_proj_layers = 3
  c.model.proj_hidden_dim = 4096
  c.model.proj_out_dim = 256
  c.model.proj_out_bn_scale = False
  c.moco_v3.update(dict(momentum=0.99, predictor_hidden_dim=4096,
                        predictor_out_bn=True))
  c.loss.temperature = 0.2
  c.optim.update(dict(name='adamw', base_learning_rate=1.5e-4,
                      lr_scaling='linear', weight_decay=0.1,
                      warmup_epochs=warmup_epochs, warmup_steps=0))
  return c


def get_config(dataset: str = 'digits'):
  """MoCo v3 on `dataset`, one of ARGUMENTS."""
  configs_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if dataset not in ARGUMENTS:
    raise ValueError(f'unknown argument {dataset!r} of '
                     f'configs/methods/moco_v3.py; choose one of '
                     f'{", ".join(ARGUMENTS)}')
  if dataset == 'fashion_mnist_vit':
    c = defaults.dataset_recipe('fashion_mnist', configs_dir)
    vit_recipe(c, size='tiny', patch_size=7, warmup_epochs=1.0)
    # 16 patches of a 28 px image: with 4 px patches (49 tokens) a 6-block
    # step was 593 GFLOP, 7 times the ResNet recipe's 80
    # (python -m simclr_jax.benchmark). 4 blocks of width 192 for 3 epochs
    # were chosen on the validation split against width 128 for 5 epochs
    # at the same pretraining time (docs/fashion_mnist.md).
    c.model.vit.depth = 4
    c.num_epochs = 3
    c.model.proj_hidden_dim = 512
    c.moco_v3.predictor_hidden_dim = 512
    # AdamW's rate at batch 256: 1.5e-4 x 256/256 is the paper's for 300
    # epochs; a few epochs need a larger step.
    c.optim.base_learning_rate = 1e-3
    return c
  c = defaults.dataset_recipe(dataset, configs_dir)
  c.method = 'moco_v3'
  c.loss.temperature = 1.0
  c.moco_v3.momentum = 0.99
  c.moco_v3.predictor_hidden_dim = 256 if dataset == 'digits' else 4096
  return c
