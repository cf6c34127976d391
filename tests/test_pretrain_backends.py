"""Pretraining on digits runs with either augmentation backend."""

import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.training import pretrain as train


@pytest.mark.parametrize('backend', ['tf', 'jax'])
def test_pretrain_digits_both_backends(tmp_path, backend):
  c = defaults.base_config()
  c.dataset.image_size = 16
  c.augment.backend = backend
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 3
  c.log_every_steps = 1
  out = train.pretrain(c, str(tmp_path))
  assert out['steps'] == 3 and np.isfinite(out['final_train_loss'])
  # The loss is NT-Xent over 128 views: positive, below ln(127) + a margin.
  assert 0 < out['final_train_loss'] < np.log(127) + 1
