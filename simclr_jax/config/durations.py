"""The config's durations: each one a `_steps` / `_epochs` pair, read one way.

`steps(section, prefix, steps_per_epoch)` gives a duration in steps: a
`{prefix}_steps` value > 0 wins (as `train_steps` over `num_epochs`),
otherwise `round({prefix}_epochs * steps_per_epoch)`, and both 0 is 0 (off).
The rule itself lives in runtime/durations.py, below the methods and the
optimiser that read it too; this module re-exports it and lists the
durations of the schema's shared sections, so validation checks them all one
way. A read-out's interval (config.evals.<entry>.every) is checked with
its entry (config/validation.py); a method section's durations
(swav.queue_start, swav.freeze_prototypes, deepcluster.recluster_every) are
checked by the method that owns the section.
"""

import ml_collections

from simclr_jax.runtime.durations import check
from simclr_jax.runtime.durations import resolve
from simclr_jax.runtime.durations import steps

# (section, prefix, may be off) of every shared duration: '' is the top
# level. Intervals the training loop divides by cannot be off.
FIELDS = (
    ('', 'log_every', False),
    ('', 'checkpoint_every', False),
    ('optim', 'warmup', True),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first duration of FIELDS that cannot work."""
  for where, prefix, allow_off in FIELDS:
    section = config[where] if where else config
    check(section, prefix, where, allow_off=allow_off)


__all__ = ['FIELDS', 'check', 'resolve', 'steps', 'validate']
