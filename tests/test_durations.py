"""Every duration reads as steps or epochs by one rule, and its readers use it.

The rule (config/durations.py): a `_steps` value > 0 wins, otherwise
round(epochs * steps_per_epoch), both 0 is 0 (off). Expected values below
are written out by hand or from the schedule's formula, not from the code.
"""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from simclr_jax import methods
from simclr_jax.config import defaults
from simclr_jax.config import durations
from simclr_jax.config import validation as config_validation
from simclr_jax.config.validation import ConfigError
from simclr_jax.evaluation import knn_monitor
from simclr_jax.runtime import optim
from simclr_jax.training import pretrain as train

# Every duration pair of the schema: the shared ones, and the method
# sections' (checked by their methods).
METHOD_DURATIONS = (('swav', 'queue_start'), ('swav', 'freeze_prototypes'),
                    ('deepcluster', 'recluster_every'))


def _section(steps, epochs, prefix='x'):
  return ml_collections.ConfigDict({f'{prefix}_steps': steps,
                                    f'{prefix}_epochs': epochs})


# (steps, epochs, steps per epoch, minimum, expected steps).
CASES = [
    (7, 100.0, 10, 0, 7),  # Steps > 0 win over any epochs.
    (7, 0.0, 10, 0, 7),
    (0, 2.5, 10, 0, 25),
    (0, 0.33, 10, 0, 3),  # 3.3 rounds to 3.
    (0, 0.37, 10, 0, 4),  # 3.7 rounds to 4.
    (0, 2.0, 22.5, 0, 45),  # Fractional steps per epoch (downstream).
    (0, 0.0, 10, 0, 0),  # Both 0: off.
    (0, 0.0, 10, 1, 0),  # Off stays off for an interval too.
    (0, 0.01, 22, 0, 0),  # 0.22 rounds to no steps ...
    (0, 0.01, 22, 1, 1),  # ... but an interval is at least one step.
]


@pytest.mark.parametrize('steps,epochs,spe,minimum,expected', CASES)
def test_steps_against_the_arithmetic(steps, epochs, spe, minimum, expected):
  got = durations.steps(_section(steps, epochs), 'x', spe, minimum=minimum)
  assert got == expected and isinstance(got, int)
  assert durations.resolve(steps, epochs, spe, minimum=minimum) == expected


def test_a_missing_twin_counts_as_zero():
  """A section recorded before its twin field existed reads the same."""
  assert durations.steps(ml_collections.ConfigDict({'x_epochs': 2.0}), 'x',
                         10) == 20
  assert durations.steps({'x_steps': 3}, 'x', 10) == 3
  assert durations.steps({}, 'x', 10) == 0


def test_every_duration_of_the_schema_has_both_fields():
  c = defaults.base_config()
  pairs = ([(w, p) for w, p, _ in durations.FIELDS] + list(METHOD_DURATIONS)
           + [(f'evals.{name}', 'every') for name in c.evals])
  assert len(pairs) == 6 + 5  # And each read-out's interval.
  for where, prefix in pairs:
    section = c
    for part in filter(None, where.split('.')):
      section = section[part]
    assert isinstance(section[f'{prefix}_steps'], int), (where, prefix)
    assert isinstance(section[f'{prefix}_epochs'], float), (where, prefix)


def test_the_defaults_keep_their_old_durations():
  """The twin fields are 0, so every default reads as it did."""
  c = defaults.base_config()
  assert durations.steps(c, 'log_every', 22) == 50
  assert durations.steps(c, 'checkpoint_every', 22) == 500
  assert durations.steps(c.evals.knn, 'every', 22) == 0
  assert durations.steps(c.optim, 'warmup', 22) == 220
  assert durations.steps(c.swav, 'queue_start', 22) == 15 * 22
  assert durations.steps(c.swav, 'freeze_prototypes', 22) == 313
  assert durations.steps(c.deepcluster, 'recluster_every', 22) == 22


# (field, value, what the one-line message must say).
BAD = [
    ('log_every_epochs', -1.0, 'config.log_every_epochs=-1.0 is invalid: '
     'must be >= 0'),
    ('checkpoint_every_steps', -1, 'config.checkpoint_every_steps=-1 is '
     'invalid: must be an integer >= 0'),
    ('evals.knn.every_steps', -3, 'config.evals.knn.every_steps=-3 is '
     'invalid: must be an integer >= 0'),
    ('optim.warmup_steps', -7, 'config.optim.warmup_steps=-7 is invalid'),
    ('optim.warmup_epochs', math.nan, 'config.optim.warmup_epochs=nan'),
]


@pytest.mark.parametrize('field,value,expected', BAD,
                         ids=[f'{f}={v!r}' for f, v, _ in BAD])
def test_each_duration_is_checked_one_way(field, value, expected):
  c = defaults.base_config()
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError) as e:
    config_validation.validate(c, num_devices=8)
  assert '\n' not in str(e.value) and expected in str(e.value), str(e.value)


def test_steps_must_be_a_whole_number():
  with pytest.raises(ConfigError, match=r'config.swav.x_steps=2.5 is invalid: '
                     r'must be an integer >= 0'):
    durations.check({'x_steps': 2.5, 'x_epochs': 0.0}, 'x', 'swav')


