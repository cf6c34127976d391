"""Optimisers and learning-rate schedules (docs/algorithms.md#optimiser).

LARS is optax.lars, which chains the reference's steps in the reference's
order: g += wd*w; g *= eeta*||w||/||g|| (1 if either norm is 0);
v = m*v + lr*g; w -= v. BatchNorm parameters and biases are excluded from both
the weight decay and the trust ratio, as in the reference (which matches on the
variable names 'batch_normalization' and 'bias'); the online linear head is
excluded from the trust ratio and keeps its kernel's weight decay
(`trust_ratio_mask`).
"""

import functools
import math
from typing import Any, Callable

import jax
import ml_collections
import optax

from simclr_jax.runtime import durations

OPTIMIZERS = ('lars', 'sgd', 'adamw')
LR_SCALINGS = ('linear', 'sqrt')


def _leaf_name(path: tuple[Any, ...]) -> str:
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last)))


# Leaf names that get no weight decay or LARS adaptation: Flax names
# BatchNorm and LayerNorm parameters 'scale' and 'bias' and Dense/Conv biases
# 'bias'. An encoder may add its own (models/encoders.no_decay_leaves).
NO_DECAY_LEAVES = ('bias', 'scale')


def decay_mask(params: Any, no_decay: tuple[str, ...] = NO_DECAY_LEAVES
               ) -> Any:
  """True for leaves that get weight decay and LARS adaptation: every leaf
  not named in `no_decay` (conv and dense kernels, for a ResNet)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _leaf_name(path) not in no_decay, params)


def trust_ratio_mask(params: Any,
                     no_decay: tuple[str, ...] = NO_DECAY_LEAVES) -> Any:
  """True for leaves that get LARS's trust ratio.

  As `decay_mask`, minus the online linear head ('linear_head'): the authors'
  code excludes its supervised head from LARS altogether and adds the head's
  weight decay to the loss (wd * ||W||^2 / 2 on kernels), so the head gets
  momentum SGD with L2, v = m*v + lr*(g + wd*w), w -= v. With the trust
  ratio (eeta = 0.001) it would move by ~0.1% of its norm per unit of lr and
  the online linear accuracy would learn orders of magnitude too slowly.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, keep: keep and _top_name(path) != 'linear_head',
      decay_mask(params, no_decay))


def _top_name(path: tuple[Any, ...]) -> str:
  first = path[0]
  return str(getattr(first, 'key', getattr(first, 'name', first)))


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


def build(name: str, schedule: Callable[[Any], Any], *, weight_decay: float,
          momentum: float, nesterov: bool = False,
          trust_coefficient: float = 0.001, frozen: Any = None,
          no_decay: tuple[str, ...] = NO_DECAY_LEAVES
          ) -> optax.GradientTransformation:
  """The one optimiser builder, for pretraining and the supervised modes.

  `frozen` (a tree of bools like the params, True = frozen, or a function
  of the params that returns one) gives those parameters no update at all:
  no gradient step, no momentum, no weight decay (optax.set_to_zero), so
  they stay bit-identical. `no_decay` names the leaves without weight decay
  or LARS adaptation.
  """
  mask = functools.partial(decay_mask, no_decay=no_decay)
  if name == 'lars':
    tx = optax.lars(
        learning_rate=schedule, weight_decay=weight_decay,
        weight_decay_mask=mask, trust_coefficient=trust_coefficient,
        eps=0.0,
        trust_ratio_mask=functools.partial(trust_ratio_mask,
                                           no_decay=no_decay),
        momentum=momentum, nesterov=nesterov)
  elif name == 'sgd':
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  elif name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=weight_decay, mask=mask)
  else:
    raise ValueError(f'optim.name={name!r} is not supported; choose one of '
                     f'{", ".join(OPTIMIZERS)}')
  if frozen is None:
    return tx

  def labels(params):
    tree = frozen(params) if callable(frozen) else frozen
    return jax.tree.map(lambda f: 'frozen' if f else 'train', tree)

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int, *, frozen: Any = None,
                   no_decay: tuple[str, ...] = NO_DECAY_LEAVES
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, schedule) of pretraining: the config's optim section.

  `frozen` and `no_decay` as in `build`; pretraining passes its encoder's
  (training/pretrain.make_optimizer).
  """
  o = config.optim
  peak = peak_learning_rate(o.base_learning_rate, config.batch_size,
                            o.lr_scaling)
  warmup_steps = durations.steps(o, 'warmup', steps_per_epoch)
  schedule = warmup_cosine(peak, warmup_steps, total_steps)
  tx = build(o.name, schedule, weight_decay=o.weight_decay,
             momentum=o.momentum, trust_coefficient=o.trust_coefficient,
             frozen=frozen, no_decay=no_decay)
  return tx, schedule


def make_supervised_optimizer(section: ml_collections.ConfigDict,
                              total_steps: int, frozen: Any = None
                              ) -> tuple[optax.GradientTransformation,
                                         Callable]:
  """(optimizer, schedule) of linear_eval, finetune and distill.

  Momentum SGD (Nesterov by default) with the section's peak learning rate
  scaled by its global batch, no warmup and cosine decay to 0, as the
  SimCLRv2 fine-tuning and linear-evaluation recipes (Chen et al. 2020b,
  appendix; docs/algorithms.md#evaluation-protocols).
  """
  peak = peak_learning_rate(section.learning_rate, section.batch_size,
                            section.lr_scaling)
  schedule = optax.cosine_decay_schedule(peak, max(total_steps, 1))
  tx = build('sgd', schedule, weight_decay=section.weight_decay,
             momentum=section.momentum, nesterov=section.nesterov,
             frozen=frozen)
  return tx, schedule
