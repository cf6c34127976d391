"""Checks of the downstream config sections, and the config a run records.

Each check raises ConfigError with one line naming the field, its value and
what is allowed (main turns it into `error: ...`, exit 2). The recorded
config.json of a downstream run carries the architecture it actually trained
(copied from the source run) so that `checkpointing.load_run` users, export
and a later distillation can rebuild the network from it alone.
"""

import math

import ml_collections

from simclr_jax.config.validation import ConfigError
from simclr_jax.models import encoders
from simclr_jax.models import resnet
from simclr_jax.runtime.optim import LR_SCALINGS

EMBED_METHODS = ('pca', 'tsne')
# fine_tune_after_block: -1 everything, 0 stem, 1..4 stages (see supervised).
_BLOCKS = (-1, 0, 1, 2, 3, 4)
# Architecture fields copied from the source run into the recorded config.
_ARCH_FIELDS = ('name', 'depth', 'width_multiplier', 'sk_ratio',
                'maxpool_padding', 'vit', 'num_proj_layers', 'proj_out_dim',
                'proj_hidden_dim', 'proj_out_bn_scale', 'compute_dtype')


def _fail(field: str, value, allowed: str) -> None:
  raise ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def check_training(name: str, section: ml_collections.ConfigDict, *,
                   num_devices: int, process_count: int = 1) -> None:
  """Fields every supervised section has (epochs, batch, optimiser)."""
  if not section.epochs > 0:
    _fail(f'{name}.epochs', section.epochs, 'must be > 0')
  b = section.batch_size
  if not isinstance(b, int) or b <= 0 or b % num_devices or b % process_count:
    _fail(f'{name}.batch_size', b,
          f'must be a positive multiple of the number of devices '
          f'({num_devices}) and processes ({process_count})')
  if not (section.learning_rate > 0 and math.isfinite(section.learning_rate)):
    _fail(f'{name}.learning_rate', section.learning_rate, 'must be > 0')
  if section.lr_scaling not in LR_SCALINGS:
    _fail(f'{name}.lr_scaling', section.lr_scaling,
          f'choose one of {", ".join(LR_SCALINGS)}')
  if not 0.0 <= section.momentum < 1.0:
    _fail(f'{name}.momentum', section.momentum, 'must be in [0, 1)')
  if not section.weight_decay >= 0:
    _fail(f'{name}.weight_decay', section.weight_decay, 'must be >= 0')


def check_finetune(config: ml_collections.ConfigDict,
                   available_head_layers: int) -> None:
  """finetune.* and model.ft_proj_selector against the source run."""
  f = config.finetune
  if not 0.0 < f.label_fraction <= 1.0:  # Also rejects NaN.
    _fail('finetune.label_fraction', f.label_fraction, 'must be in (0, 1]')
  if f.fine_tune_after_block not in _BLOCKS:
    _fail('finetune.fine_tune_after_block', f.fine_tune_after_block,
          '-1 trains everything, 0 freezes the stem, k in 1..4 also '
          'stages 1..k')
  if f.from_scratch and f.fine_tune_after_block != -1:
    _fail('finetune.fine_tune_after_block', f.fine_tune_after_block,
          'from_scratch=True trains every layer, so it must be -1')
  selector = config.model.ft_proj_selector
  if not 0 <= selector <= available_head_layers:
    _fail('model.ft_proj_selector', selector,
          f'the source run has {available_head_layers} projection-head '
          f'layers, so choose 0..{available_head_layers}')


def check_distill(config: ml_collections.ConfigDict) -> None:
  d = config.distill
  if not d.temperature > 0:
    _fail('distill.temperature', d.temperature, 'must be > 0')
  if not 0.0 <= d.labelled_weight <= 1.0:
    _fail('distill.labelled_weight', d.labelled_weight, 'must be in [0, 1]')


def check_adapt(config: ml_collections.ConfigDict) -> None:
  """adapt.* beyond the training fields (the method is parsed first)."""
  a = config.adapt
  if not a.target:
    _fail('adapt.target', a.target, 'name the target dataset (e.g. digits_m)')
  if not a.weight >= 0:
    _fail('adapt.weight', a.weight, 'must be >= 0')
  if not a.dann_gamma > 0:
    _fail('adapt.dann_gamma', a.dann_gamma, 'must be > 0')
  if not (isinstance(a.contrastive_epochs, int) and a.contrastive_epochs > 0):
    _fail('adapt.contrastive_epochs', a.contrastive_epochs,
          'must be an integer > 0')
  if not (isinstance(a.domain_hidden_dim, int) and a.domain_hidden_dim > 0):
    _fail('adapt.domain_hidden_dim', a.domain_hidden_dim,
          'must be an integer > 0')


def check_embed(config: ml_collections.ConfigDict) -> None:
  e = config.embed
  if e.method not in EMBED_METHODS:
    _fail('embed.method', e.method, f'choose one of {", ".join(EMBED_METHODS)}')
  if not e.max_points > 0:
    _fail('embed.max_points', e.max_points, 'must be > 0')


def recorded_config(config: ml_collections.ConfigDict,
                    arch_config: ml_collections.ConfigDict, *,
                    head_layers: int, mode: str, **details
                    ) -> ml_collections.ConfigDict:
  """The config.json of a downstream run.

  The current config, with model.* replaced by `arch_config`'s architecture
  (the stem resolved, since 'auto' would depend on this run's image size),
  model.ft_proj_selector = the head layers the checkpoint holds, and a
  'downstream' section recording how it was trained (mode, label fraction,
  ...).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  for field in _ARCH_FIELDS:
    if field in arch_config.model:
      out.model[field] = arch_config.model[field]
  out.model.name = encoders.name_of(arch_config.model)
  cifar = resnet.uses_cifar_stem(arch_config.model,
                                 arch_config.dataset.image_size)
  out.model.stem = 'cifar' if cifar else 'imagenet'
  out.model.ft_proj_selector = head_layers
  out.model.linear_eval_while_pretraining = False
  out.downstream = ml_collections.ConfigDict(dict(mode=mode, **details))
  return out
