"""ResNet.maxpool_padding: torch's (1, 1) stem max-pool vs TF 'SAME'.

The SimCLR reference pools with TF 'SAME' padding, which is (0, 1) on an
even-sized map; these tests check 'tf' against TensorFlow itself, so imported
checkpoints can be trusted at 224 px and not only at sizes where the two
conventions happen to agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax import models
from simclr_jax.models import classifier
from simclr_jax.models import resnet


@pytest.mark.parametrize('size,padding', [(7, (1, 1)), (8, (0, 1)),
                                          (15, (1, 1)), (16, (0, 1)),
                                          (112, (0, 1)), (1, (1, 1)),
                                          (2, (0, 1))])
def test_tf_same_padding_values(size, padding):
  assert resnet.tf_same_padding(size) == padding


@pytest.mark.parametrize('shape', [(8, 8), (9, 9), (16, 15), (15, 16),
                                   (112, 112)])
def test_tf_padding_equals_tf_max_pool_same(shape):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # Negative values too: the padding must be -inf, never a winning 0.
  x = np.random.default_rng(0).standard_normal((2, *shape, 3)).astype(
      np.float32)
  want = tf.nn.max_pool2d(x, 3, 2, 'SAME').numpy()
  got = np.asarray(resnet.stem_max_pool(jnp.asarray(x), 'tf'))
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  torch_style = np.asarray(resnet.stem_max_pool(jnp.asarray(x), 'torch'))
  if all(n % 2 for n in shape):  # Odd sizes: both conventions agree.
    np.testing.assert_array_equal(torch_style, want)
  else:  # Even sizes: torch's grid is shifted by one pixel.
    assert torch_style.shape == want.shape
    assert not np.array_equal(torch_style, want)


def _features(maxpool_padding, size, cifar_stem=False):
  net = models.ResNet(depth=18, width_multiplier=0.125, cifar_stem=cifar_stem,
                      maxpool_padding=maxpool_padding)
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 3))
  variables = models.ResNet(depth=18, width_multiplier=0.125,
                            cifar_stem=cifar_stem).init(
                                jax.random.key(1), x, train=False)
  return np.asarray(net.apply(variables, x, train=False))


def test_resnet_padding_changes_features_only_on_even_stem_outputs():
  # 30 px -> 15 before the pool (odd): identical; 32 px -> 16: different.
  np.testing.assert_array_equal(_features('tf', 30), _features('torch', 30))
  assert not np.allclose(_features('tf', 32), _features('torch', 32))
  # The CIFAR stem has no max-pool at all.
  np.testing.assert_array_equal(_features('tf', 16, cifar_stem=True),
                                _features('torch', 16, cifar_stem=True))


def test_unknown_padding_is_a_clear_error():
  with pytest.raises(ValueError, match="maxpool_padding='same'.*'torch'"):
    models.ResNet(depth=18, maxpool_padding='same')
  config = defaults.base_config()
  config.model.maxpool_padding = 'TF'
  with pytest.raises(ValueError, match='model.maxpool_padding'):
    models.build_model(config, num_classes=10)


def test_configs_pass_the_field_through():
  config = defaults.base_config()
  assert config.model.maxpool_padding == 'torch'
  # The models hold the ResNet the config describes as their encoder.
  def padding(model):
    return model.encoder.maxpool_padding

  assert padding(models.build_model(config, num_classes=10)) == 'torch'
  config.model.maxpool_padding = 'tf'
  assert padding(models.build_model(config, num_classes=10)) == 'tf'
  net = classifier.build_classifier(config, head_layers=0, num_classes=10)
  assert padding(net) == 'tf'
  # A config.json saved before the field existed builds the torch padding.
  del config.model['maxpool_padding']
  assert padding(models.build_model(config, num_classes=10)) == 'torch'
  net = classifier.build_classifier(config, head_layers=0, num_classes=10)
  assert net.maxpool_padding == 'torch'
