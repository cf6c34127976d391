"""The contrastive family on one trainer: `config.method` picks the method.

See methods/base.py for the interface. Each method has a digits and a
CIFAR-10 recipe under configs/ (configs/methods/).
"""

from simclr_jax.methods.base import HostContext
from simclr_jax.methods.base import LossOutput
from simclr_jax.methods.base import Method
from simclr_jax.methods.base import StepBatch
from simclr_jax.methods.contrastive import ContrastiveMargin
from simclr_jax.methods.contrastive import HardNegativeSimCLR
from simclr_jax.methods.contrastive import SimCLR
from simclr_jax.methods.contrastive import SupCon
from simclr_jax.methods.contrastive import Triplet
from simclr_jax.methods.deepcluster import DeepCluster
from simclr_jax.methods.instdisc import InstDisc
from simclr_jax.methods.invaspread import InvaSpread
from simclr_jax.methods.momentum import BYOL
from simclr_jax.methods.momentum import MoCoV2
from simclr_jax.methods.momentum import MoCoV3
from simclr_jax.methods.swav import SwAV

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (SimCLR, HardNegativeSimCLR, SupCon, Triplet,
                        ContrastiveMargin, MoCoV2, MoCoV3, BYOL, SwAV,
                        InstDisc, InvaSpread, DeepCluster)
}


def method_class(config) -> type[Method]:
  """The class `config.method` names; an unknown name fails with the choices."""
  if config.method not in METHODS:
    raise ValueError(f'method={config.method!r} is not supported; choose one '
                     'of ' + ', '.join(sorted(METHODS)))
  return METHODS[config.method]


def resume_shape_fields(config) -> tuple[str, ...]:
  """Dotted config fields fixing the shapes of `config.method`'s state.

  A run cannot resume from a checkpoint made with other values of them (a
  queue's length, a predictor's width, the number of prototypes).
  """
  return method_class(config).resume_shape_fields


def make_method(config, *, mesh, total_steps: int,
                num_train_examples: int) -> Method:
  """The `config.method` object; unknown names fail with the allowed list."""
  cls = method_class(config)
  kw = dict(total_steps=total_steps, num_train_examples=num_train_examples)
  if cls is SimCLR:
    return cls(config, mesh=mesh, **kw)
  return cls(config, **kw)


__all__ = ['HostContext', 'LossOutput', 'METHODS', 'Method', 'StepBatch',
           'make_method', 'method_class', 'resume_shape_fields']
