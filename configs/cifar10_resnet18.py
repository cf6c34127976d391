r"""SimCLR on CIFAR-10, ResNet-18 (reference README recipe, about 91% linear).

  python -m simclr_jax.main --config=configs/cifar10_resnet18.py \
      --workdir=gs://BUCKET/simclr/cifar10_r18 --config.dataset.data_dir=DIR

Batch 512, 1000 epochs, LARS lr 1.0 x B/256, T 0.5, colour strength 0.5, no
blur, CIFAR stem (Chen et al. 2020a, Appendix B.9; docs/algorithms.md).
"""

from simclr_jax.config import defaults


def get_config():
  c = defaults.base_config()
  c.dataset.name = 'cifar10'
  c.dataset.image_size = 32
  c.dataset.shuffle_buffer_multiplier = 50
  c.augment.color_strength = 0.5
  c.augment.blur = False
  c.model.depth = 18
  c.model.width_multiplier = 1
  c.loss.temperature = 0.5
  c.batch_size = 512
  c.num_epochs = 1000
  c.optim.base_learning_rate = 1.0
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10
  c.eval.knn_k = 200
  return c
