"""Encoders and heads: ResNet (v1/v2, SK), ViT, projection and linear heads."""

from simclr_jax.models.heads import LinearHead
from simclr_jax.models.heads import ProjectionHead
from simclr_jax.models.resnet import ResNet
from simclr_jax.models.simclr import build_model
from simclr_jax.models.simclr import SimCLRModel
from simclr_jax.models.vit import ViT

__all__ = [
    'LinearHead', 'ProjectionHead', 'ResNet', 'SimCLRModel', 'ViT',
    'build_model'
]
