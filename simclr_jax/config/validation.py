"""Checks a config before anything is compiled or loaded.

Every problem becomes one line naming the field, its value and what is
allowed, so a bad launch on a pod fails in seconds with a readable message
instead of a traceback from deep inside XLA or tf.data.
"""

import ml_collections

from simclr_jax import methods
from simclr_jax.config import durations
from simclr_jax.models import encoders
from simclr_jax.models import resnet
from simclr_jax.runtime import config_checks as checks
from simclr_jax.runtime.config_checks import ConfigError  # Re-exported.
from simclr_jax.runtime.optim import LR_SCALINGS, OPTIMIZERS

DEPTHS = tuple(sorted(resnet.STAGE_SIZES))
BACKENDS = ('tf', 'jax')
ON_NAN = ('stop', 'skip_step')
ON_CORRUPT = ('skip', 'fail')
GRAD_CACHE_BN = ('per_chunk', 'frozen')


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1) -> None:
  """Raises ConfigError for the first invalid field."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top

  try:  # Any TFDS name passes; TFDS itself says later if it is unknown.
    datasets.check_name(config)
  except datasets.DatasetError as e:
    raise ConfigError(str(e)) from e
  checks.choice('model.name', encoders.name_of(config.model),
                sorted(encoders.ENCODERS))
  if encoders.name_of(config.model) == 'resnet':
    checks.choice('model.depth', config.model.depth, DEPTHS)
    checks.choice('model.stem', config.model.stem, resnet.STEMS)
    checks.choice('model.maxpool_padding',
                  config.model.get('maxpool_padding', 'torch'),
                  resnet.MAXPOOL_PADDINGS)
  try:
    encoders.check(config.model, config.dataset.image_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  checks.choice('model.compute_dtype', config.model.compute_dtype,
                resnet.COMPUTE_DTYPES)
  checks.choice('augment.backend', config.augment.backend, BACKENDS)
  checks.choice('optim.name', config.optim.name, OPTIMIZERS)
  checks.choice('optim.lr_scaling', config.optim.lr_scaling, LR_SCALINGS)
  checks.choice('on_nan', config.on_nan, ON_NAN)
  checks.choice('dataset.on_corrupt',
                config.dataset.get('on_corrupt', 'skip'), ON_CORRUPT)
  checks.choice('method', config.method, sorted(methods.METHODS))
  checks.positive('model.width_multiplier', config.model.width_multiplier)
  checks.positive('model.proj_out_dim', config.model.proj_out_dim)
  checks.positive('model.num_proj_layers', config.model.num_proj_layers,
                  allow_zero=True)
  checks.integer('model.proj_hidden_dim', config.model.proj_hidden_dim, 0)
  checks.choice('model.proj_out_bn_scale', config.model.proj_out_bn_scale,
                (True, False))
  checks.positive('model.sk_ratio', config.model.sk_ratio, allow_zero=True)
  checks.positive('loss.temperature', config.loss.temperature)
  checks.positive('optim.base_learning_rate', config.optim.base_learning_rate)
  checks.positive('optim.weight_decay', config.optim.weight_decay,
                  allow_zero=True)
  checks.positive('augment.color_strength', config.augment.color_strength,
                  allow_zero=True)
  checks.unit_interval('optim.momentum', config.optim.momentum)
  for field in ('crop_min_area', 'finetune_crop_min_area'):
    area = config.augment[field]
    if not 0.0 < area <= 1.0:  # Also rejects NaN.
      raise ConfigError(f'config.augment.{field}={area!r} is invalid: must '
                        'be in (0, 1]')
  durations.validate(config)  # Intervals and warmup, in steps or epochs.
  checks.integer('keep_checkpoints', config.keep_checkpoints, 1)
  checks.integer('max_batch_per_device', config.get('max_batch_per_device', 0),
                 0)
  checks.integer('train_steps', config.train_steps, 0)
  checks.positive('num_epochs', config.num_epochs, allow_zero=True)
  if config.train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(
        f'config.num_epochs={config.num_epochs} and config.train_steps='
        f'{config.train_steps}: one of them must be > 0')
  # With train_steps set (smoke tests, benchmarks) the epoch count is not
  # known before the dataset is read, and a short run that never leaves
  # warmup is legitimate there; for an epoch-defined run it is a mistake.
  # Warmup in steps cannot be compared before the dataset is read either.
  if (config.train_steps <= 0 and config.optim.get('warmup_steps', 0) <= 0
      and config.optim.warmup_epochs > config.num_epochs):
    raise ConfigError(
        f'config.optim.warmup_epochs={config.optim.warmup_epochs} is longer '
        f'than training (config.num_epochs={config.num_epochs}): must be <= '
        'num_epochs')
  if 'debug' in config:
    checks.integer('debug.inject_nan_at_step',
                   config.debug.inject_nan_at_step, -1)
  checks.integer('dataset.raw_size', config.dataset.raw_size, 0)
  checks.integer('dataset.prefetch', config.dataset.prefetch, 0)
  checks.positive('dataset.shuffle_buffer_multiplier',
                  config.dataset.shuffle_buffer_multiplier)
  checks.integer('eval.knn_k', config.eval.knn_k, 1)
  checks.integer('eval.pixel_max_examples', config.eval.pixel_max_examples, 0)
  checks.integer('eval.feature_gather_max_bytes',
                 config.eval.feature_gather_max_bytes, 0)
  checks.positive('eval.knn_temperature', config.eval.knn_temperature)
  checks.integer('eval.batch_size', config.eval.batch_size, 1)
  checks.integer('eval.fewshot_draws', config.eval.fewshot_draws, 1)
  for shots in config.eval.fewshot_shots:
    checks.integer('eval.fewshot_shots', shots, 1)
  _validate_evals(config)
  finetune = config.get('finetune')
  if finetune is not None and 'label_fraction' in finetune:
    if not 0.0 < finetune.label_fraction <= 1.0:  # Also rejects NaN.
      raise ConfigError(
          f'config.finetune.label_fraction={finetune.label_fraction!r} is '
          'invalid: must be in (0, 1]')

  # The ImageNet stem and four stages downsample by 32; below that the
  # last stage would see an empty feature map.
  size = config.dataset.image_size
  cifar = resnet.uses_cifar_stem(config.model, size)
  min_size = 8 if cifar else 32
  if encoders.name_of(config.model) == 'resnet' and size < min_size:
    stem = 'cifar' if cifar else 'imagenet'
    raise ConfigError(
        f'config.dataset.image_size={size} is too small for the {stem} stem: '
        f'must be >= {min_size}')

  b = config.batch_size
  if not isinstance(b, int) or b <= 0 or b % num_devices:
    hint = max(num_devices, (int(b) // num_devices) * num_devices)
    raise ConfigError(
        f'config.batch_size={b} must be a positive multiple of the number of '
        f'devices ({num_devices}); e.g. {hint}')
  if b % process_count:
    raise ConfigError(f'config.batch_size={b} must divide over '
                      f'{process_count} processes')
  # Gradient caching: every chunk must still be sharded evenly over the
  # devices (grad_cache.py interleaves chunks across them).
  chunks = config.get('grad_cache_chunks', 0)
  checks.choice('grad_cache_bn', config.get('grad_cache_bn', 'per_chunk'),
                GRAD_CACHE_BN)
  if not isinstance(chunks, int) or chunks < 0:
    raise ConfigError(f'config.grad_cache_chunks={chunks!r} is invalid: '
                      'must be an integer >= 0 (0 = off)')
  if chunks and b % (chunks * num_devices):
    raise ConfigError(
        f'config.grad_cache_chunks={chunks} does not split '
        f'config.batch_size={b} evenly over {num_devices} devices: the '
        f'batch must be a multiple of chunks x devices = '
        f'{chunks * num_devices}')
  _validate_method(config)


# The fields of a config.evals entry (defaults.eval_entry).
_EVAL_ENTRY_FIELDS = ('type', 'enabled', 'dataset', 'every_steps',
                      'every_epochs')


def _validate_evals(config: ml_collections.ConfigDict) -> None:
  """Each config.evals entry: its fields, interval and dataset override.

  Whether its type names a read-out is checked against the registry,
  above this layer (evaluation/registry.check, when a run is built).
  """
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  for name, entry in config.get('evals', {}).items():
    where = f'evals.{name}'
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ConfigError(f'config.{where}={entry!r} is invalid: an entry is '
                        'a ConfigDict (config/defaults.eval_entry)')
    for field in entry:
      if field not in _EVAL_ENTRY_FIELDS:
        raise ConfigError(f'config.{where}.{field} is not a field of a '
                          f'read-out: use {", ".join(_EVAL_ENTRY_FIELDS)}')
    kind = entry.get('type', None)
    if not isinstance(kind, str) or not kind:
      raise ConfigError(f'config.{where}.type={kind!r} is invalid: name a '
                        'read-out type (evaluation/registry.py)')
    if not isinstance(entry.get('enabled', True), bool):
      raise ConfigError(f'config.{where}.enabled={entry.enabled!r} is '
                        'invalid: must be True or False')
    durations.check(entry, 'every', where)
    for field, value in entry.get('dataset', {}).items():
      if field not in defaults.EVAL_DATASET_FIELDS:
        raise ConfigError(
            f'config.{where}.dataset.{field} is not a dataset field that a '
            f'read-out can replace: use '
            f'{", ".join(defaults.EVAL_DATASET_FIELDS)}')
      if value is not None and not isinstance(value, str):
        raise ConfigError(f'config.{where}.dataset.{field}={value!r} is '
                          "invalid: must be a string ('' = the pretraining "
                          "dataset's)")
      if field == 'name' and value and not value.strip():
        raise ConfigError(f'config.{where}.dataset.name={value!r} is '
                          "invalid: '' reads the pretraining dataset, else "
                          'a dataset name as config.dataset.name takes')


def _validate_method(config: ml_collections.ConfigDict) -> None:
  """The settings of the method config.method selects; each method owns them."""
  cls = methods.METHODS[config.method]
  cls.validate(config)
  chunks = config.get('grad_cache_chunks', 0)
  if chunks and not cls.supports_grad_cache:
    supported = ', '.join(sorted(n for n, m in methods.METHODS.items()
                                 if m.supports_grad_cache))
    raise ConfigError(
        f'config.grad_cache_chunks={chunks} is not supported for '
        f'method={config.method!r}: its loss needs more than one output per '
        'view (a queue, prototypes or a memory bank); '
        f'use 0, or one of {supported}')
