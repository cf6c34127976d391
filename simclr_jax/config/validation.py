"""Checks a config before anything is compiled or loaded.

Every problem becomes one line naming the field, its value and what is
allowed, so a bad launch on a pod fails in seconds with a readable message
instead of a traceback from deep inside XLA or tf.data.
"""

import sys

import ml_collections

from simclr_jax.models.resnet import STAGE_SIZES
from simclr_jax.runtime.optim import LR_SCALINGS, OPTIMIZERS

DEPTHS = tuple(sorted(STAGE_SIZES))
BACKENDS = ('tf', 'jax')
STEMS = ('auto', 'cifar', 'imagenet')
DTYPES = ('float32', 'bfloat16')
ON_NAN = ('stop', 'skip_step')
ON_CORRUPT = ('skip', 'fail')


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


def _integer(field: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f'config.{field}={value!r} is invalid: must be an '
                      f'integer >= {minimum}')


def _methods() -> tuple[str, ...]:
  """The names config.method may take (the method registry, if present)."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from simclr_jax.methods import METHODS
  except ImportError:
    return ('simclr',)
  return tuple(sorted(METHODS))


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
  _choice('dataset.on_corrupt', config.dataset.get('on_corrupt', 'skip'),
          ON_CORRUPT)
  _choice('method', config.method, _methods())
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
  if not 0.0 <= config.optim.momentum < 1.0:  # Also rejects NaN.
    raise ConfigError(f'config.optim.momentum={config.optim.momentum!r} is '
                      'invalid: must be in [0, 1)')
  _integer('log_every_steps', config.log_every_steps, 1)
  _integer('checkpoint_every_steps', config.checkpoint_every_steps, 1)
  _integer('keep_checkpoints', config.keep_checkpoints, 1)
  _integer('train_steps', config.train_steps, 0)
  _positive('num_epochs', config.num_epochs, allow_zero=True)
  if config.train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(
        f'config.num_epochs={config.num_epochs} and config.train_steps='
        f'{config.train_steps}: one of them must be > 0')
  # With train_steps set (smoke tests, benchmarks) the epoch count is not
  # known before the dataset is read, and a short run that never leaves
  # warmup is legitimate there; for an epoch-defined run it is a mistake.
  if (config.train_steps <= 0 and
      config.optim.warmup_epochs > config.num_epochs):
    raise ConfigError(
        f'config.optim.warmup_epochs={config.optim.warmup_epochs} is longer '
        f'than training (config.num_epochs={config.num_epochs}): must be <= '
        'num_epochs')
  if 'debug' in config:
    _integer('debug.inject_nan_at_step', config.debug.inject_nan_at_step, -1)
  _integer('dataset.raw_size', config.dataset.raw_size, 0)
  _integer('dataset.prefetch', config.dataset.prefetch, 0)
  _positive('dataset.shuffle_buffer_multiplier',
            config.dataset.shuffle_buffer_multiplier)
  _integer('eval.knn_k', config.eval.knn_k, 1)
  _positive('eval.knn_temperature', config.eval.knn_temperature)
  _integer('eval.batch_size', config.eval.batch_size, 1)
  _integer('eval.fewshot_draws', config.eval.fewshot_draws, 1)
  for shots in config.eval.fewshot_shots:
    _integer('eval.fewshot_shots', shots, 1)
  finetune = config.get('finetune')
  if finetune is not None and 'label_fraction' in finetune:
    if not 0.0 < finetune.label_fraction <= 1.0:  # Also rejects NaN.
      raise ConfigError(
          f'config.finetune.label_fraction={finetune.label_fraction!r} is '
          'invalid: must be in (0, 1]')

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
  # Gradient caching: every chunk must still be sharded evenly over the
  # devices (grad_cache.py interleaves chunks across them).
  chunks = config.get('grad_cache_chunks', 0)
  _choice('grad_cache_bn', config.get('grad_cache_bn', 'per_chunk'),
          ('per_chunk', 'frozen'))
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


def _validate_method(config: ml_collections.ConfigDict) -> None:
  """Settings of the method config.method selects (REFERENCE §6)."""
  method, b = config.method, config.batch_size
  if method in ('moco_v2', 'moco_v3', 'byol'):
    section = {'moco_v2': 'moco', 'moco_v3': 'mocov3', 'byol': 'byol'}[method]
    m = config[section].momentum
    if not 0.0 <= m < 1.0:
      raise ConfigError(f'config.{section}.momentum={m!r} is invalid: must be '
                        'in [0, 1)')
    if section != 'moco':
      _integer(f'{section}.predictor_hidden_dim',
               config[section].predictor_hidden_dim, 1)
  if method == 'moco_v2':
    k = config.moco.queue_size
    _integer('moco.queue_size', k, 1)
    if k % (2 * b):
      raise ConfigError(
          f'config.moco.queue_size={k} must be a multiple of 2 x batch_size '
          f'= {2 * b} (both views\' keys are enqueued each step)')
  if method == 'swav':
    _integer('swav.num_prototypes', config.swav.num_prototypes, 2)
    _integer('swav.sinkhorn_iterations', config.swav.sinkhorn_iterations, 1)
    _positive('swav.epsilon', config.swav.epsilon)
    _integer('swav.freeze_prototypes_steps',
             config.swav.freeze_prototypes_steps, 0)
  if method == 'instdisc':
    _integer('instdisc.num_negatives', config.instdisc.num_negatives, 1)
    m = config.instdisc.bank_momentum
    if not 0.0 <= m < 1.0:
      raise ConfigError(f'config.instdisc.bank_momentum={m!r} is invalid: '
                        'must be in [0, 1)')
  if method == 'hcl':
    _positive('hcl.beta', config.hcl.beta, allow_zero=True)
    t = config.hcl.tau_plus
    if not 0.0 <= t < 1.0:
      raise ConfigError(f'config.hcl.tau_plus={t!r} is invalid: must be in '
                        '[0, 1)')
  if method in ('triplet', 'contrastive_margin'):
    _positive('margin.margin', config.margin.margin)
  if config.get('grad_cache_chunks', 0) and method in (
      'moco_v2', 'moco_v3', 'byol', 'swav', 'instdisc'):
    raise ConfigError(
        f'config.grad_cache_chunks={config.grad_cache_chunks} is not supported '
        f'for method={method!r}: its loss needs more than the projections; '
        'use 0, or simclr, hcl, supcon, triplet or contrastive_margin')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for main: an unknown --config.* field is one line.

  ml_collections rejects an override of a field the config does not have
  (good: a typo must not be silently ignored) but raises it as a traceback
  out of flag parsing; this prints `error: ...` and exits 2 like every other
  config error. Other flag errors keep absl's own one-line message.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]  # ml_collections nests KeyError in the error.
    lines = str(detail).splitlines() or ['?']
    name = lines[0].strip('\'"')
    flag = next((a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.') and
                 name in a.split('=')[0].split('.')), None)
    hint = ' '.join(' '.join(lines[1:]).split())
    print(f'error: {flag or name}: the config has no field {name!r}'
          + (f'; {hint}' if hint else ''), file=sys.stderr)
    sys.exit(2)
