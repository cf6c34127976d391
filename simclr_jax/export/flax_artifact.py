"""A self-contained Flax artifact: variables as msgpack, model as JSON.

Layout of an artifact directory:
  model.json          {"format": ...,
                       "encoder_name": the kind of encoder
                           (models/encoders.py; 'resnet' when absent, as
                           in artifacts written before there were others),
                       "encoder": its module's kwargs (an older ResNet
                           artifact without maxpool_padding loads as
                           'torch', what every ResNet computed then),
                       "projection_head": ProjectionHead kwargs (plus
                           total_layers when a fine-tuning run kept only
                           the first layers) or null,
                       "source": where it came from}
  variables.msgpack   {"encoder": {"params", "batch_stats"},
                       "projection_head": {...}}   (float32)

msgpack (`flax.serialization`) rather than Orbax: the artifact is one small
fixed-layout file that needs no template to restore, carries no optimiser or
TrainState, round-trips bit for bit, and loads with nothing but flax and
numpy wherever the weights go next. Training checkpoints stay in Orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from simclr_jax.models import classifier
from simclr_jax.models import encoders
from simclr_jax.models import heads

FORMAT = 'simclr_jax.flax_artifact.v1'
MODEL_FILE = 'model.json'
VARIABLES_FILE = 'variables.msgpack'
_ENCODER_FIELDS = ('depth', 'width_multiplier', 'sk_ratio', 'cifar_stem')
# Encoder fields added later, with the value that reproduces what artifacts
# written before them compute.
_ENCODER_DEFAULTS = {'maxpool_padding': 'torch'}
_HEAD_FIELDS = ('num_layers', 'out_dim', 'total_layers')


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x, dtype=np.float32),
                      jax.device_get(tree))


def save(directory: str, encoder_config: Mapping[str, Any],
         encoder_variables: Mapping[str, Any],
         head_config: Mapping[str, Any] | None = None,
         head_variables: Mapping[str, Any] | None = None,
         source: Mapping[str, Any] | None = None,
         encoder_name: str = encoders.DEFAULT) -> dict[str, str]:
  """Writes an artifact; returns {'model_json': path, 'variables': path}.

  `encoder_config` holds the fields of the `encoder_name` module
  (`encoders.encoder_kwargs`; for a ResNet depth, width_multiplier,
  sk_ratio, cifar_stem and optionally maxpool_padding, 'torch' if absent);
  `head_config` `models.ProjectionHead` fields
  (num_layers, out_dim), plus total_layers for the first layers of a longer
  head (a fine-tuning run's). Both head arguments None leave the head out.
  """
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  tree = {'encoder': _to_numpy(dict(encoder_variables))}
  if head_variables is not None:
    tree['projection_head'] = _to_numpy(dict(head_variables))
  meta = {
      'format': FORMAT,
      'encoder_name': encoder_name,
      'encoder': (dict({k: encoder_config[k] for k in _ENCODER_FIELDS},
                       **{k: encoder_config.get(k, v)
                          for k, v in _ENCODER_DEFAULTS.items()})
                  if encoder_name == 'resnet' else dict(encoder_config)),
      'projection_head': ({k: head_config[k] for k in _HEAD_FIELDS
                           if k in head_config}
                          if head_variables is not None else None),
      'source': dict(source or {}),
  }
  model_path = os.path.join(directory, MODEL_FILE)
  variables_path = os.path.join(directory, VARIABLES_FILE)
  epath.Path(variables_path).write_bytes(flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, tree)))
  with epath.Path(model_path).open('w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return {'model_json': model_path, 'variables': variables_path}


def _resolve(path: str) -> str:
  """Accepts the artifact directory, its model.json, or the export workdir."""
  if epath.Path(path).is_file():
    path = os.path.dirname(path)
  for candidate in (path, os.path.join(path, 'flax')):
    if epath.Path(candidate, MODEL_FILE).exists():
      return candidate
  raise FileNotFoundError(
      f'{path} holds no {MODEL_FILE}: pass the directory written by '
      '`--mode=export` (or its flax/ subdirectory)')


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns (model.json contents, variable tree as numpy arrays)."""
  directory = _resolve(path)
  with epath.Path(directory, MODEL_FILE).open() as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{directory} is not a {FORMAT} artifact '
                     f'(format={meta.get("format")!r})')
  tree = flax.serialization.msgpack_restore(
      epath.Path(directory, VARIABLES_FILE).read_bytes())
  return meta, tree


def load_encoder(path: str, dtype: Any = jnp.float32
                 ) -> tuple[Any, dict[str, Any]]:
  """One call from an exported artifact to a usable encoder.

  Returns (module, variables): `module.apply(variables, x, train=False)`
  gives the (N, C) pooled features. `dtype` sets the compute dtype (e.g.
  bfloat16); the stored parameters are float32.
  """
  meta, tree = load(path)
  name = meta.get('encoder_name', encoders.DEFAULT)
  kwargs = meta['encoder']
  if name == 'resnet':
    kwargs = dict(_ENCODER_DEFAULTS, **kwargs)
  return encoders.from_kwargs(name, kwargs, dtype=dtype), tree['encoder']


def load_projection_head(path: str, dtype: Any = jnp.float32
                         ) -> tuple[Any, dict[str, Any]]:
  """(module, variables) of the exported projection head g(.).

  A pretraining run's full head is a `models.ProjectionHead`, whose apply
  returns (z, hiddens). A fine-tuning run keeps only the first layers of
  it; those come back as `models.classifier.HeadLayers`, whose apply
  returns the output of the last kept layer (the classifier's input).
  """
  meta, tree = load(path)
  config = meta['projection_head']
  if config is None:
    raise ValueError(f'the artifact at {path} was exported without its '
                     'projection head (export.include_head=False)')
  if 'total_layers' in config:
    module = classifier.HeadLayers(**config, dtype=dtype)
  else:
    module = heads.ProjectionHead(**config, dtype=dtype)
  return module, tree['projection_head']
