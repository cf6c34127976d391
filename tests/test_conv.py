"""The ResNet's convolution (models/conv.py) against lax.conv_general_dilated.

The sliced weight gradient must be the gradient jax derives for the plain
convolution, whatever the strides, kernel, slicing or sharding; and off the
CPU the layer must trace to the plain convolution, so no accelerator program
changes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.models import conv
from simclr_jax.models import resnet

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv_fn, x, w, g, **kwargs):
  """A scalar whose gradient sends cotangent `g` into the conv's output."""
  return jnp.sum(conv_fn(x, w, dimension_numbers=NHWC, **kwargs) * g)


@pytest.mark.parametrize('kernel,stride,chunks', [
    (3, 1, 4), (3, 2, 2), (1, 2, 8), (7, 2, 3)])
def test_gradients_equal_lax(kernel, stride, chunks):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(24, 10, 10, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)), jnp.float32)
  pad = (kernel - 1) // 2
  out_size = (10 + 2 * pad - kernel) // stride + 1
  g = jnp.asarray(rng.normal(size=(24, out_size, out_size, 5)), jnp.float32)
  args = dict(window_strides=(stride, stride), padding=((pad, pad),) * 2)
  plain = functools.partial(_loss, jax.lax.conv_general_dilated, **args)
  sliced = functools.partial(
      _loss, functools.partial(conv.conv_general_dilated, chunks=chunks),
      **args)
  want = jax.grad(plain, argnums=(0, 1))(x, w, g)
  got = jax.jit(jax.grad(sliced, argnums=(0, 1)))(x, w, g)
  assert plain(x, w, g) == pytest.approx(float(sliced(x, w, g)), rel=1e-6)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(
        jnp.max(jnp.abs(b))))


def test_sliced_gradient_under_batch_sharding_equals_one_device():
  """Interleaved slices of a batch sharded over 8 devices: same gradient."""
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ('data',))
  rows = NamedSharding(mesh, P('data'))
  rng = np.random.default_rng(0)
  n = 4 * len(devices)
  x = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  g = rng.normal(size=(n, 6, 6, 4)).astype(np.float32)
  args = dict(window_strides=(1, 1), padding=((1, 1),) * 2)
  sliced = functools.partial(
      _loss, functools.partial(conv.conv_general_dilated, chunks=2), **args)
  got = jax.jit(jax.grad(sliced, argnums=1))(
      jax.device_put(x, rows), w, jax.device_put(g, rows))
  want = jax.grad(functools.partial(
      _loss, jax.lax.conv_general_dilated, **args), argnums=1)(x, w, g)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_weight_gradient_sums_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 8, 8, 4)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 4)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(64, 8, 8, 4)), jnp.bfloat16)
  args = dict(window_strides=(1, 1), padding=((1, 1),) * 2)
  sliced = functools.partial(
      _loss, functools.partial(conv.conv_general_dilated, chunks=8), **args)
  got = jax.grad(sliced, argnums=1)(x, w, g)
  assert got.dtype == jnp.bfloat16
  # The float64 gradient of the same bfloat16 numbers, by NumPy.
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.stack([
      np.einsum('nhwc,nhwd->cd', xp[:, i:i + 8, j:j + 8], g64)
      for i in range(3) for j in range(3)]).reshape(3, 3, 4, 4)
  # bfloat16 keeps 8 significant bits: one rounding of the result, not 8.
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max())


def test_accelerators_trace_the_plain_convolution():
  assert conv.weight_grad_chunks(4096, backend='gpu', num_devices=1) == 1
  assert conv.weight_grad_chunks(4096, backend='tpu', num_devices=1) == 1
  x = jnp.zeros((8, 6, 6, 2))
  w = jnp.zeros((3, 3, 2, 4))
  args = dict(window_strides=(1, 1), padding=((1, 1),) * 2,
              dimension_numbers=NHWC)
  ours = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv.conv_general_dilated(
      x, w, chunks=1, **args))))(w)
  plain = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(
      jax.lax.conv_general_dilated(x, w, **args))))(w)
  assert str(ours) == str(plain)


@pytest.mark.parametrize('batch,devices,want', [
    (512, 1, 512 // conv.ROWS_PER_CHUNK),   # the Fashion-MNIST step here
    (512, 8, 1),                            # 64 rows a device: not sliced
    (513, 1, None),                         # the largest divisor that fits
    (12, 1, 1),                             # fewer rows than one slice
    (512, 3, 1),                            # does not divide the devices
])
def test_weight_grad_chunks(batch, devices, want):
  k = conv.weight_grad_chunks(batch, backend='cpu', num_devices=devices)
  per_device = batch // devices
  if want is None:
    # Whole slices on every device, at least ROWS_PER_CHUNK rows each.
    assert per_device % k == 0 and per_device // k >= conv.ROWS_PER_CHUNK
    assert k >= 2
  else:
    assert k == want


def test_resnet_gradient_with_sliced_convs_equals_plain(monkeypatch):
  """Every conv of a ResNet sliced (ROWS_PER_CHUNK 1): the same gradient."""
  model = resnet.ResNet(depth=18, width_multiplier=0.0625, cifar_stem=True)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8, 8, 3)),
                  jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl='rbg'), x)

  def grads():
    def loss(params):
      y, _ = model.apply({**variables, 'params': params}, x, train=True,
                         mutable=['batch_stats'])
      return jnp.sum(y ** 2)
    return jax.jit(jax.grad(loss))(variables['params'])

  monkeypatch.setattr(conv, 'ROWS_PER_CHUNK', 10 ** 9)
  plain = grads()
  monkeypatch.setattr(conv, 'ROWS_PER_CHUNK', 1)
  assert conv.weight_grad_chunks(16, backend='cpu') >= 2
  sliced = grads()
  for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)
