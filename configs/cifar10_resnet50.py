r"""SimCLR on CIFAR-10, ResNet-50 (paper: 94.0% linear at batch 1024).

  python -m simclr_jax.main --config=configs/cifar10_resnet50.py \
      --workdir=gs://BUCKET/simclr/cifar10_r50 --config.dataset.data_dir=DIR

The ResNet-18 recipe with a ResNet-50, batch 1024 and bfloat16 compute.
"""

import os

from simclr_jax.config import defaults


def get_config():
  c = defaults.load_recipe(
      os.path.join(os.path.dirname(__file__), 'cifar10_resnet18.py'))
  c.model.depth = 50
  c.model.compute_dtype = 'bfloat16'
  c.batch_size = 1024
  return c
