"""Optimisers and learning-rate schedules (REFERENCE §3).

LARS is optax.lars, which chains the reference's steps in the reference's
order: g += wd*w; g *= eeta*||w||/||g|| (1 if either norm is 0);
v = m*v + lr*g; w -= v. BatchNorm parameters and biases are excluded from both
the weight decay and the trust ratio, as in the reference (which matches on the
variable names 'batch_normalization' and 'bias').
"""

import math
from typing import Any, Callable

import jax
import ml_collections
import optax

OPTIMIZERS = ('lars', 'sgd', 'adamw')
LR_SCALINGS = ('linear', 'sqrt')


def _leaf_name(path: tuple[Any, ...]) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay and LARS adaptation.

  Flax names BatchNorm parameters 'scale' and 'bias' and Dense/Conv biases
  'bias'; everything else (conv and dense kernels) is adapted.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) not in ('bias', 'scale'), params)


def peak_learning_rate(base: float, batch_size: int, scaling: str) -> float:
  """base * B/256 (linear) or base * sqrt(B) (sqrt), as in the reference."""
  if scaling == 'linear':
    return base * batch_size / 256.0
  if scaling == 'sqrt':
    return base * math.sqrt(batch_size)
  raise ValueError(
      f'optim.lr_scaling={scaling!r} is not supported; choose one of '
      f'{", ".join(LR_SCALINGS)}')


def warmup_cosine(peak: float, warmup_steps: int,
                  total_steps: int) -> Callable[[Any], Any]:
  """Linear warmup from 0 to `peak`, then cosine decay to 0 at total_steps."""
  warmup_steps = min(warmup_steps, total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Returns (optimizer, schedule) for the config's optim section."""
  o = config.optim
  peak = peak_learning_rate(o.base_learning_rate, config.batch_size,
                            o.lr_scaling)
  warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
  schedule = warmup_cosine(peak, warmup_steps, total_steps)
  if o.name == 'lars':
    tx = optax.lars(
        learning_rate=schedule, weight_decay=o.weight_decay,
        weight_decay_mask=decay_mask, trust_coefficient=o.trust_coefficient,
        eps=0.0, trust_ratio_mask=decay_mask, momentum=o.momentum,
        nesterov=False)
  elif o.name == 'sgd':
    tx = optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=o.momentum))
  elif o.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f'optim.name={o.name!r} is not supported; choose one of '
                     f'{", ".join(OPTIMIZERS)}')
  return tx, schedule
