"""`python -m simclr_jax.prepare_data`: an image folder as TFRecords
(simclr_jax/tools/prepare_data.py)."""

from simclr_jax.tools import prepare_data

if __name__ == '__main__':
  prepare_data.run()
