"""Checkpoint export (Flax artifact, torchvision, timm) and import (SimCLR TF).

  export.run_export(config, workdir)         --mode=export
  export.load_encoder(path)                  -> (encoder module, variables)
  export.load_projection_head(path)          -> (ProjectionHead, variables)
  export.to_torchvision(variables)           -> torchvision state_dict (numpy)
  export.projection_head_to_torch(variables) -> nn.Sequential state_dict
  export.to_timm(name, kwargs, variables, image_size)
                                             -> (timm state_dict, create_model spec)
  export.import_tf_checkpoint(path)          -> (model config, variables)
"""

from simclr_jax.export.flax_artifact import load_encoder
from simclr_jax.export.flax_artifact import load_projection_head
from simclr_jax.export.run import run_export
from simclr_jax.export.tf_import import import_tf_checkpoint
from simclr_jax.export.timm_layout import to_timm
from simclr_jax.export.torch_layout import projection_head_to_torch
from simclr_jax.export.torch_layout import to_torchvision

__all__ = [
    'import_tf_checkpoint', 'load_encoder', 'load_projection_head',
    'projection_head_to_torch', 'run_export', 'to_timm', 'to_torchvision'
]
