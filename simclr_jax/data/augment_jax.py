"""SimCLR augmentations in JAX, for on-device input processing.

Mirrors the tf.data pipeline of `augment_tf` (docs/algorithms.md#augmentation)
with one code path: sample explicit random parameters (`sample_view_params`),
then apply them (`apply_view`). Both are written for ONE image and vmapped over
the batch, so everything is static-shaped, branch-free (`jnp.where` selects)
and jit-able inside the train step with no host sync. Importing this module
must not import TensorFlow (accelerator hosts may lack it), which is also why
the backend-neutral constants and parameter types live here.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Constants of docs/algorithms.md#augmentation, shared with augment_tf.
CROP_AREA_RANGE = (0.08, 1.0)
# Reference crop_and_resize(image, height, width) uses (3/4, 4/3) times the
# OUTPUT width/height; outputs here are square, so the range is (3/4, 4/3).
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100
FLIP_PROB = 0.5
JITTER_PROB = 0.8
GRAY_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
EVAL_CROP_PROPORTION = 0.875
# Eval images at or below this output size are not centre-cropped (reference:
# `test_crop = False` when FLAGS.image_size <= 32, i.e. CIFAR).
EVAL_NO_CROP_MAX_SIZE = 32
# tf.image.rgb_to_grayscale weights.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Colour op ids; `ColorParams.order` is a permutation of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


class CropBox(NamedTuple):
  """Crop window in pixels, as sample_distorted_bounding_box returns it."""
  y: jax.Array  # int32 top row.
  x: jax.Array  # int32 left column.
  h: jax.Array  # int32 height.
  w: jax.Array  # int32 width.


class ColorParams(NamedTuple):
  """The random draws of the reference's random_color_jitter, made explicit."""
  apply_jitter: jax.Array  # bool, p = JITTER_PROB.
  brightness: jax.Array  # multiplicative factor.
  contrast: jax.Array  # adjust_contrast factor.
  saturation: jax.Array  # adjust_saturation factor.
  hue: jax.Array  # adjust_hue delta.
  order: jax.Array  # int32 permutation of (BRIGHTNESS, CONTRAST, ...).
  apply_gray: jax.Array  # bool, p = GRAY_PROB.


class BlurParams(NamedTuple):
  apply_blur: jax.Array  # bool, p = BLUR_PROB.
  sigma: jax.Array  # Gaussian std in pixels of the output image.


class ViewParams(NamedTuple):
  """Everything random about one view; tests compare these across backends."""
  crop: CropBox
  flip: jax.Array  # bool, p = FLIP_PROB.
  color: ColorParams
  blur: BlurParams


def to_float(images: jax.Array) -> jax.Array:
  """uint8 -> [0, 1] like tf.image.convert_image_dtype (x * (1/255)).

  Float images are assumed to be in [0, 1] already and are only cast.
  """
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images.astype(jnp.float32)


# ----------------------------------------------------------------------------
# Random crop.


def _uniform_int(u: jax.Array, m: jax.Array) -> jax.Array:
  """Integer uniform in [0, m) from u ~ U[0, 1)."""
  return jnp.minimum(jnp.floor(u * m).astype(jnp.int32), m - 1)


