"""Augmentation (docs/algorithms.md): TF and JAX backends against each other.

The two backends share one structure (sample explicit params, then apply
them), so the tests check (a) both sample the same distributions, which also
match the nominal ones, and (b) the same params give the same pixels.
"""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.data import augment
from simclr_jax.data import augment_jax as aj

import tensorflow as tf  # pylint: disable=g-import-not-at-top,g-bad-import-order
# pylint: disable-next=g-import-not-at-top,g-bad-import-order
from simclr_jax.data import augment_tf as at

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_N = 4000  # Draws per backend for the distribution tests.
# Two-sample KS at n = m = 4000: P(D > 0.05) ~ 2 exp(-2 * 0.05^2 * 2000) ~ 1e-4
# for equal distributions (discreteness only makes it smaller). Seeds are
# fixed, so the test is deterministic; the bound is what makes it meaningful.
_KS2 = 0.05
# One-sample KS against the nominal law: P(D > 0.035) ~ 2 exp(-2 * 0.035^2 *
# 4000) ~ 1e-4.
_KS1 = 0.035


def _ks2(a, b) -> float:
  """Two-sample Kolmogorov-Smirnov statistic."""
  a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
  grid = np.concatenate([a, b])
  cdf_a = np.searchsorted(a, grid, side='right') / len(a)
  cdf_b = np.searchsorted(b, grid, side='right') / len(b)
  return float(np.max(np.abs(cdf_a - cdf_b)))


def _ks_uniform(a, lo, hi) -> float:
  """One-sample KS statistic against U[lo, hi]."""
  a = np.sort((np.asarray(a, np.float64) - lo) / (hi - lo))
  n = len(a)
  return float(max(np.max(np.arange(1, n + 1) / n - a),
                   np.max(a - np.arange(n) / n)))


def _to_tf(tree):
  return jax.tree.map(lambda a: tf.constant(np.asarray(a)), tree)


def _index(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


# Shapes shared by the JAX view tests so they reuse one compilation.
_B, _SIZE = 6, 48


def _batch() -> np.ndarray:
  """(_B, 80, 64, 3) uint8; images 0 and 1 are the same image."""
  return np.stack([_image(seed=max(i - 1, 0)) for i in range(_B)])


def _smooth_image() -> np.ndarray:
  """80x64 uint8 with smooth colour gradients (see the full-view test)."""
  yy, xx = np.mgrid[0:80, 0:64].astype(np.float32)
  x = np.stack([0.5 + 0.45 * np.sin(yy / 9.0), 0.5 + 0.45 * np.cos(xx / 7.0),
                0.5 + 0.3 * np.sin((xx + yy) / 11.0)], -1)
  return np.round(x * 255).astype(np.uint8)


def _image(h=80, w=64, seed=0, dtype=np.uint8):
  rs = np.random.RandomState(seed)
  x = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
  return x if dtype == np.uint8 else (x / 255.0).astype(dtype)


_TF_PARAMS_SIGNATURE = aj.ViewParams(
    aj.CropBox(*[tf.int32] * 4), tf.bool,
    aj.ColorParams(tf.bool, tf.float32, tf.float32, tf.float32, tf.float32,
                   tf.int32, tf.bool),
    aj.BlurParams(tf.bool, tf.float32))

# A non-square image, so aspect handling (pixels, not relative) is exercised.
_H, _W = 96, 160


@pytest.fixture(scope='module')
def sampled_params():
  """_N view params from each backend for an (_H, _W) image, as numpy."""
  seeds = tf.random.stateless_uniform([_N, 2], [7, 0], maxval=2**30,
                                      dtype=tf.int32)
  sample = lambda s: at.sample_view_params(s, _H, _W, 1.0, True)
  tf_params = tf.function(lambda s: tf.map_fn(
      sample, s, fn_output_signature=_TF_PARAMS_SIGNATURE,
      parallel_iterations=64))(seeds)
  jax_params = aj.sample_views_params(jax.random.key(7), _N, _H, _W)
  as_np = lambda t: jax.tree.map(np.asarray, t)
  return as_np(tf_params), as_np(jax_params)


def test_tf_view_shape_range_and_determinism():
  image = _image()
  view = lambda s: augment.tf_view(image, 32, seed=tf.constant(s)).numpy()
  a, b, c = view([1, 2]), view([1, 2]), view([3, 4])
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  assert a.min() >= 0.0 and a.max() <= 1.0
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).mean() > 0.01
  # Graph mode inside tf.data with the default (seed=None) path; float input.
  ds = tf.data.Dataset.from_tensors(_image(dtype=np.float32)).repeat(2).map(
      lambda x: augment.tf_view(x, 32), num_parallel_calls=tf.data.AUTOTUNE)
  v1, v2 = [v.numpy() for v in ds]
  assert v1.shape == (32, 32, 3) and v1.min() >= 0.0 and v1.max() <= 1.0
  assert np.abs(v1 - v2).mean() > 0.01