def test_an_interval_cannot_be_off_but_may_be_given_in_epochs():
  c = defaults.base_config()
  c.log_every_steps = 0
  with pytest.raises(ConfigError, match=r'config.log_every_steps=0 is '
                     r'invalid: must be an integer >= 1 while '
                     r'config.log_every_epochs=0.0'):
    config_validation.validate(c, num_devices=8)
  c.log_every_epochs = 0.5
  config_validation.validate(c, num_devices=8)


def test_warmup_in_steps_is_not_compared_with_the_epochs():
  """Steps cannot be set against num_epochs before the data is read."""
  c = defaults.base_config()
  c.num_epochs = 2
  c.optim.warmup_epochs = 1.0
  c.optim.warmup_steps = 10_000
  config_validation.validate(c, num_devices=8)


def test_method_sections_check_their_durations_the_same_way():
  c = defaults.base_config()
  c.method = 'swav'
  c.swav.queue_start_steps = -1
  with pytest.raises(ConfigError, match=r'config.swav.queue_start_steps=-1 '
                     r'is invalid: must be an integer >= 0'):
    methods.METHODS['swav'].validate(c)
  c.swav.queue_start_steps = 0
  c.swav.freeze_prototypes_epochs = -0.5
  with pytest.raises(ConfigError, match=r'config.swav.freeze_prototypes_'
                     r'epochs=-0.5 is invalid: must be >= 0'):
    methods.METHODS['swav'].validate(c)


def _warmup_cosine(peak, warmup, total, t):
  """Linear 0 -> peak over `warmup` steps, then cosine to 0 at `total`."""
  if t < warmup:
    return peak * t / warmup
  return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_optimiser_warmup_in_steps_or_in_epochs():
  spe, total = 10, 50  # Peak learning rate 0.8 x 256 / 256.
  by_steps = defaults.base_config()
  by_steps.update_from_flattened_dict({
      'batch_size': 256, 'optim.base_learning_rate': 0.8,
      'optim.warmup_steps': 7, 'optim.warmup_epochs': 3.0})  # Steps win.
  by_epochs = defaults.base_config()
  by_epochs.update_from_flattened_dict({
      'batch_size': 256, 'optim.base_learning_rate': 0.8,
      'optim.warmup_epochs': 0.7})  # 0.7 x 10 = 7 steps.
  for config in (by_steps, by_epochs):
    _, schedule = optim.make_optimizer(config, spe, total)
    for t in range(total + 1):
      assert float(schedule(t)) == pytest.approx(
          _warmup_cosine(0.8, 7, total, t), rel=1e-5, abs=1e-7), t


def test_knn_monitor_interval_in_steps_or_in_epochs():
  c = defaults.base_config()
  knn = c.evals.knn
  assert knn_monitor.interval(knn, 22) == 0  # Off by default.
  knn.every_steps = 3
  knn.every_epochs = 5.0  # The steps win.
  assert knn_monitor.interval(knn, 22) == 3
  knn.every_steps = 0
  assert knn_monitor.interval(knn, 22) == 110
  knn.every_epochs, knn.every_steps = 0.0, 4
  assert knn_monitor.interval(knn, 22) == 4


def test_swav_and_deepcluster_read_both_forms():
  c = defaults.base_config()
  c.batch_size = 64
  spe = 1437 // 64  # 22 full batches of the digits train split.
  c.swav.update(dict(queue_start_steps=5, freeze_prototypes_steps=0,
                     freeze_prototypes_epochs=2.0))
  swav = methods.METHODS['swav'](c, total_steps=100, num_train_examples=1437)
  assert (swav.queue_start_step, swav.freeze_prototypes_step) == (5, 44)
  c.swav.queue_start_steps = 0
  c.swav.queue_start_epochs = 3.0
  swav = methods.METHODS['swav'](c, total_steps=100, num_train_examples=1437)
  assert swav.queue_start_step == 66
  frozen = swav.mask_frozen({'prototypes': np.ones(2)}, 43)['prototypes']
  moving = swav.mask_frozen({'prototypes': np.ones(2)}, 44)['prototypes']
  np.testing.assert_array_equal(frozen, 0.0)
  np.testing.assert_array_equal(moving, 1.0)

  c.model.width_multiplier = 0.0625
  deepcluster = methods.METHODS['deepcluster'](c, total_steps=100,
                                               num_train_examples=1437)
  assert deepcluster.recluster_every(spe) == spe  # 1 epoch by default.
  c.deepcluster.recluster_every_steps = 3
  assert deepcluster.recluster_every(spe) == 3


def test_pretraining_loop_honours_the_twin_fields(tmp_path):
  """Log and kNN monitor intervals given the other way than by default."""
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 4
  c.optim.warmup_steps = 1
  spe = 1437 // 64
  c.log_every_steps, c.log_every_epochs = 0, 2 / spe  # Every 2 steps.
  c.checkpoint_every_steps = 4
  c.evals.knn.every_steps = 2
  c.eval.knn_k = 7
  c.eval.monitor_max_examples = 128
  c.evals.random_init.enabled = False
  workdir = str(tmp_path / 'run')
  setup = train.build(c)
  spec = train.loop_spec(setup, workdir)
  assert (spec.log_every_steps, spec.checkpoint_every_steps) == (2, 4)
  out = train.pretrain(c, workdir, setup)
  assert [h['step'] for h in out['knn_monitor']] == [2]  # 4 is the last step.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert {r['step'] for r in logged if 'learning_rate' in r} == {2, 4}
