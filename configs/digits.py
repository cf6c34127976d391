r"""The main job: SimCLR on the embedded scikit-learn digits, CPU-sized.

  python -m simclr_jax.main --config=configs/digits.py --workdir=/tmp/simclr_digits

A thin ResNet-18 (CIFAR stem) on 32x32 upsampled digits; finishes on 2 CPU cores
within minutes, then probes frozen features against the same net at random init.
"""

from simclr_jax import defaults


def get_config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 32
  c.augment.backend = 'tf'
  c.augment.color_strength = 0.5
  c.augment.blur = False
  c.model.depth = 18
  c.model.width_multiplier = 0.25
  c.loss.temperature = 0.2
  c.batch_size = 256
  c.num_epochs = 30
  c.optim.name = 'lars'
  c.optim.base_learning_rate = 1.0
  c.optim.warmup_epochs = 5
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.eval.knn_k = 20
  c.eval.eval_every_epochs = 10  # kNN monitor at epochs 10 and 20.
  return c
