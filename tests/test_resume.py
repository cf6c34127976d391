"""A run stopped and resumed ends exactly where an uninterrupted run ends."""

import json
import os

import jax
import numpy as np

from simclr_jax.config import defaults
from simclr_jax.training import pretrain as train


def _config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.augment.backend = 'tf'
  c.augment.color_strength = 0.5
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 4
  c.optim.warmup_epochs = 0.1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.evals.random_init.enabled = False
  return c


def _params(out):
  return jax.tree.map(np.asarray, jax.device_get(out['state'].params))


def test_stop_and_resume_matches_uninterrupted(tmp_path):
  c = _config()
  full = train.pretrain(c, str(tmp_path / 'full'))
  assert full['steps'] == 4 and full['resumed_from_step'] is None

  part_dir = str(tmp_path / 'part')
  first = train.pretrain(c, part_dir, stop_after_steps=3)
  assert first['steps'] == 3 and first['interrupted']
  second = train.pretrain(c, part_dir)
  assert second['resumed_from_step'] == 3 and second['steps'] == 4
  # Bit-for-bit: same data position, same per-step keys, same arithmetic.
  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(second))
  assert full['final_train_loss'] == second['final_train_loss']
  # The resumed run logged steps 4 only, and the log continues the first.
  with open(os.path.join(part_dir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]


def test_resume_with_another_model_is_refused(tmp_path):
  c = _config()
  c.train_steps = 1
  train.pretrain(c, str(tmp_path))
  c.model.width_multiplier = 0.25
  try:
    train.pretrain(c, str(tmp_path))
  except ValueError as e:
    assert 'model.width_multiplier was 0.125' in str(e)
  else:
    raise AssertionError('resume with another width was accepted')
