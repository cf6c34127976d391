"""simclr_jax: SimCLR v1/v2 and its contrastive family in JAX/Flax."""

__version__ = '0.1.0'
