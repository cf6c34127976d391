"""SimCLR augmentations as TensorFlow ops, for tf.data input pipelines.

The steps of docs/algorithms.md#augmentation, written with stateless random ops
driven by one shape-[2] seed per view, so a deterministic pipeline (seeds from
the dataset) and the default one (seed drawn from tf.random) share a single
code path. As in augment_jax the randomness is sampled explicitly
(`sample_view_params`) and then applied (`apply_view`), which lets tests check
both backends draw the same distributions and turn the same draws into the same
pixels. All ops are graph friendly for
Dataset.map(num_parallel_calls=AUTOTUNE).
"""

import tensorflow as tf

from simclr_jax.data import augment_jax as aj
from simclr_jax.data.augment_jax import BlurParams
from simclr_jax.data.augment_jax import ColorParams
from simclr_jax.data.augment_jax import CropBox
from simclr_jax.data.augment_jax import ViewParams


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  seeds = tf.random.experimental.stateless_split(seed, num)
  return [seeds[i] for i in range(num)]


def _uniform(seed: tf.Tensor, lo=0.0, hi=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, lo, hi, tf.float32)


def _default_seed() -> tf.Tensor:
  return tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)


def to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 -> [0, 1] (x * 1/255); float images are assumed in [0, 1]."""
  return tf.image.convert_image_dtype(image, tf.float32)


def sample_crop_box(seed: tf.Tensor, height, width,
                    min_area: float = aj.CROP_AREA_RANGE[0]) -> CropBox:
  """The reference's distorted_bounding_box_crop window (whole-image object)."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=aj.CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=aj.CROP_ASPECT_RANGE,
      area_range=(min_area, aj.CROP_AREA_RANGE[1]),
      max_attempts=aj.CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  begin = tf.cast(begin, tf.int32)
  size = tf.cast(size, tf.int32)
  return CropBox(y=begin[0], x=begin[1], h=size[0], w=size[1])


def crop_and_resize(image: tf.Tensor, box: CropBox, size: int) -> tf.Tensor:
  """Reference crop_and_resize: crop, then tf.image.resize BICUBIC."""
  image = tf.image.crop_to_bounding_box(image, box.y, box.x, box.h, box.w)
  return tf.image.resize(image, [size, size],
                         method=tf.image.ResizeMethod.BICUBIC)


def sample_color_params(seed: tf.Tensor, strength: float) -> ColorParams:
  """Same draws as augment_jax.sample_color_params (see there)."""
  u = tf.random.stateless_uniform([10], seed, dtype=tf.float32)
  s = float(strength)
  between = lambda v, lo, hi: lo + v * (hi - lo)
  return ColorParams(
      apply_jitter=tf.logical_and(u[0] < aj.JITTER_PROB, s > 0),
      brightness=between(u[1], max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s),
      contrast=between(u[2], 1.0 - 0.8 * s, 1.0 + 0.8 * s),
      saturation=between(u[3], 1.0 - 0.8 * s, 1.0 + 0.8 * s),
      hue=between(u[4], -0.2 * s, 0.2 * s),
      # Sorting i.i.d. uniforms gives a uniformly random permutation.
      order=tf.cast(tf.argsort(u[5:9]), tf.int32),
      apply_gray=u[9] < aj.GRAY_PROB)


def color_op(image: tf.Tensor, op: int, params: ColorParams) -> tf.Tensor:
  """One of the reference's four jitter ops (static id), without clipping."""
  if op == aj.BRIGHTNESS:  # SimCLR v2 random_brightness is multiplicative.
    return image * params.brightness
  if op == aj.CONTRAST:
    return tf.image.adjust_contrast(image, params.contrast)
  if op == aj.SATURATION:
    return tf.image.adjust_saturation(image, params.saturation)
  return tf.image.adjust_hue(image, params.hue)


def _jitter(image: tf.Tensor, params: ColorParams) -> tf.Tensor:
  """Reference color_jitter_rand: 4 ops in random order, clip after each."""
  for i in range(4):
    image = tf.switch_case(
        params.order[i],
        [(lambda op=op, x=image: color_op(x, op, params)) for op in range(4)])
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def apply_color(image: tf.Tensor, params: ColorParams) -> tf.Tensor:
  """Reference random_color_jitter: jitter (p=0.8) then grayscale (p=0.2)."""
  image = tf.cond(params.apply_jitter, lambda: _jitter(image, params),
                  lambda: image)
  return tf.cond(params.apply_gray,
                 lambda: tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3]),
                 lambda: image)


def sample_blur_params(seed: tf.Tensor) -> BlurParams:
  u = tf.random.stateless_uniform([2], seed, dtype=tf.float32)
  lo, hi = aj.BLUR_SIGMA_RANGE
  return BlurParams(apply_blur=u[0] < aj.BLUR_PROB, sigma=lo + u[1] * (hi - lo))