def sample_crop_box(key: jax.Array, height: int, width: int,
                    min_area: float = CROP_AREA_RANGE[0]) -> CropBox:
  """Samples a crop exactly like TF's sample_distorted_bounding_box kernel.

  The C++ kernel tries up to 100 times: aspect ratio r ~ U(range); integer
  height uniform between the heights whose area at ratio r lies in the area
  range (clamped to the image); width = round(height * r); rounding repairs;
  reject on area / bounds / min_object_covered (the object is the whole
  image, so coverage = crop area / image area); offsets uniform in
  [0, H - h) (sic: the crop never touches the last row unless h == H).
  The first accepted attempt wins, else the whole image. Here all attempts
  are drawn at once and the first valid one is selected, so the distribution
  is the kernel's (up to the integer-draw bias noted below) while every shape
  stays static.

  Args:
    key: PRNG key for one image.
    height: static image height H.
    width: static image width W.
    min_area: smallest crop area as a fraction of the image (0.08 in the
      reference; downstream recipes for tiny images may raise it).

  Returns:
    CropBox of int32 scalars.
  """
  n = CROP_MAX_ATTEMPTS
  f32 = jnp.float32
  # One draw of uniforms for everything (cheaper to compile and run than four
  # randint calls); integers come from floor(u * m), whose bias for m < 2^12
  # is below 5e-4 relative (u has 23 random bits).
  u_ratio, u_height, u_y, u_x = jax.random.uniform(key, (4, n), f32)
  lo_ratio, hi_ratio = CROP_ASPECT_RANGE
  ratio = u_ratio * f32(hi_ratio - lo_ratio) + f32(lo_ratio)
  # Same float32 operation order as the kernel: (frac * W) * H.
  min_area = f32(min_area) * width * height
  max_area = f32(CROP_AREA_RANGE[1]) * width * height

  def lrint(v):  # lrintf rounds half to even, as jnp.round does.
    return jnp.round(v).astype(jnp.int32)

  min_h = lrint(jnp.sqrt(min_area / ratio))
  max_h = lrint(jnp.sqrt(max_area / ratio))
  # Largest max_h with round(max_h * r) <= W (the kernel's kEps is below
  # float32 resolution here, hence the -1 repair below as in the kernel).
  too_wide = lrint(max_h * ratio) > width
  capped = ((width + 0.5) / ratio).astype(jnp.int32)
  capped = jnp.where(lrint(capped * ratio) > width, capped - 1, capped)
  max_h = jnp.where(too_wide, capped, max_h)
  max_h = jnp.minimum(max_h, height)
  min_h = jnp.minimum(min_h, max_h)
  # Uniform integer in the closed range [min_h, max_h].
  h = min_h + _uniform_int(u_height, max_h - min_h + 1)
  w = lrint(h * ratio)
  area = (w * h).astype(f32)
  h = jnp.where(area < min_area, h + 1, h)
  w = jnp.where(area < min_area, lrint(h * ratio), w)
  area = (w * h).astype(f32)
  h = jnp.where(area > max_area, h - 1, h)
  w = jnp.where(area > max_area, lrint(h * ratio), w)
  area = (w * h).astype(f32)
  valid = ((area >= min_area) & (area <= max_area) & (w <= width) &
           (h <= height) & (w > 0) & (h > 0))
  # SatisfiesOverlapConstraints against the whole-image box.
  image_area = f32(width * height)
  valid &= (area >= 1.0) & (area / image_area >= f32(CROP_MIN_OBJECT_COVERED))
  # The kernel's Uniform(H - h): [0, H - h), or 0 when h == H.
  y = _uniform_int(u_y, jnp.maximum(height - h, 1))
  x = _uniform_int(u_x, jnp.maximum(width - w, 1))
  first = jnp.argmax(valid)
  ok = valid[first]
  pick = lambda v, full: jnp.where(ok, v[first], full).astype(jnp.int32)
  return CropBox(y=pick(y, 0), x=pick(x, 0), h=pick(h, height),
                 w=pick(w, width))


