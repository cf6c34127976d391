r"""SimCLR on ImageNet, ResNet-50 1x, global batch 4096 (paper: 64.6% at 100 ep).

  python -m simclr_jax.main --config=configs/imagenet_resnet50.py \
      --workdir=gs://BUCKET/simclr/in_r50 \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

T 0.1, LARS with sqrt scaling (0.075 x sqrt(B)), wd 1e-6, 10 warmup epochs,
colour strength 1.0, blur on, bfloat16 compute (Chen et al. 2020a, Sec. 2.3
and Appendix B.1; docs/algorithms.md).
"""

from simclr_jax.config import defaults


def get_config():
  c = defaults.base_config()
  c.requires_accelerator = True  # CPU-only JAX is refused (--allow_cpu).
  c.dataset.name = 'imagenet2012'
  c.dataset.image_size = 224
  c.dataset.raw_size = 256
  c.dataset.shuffle_buffer_multiplier = 10
  c.dataset.cache = False
  c.dataset.eval_split = 'validation'
  c.augment.color_strength = 1.0
  c.augment.blur = True
  c.model.depth = 50
  c.model.width_multiplier = 1
  c.model.compute_dtype = 'bfloat16'
  c.loss.temperature = 0.1
  c.batch_size = 4096
  c.num_epochs = 100
  c.optim.base_learning_rate = 0.075
  c.optim.lr_scaling = 'sqrt'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.eval.batch_size = 1024
  c.eval.knn_k = 20
  c.evals.random_init.enabled = False
  c.evals.pixel.enabled = False
  return c
