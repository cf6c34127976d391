"""simclr_jax: SimCLR v1/v2 and its contrastive family in JAX/Flax."""

from simclr_jax.runtime import cpu_threads as _cpu_threads

# Before anything creates JAX's CPU client: see runtime/cpu_threads.py.
_cpu_threads.reserve()

__version__ = '0.1.0'
