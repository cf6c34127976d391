"""Which devices a run sees, and a refusal to train an accelerator recipe on CPU.

`pip install -e .` on a TPU VM or a GPU node installs CPU-only jaxlib, and a
run started that way trains on the hosts' CPUs at a thousandth of the
expected speed without saying so. So runs log the platform, device kind and
count, and an accelerator recipe (`config.requires_accelerator`, set by the
ImageNet-scale configs) or any run under an accelerator launch script
(which exports SIMCLR_JAX_REQUIRE_ACCELERATOR=1) stops with one line when
JAX sees only CPUs, unless `--allow_cpu` asks for it.
"""

import os

import jax
import ml_collections

ENV_VAR = 'SIMCLR_JAX_REQUIRE_ACCELERATOR'
INSTALL_HINT = ("install JAX for the accelerator with the project's extras: "
                "pip install -e '.[cuda]' on NVIDIA GPUs, pip install -e "
                "'.[tpu]' on a TPU VM")


class AcceleratorError(RuntimeError):
  pass


def describe() -> str:
  """E.g. '8 x NVIDIA H100 80GB HBM3 (gpu), 1 process'."""
  devices = jax.devices()
  processes = jax.process_count()
  return (f'{len(devices)} x {devices[0].device_kind} '
          f'({devices[0].platform}), {processes} '
          f'process{"es" if processes > 1 else ""}')


def check(config: ml_collections.ConfigDict, allow_cpu: bool = False
          ) -> None:
  """Raises AcceleratorError for an accelerator run that sees only CPUs."""
  if allow_cpu or jax.devices()[0].platform != 'cpu':
    return
  if config.get('requires_accelerator', False):
    why = 'this recipe sets config.requires_accelerator (ImageNet scale)'
  elif os.environ.get(ENV_VAR, '') == '1':
    why = f'an accelerator launch script set {ENV_VAR}=1'
  else:
    return
  raise AcceleratorError(
      f'{why}, but JAX sees only CPUs ({describe()}): {INSTALL_HINT}; or '
      'pass --allow_cpu to run on the CPUs anyway')
