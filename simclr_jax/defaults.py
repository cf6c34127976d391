"""Default configuration shared by every recipe under configs/.

Each recipe starts from `base_config()` and overrides what differs, so a field
exists in every config and command-line overrides (`--config.x=...`) always
find it. Values follow the SimCLR reference where it has one (REFERENCE.md).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the full config schema with reference defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'simclr'
  # Downstream modes (linear_eval, finetune, distill, embed, export) start from
  # the checkpoint of the run whose --workdir this names.
  c.init_from = ''

  # Data. `name` is 'digits' (embedded), 'synthetic', or a TFDS name such as
  # 'cifar10', 'cifar100', 'stl10', 'imagenet2012', 'imagenet2012_subset/1pct'.
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 32  # Size of the augmented views fed to the encoder.
  # For the on-device ('jax') augmentation of variable-size images, the host
  # resizes every image to raw_size x raw_size first (0 = image_size).
  c.dataset.raw_size = 0
  # Shuffle buffer = multiplier x per-host batch (REFERENCE §4: 50 CIFAR, 10 else).
  c.dataset.shuffle_buffer_multiplier = 50
  c.dataset.cache = True
  c.dataset.prefetch = 2  # Batches prefetched onto the devices.

  c.augment = ml_collections.ConfigDict()
  c.augment.backend = 'tf'  # 'tf' (tf.data on host CPU) or 'jax' (on device).
  c.augment.color_strength = 0.5
  c.augment.blur = False

  c.model = ml_collections.ConfigDict()
  c.model.depth = 18
  c.model.width_multiplier = 1.0
  c.model.sk_ratio = 0.0
  c.model.stem = 'auto'  # 'auto' picks the CIFAR stem for image_size <= 32.
  c.model.num_proj_layers = 2  # SimCLRv1: 2, SimCLRv2: 3.
  c.model.proj_out_dim = 128
  c.model.ft_proj_selector = 0
  c.model.linear_eval_while_pretraining = True
  c.model.compute_dtype = 'float32'  # or 'bfloat16'; params stay float32.

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.5

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'lars'  # 'lars', 'sgd' (momentum) or 'adamw'.
  c.optim.base_learning_rate = 1.0
  c.optim.lr_scaling = 'linear'  # peak = base * B / 256 ('linear') or base * sqrt(B).
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.optim.trust_coefficient = 0.001
  c.optim.warmup_epochs = 10.0

  c.batch_size = 512  # Global batch (images; each gives two views).
  # Gradient caching (simclr_jax/grad_cache.py): > 0 computes each step's
  # gradient in this many chunks, for global batches larger than memory;
  # BN statistics are then per chunk ('per_chunk') or the running ones
  # ('frozen', exact full-batch gradient, no statistic updates).
  c.grad_cache_chunks = 0
  c.grad_cache_bn = 'per_chunk'
  c.num_epochs = 100
  c.train_steps = 0  # > 0 overrides num_epochs.

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.on_nan = 'stop'

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512
  c.eval.knn_k = 200
  c.eval.knn_temperature = 0.1
  c.eval.eval_every_epochs = 0.0  # kNN monitor during pretraining; 0 = only at the end.
  c.eval.monitor_max_examples = 0  # Cap per split for the monitor; 0 = all.
  c.eval.fewshot_shots = (1, 5, 10)
  c.eval.fewshot_draws = 10
  c.eval.probe_random_init = True  # Also probe the same architecture at random init.
  return c


def load_recipe(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` of a recipe file, so variants can extend a recipe.

  Recipes are plain files loaded by path (not a package), so a variant such
  as configs/imagenet_resnet50_b8192.py reads its base this way.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'simclr_recipe_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
