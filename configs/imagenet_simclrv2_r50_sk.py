r"""SimCLRv2 on ImageNet: selective-kernel ResNet-50 1x, 3-layer projection head.

  python -m simclr_jax.main --config=configs/imagenet_simclrv2_r50_sk.py \
      --workdir=gs://BUCKET/simclr/in_v2_r50_sk \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Then fine-tune on 1% of the labels from the first head layer (SimCLRv2 paper:
R50-SK 1x, 3-layer head):

  python -m simclr_jax.main --config=configs/imagenet_simclrv2_r50_sk.py \
      --mode=finetune --workdir=gs://BUCKET/simclr/in_v2_r50_sk_ft1 \
      --config.init_from=gs://BUCKET/simclr/in_v2_r50_sk \
      --config.dataset.name=imagenet2012_subset/1pct

Differences from the v1 recipe (Chen et al. 2020b, Sec. 3): SK convs with
sk_ratio 0.0625 and the ResNet-D stem, 3 projection layers with fine-tuning
from layer 1, warmup over 5% of training, weight decay 1e-4, 800 epochs.
"""

import os

from simclr_jax.config import defaults


def get_config():
  c = defaults.load_recipe(
      os.path.join(os.path.dirname(__file__), 'imagenet_resnet50.py'))
  c.model.sk_ratio = 0.0625
  c.model.num_proj_layers = 3
  c.model.ft_proj_selector = 1
  c.num_epochs = 800
  c.optim.warmup_epochs = 0.05 * c.num_epochs
  c.optim.weight_decay = 1e-4
  return c
