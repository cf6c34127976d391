r"""MoCo v3 on ImageNet, ViT-B/16, global batch 4096, 300 epochs.

  python -m simclr_jax.main --config=configs/imagenet_moco_v3_vit_b16.py \
      --workdir=gs://BUCKET/moco_v3/vit_b16 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

The paper's ViT-B recipe (Chen, Xie, He 2021; linear probe 76.7% after 300
epochs): AdamW at 1.5e-4 x 4096/256 = 2.4e-3, weight decay 0.1, 40 warmup
epochs then cosine, T 0.2, momentum 0.99 -> 1 on a cosine, the frozen
random patch projection, sine-cosine position embeddings, a 3-layer
projector and 2-layer predictor 4096 wide (configs/methods/moco_v3.py,
`vit_recipe`). The images, crop (down to 8%), colour jitter, blur and
bfloat16 compute are the ImageNet SimCLR recipe's
(configs/imagenet_resnet50.py). docs/preflight.md has its memory plan on
128 devices of 16 GiB: 32 images per device fit there with
`--config.max_batch_per_device=16` (gradient caching in 2 chunks).
"""

import os

from simclr_jax.config import defaults


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  c = defaults.load_recipe(os.path.join(here, 'imagenet_resnet50.py'))
  module = defaults.recipe_module(os.path.join(here, 'methods', 'moco_v3.py'))
  module.vit_recipe(c, size='base', patch_size=16, warmup_epochs=40)
  c.num_epochs = 300
  c.batch_size = 4096
  return c
