"""`python -m simclr_jax.study`: scaling studies (simclr_jax/tools/study.py)."""

from simclr_jax.tools import study

if __name__ == '__main__':
  study.run()
