"""`python -m simclr_jax.benchmark`: the benchmark's stable command name.

The benchmark lives in simclr_jax/tools/benchmark.py; this entry point keeps
the documented command short.
"""

from simclr_jax.tools import benchmark

if __name__ == '__main__':
  benchmark.run()
