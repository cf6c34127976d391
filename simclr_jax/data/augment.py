"""SimCLR augmentation (docs/algorithms.md), for tf.data and on-device JAX.

Per view, in the reference's order: convert to float in [0, 1]; random
crop (sample_distorted_bounding_box, area 0.08-1, aspect 3/4-4/3, min object
covered 0.1, 100 attempts) resized to size x size with bicubic; horizontal
flip p=0.5; colour jitter p=0.8 (brightness, contrast, saturation, hue in a
random order) then grayscale p=0.2; clip; Gaussian blur p=0.5; clip.

  augment.tf_view(image, size=224, color_strength=1.0, blur=True, seed=None)
  augment.jax_views(rng, images, size=224, color_strength=1.0, blur=True)

`crop_min_area` and `flip` (both functions) default to the reference's.

The tf_* functions import TensorFlow on first call only, so the package (and
the JAX path) work where TensorFlow is not installed.
"""

from typing import Any

from simclr_jax.data.augment_jax import BlurParams
from simclr_jax.data.augment_jax import ColorParams
from simclr_jax.data.augment_jax import CROP_AREA_RANGE
from simclr_jax.data.augment_jax import CropBox
from simclr_jax.data.augment_jax import jax_eval
from simclr_jax.data.augment_jax import jax_finetune_views
from simclr_jax.data.augment_jax import jax_views
from simclr_jax.data.augment_jax import ViewParams

__all__ = [
    'BlurParams', 'ColorParams', 'CropBox', 'ViewParams', 'jax_eval',
    'jax_finetune_views', 'jax_views', 'resize_centre_crop', 'tf_eval',
    'tf_finetune_view', 'tf_view'
]


def _tf_backend():
  from simclr_jax.data import augment_tf  # pylint: disable=g-import-not-at-top
  return augment_tf


def tf_view(image: Any, size: int = 224, color_strength: float = 1.0,
            blur: bool = True, seed: Any = None,
            crop_min_area: float = CROP_AREA_RANGE[0],
            flip: bool = True) -> Any:
  """One SimCLR view of one image, as a tf.Tensor.

  Args:
    image: (H, W, 3) uint8, or float in [0, 1]; any H, W.
    size: output side.
    color_strength: colour-jitter strength s (1.0 ImageNet, 0.5 CIFAR).
    blur: whether to apply the p=0.5 Gaussian blur (ImageNet recipe).
    seed: optional shape-[2] int tensor for stateless ops (deterministic
      pipelines pass one); None draws one from tf.random.
    crop_min_area: smallest crop area fraction (reference 0.08).
    flip: whether to mirror with p=0.5 (reference True).

  Returns:
    float32 (size, size, 3) in [0, 1].
  """
  return _tf_backend().tf_view(image, size, color_strength, blur, seed,
                               crop_min_area, flip)


def tf_eval(image: Any, size: int) -> Any:
  """Eval preprocessing: centre crop 0.875 + bicubic; no crop if size <= 32."""
  return _tf_backend().tf_eval(image, size)


def tf_finetune_view(image: Any, size: int, seed: Any = None,
                     crop_min_area: float = 0.08, flip: bool = True) -> Any:
  """Crop + flip only, for fine-tuning and linear evaluation."""
  return _tf_backend().tf_finetune_view(image, size, seed, crop_min_area,
                                        flip)


def resize_centre_crop(image: Any, size: int) -> Any:
  """uint8 (size, size, 3): shorter side to `size`, centre square kept."""
  return _tf_backend().resize_centre_crop(image, size)