def crop_and_resize(image: jax.Array, box: CropBox, size: int) -> jax.Array:
  """Crops `box` from an (H, W, C) float image, bicubic-resizes to (size, size).

  Matches tf.image.crop_to_bounding_box + tf.image.resize(BICUBIC): Keys cubic
  (a = -0.5), half-pixel centres, no antialiasing, and taps outside the
  (cropped) input dropped with the remaining weights renormalised.
  scale_and_translate on the full image would also read pixels just outside
  the crop, so the crop is masked out and the result divided by the resampled
  mask: that renormalises over in-crop taps exactly as TF does on the cropped
  tensor, while keeping every shape static.
  """
  height, width = image.shape[0], image.shape[1]
  scale = jnp.stack([size / box.h, size / box.w]).astype(jnp.float32)
  translation = -jnp.stack([box.y, box.x]).astype(jnp.float32) * scale
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  mask_y = ((rows >= box.y) & (rows < box.y + box.h)).astype(jnp.float32)
  mask_x = ((cols >= box.x) & (cols < box.x + box.w)).astype(jnp.float32)
  masked = image * mask_y[:, None, None] * mask_x[None, :, None]
  resize = functools.partial(
      jax.image.scale_and_translate, method='cubic', antialias=False)
  num = resize(masked, (size, size, image.shape[2]), (0, 1), scale,
               translation)
  # The mask is separable, so its resampled version is an outer product.
  den_y = resize(mask_y, (size,), (0,), scale[:1], translation[:1])
  den_x = resize(mask_x, (size,), (0,), scale[1:], translation[1:])
  den = den_y[:, None, None] * den_x[None, :, None]
  # Every output sample lies inside the crop, so den is about 0.5 or more
  # (nearest tap in the crop); guard anyway.
  return num / jnp.maximum(den, 1e-6)


# ----------------------------------------------------------------------------
# Colour distortion.


