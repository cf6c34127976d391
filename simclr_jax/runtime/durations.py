"""Durations given in steps or in epochs: the one rule to read and check them.

Every duration of the config is a pair of fields, `{prefix}_steps` and
`{prefix}_epochs` (as big_vision's `u.steps`), e.g. `log_every_steps` /
`log_every_epochs` or `optim.warmup_steps` / `optim.warmup_epochs`. As
`train_steps` > 0 overrides `num_epochs`, a `_steps` value > 0 wins;
otherwise the duration is `round(epochs * steps_per_epoch)`; both 0 is 0
(off, where the field allows off).

This module is the one home of that rule. It lives in the lowest layer
because its readers span the layers: runtime/optim.py (warmup) and the
methods (SwAV's queue start and prototype freeze, DeepCluster's reclustering
interval) sit below config/, which re-exports it and lists the schema's
own duration fields (config/durations.py).
"""

from typing import Any, Mapping

import ml_collections

from simclr_jax.runtime import config_checks as checks

# A config section (or a plain dict of its fields).
Section = ml_collections.ConfigDict | Mapping[str, Any]


def resolve(steps: int, epochs: float, steps_per_epoch: float, *,
            minimum: int = 0) -> int:
  """Steps of a duration given as (steps, epochs); steps > 0 wins.

  `minimum` is the fewest steps an epochs value > 0 gives: 1 for an interval,
  so a short one never rounds down to 0 (which would mean off).
  """
  if steps and steps > 0:
    return int(steps)
  if not epochs or epochs <= 0:
    return 0
  return max(int(minimum), int(round(epochs * steps_per_epoch)))


def steps(section: Section, prefix: str, steps_per_epoch: float,
          *, minimum: int = 0) -> int:
  """Steps of the duration `{prefix}_steps` / `{prefix}_epochs` of `section`.

  A field the section lacks counts as 0, so a section written before its
  twin field existed (an old recorded config) still reads the same.
  """
  return resolve(section.get(f'{prefix}_steps', 0),
                 section.get(f'{prefix}_epochs', 0.0), steps_per_epoch,
                 minimum=minimum)


def check(section: Section, prefix: str, where: str = '', *,
          allow_off: bool = True) -> None:
  """Raises ConfigError unless the duration's two fields can work.

  Both fields >= 0 and the steps an integer; with `allow_off=False` (an
  interval the loop divides by) at least one of them > 0. `where` is the
  section's dotted path in the config ('' for the top level), for the
  message.
  """
  name = f'{where}.{prefix}' if where else prefix
  step_value = section.get(f'{prefix}_steps', 0)
  epoch_value = section.get(f'{prefix}_epochs', 0.0)
  checks.integer(f'{name}_steps', step_value, 0)
  checks.positive(f'{name}_epochs', epoch_value, allow_zero=True)
  if not allow_off and step_value == 0 and epoch_value == 0:
    raise checks.ConfigError(
        f'config.{name}_steps={step_value!r} is invalid: must be an integer '
        f'>= 1 while config.{name}_epochs={epoch_value!r} (set one of them '
        '> 0)')
