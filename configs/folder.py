r"""SimCLR on your own images: a folder, or any TFDS image dataset.

  python -m simclr_jax.main --config=configs/folder.py --workdir=RUN \
      --config.dataset.folder=/path/to/images

The folder holds one subfolder per class (labels, used only by the probes)
or just images (unlabelled: pretraining runs and the probes are skipped);
docs/your_images.md has the layout, the TFRecord preparation for large
folders and pods, and how to probe on another, labelled dataset.

A starting point for photos of a few thousand to a few hundred thousand
images: 96 px views (STL-10's size; 2-3x faster than 224 px) on a
ResNet-18 with the ImageNet stem, the full SimCLR augmentation including
blur, LARS at 0.3 x B/256 and temperature 0.2 for a batch of 512 (the
paper's settings for smaller batches and shorter runs, Chen et al. 2020a,
Section 5 and B.9). A folder read directly keeps 110 px squares in host
memory (96 / 0.875: room for the crops); for images near 32 px start from
configs/cifar10_resnet18.py instead, with dataset.name='folder'.
"""

from simclr_jax.config import defaults


def get_config():
  c = defaults.base_config()
  c.dataset.name = 'folder'
  c.dataset.folder = ''  # --config.dataset.folder=PATH (or prepared DIR).
  c.dataset.image_size = 96
  c.dataset.raw_size = 110
  c.dataset.shuffle_buffer_multiplier = 10
  c.augment.color_strength = 1.0
  c.augment.blur = True
  c.model.depth = 18
  c.model.width_multiplier = 1
  c.model.stem = 'imagenet'
  c.loss.temperature = 0.2
  c.batch_size = 512
  c.num_epochs = 200
  c.optim.name = 'lars'
  c.optim.base_learning_rate = 0.3
  c.optim.lr_scaling = 'linear'
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10
  c.eval.knn_k = 20
  c.evals.knn.every_epochs = 20  # The kNN monitor.
  c.eval.monitor_max_examples = 10000
  return c
