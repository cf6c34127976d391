"""2-D pictures of a representation: PCA or t-SNE of features, by label.

A quick visual check of what pretraining learned: classes that the linear
probe separates should form visible clusters. matplotlib runs on the Agg
backend, so no display is needed (servers, CI).
"""

import io
import os

import numpy as np
from etils import epath

METHODS = ('pca', 'tsne')


def project_2d(features: np.ndarray, method: str = 'pca',
               seed: int = 0) -> np.ndarray:
  """(n, d) features -> (n, 2) coordinates.

  Features are L2-normalised first, as the kNN monitor and the contrastive
  loss see them (cosine geometry). t-SNE starts from the PCA layout with a
  fixed seed, so the picture is reproducible.
  """
  # pylint: disable=g-import-not-at-top
  from sklearn import decomposition
  from sklearn import manifold
  x = np.asarray(features, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  if method == 'pca':
    return decomposition.PCA(n_components=2, random_state=seed).fit_transform(x)
  if method == 'tsne':
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    return manifold.TSNE(n_components=2, init='pca', random_state=seed,
                         perplexity=perplexity).fit_transform(x)
  raise ValueError(f'embed.method={method!r} is not supported; choose one of '
                   f'{", ".join(METHODS)}')


def plot_embedding(points: np.ndarray, labels: np.ndarray, path: str,
                   title: str) -> str:
  """Writes a scatter plot of `points` coloured by label to `path` (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = np.asarray(labels)
  classes = np.unique(labels)
  cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20')
  fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
  for i, cls in enumerate(classes):
    sel = labels == cls
    ax.scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.8,
               color=cmap(i % cmap.N), label=str(cls))
  if len(classes) <= 20:
    ax.legend(markerscale=2, fontsize=7, loc='best', title='label')
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  return _save(fig, path)


def plot_domains(points: np.ndarray, labels: np.ndarray, domains: np.ndarray,
                 domain_names: list[str], path: str, title: str) -> str:
  """Two panels of the same points: coloured by domain, and by class (marker
  by domain), so aligned features show as mixed domains within classes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  labels, domains = np.asarray(labels), np.asarray(domains)
  fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), dpi=120)
  markers = 'o^sx'
  for d, name in enumerate(domain_names):
    sel = domains == d
    axes[0].scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.6,
                    label=name)
  classes = np.unique(labels)
  cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20')
  for i, cls in enumerate(classes):
    for d in range(len(domain_names)):
      sel = (labels == cls) & (domains == d)
      axes[1].scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.7,
                      color=cmap(i % cmap.N), marker=markers[d % 4],
                      label=str(cls) if d == 0 else None)
  axes[0].legend(markerscale=2, fontsize=7, title='domain')
  if len(classes) <= 20:
    axes[1].legend(markerscale=2, fontsize=7, title='label', ncol=2)
  axes[0].set_title('by domain', fontsize=9)
  axes[1].set_title('by class (marker: ' + ', '.join(
      f'{markers[d % 4]} {n}' for d, n in enumerate(domain_names)) + ')',
                    fontsize=9)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  """Writes and closes `fig`, through a buffer so `path` may be gs://."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or None)
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path