def test_jax_views_shape_range_and_keys():
  images = jnp.asarray(_batch())
  a = augment.jax_views(jax.random.key(0), images, size=_SIZE)
  b = augment.jax_views(jax.random.key(1), images, size=_SIZE)
  assert a.shape == (_B, _SIZE, _SIZE, 3) and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Two views of the same image differ, and examples get independent keys.
  assert float(jnp.abs(a - b).mean(axis=(1, 2, 3)).min()) > 0.01
  assert float(jnp.abs(a[0] - a[1]).mean()) > 0.01  # images 0, 1 are equal.
  again = augment.jax_views(jax.random.key(0), images, size=_SIZE)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))


def _best_time(fn, repeats=5) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def test_jitted_views_as_fast_as_precomputed_params():
  """Guards against XLA fusing the params' threefry into per-pixel loops.

  Without augment_jax._materialize, jit(jax_views) recomputed each view's
  random bits for every pixel: 30-70x slower than applying precomputed
  params. 4x (+2 ms) leaves room for timing noise on a shared CPU.
  """
  images = jnp.asarray(_batch())
  key = jax.random.key(0)
  params = aj.sample_views_params(key, _B, 80, 64)
  fused = jax.jit(lambda k, x: augment.jax_views(k, x, _SIZE))
  t_fused = _best_time(lambda: fused(key, images))
  t_apply = _best_time(lambda: aj.apply_views(images, params, _SIZE))
  assert t_fused < 4 * t_apply + 2e-3, (t_fused, t_apply)


def test_crop_distributions_match(sampled_params):
  t, j = sampled_params
  for p in (t, j):
    c = p.crop
    area = c.h * c.w / (_H * _W)
    # min_object_covered=0.1 with the whole image as object: area >= 0.1.
    assert area.min() >= 0.1 and area.max() <= 1.0
    # width = round(height * r), r in [3/4, 4/3] (pixels, square output).
    assert np.all(c.w >= 0.75 * c.h - 0.5) and np.all(c.w <= 4 / 3 * c.h + 0.5)
    assert np.all(c.y >= 0) and np.all(c.y + c.h <= _H)
    assert np.all(c.x >= 0) and np.all(c.x + c.w <= _W)
  area = lambda p: p.crop.h * p.crop.w / (_H * _W)
  ratio = lambda p: p.crop.w / p.crop.h
  assert _ks2(area(t), area(j)) < _KS2
  assert _ks2(ratio(t), ratio(j)) < _KS2
  # Offsets: uniform over the free range.
  rel_y = lambda p: p.crop.y / np.maximum(_H - p.crop.h, 1)
  rel_x = lambda p: p.crop.x / np.maximum(_W - p.crop.w, 1)
  assert _ks2(rel_y(t), rel_y(j)) < _KS2
  assert _ks2(rel_x(t), rel_x(j)) < _KS2
  # Sanity of the law itself: median area ~0.3 for the TF sampler
  # (height uniform between the area bounds); both within 0.03 of each other.
  assert abs(np.median(area(t)) - np.median(area(j))) < 0.03


def _binomial_ok(x, p, sigmas=5.0) -> bool:
  return abs(np.mean(x) - p) < sigmas * np.sqrt(p * (1 - p) / len(x))


@pytest.mark.parametrize('name,lo,hi', [('brightness', 0.2, 1.8),
                                        ('contrast', 0.2, 1.8),
                                        ('saturation', 0.2, 1.8),
                                        ('hue', -0.2, 0.2)])