def _gaussian_blur(image: tf.Tensor, sigma: tf.Tensor,
                   radius: int) -> tf.Tensor:
  """Separable blur with REFLECT padding (the reference pads with zeros).

  Zero (SAME) padding darkens a `radius`-wide border; torchvision's reflect
  padding keeps a constant image constant, so we follow it.
  """
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma)))
  kernel /= tf.reduce_sum(kernel)
  channels = tf.shape(image)[-1]
  k_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  k_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  x = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
             mode='REFLECT')
  x = tf.nn.depthwise_conv2d(x, k_v, [1, 1, 1, 1], 'VALID')
  x = tf.nn.depthwise_conv2d(x, k_h, [1, 1, 1, 1], 'VALID')
  return x[0]


def apply_blur(image: tf.Tensor, params: BlurParams, size: int) -> tf.Tensor:
  radius = aj.blur_radius(size)
  if radius == 0:
    return image
  return tf.cond(params.apply_blur,
                 lambda: _gaussian_blur(image, params.sigma, radius),
                 lambda: image)


def sample_view_params(seed: tf.Tensor, height, width,
                       color_strength: float = 1.0,
                       blur: bool = True,
                       crop_min_area: float = aj.CROP_AREA_RANGE[0],
                       flip: bool = True) -> ViewParams:
  """All random draws for one view; mirrors augment_jax.sample_view_params."""
  s_crop, s_flip, s_color, s_blur = _split(seed, 4)
  blur_params = sample_blur_params(s_blur)
  if not blur:
    blur_params = blur_params._replace(apply_blur=tf.constant(False))
  return ViewParams(
      crop=sample_crop_box(s_crop, height, width, crop_min_area),
      flip=_uniform(s_flip) < (aj.FLIP_PROB if flip else 0.0),
      color=sample_color_params(s_color, color_strength),
      blur=blur_params)


def apply_view(image: tf.Tensor, params: ViewParams, size: int) -> tf.Tensor:
  """Steps 1-6 of docs/algorithms.md#augmentation with explicit params."""
  image = crop_and_resize(to_float(image), params.crop, size)
  image = tf.cond(params.flip, lambda: tf.image.flip_left_right(image),
                  lambda: image)
  image = apply_color(image, params.color)
  image = tf.clip_by_value(image, 0.0, 1.0)
  image = apply_blur(image, params.blur, size)
  # Clip again: a normalised kernel can overshoot 1 by a rounding step.
  return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3])


def _image_hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(image)
  return shape[0], shape[1]


def tf_view(image: tf.Tensor, size: int = 224, color_strength: float = 1.0,
            blur: bool = True, seed: tf.Tensor | None = None,
            crop_min_area: float = aj.CROP_AREA_RANGE[0],
            flip: bool = True) -> tf.Tensor:
  """One SimCLR pretraining view (see augment.tf_view)."""
  seed = _default_seed() if seed is None else seed
  height, width = _image_hw(image)
  params = sample_view_params(seed, height, width, color_strength, blur,
                              crop_min_area, flip)
  return apply_view(image, params, size)


def tf_finetune_view(image: tf.Tensor, size: int,
                     seed: tf.Tensor | None = None,
                     crop_min_area: float = aj.CROP_AREA_RANGE[0],
                     flip: bool = True) -> tf.Tensor:
  """Crop + flip only (reference preprocess_for_train, color_distort=False).

  `crop_min_area` and `flip` as in augment_jax.jax_finetune_views.
  """
  seed = _default_seed() if seed is None else seed
  s_crop, s_flip = _split(seed, 2)
  height, width = _image_hw(image)
  image = crop_and_resize(to_float(image),
                          sample_crop_box(s_crop, height, width,
                                          crop_min_area), size)
  image = tf.cond(_uniform(s_flip) < (aj.FLIP_PROB if flip else 0.0),
                  lambda: tf.image.flip_left_right(image), lambda: image)
  return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3])


def tf_eval(image: tf.Tensor, size: int) -> tf.Tensor:
  """Reference preprocess_for_eval: centre crop 0.875, bicubic resize.

  No crop when size <= 32 (the reference sets test_crop=False for
  image_size <= 32); the image is then only resized if its size differs
  (bicubic at the same size is the identity).
  """
  image = to_float(image)
  if size > aj.EVAL_NO_CROP_MAX_SIZE:
    height, width = _image_hw(image)
    side = tf.cast(tf.math.rint(aj.EVAL_CROP_PROPORTION * tf.cast(
        tf.minimum(height, width), tf.float32)), tf.int32)
    image = tf.image.crop_to_bounding_box(
        image, (height - side + 1) // 2, (width - side + 1) // 2, side, side)
  image = tf.image.resize(image, [size, size],
                          method=tf.image.ResizeMethod.BICUBIC)
  return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3])


def resize_centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 (size, size, 3): shorter side resized to `size`, centre square kept.

  Gives the fixed-size raw images that in-memory datasets and the on-device
  augmentation need while keeping as much of each image as a square can
  (bicubic with antialiasing, so downscaling large photos does not alias).
  An image already (size, size) passes through unchanged.
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = float(size) / tf.minimum(h, w)
  new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))

  def resize():
    resized = tf.image.resize(image, [new_h, new_w], method='bicubic',
                              antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top:top + size, left:left + size]
    return tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8)

  same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
  out = tf.cond(same, lambda: tf.cast(image, tf.uint8), resize)
  return tf.ensure_shape(out, [size, size, 3])