def sample_color_params(key: jax.Array, strength: float) -> ColorParams:
  """Colour-jitter randomness of docs/algorithms.md#augmentation, step 4.

  Strength 0 turns jitter off (the reference skips each op whose strength is
  0), but grayscale is still drawn with p = 0.2, as in the reference.
  """
  u = jax.random.uniform(key, (10,), jnp.float32)
  s = jnp.asarray(strength, jnp.float32)
  between = lambda v, lo, hi: lo + v * (hi - lo)
  return ColorParams(
      apply_jitter=(u[0] < JITTER_PROB) & (s > 0),
      brightness=between(u[1], jnp.maximum(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s),
      contrast=between(u[2], 1.0 - 0.8 * s, 1.0 + 0.8 * s),
      saturation=between(u[3], 1.0 - 0.8 * s, 1.0 + 0.8 * s),
      hue=between(u[4], -0.2 * s, 0.2 * s),
      # Sorting i.i.d. uniforms gives a uniformly random permutation.
      order=jnp.argsort(u[5:9]).astype(jnp.int32),
      apply_gray=u[9] < GRAY_PROB)


# From the crop on, a view is kept channel-first, (3, H, W): slicing and
# re-stacking a size-3 minor axis inside every colour op and blur tap
# dominated their cost on CPU (2-4x slower end to end). On accelerators XLA
# assigns layouts itself. The public per-op helpers below take and return
# (H, W, 3).
_Planes = tuple[jax.Array, jax.Array, jax.Array]


def _hwc(chw: jax.Array) -> jax.Array:
  return jnp.moveaxis(chw, 0, -1)


def _chw(hwc: jax.Array) -> jax.Array:
  return jnp.moveaxis(hwc, -1, 0)


def _adjust_hsv(rgb: _Planes, saturation: jax.Array,
                hue: jax.Array) -> _Planes:
  """tf.image.adjust_saturation then adjust_hue, in one pass without HSV.

  In HSV terms a pixel is v - c * f_n(h) per channel n, with value v = max,
  chroma c = max - min and f_n a fixed function of hue. adjust_saturation
  scales s = c / v and clips it to [0, 1], i.e. c -> clip(c * factor, 0, v);
  adjust_hue adds `hue` (in turns) to h. Both keep v, so the pixel is rebuilt
  from (v, new c, new h) directly: TF's rgb_to_hsv / hsv_to_rgb pair,
  algebraically, at a fraction of the cost (this runs 4x per view).
  """
  r, g, b = rgb
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  inv_chroma = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, in (-1, 5]; 0 for grays (tf.image convention).
  r_max, g_max = r == v, g == v
  hue6 = (jnp.where(r_max, g - b, jnp.where(g_max, b - r, r - g)) * inv_chroma
          + jnp.where(r_max, 0.0, jnp.where(g_max, 2.0, 4.0)) + 6.0 * hue)
  new_chroma = jnp.clip(chroma * saturation, 0.0, v)
  out = []
  for n in (5.0, 3.0, 1.0):  # R, G, B: the closed form of the six sectors.
    k = n + hue6
    k = k - 6.0 * jnp.floor(k * (1.0 / 6.0))  # mod 6, cheaper than jnp.mod.
    out.append(v - new_chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return tuple(out)


def _color_op(rgb: _Planes, op: jax.Array, params: ColorParams) -> _Planes:
  """Applies colour op `op` (traced id) then clips, as color_jitter_rand does.

  Brightness and contrast are affine and saturation and hue share one HSV
  pass, so one step computes two candidates and selects, instead of four
  branches (vmapped lax.switch would compute all of them anyway). Unselected
  candidates are discarded by the select, never applied with identity
  parameters, so they add no rounding.

  One knowing difference from TF: its hsv_to_rgb turns a hue that rounds up
  to exactly 1.0 (g a hair below b with r the max) into sector 6, which it
  maps to gray; the closed form here keeps the pixel's colour.
  """
  hsv = _adjust_hsv(rgb, jnp.where(op == SATURATION, params.saturation, 1.0),
                    jnp.where(op == HUE, params.hue, 0.0))
  out = []
  for plane, shifted in zip(rgb, hsv):
    # adjust_contrast: per-channel spatial mean.
    mean = jnp.mean(plane)
    affine = jnp.where(op == BRIGHTNESS, plane * params.brightness,
                       (plane - mean) * params.contrast + mean)
    out.append(jnp.clip(jnp.where(op <= CONTRAST, affine, shifted), 0.0, 1.0))
  return tuple(out)


def _gray(rgb: _Planes) -> jax.Array:
  """tf.image.rgb_to_grayscale (one plane)."""
  return sum(w * plane for w, plane in zip(GRAY_WEIGHTS, rgb))


def _apply_color_chw(image: jax.Array, params: ColorParams) -> jax.Array:
  rgb = tuple(image)
  jittered = rgb
  for i in range(4):
    jittered = _color_op(jittered, params.order[i], params)
  rgb = [jnp.where(params.apply_jitter, j, p) for j, p in zip(jittered, rgb)]
  gray = _gray(rgb)
  return jnp.stack([jnp.where(params.apply_gray, gray, p) for p in rgb])


def color_op(image: jax.Array, op: jax.Array,
             params: ColorParams) -> jax.Array:
  """One clipped jitter op on an (H, W, 3) image (see _color_op)."""
  return _hwc(jnp.stack(_color_op(tuple(_chw(image)), op, params)))


def to_grayscale(image: jax.Array) -> jax.Array:
  """tf.image.rgb_to_grayscale of (H, W, 3), tiled back to 3 channels."""
  return _hwc(jnp.stack([_gray(tuple(_chw(image)))] * 3))


def apply_color(image: jax.Array, params: ColorParams) -> jax.Array:
  """Colour jitter in the sampled order (p=0.8), then grayscale (p=0.2)."""
  return _hwc(_apply_color_chw(_chw(image), params))


# ----------------------------------------------------------------------------
# Gaussian blur.


def blur_radius(size: int) -> int:
  """Reference: kernel_size = size // 10, radius = kernel_size // 2."""
  return (size // 10) // 2


def sample_blur_params(key: jax.Array) -> BlurParams:
  u_apply, u_sigma = jax.random.uniform(key, (2,), jnp.float32)
  lo, hi = BLUR_SIGMA_RANGE
  return BlurParams(apply_blur=u_apply < BLUR_PROB,
                    sigma=lo + u_sigma * (hi - lo))


def _apply_blur_chw(image: jax.Array, params: BlurParams) -> jax.Array:
  """Separable Gaussian blur of (C, H, W) with 2 * radius + 1 taps.

  The reference convolves with SAME (zero) padding, which darkens a border
  `radius` pixels wide; we pad with REFLECT like torchvision's GaussianBlur so a
  constant image stays constant. When the view is not blurred the kernel is a
  delta, so the output is bit-identical to the input and no branch is needed.
  Shifted multiply-adds rather than a convolution: per-example kernels make
  a vmapped conv a grouped conv, several times slower on CPU.
  """
  height, width = image.shape[1], image.shape[2]
  radius = blur_radius(height)
  if radius == 0:
    return image
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-jnp.square(taps) / (2.0 * jnp.square(params.sigma)))
  kernel = kernel / jnp.sum(kernel)
  kernel = jnp.where(params.apply_blur, kernel, (taps == 0).astype(jnp.float32))
  padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)), mode='reflect')
  image = sum(kernel[j] * padded[:, j:j + height]
              for j in range(2 * radius + 1))
  padded = jnp.pad(image, ((0, 0), (0, 0), (radius, radius)), mode='reflect')
  return sum(kernel[j] * padded[:, :, j:j + width]
             for j in range(2 * radius + 1))