def test_color_factor_distributions(sampled_params, name, lo, hi):
  t, j = (getattr(p.color, name) for p in sampled_params)
  for x in (t, j):
    assert x.min() >= lo and x.max() <= hi
    assert _ks_uniform(x, lo, hi) < _KS1
  assert _ks2(t, j) < _KS2


def test_blur_sigma_distribution(sampled_params):
  t, j = (p.blur.sigma for p in sampled_params)
  for x in (t, j):
    assert _ks_uniform(x, 0.1, 2.0) < _KS1
  assert _ks2(t, j) < _KS2


@pytest.mark.parametrize('field,p', [('color.apply_jitter', 0.8),
                                     ('color.apply_gray', 0.2),
                                     ('blur.apply_blur', 0.5),
                                     ('flip', 0.5)])
def test_random_apply_frequencies(sampled_params, field, p):
  def get(params):
    for part in field.split('.'):
      params = getattr(params, part)
    return params.astype(np.float64)
  t, j = (get(params) for params in sampled_params)
  # Each within 5 sigma of nominal (sigma = 0.0063 at p=0.8, n=4000) ...
  assert _binomial_ok(t, p) and _binomial_ok(j, p)
  # ... and of each other (difference has sqrt(2) larger sigma).
  assert abs(t.mean() - j.mean()) < 5 * np.sqrt(2 * p * (1 - p) / _N)


def test_color_order_is_uniform_permutation(sampled_params):
  for p in sampled_params:
    order = p.color.order
    np.testing.assert_array_equal(np.sort(order, axis=1),
                                  np.tile(np.arange(4), (_N, 1)))
    for position in (0, 3):
      for op in range(4):
        assert _binomial_ok(order[:, position] == op, 0.25)


def test_strength_zero_disables_jitter_not_gray():
  keys = jax.random.split(jax.random.key(3), 2000)
  p = jax.vmap(lambda k: aj.sample_color_params(k, 0.0))(keys)
  assert not np.any(np.asarray(p.apply_jitter))
  assert _binomial_ok(np.asarray(p.apply_gray), 0.2)
  tp = at.sample_color_params(tf.constant([1, 2]), 0.0)
  assert not bool(tp.apply_jitter)


def _color_test_image() -> np.ndarray:
  """Random pixels plus HSV edge cases: grays, black, white, primaries."""
  rs = np.random.RandomState(1)
  x = rs.rand(12, 12, 3).astype(np.float32)
  special = np.array([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0],
                      [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                      [0.2, 0.2, 0.9], [0.9, 0.2, 0.2], [0.3, 0.9, 0.3]],
                     np.float32)
  x[0] = special
  return x


def test_color_same_params_same_image():
  image = _color_test_image()
  keys = jax.random.split(jax.random.key(11), 12)
  params = jax.vmap(lambda k: aj.sample_color_params(k, 1.0))(keys)
  # Force jitter on for most draws and gray on for a few, so every op runs.
  params = params._replace(
      apply_jitter=jnp.arange(12) != 0, apply_gray=jnp.arange(12) % 4 == 0)
  out = jax.jit(jax.vmap(aj.apply_color, in_axes=(None, 0)))(
      jnp.asarray(image), params)
  for i in range(12):
    expected = at.apply_color(tf.constant(image),
                              _to_tf(_index(params, i))).numpy()
    # Float32 round-off only: HSV conversions use different but equivalent
    # formulas (TF: six-sector switch / hue-range form).
    np.testing.assert_allclose(np.asarray(out[i]), expected, atol=2e-5,
                               err_msg=f'params {i}')
  # And the ops do something: jittered output differs from the input.
  assert np.abs(np.asarray(out[1]) - image).max() > 0.05


