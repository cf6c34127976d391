"""`digits_m`: the embedded digits blended over coloured textures.

A domain-shifted twin of `digits` in the spirit of MNIST-M (Ganin & Lempitsky
2015, Section 5: MNIST digits blended over patches of colour photos), built
offline and deterministically so that domain adaptation can be measured on a
machine with no data: each image i of a split gets its own texture, a sum of
two smooth coloured gratings over a random dark-to-mid base colour (seeded
by (split, i)), and the digit is blended in as |texture - digit| per
channel, so strokes invert the texture's colour as in MNIST-M.

Same digits, same train/test split and labels as `digits`: image i of
digits_m 'test' is image i of digits 'test' on a texture. The labels of the
training split are for evaluation and probes only; `--mode=adapt` never
reads them (downstream/adapt.py).

NumPy only, like digits.py: on the TensorFlow-free path.
"""

import functools

import numpy as np

from simclr_jax.data import digits

_SPLIT_IDS = {'train': 0, 'test': 1}
_GRATINGS = 2
_AMPLITUDE = 0.2
MAX_LEVEL = 0.6


def textures(num: int, size: int, split_id: int) -> np.ndarray:
  """float (num, size, size, 3) in [0, MAX_LEVEL]: one seeded texture each.

  A random base colour plus two smooth coloured gratings (0.5 to 2.5
  cycles across the image), clipped below MAX_LEVEL so that a stroke
  (1 - texture) stays lighter than its surround, as on most MNIST-M images.
  """
  out = np.empty((num, size, size, 3), np.float64)
  yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size,
                       indexing='ij')
  for i in range(num):
    rng = np.random.default_rng([0xD161, split_id, i])
    image = np.broadcast_to(rng.uniform(0.0, MAX_LEVEL, 3),
                            (size, size, 3)).copy()
    for _ in range(_GRATINGS):
      cycles = rng.uniform(0.5, 2.5)
      angle, phase = rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
      wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle)
                                          * yy) + phase)
      image += _AMPLITUDE * wave[..., None] * rng.uniform(-1.0, 1.0, 3)
    out[i] = np.clip(image, 0.0, MAX_LEVEL)
  return out


@functools.lru_cache(maxsize=2)
def load_digits_m(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (N, 32, 32, 3), int32 (N,)) of a digits_m split ('train'/'test').

  Read-only and cached for the process, like digits.load_digits.
  """
  images, labels = digits.load_digits(split)  # Raises for unknown splits.
  ink = images.astype(np.float64) / 255.0
  tex = textures(len(labels), images.shape[1], _SPLIT_IDS[split])
  out = np.clip(np.round(np.abs(tex - ink) * 255.0), 0, 255).astype(np.uint8)
  out.setflags(write=False)
  return out, labels
