"""`--mode=export`: turn a run's checkpoint into files other code can load.

Reads the run named by `config.init_from` (a pretraining or fine-tuning
--workdir) and writes into the export workdir:

  flax/model.json, flax/variables.msgpack   the Flax artifact
                                            (`export.load_encoder(workdir)`)
  resnet{depth}.safetensors                 torchvision ResNet state_dict
                                            (or resnet{depth}_cifar_stem...)
  timm_{model}.safetensors, timm.json       the encoder in timm's layout and
                                            the timm.create_model call that
                                            builds it (export/timm_layout.py)
  projection_head.safetensors               the head as a torch nn.Sequential

Config (`config.export`, see defaults.py): `include_head` (also export the
projection head) and `torchvision`: 'auto' writes the torchvision file when
the encoder has a torchvision counterpart and otherwise records why not in
results.json (so exporting the thin CPU models still yields the Flax
artifact), 'require' makes that a one-line error, 'off' skips it. An
ImageNet-stem encoder with model.maxpool_padding='tf' has no torchvision
counterpart: torchvision's max-pool pads (1, 1).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from simclr_jax.runtime import checkpointing
from simclr_jax.runtime import paths as paths_lib  # `paths` is a local name below.
from simclr_jax.export import flax_artifact
from simclr_jax.export import timm_layout
from simclr_jax.export import torch_layout
from simclr_jax.models import encoders
from simclr_jax.models import heads

TORCHVISION_MODES = ('auto', 'require', 'off')


def _export_options(config: ml_collections.ConfigDict) -> tuple[bool, str]:
  export = config.get('export') or {}
  include_head = bool(export.get('include_head', True))
  mode = export.get('torchvision', 'auto')
  if mode not in TORCHVISION_MODES:
    raise ValueError(f'config.export.torchvision={mode!r} is not supported; '
                     f'choose one of {", ".join(TORCHVISION_MODES)}')
  return include_head, mode


def save_safetensors(path: str, tensors: dict[str, Any],
                     metadata: dict[str, str]) -> str:
  """Writes numpy tensors with `safetensors.numpy` (no torch needed).

  `save_file` writes local files only: a remote `path` (gs://...) is written
  to a local temporary file first and then copied.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if paths_lib.is_local(path):
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o644)  # safetensors makes it owner-only; it is not secret.
    return path
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    save_file(tensors, local, metadata=metadata)
    epath.Path(local).copy(path, overwrite=True)
  return path


def run_export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Exports the run at `config.init_from`; returns paths and key counts."""
  if not config.init_from:
    raise ValueError('config.init_from is empty: set it to the --workdir of '
                     'the pretraining or fine-tuning run to export')
  include_head, tv_mode = _export_options(config)
  run_config, variables, step = checkpointing.load_run(config.init_from)
  m = run_config.model
  encoder_name = encoders.name_of(m)
  encoder_config = encoders.encoder_kwargs(m, run_config.dataset.image_size)
  encoder = torch_layout.split_variables(variables, 'encoder')
  head, head_config = None, None
  if include_head and variables['params'].get('projection_head'):
    head = torch_layout.split_variables(variables, 'projection_head')
    # A fine-tuning run keeps only the first ft_proj_selector layers.
    kept = heads.num_head_layers(head['params'])
    head_config = dict(num_layers=kept, out_dim=m.proj_out_dim,
                       **heads.head_settings(m))
    if kept < m.num_proj_layers:
      head_config['total_layers'] = m.num_proj_layers
  source = dict(init_from=paths_lib.abspath(config.init_from), step=int(step),
                method=run_config.get('method', 'simclr'))
  writer = jax.process_index() == 0
  if writer:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  results: dict[str, Any] = dict(init_from=source['init_from'],
                                 checkpoint_step=int(step))

  flax_dir = os.path.join(workdir, 'flax')
  if writer:
    paths = flax_artifact.save(flax_dir, encoder_config, encoder, head_config,
                               head, source, encoder_name=encoder_name)
    results.update(flax_model_json=paths['model_json'],
                   flax_variables=paths['variables'])
  results.update(
      flax_artifact=flax_dir,
      flax_num_arrays=len(jax.tree.leaves(encoder)) + len(
          jax.tree.leaves(head) if head is not None else []))

  results.update(torchvision_state_dict=None, torchvision_num_keys=0,
                 torchvision_skipped=None)
  if tv_mode != 'off' and encoder_name != 'resnet':
    reason = f'torchvision has no layout for a {encoder_name} encoder'
    if tv_mode == 'require':
      raise ValueError(reason + '; set export.torchvision=off')
    results['torchvision_skipped'] = reason
  elif tv_mode != 'off':
    try:
      state_dict = torch_layout.to_torchvision(
          encoder, allow_cifar_stem=True,
          maxpool_padding=encoder_config['maxpool_padding'])
    except ValueError as e:
      if tv_mode == 'require':
        raise
      logging.warning('No torchvision export: %s', e)
      results['torchvision_skipped'] = str(e)
    else:
      depth = encoder_config['depth']
      suffix = '_cifar_stem' if encoder_config['cifar_stem'] else ''
      path = os.path.join(workdir, f'resnet{depth}{suffix}.safetensors')
      meta = dict(format='torchvision.models.resnet', depth=str(depth),
                  stem='cifar' if suffix else 'imagenet')
      if suffix:
        results['torchvision_note'] = (
            'CIFAR stem: set model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, '
            'bias=False) and model.maxpool = nn.Identity() before loading')
      if writer:
        save_safetensors(path, state_dict, meta)
      results.update(torchvision_state_dict=path,
                     torchvision_num_keys=len(state_dict))

  results.update(timm_state_dict=None, timm_spec=None, timm_skipped=None)
  try:
    timm_dict, spec = timm_layout.to_timm(
        encoder_name, encoder_config, encoder, run_config.dataset.image_size)
  except ValueError as e:
    logging.warning('No timm export: %s', e)
    results['timm_skipped'] = str(e)
  else:
    path = os.path.join(workdir, f'timm_{spec["model_name"]}.safetensors')
    spec_path = os.path.join(workdir, 'timm.json')
    if writer:
      save_safetensors(path, timm_dict, dict(
          format='timm', timm_model=spec['model_name'],
          timm_kwargs=json.dumps(spec['kwargs'], sort_keys=True)))
      paths_lib.write_text_atomic(spec_path, json.dumps(
          dict(spec, state_dict=os.path.basename(path)), indent=2,
          sort_keys=True))
    results.update(timm_state_dict=path, timm_spec=spec_path,
                   timm_num_keys=len(timm_dict))

  results.update(projection_head_state_dict=None,
                 projection_head_num_keys=0)
  if head is not None:
    head_dict = torch_layout.projection_head_to_torch(head)
    path = os.path.join(workdir, 'projection_head.safetensors')
    meta = dict(format='torch.nn.Sequential(Linear, BatchNorm1d, ReLU, ...)',
                num_layers=str(head_config['num_layers']),
                total_layers=str(head_config.get(
                    'total_layers', head_config['num_layers'])),
                out_dim=str(head_config['out_dim']))
    if writer:
      save_safetensors(path, head_dict, meta)
    results.update(projection_head_state_dict=path,
                   projection_head_num_keys=len(head_dict))
  logging.info('Exported %s (step %d) to %s', config.init_from, step, workdir)
  return results