def test_single_color_ops_match_tf():
  """Each op alone, to localise a mismatch (clipped as in the pipeline)."""
  image = jnp.asarray(_color_test_image())
  base = dict(apply_jitter=True, brightness=1.6, contrast=0.3, saturation=0.25,
              hue=0.17, order=np.arange(4, dtype=np.int32), apply_gray=False)
  for values in [base, dict(base, contrast=1.7, saturation=1.75, hue=-0.19)]:
    p = jax.tree.map(jnp.asarray, aj.ColorParams(**values))
    for op in range(4):
      out = np.clip(np.asarray(aj.color_op(image, jnp.int32(op), p)), 0, 1)
      expected = tf.clip_by_value(
          at.color_op(tf.constant(np.asarray(image)), op, _to_tf(p)), 0, 1)
      np.testing.assert_allclose(out, expected.numpy(), atol=2e-5,
                                 err_msg=f'op {op} {values}')
  gray = aj.to_grayscale(image)
  np.testing.assert_allclose(
      np.asarray(gray),
      tf.tile(tf.image.rgb_to_grayscale(np.asarray(image)), [1, 1, 3]).numpy(),
      atol=1e-6)


@pytest.mark.parametrize('box', [(3, 5, 40, 30), (0, 0, 80, 64),
                                 (61, 50, 19, 14), (10, 20, 9, 11)])
def test_crop_resize_same_box_same_image(box):
  image = _image(dtype=np.float32)
  out = jax.jit(aj.crop_and_resize, static_argnums=2)(
      jnp.asarray(image), aj.CropBox(*map(jnp.int32, box)), 48)
  expected = at.crop_and_resize(tf.constant(image),
                                at.CropBox(*map(tf.constant, box)), 48)
  # TF's ResizeBicubic looks its weights up in a 1024-entry table (sample
  # positions quantised to 1/1024 px); on white noise that moves outputs by up
  # to ~6e-4. Edges included: pixels outside the crop get no weight in JAX
  # either (they would shift edges by ~0.1 on noise).
  np.testing.assert_allclose(np.asarray(out), expected.numpy(), atol=1.5e-3)


def test_blur_same_params_same_image():
  image = _image(48, 48, dtype=np.float32)
  for apply, sigma in [(True, 0.1), (True, 1.0), (True, 2.0), (False, 1.5)]:
    p = aj.BlurParams(jnp.asarray(apply), jnp.float32(sigma))
    out = np.asarray(aj.apply_blur(jnp.asarray(image), p))
    expected = at.apply_blur(tf.constant(image), _to_tf(p), 48).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    if not apply:
      np.testing.assert_array_equal(out, image)
  assert aj.blur_radius(224) == 11  # 23 taps at 224 px, as the reference.


def test_full_view_same_params_same_image():
  images = np.stack([_smooth_image()] * _B)
  params = aj.sample_views_params(jax.random.key(5), _B, 80, 64)
  params = params._replace(blur=params.blur._replace(
      apply_blur=jnp.arange(_B) % 2 == 0))
  out = np.asarray(aj.apply_views(jnp.asarray(images), params, _SIZE))
  for i in range(_B):
    expected = at.apply_view(tf.constant(images[i]), _to_tf(_index(params, i)),
                             _SIZE).numpy()
    # A smooth image keeps TF's bicubic table error small (~1e-4); colour ops
    # amplify it (up to 1.8x per factor), hence 1e-3 rather than 2e-5.
    np.testing.assert_allclose(out[i], expected, atol=1e-3,
                               err_msg=f'view {i}')


def test_blurred_white_view_stays_in_unit_range():
  # A normalised kernel over an all-ones image sums to 1 + a rounding step
  # for some sigmas (1.0000002 at 32 px, found by CI); the view must still be
  # in [0, 1] in both backends.
  white = np.ones((32, 32, 3), np.float32)
  params = aj.sample_views_params(jax.random.key(0), 1, 32, 32,
                                  color_strength=0.0)
  one = _index(params, 0)
  for sigma in np.linspace(0.1, 2.0, 40, dtype=np.float32):
    p = one._replace(blur=aj.BlurParams(jnp.asarray(True), jnp.float32(sigma)))
    out = np.asarray(aj.apply_view(jnp.asarray(white), p, 32))
    tf_out = at.apply_view(tf.constant(white), _to_tf(p), 32).numpy()
    assert out.max() <= 1.0 and tf_out.max() <= 1.0, sigma