def apply_blur(image: jax.Array, params: BlurParams) -> jax.Array:
  """Blurs an (H, W, C) image; kernel from its size (see _apply_blur_chw)."""
  return _hwc(_apply_blur_chw(_chw(image), params))


# ----------------------------------------------------------------------------
# Whole views.


def sample_view_params(key: jax.Array, height: int, width: int,
                       color_strength: float = 1.0,
                       blur: bool = True,
                       crop_min_area: float = CROP_AREA_RANGE[0],
                       flip: bool = True) -> ViewParams:
  """All random draws for one view of an (height, width) image.

  `crop_min_area` and `flip` default to the reference's; turning them off
  keeps every other draw unchanged (same keys).
  """
  k_crop, k_flip, k_color, k_blur = jax.random.split(key, 4)
  blur_params = sample_blur_params(k_blur)
  if not blur:
    blur_params = blur_params._replace(apply_blur=jnp.zeros((), bool))
  return ViewParams(
      crop=sample_crop_box(k_crop, height, width, crop_min_area),
      flip=jax.random.uniform(k_flip) < (FLIP_PROB if flip else 0.0),
      color=sample_color_params(k_color, color_strength),
      blur=blur_params)


def apply_view(image: jax.Array, params: ViewParams, size: int) -> jax.Array:
  """Steps 1-6 of docs/algorithms.md#augmentation for one (H, W, 3) image."""
  image = _chw(crop_and_resize(to_float(image), params.crop, size))
  image = jnp.where(params.flip, image[:, :, ::-1], image)
  image = _apply_color_chw(image, params.color)
  image = jnp.clip(image, 0.0, 1.0)
  # Clip again: a normalised kernel can overshoot 1 by a rounding step.
  return _hwc(jnp.clip(_apply_blur_chw(image, params.blur), 0.0, 1.0))


def _materialize(tree: Any) -> Any:
  """Identity on batched params that XLA cannot fuse into their consumers.

  Threefry (partitionable) random bits are elementwise integer ops, so XLA
  happily fuses a parameter's whole hash chain into every per-pixel loop that
  broadcasts it, recomputing it for each pixel: measured 70x slower on CPU
  when the params are sampled in the same program as the views. A stable
  sort keyed on iota (already sorted, so the values come back unchanged) is
  never fused and costs O(N log N) scalars; lax.optimization_barrier is
  expanded before fusion on CPU and did not help.
  """
  leaves, treedef = jax.tree.flatten(tree)
  by_shape = {}
  for i, leaf in enumerate(leaves):
    by_shape.setdefault(leaf.shape, []).append(i)
  for shape, indices in by_shape.items():  # One sort per distinct shape.
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    values = jax.lax.sort((iota, *(leaves[i] for i in indices)), dimension=0,
                          num_keys=1)[1:]
    for i, value in zip(indices, values):
      leaves[i] = value
  return jax.tree.unflatten(treedef, leaves)


@functools.partial(
    jax.jit, static_argnames=('num', 'height', 'width', 'blur',
                              'crop_min_area', 'flip'))
