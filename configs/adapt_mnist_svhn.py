r"""Domain adaptation MNIST -> SVHN (and back), the classic digit pair.

  python -m simclr_jax.main --config=configs/adapt_mnist_svhn.py \
      --workdir=RUN --mode=adapt --config.adapt.method=dann \
      --config.dataset.data_dir=DIR
  # SVHN -> MNIST:
  ... --config.dataset.name=svhn_cropped --config.adapt.target=mnist

Labelled MNIST (grey, read as RGB, resized to 32 px) and unlabelled SVHN
train images in every batch; SVHN's test split measures the adaptation.
Needs both prepared in DIR (`tfds build mnist svhn_cropped --data_dir=DIR`).
A ResNet-18 with the CIFAR stem, 128 images per domain per step, 30 epochs
of MNIST. The contrastive methods need both domains in memory as one
pretraining set, which only the embedded data provides; for this pair,
pretrain on SVHN and MNIST yourself and pass --config.init_from=THAT_RUN
with source_only, dann, coral or mmd.
"""

from simclr_jax.config import defaults


def get_config():
  c = defaults.base_config()
  c.dataset.name = 'mnist'
  c.dataset.image_size = 32
  c.dataset.raw_size = 32
  c.model.depth = 18
  c.model.width_multiplier = 1
  c.model.stem = 'cifar'
  c.augment.finetune_crop_min_area = 0.5
  c.augment.finetune_flip = False  # Mirrored digits are other symbols.
  c.adapt.update(dict(method='dann', target='svhn_cropped',
                      target_train_split='train', target_eval_split='test',
                      epochs=30.0, batch_size=128, learning_rate=0.1,
                      lr_scaling='linear', weight=1.0))
  c.eval.batch_size = 1000
  return c