def test_constant_image_stays_constant():
  rgb = np.array([51, 128, 179], np.uint8)
  color = rgb / np.float32(255.0)
  image = np.broadcast_to(rgb, (80, 64, 3)).copy()
  flat = np.broadcast_to(color, (48, 48, 3)).astype(np.float32)
  # The blur must preserve constants (reflect padding); the reference's zero
  # padding would darken a 2-pixel border here by up to ~0.3.
  blurred = aj.apply_blur(jnp.asarray(flat),
                          aj.BlurParams(jnp.asarray(True), jnp.float32(2.0)))
  np.testing.assert_allclose(np.asarray(blurred), flat, atol=1e-6)
  tf_blurred = at.apply_blur(tf.constant(flat),
                             at.BlurParams(tf.constant(True), tf.constant(2.0)),
                             48)
  np.testing.assert_allclose(tf_blurred.numpy(), flat, atol=1e-6)
  # Whole views with colour jitter off: crop, flip, blur (and p=0.2 gray,
  # which keeps a uniform image uniform) leave every channel spatially flat.
  tf_views = np.stack([
      augment.tf_view(image, _SIZE, color_strength=0.0,
                      seed=tf.constant([i, 0])) for i in range(_B)])
  jax_views = np.asarray(augment.jax_views(
      jax.random.key(0), jnp.asarray(np.stack([image] * _B)), _SIZE,
      color_strength=0.0))
  gray = np.full(3, np.dot(aj.GRAY_WEIGHTS, color), np.float32)
  for views in (tf_views, jax_views):
    # Peak-to-peak, not std: float32 np.std itself errs by ~1e-5 here.
    assert np.ptp(views, axis=(1, 2)).max() < 1e-5
    first = views[:, 0, 0]
    assert np.all(np.isclose(first, color, atol=1e-5).all(axis=1) |
                  np.isclose(first, gray, atol=1e-5).all(axis=1))


def test_finetune_views_crop_and_flip_only():
  rgb = np.array([51, 128, 179], np.uint8)
  flat = np.broadcast_to(rgb, (40, 36, 3))
  images = jnp.asarray(np.stack([flat, _image(40, 36)]))
  a = augment.jax_finetune_views(jax.random.key(1), images, 24)
  b = augment.jax_finetune_views(jax.random.key(2), images, 24)
  assert a.shape == (2, 24, 24, 3) and a.dtype == jnp.float32
  assert float(a.min()) >= 0 and float(a.max()) <= 1
  assert float(jnp.abs(a[1] - b[1]).mean()) > 0.01
  # No colour ops: a uniform colour comes out unchanged (jitter or gray
  # would move it).
  flat_out = np.broadcast_to(rgb / np.float32(255.0), (24, 24, 3))
  np.testing.assert_allclose(np.asarray(a[0]), flat_out, atol=1e-5)
  tf_out = augment.tf_finetune_view(
      flat / np.float32(255.0), 24, seed=tf.constant([1, 1]))
  assert tf_out.shape == (24, 24, 3) and tf_out.dtype == tf.float32
  np.testing.assert_allclose(tf_out.numpy(), flat_out, atol=1e-5)


def test_finetune_views_gentle_crop_and_no_flip():
  """config.augment.finetune_*: min area bounds every crop; flip=False never
  mirrors (tested on a square image with distinct columns)."""
  image = _image(32, 32)
  images = jnp.asarray(np.stack([image] * 64))
  # Area 1.0: every crop is the whole image, so every view is the resized
  # image itself, whatever the key.
  whole = augment.jax_finetune_views(jax.random.key(3), images, 32,
                                     crop_min_area=1.0, flip=False)
  np.testing.assert_allclose(np.asarray(whole),
                             np.broadcast_to(image / 255.0, whole.shape),
                             atol=1e-5)
  # With flips on, about half of those views are mirrored.
  flipped = augment.jax_finetune_views(jax.random.key(3), images, 32,
                                       crop_min_area=1.0, flip=True)
  mirrored = np.all(np.isclose(np.asarray(flipped),
                               (image / 255.0)[:, ::-1], atol=1e-5),
                    axis=(1, 2, 3))
  assert 10 < mirrored.sum() < 54
  # The crop box never goes below the area asked for.
  boxes = jax.vmap(lambda k: aj.sample_crop_box(k, 32, 32, 0.5))(
      jax.random.split(jax.random.key(4), 2000))
  area = np.asarray(boxes.h) * np.asarray(boxes.w) / 1024.0
  assert area.min() >= 0.5 and area.max() <= 1.0
  tf_whole = augment.tf_finetune_view(image / np.float32(255.0), 32,
                                      seed=tf.constant([1, 2]),
                                      crop_min_area=1.0, flip=False)
  np.testing.assert_allclose(tf_whole.numpy(), image / 255.0, atol=1e-5)


