"""Checks a config before anything is compiled or loaded.

Every problem becomes one line naming the field, its value and what is
allowed, so a bad launch on a pod fails in seconds with a readable message
instead of a traceback from deep inside XLA or tf.data.
"""

import ml_collections

from simclr_jax.models.resnet import STAGE_SIZES
from simclr_jax.optim import LR_SCALINGS, OPTIMIZERS

DEPTHS = tuple(sorted(STAGE_SIZES))
BACKENDS = ('tf', 'jax')
STEMS = ('auto', 'cifar', 'imagenet')
DTYPES = ('float32', 'bfloat16')
ON_NAN = ('stop', 'skip_step')


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is not supported; choose one '
                      f'of {", ".join(map(str, allowed))}')


def _positive(field: str, value, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = '>= 0' if allow_zero else '> 0'
    raise ConfigError(f'config.{field}={value!r} is invalid: must be {bound}')


def uses_cifar_stem(config: ml_collections.ConfigDict) -> bool:
  """REFERENCE §2: the CIFAR stem for images of size <= 32."""
  if config.model.stem == 'auto':
    return config.dataset.image_size <= 32
  return config.model.stem == 'cifar'


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             process_count: int = 1) -> None:
  """Raises ConfigError for the first invalid field."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top

  _choice('dataset.name', config.dataset.name,
          tuple(datasets.KNOWN_DATASETS))
  _choice('model.depth', config.model.depth, DEPTHS)
  _choice('model.stem', config.model.stem, STEMS)
  _choice('model.compute_dtype', config.model.compute_dtype, DTYPES)
  _choice('augment.backend', config.augment.backend, BACKENDS)
  _choice('optim.name', config.optim.name, OPTIMIZERS)
  _choice('optim.lr_scaling', config.optim.lr_scaling, LR_SCALINGS)
  _choice('on_nan', config.on_nan, ON_NAN)
  _positive('model.width_multiplier', config.model.width_multiplier)
  _positive('model.proj_out_dim', config.model.proj_out_dim)
  _positive('model.num_proj_layers', config.model.num_proj_layers,
            allow_zero=True)
  _positive('model.sk_ratio', config.model.sk_ratio, allow_zero=True)
  _positive('loss.temperature', config.loss.temperature)
  _positive('optim.base_learning_rate', config.optim.base_learning_rate)
  _positive('optim.weight_decay', config.optim.weight_decay, allow_zero=True)
  _positive('optim.warmup_epochs', config.optim.warmup_epochs,
            allow_zero=True)
  _positive('augment.color_strength', config.augment.color_strength,
            allow_zero=True)
  _positive('log_every_steps', config.log_every_steps)
  _positive('checkpoint_every_steps', config.checkpoint_every_steps)
  if config.train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(
        f'config.num_epochs={config.num_epochs} and config.train_steps='
        f'{config.train_steps}: one of them must be > 0')

  # The ImageNet stem and four stages downsample by 32; below that the
  # last stage would see an empty feature map.
  size = config.dataset.image_size
  min_size = 8 if uses_cifar_stem(config) else 32
  if size < min_size:
    stem = 'cifar' if uses_cifar_stem(config) else 'imagenet'
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
