"""Seeded, class-balanced subsets of a labelled split.

Both the few-shot probes (evaluation) and the label fractions of fine-tuning
(data.labelled) draw their examples here, so a subset is defined once and the
same seed always gives the same rows.
"""

import numpy as np


def fewshot_indices(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Exactly `shots` examples of every class, drawn without replacement.

  Returns sorted indices into `labels`. The same (labels, shots, seed) always
  gives the same draw, so few-shot numbers are reproducible across runs and
  comparable between the pretrained and the random-init encoder.
  """
  labels = np.asarray(labels)
  if shots < 1:
    raise ValueError(f'shots must be >= 1, got {shots}')
  rng = np.random.default_rng(seed)
  picked = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    if members.size < shots:
      raise ValueError(f'class {cls} has {members.size} examples, fewer than '
                       f'shots={shots}')
    picked.append(rng.choice(members, size=shots, replace=False))
  return np.sort(np.concatenate(picked))


def stratified_fraction(labels: np.ndarray, fraction: float,
                        seed: int) -> np.ndarray:
  """Seeded, class-stratified subset holding `fraction` of the examples.

  For datasets without official label subsets (ImageNet has TFDS 1pct/10pct),
  semi-supervised fine-tuning uses this (Chen et al. 2020b, SimCLRv2, Section 4). Every class keeps
  round(fraction * count) examples, at least one, so each class's share
  matches the full set and no class disappears at small fractions.

  Args:
    labels: (n,) integer labels.
    fraction: share of examples to keep, in (0, 1].
    seed: the same seed gives the same subset.

  Returns:
    Sorted, duplicate-free int64 indices into `labels`.
  """
  if not 0.0 < fraction <= 1.0:  # Also rejects NaN.
    raise ValueError(f'fraction must be in (0, 1], got {fraction}')
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
  rng = np.random.default_rng(seed)
  picked = []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    # floor(x + 0.5), not np.round: banker's rounding would make the count
    # depend on the parity of the neighbouring integer.
    count = max(1, int(np.floor(fraction * members.size + 0.5)))
    picked.append(rng.choice(members, size=min(count, members.size),
                             replace=False))
  return np.sort(np.concatenate(picked)).astype(np.int64)