def test_pretraining_views_crop_min_area_and_no_flip():
  """config.augment.crop_min_area / flip reach both backends' view params;
  the other draws (colour, blur) are those of the reference settings."""
  ref = aj.sample_views_params(jax.random.key(6), 1000, 32, 32)
  gentle = aj.sample_views_params(jax.random.key(6), 1000, 32, 32,
                                  crop_min_area=0.5, flip=False)
  area = np.asarray(gentle.crop.h) * np.asarray(gentle.crop.w) / 1024.0
  assert area.min() >= 0.5 and not np.asarray(gentle.flip).any()
  assert (np.asarray(ref.crop.h) * np.asarray(ref.crop.w) / 1024.0).min() < 0.5
  assert 400 < np.asarray(ref.flip).sum() < 600
  for a, b in zip(jax.tree.leaves(ref.color), jax.tree.leaves(gentle.color)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tf_params = [at.sample_view_params(tf.constant([i, 7]), 32, 32,
                                     crop_min_area=0.5, flip=False)
               for i in range(200)]
  assert not any(bool(p.flip) for p in tf_params)
  assert min(int(p.crop.h) * int(p.crop.w) for p in tf_params) >= 512
  # Through the public tf_view: area 1 and no flip leave only colour.
  image = _image(32, 32)
  view = augment.tf_view(image, 32, color_strength=0.0, blur=False,
                         seed=tf.constant([3, 4]), crop_min_area=1.0,
                         flip=False).numpy()
  gray = np.dot(image / 255.0, aj.GRAY_WEIGHTS)[..., None]
  assert (np.allclose(view, image / 255.0, atol=1e-5) or
          np.allclose(view, np.broadcast_to(gray, view.shape), atol=1e-5))


def test_eval_center_crop():
  image = _image(64, 48)
  # Crop side rint(0.875 * 48) = 42, offsets ((64-42)+1)//2 = 11 and
  # ((48-42)+1)//2 = 3. Bicubic resize 42 -> 42 is the identity.
  expected = image[11:53, 3:45] / 255.0
  np.testing.assert_allclose(augment.tf_eval(image, 42).numpy(), expected,
                             atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(augment.jax_eval(jnp.asarray(image[None]), 42))[0], expected,
      atol=1e-6)
  # With a resize the backends agree (TF's bicubic table error, as above).
  np.testing.assert_allclose(
      np.asarray(augment.jax_eval(jnp.asarray(image[None]), 56))[0],
      augment.tf_eval(image, 56).numpy(), atol=1.5e-3)


def test_eval_no_crop_at_32():
  small = _image(32, 32)
  np.testing.assert_allclose(augment.tf_eval(small, 32).numpy(),
                             small / 255.0, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(augment.jax_eval(jnp.asarray(small[None]), 32))[0],
      small / 255.0, atol=1e-6)
  # size <= 32: the whole (uncropped) image is resized.
  big = _image(40, 36)
  whole = tf.image.resize(big / 255.0, [32, 32], method='bicubic')
  np.testing.assert_allclose(augment.tf_eval(big, 32).numpy(),
                             np.clip(whole.numpy(), 0, 1), atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(augment.jax_eval(jnp.asarray(big[None]), 32))[0],
      np.clip(whole.numpy(), 0, 1), atol=1.5e-3)


def test_jax_path_does_not_import_tensorflow():
  code = '\n'.join([
      'import sys',
      "sys.modules['tensorflow'] = None  # Any import of TF now fails.",
      'import jax, jax.numpy as jnp',
      'from simclr_jax.data import augment',
      'x = jnp.zeros((2, 20, 18, 3), jnp.uint8)',
      'f = jax.jit(lambda k, x: augment.jax_views(k, x, size=16))',
      'v = f(jax.random.key(0), x)',
      'assert v.shape == (2, 16, 16, 3), v.shape',
      "assert sys.modules['tensorflow'] is None",
      "print('ok')",
  ])
  env = dict(os.environ, PYTHONPATH=_REPO, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().endswith('ok')
