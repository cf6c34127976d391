r"""SimCLR on CIFAR-10, ResNet-50 (paper: 94.0% linear at batch 1024).

  python -m simclr_jax.main --config=configs/cifar10_resnet50.py \
      --workdir=gs://BUCKET/simclr/cifar10_r50 --config.dataset.data_dir=DIR
"""

from simclr_jax import defaults


def get_config():
  c = defaults.base_config()
  c.dataset.name = 'cifar10'
  c.dataset.image_size = 32
  c.dataset.shuffle_buffer_multiplier = 50
  c.augment.color_strength = 0.5
  c.augment.blur = False
  c.model.depth = 50
  c.model.width_multiplier = 1
  c.model.compute_dtype = 'bfloat16'
  c.loss.temperature = 0.5
  c.batch_size = 1024
  c.num_epochs = 1000
  c.optim.base_learning_rate = 1.0
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10
  c.eval.knn_k = 200
  return c
