r"""DeepCluster (k-means pseudo-labels of the train split, a classifier on h).

  python -m simclr_jax.main --config=configs/methods/deepcluster.py:digits \
      --workdir=/tmp/deepcluster_digits
  python -m simclr_jax.main --config=configs/methods/deepcluster.py:cifar10 \
      --workdir=DIR --config.dataset.data_dir=TFDS_DIR

DeepCluster holds a pseudo-label per image of the train split, so the
CIFAR-10 variant reads the split into host memory by row id
(`dataset.in_memory`, about 150 MB) instead of streaming it.

Digits: 100 clusters (10 per class) of PCA-32 whitened features, re-clustered
every 3 epochs (15 steps: a digits epoch is 5 steps, the paper's ImageNet
epoch 5000), classifier SGD at lr 0.5. CIFAR-10: 100 clusters, PCA 128,
re-clustered every epoch, classifier lr 0.05 as in the paper. Everything
else (model, optimiser, schedule, augmentation, evaluation) is the SimCLR
recipe of the dataset, so methods compare at equal budget.
"""

import os

from simclr_jax.config import defaults


def get_config(dataset: str = 'digits'):
  c = defaults.dataset_recipe(
      dataset, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  c.method = 'deepcluster'
  d = c.deepcluster
  d.num_clusters = 100
  d.kmeans_iterations = 20
  if dataset == 'digits':
    d.pca_dim = 32
    d.recluster_every_epochs = 3.0
    d.head_learning_rate = 0.5
  else:
    c.dataset.in_memory = True
    d.pca_dim = 128
    d.recluster_every_epochs = 1.0
    d.head_learning_rate = 0.05
  return c
