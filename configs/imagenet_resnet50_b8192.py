r"""SimCLR on ImageNet, ResNet-50 1x, global batch 8192 (paper: 64.8% at 100 ep).

  python -m simclr_jax.main --config=configs/imagenet_resnet50_b8192.py \
      --workdir=gs://BUCKET/simclr/in_r50_b8192 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

The batch-4096 recipe at twice the batch; sqrt scaling gives peak LR
0.075 x sqrt(8192) = 6.79.
"""

import os

from simclr_jax.config import defaults


def get_config():
  c = defaults.load_recipe(
      os.path.join(os.path.dirname(__file__), 'imagenet_resnet50.py'))
  c.batch_size = 8192
  return c
