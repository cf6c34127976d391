"""Encoders and heads: ResNet (v1/v2, SK), projection and linear heads."""

from simclr_jax.models.heads import LinearHead
from simclr_jax.models.heads import ProjectionHead
from simclr_jax.models.resnet import ResNet
from simclr_jax.models.simclr import build_model
from simclr_jax.models.simclr import SimCLRModel

__all__ = [
    'LinearHead', 'ProjectionHead', 'ResNet', 'SimCLRModel', 'build_model'
]