def sample_views_params(rng: jax.Array, num: int, height: int, width: int,
                        color_strength: float = 1.0,
                        blur: bool = True,
                        crop_min_area: float = CROP_AREA_RANGE[0],
                        flip: bool = True) -> ViewParams:
  """Params for `num` views, one key per example: jax.random.split(rng, num)."""
  sample = functools.partial(sample_view_params, height=height, width=width,
                             color_strength=color_strength, blur=blur,
                             crop_min_area=crop_min_area, flip=flip)
  return _materialize(jax.vmap(sample)(jax.random.split(rng, num)))


@functools.partial(jax.jit, static_argnames=('size',))
def apply_views(images: jax.Array, params: ViewParams, size: int) -> jax.Array:
  """`apply_view` over a batch (N, H, W, 3) with batched params."""
  return jax.vmap(functools.partial(apply_view, size=size))(images, params)


def jax_views(rng: jax.Array, images: jax.Array, size: int = 224,
              color_strength: float = 1.0, blur: bool = True,
              crop_min_area: float = CROP_AREA_RANGE[0],
              flip: bool = True) -> jax.Array:
  """One SimCLR view per image: (N, H, W, 3) uint8/float -> (N, size, size, 3).

  One key per example (jax.random.split(rng, N)); call twice with different
  keys for the two views. Same distributions as augment_tf.tf_view.
  Not itself jitted: it calls two jitted halves (sample, apply) whose caches
  are then shared with direct callers, and it is inlined into any enclosing
  jit such as the train step. `color_strength` is traced (no recompiles).
  """
  n, height, width = images.shape[:3]
  params = sample_views_params(rng, n, height, width, color_strength, blur,
                               crop_min_area, flip)
  return apply_views(images, params, size)


@functools.partial(jax.jit, static_argnames=('size', 'crop_min_area', 'flip'))
def jax_finetune_views(rng: jax.Array, images: jax.Array, size: int,
                       crop_min_area: float = CROP_AREA_RANGE[0],
                       flip: bool = True) -> jax.Array:
  """Crop + flip only (reference fine-tuning / linear-eval preprocessing).

  `crop_min_area` and `flip` default to the reference's (0.08, flip); small
  images such as 8x8 digits lose their class to such crops and to mirroring,
  so their recipe sets gentler values (config.augment.finetune_*).
  """
  n, height, width = images.shape[:3]
  k_crop, k_flip = jax.random.split(rng)
  boxes = jax.vmap(lambda k: sample_crop_box(k, height, width,
                                             crop_min_area))(
      jax.random.split(k_crop, n))
  flips = jax.random.uniform(k_flip, (n,)) < (FLIP_PROB if flip else 0.0)
  boxes, flips = _materialize((boxes, flips))

  def one(image, box, flip):
    image = crop_and_resize(to_float(image), box, size)
    return jnp.clip(jnp.where(flip, image[:, ::-1], image), 0.0, 1.0)

  return jax.vmap(one)(images, boxes, flips)


def eval_crop_window(height: int, width: int,
                     size: int) -> tuple[int, int, int, int]:
  """(y, x, h, w) of the reference's eval centre crop (static ints).

  Reference center_crop with a square target: side = rint(0.875 * shorter
  side), offsets ((H - side) + 1) // 2; no crop when size <= 32.
  """
  if size <= EVAL_NO_CROP_MAX_SIZE:
    return 0, 0, height, width
  side = int(round(EVAL_CROP_PROPORTION * min(height, width)))  # Half-even.
  return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


@functools.partial(jax.jit, static_argnames=('size',))
def jax_eval(images: jax.Array, size: int) -> jax.Array:
  """Evaluation preprocessing: centre crop 0.875 + bicubic resize, in [0, 1]."""
  _, height, width, channels = images.shape
  y, x, h, w = eval_crop_window(height, width, size)
  images = to_float(images)[:, y:y + h, x:x + w]
  if (h, w) != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, channels),
                              method='cubic', antialias=False)
  return jnp.clip(images, 0.0, 1.0)
