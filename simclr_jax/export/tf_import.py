"""Import the SimCLR authors' TensorFlow checkpoints (v1 and v2).

Reads both layouts the reference code produced:
  * TF1 (`resnet.py`/`model_util.py`, the released SimCLRv1 checkpoints and
    the SimCLRv2 `gs://simclr-checkpoints/simclrv2/...` ones): variables are
    named by creation order, `base_model/conv2d_{n}/kernel` and
    `base_model/batch_normalization_{n}/{gamma,beta,moving_mean,
    moving_variance}`, heads `head_contrastive/nl_{j}/...` and
    `head_supervised/linear_layer/dense/{kernel,bias}`.
  * TF2 (`tf2/resnet.py`/`tf2/model.py`, object-based checkpoints): names
    follow the Keras attribute structure, e.g.
    `model/resnet_model/block_groups/0/layers/0/projection_layers/0/conv2d/
    kernel/.ATTRIBUTES/VARIABLE_VALUE`, `.../_projection_head/linear_layers/
    {j}/{dense,bn_relu/bn}/...`, `.../supervised_head/linear_layer/dense/...`.
  * TF2 SavedModels (the published `saved_model/` directories, written by
    `build_saved_model` in tf2/run.py: a tf.Module holding `model` and
    `trainable_variables_list`). Their `variables/variables` checkpoint keys
    every variable by the first path to it in a breadth-first walk of the
    object graph, which for most of them runs through a list of variables:
    `trainable_variables_list/{i}/...`, or Keras's SavedModel-only lists
    (`model/variables/{j}/...`) for the BN moving statistics. The names are
    recovered from the checkpoint's own object graph
    (`_CHECKPOINTABLE_OBJECT_GRAPH`), which stores every child edge: the
    attribute path to each such variable (`model/resnet_model/...`) is what
    the TF2 checkpoint stores (see `_attribute_names`).

Both are mapped through one description of the reference network
(`_encoder_slots`): for every conv and BN, in the order the reference creates
them, the Flax path it becomes and its TF2 attribute path. Depth, width,
stem and the SK ratio are inferred from names and shapes; every tensor is
checked against the shapes of this project's `SimCLRModel` built from the
inferred config, and a checkpoint variable left over (other than optimiser
slots and counters) is an error, so a misread checkpoint never loads silently.

The reference's ImageNet-stem max-pool is TF 'SAME', which pads 0 before and
1 after on an even feature map, where this project's ResNet pads (1, 1) like
torch by default. They agree on odd-sized stem outputs only; at 224 px (112
before the pool) torch's grid is shifted by one pixel, which moves released
ResNet-50 features by about 1%. The padding is not in the weights, so the
returned config sets maxpool_padding='tf' for ImageNet-stem checkpoints and
the imported model matches the reference at every input size. Such a model
has no exact torchvision counterpart: `to_torchvision` refuses it (see
export/torch_layout.py).
The reference feeds images in [0, 1] without normalisation, as this project.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.core
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.models import resnet
from simclr_jax.models import simclr

_BN_VARS = {'gamma': 'scale', 'beta': 'bias', 'moving_mean': 'mean',
            'moving_variance': 'var'}
_TF2_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
_TF1_CONV = re.compile(r'^(.*?)base_model/conv2d(?:_(\d+))?/kernel$')
_TF1_BN = re.compile(r'^(.*?)base_model/batch_normalization(?:_(\d+))?/'
                     r'(gamma|beta|moving_mean|moving_variance)$')
_IGNORED = re.compile(r'(global_step|save_counter|OPTIMIZER_SLOT|/Momentum$|'
                      r'ExponentialMovingAverage|^optimizer/|/optimizer/|'
                      r'_CHECKPOINTABLE_OBJECT_GRAPH)')


@dataclasses.dataclass(frozen=True)
class _Slot:
  kind: str  # 'conv' or 'bn'
  path: tuple[str, ...]  # Flax module path inside the encoder.
  tf2: str  # TF2 attribute path below the resnet_model prefix.


def _encoder_slots(depth: int, sk: bool, cifar_stem: bool) -> list[_Slot]:
  """Convs and BNs of the reference ResNet in TF1 creation order."""
  block, stage_sizes = resnet.STAGE_SIZES[depth]
  if block != 'bottleneck':
    raise ValueError(
        f'cannot import a TF ResNet-{depth}: the reference gives the first '
        'block of every group a projection shortcut, including stage 1 of '
        'ResNet-18/34, which this project\'s (torchvision-layout) ResNet does '
        'not have; only bottleneck depths (50, 101, 152, 200) map one-to-one')
  stem = 'initial_conv_relu_max_pool'
  slots = []
  if sk and not cifar_stem:  # ResNet-D deep stem; the CIFAR stem overrides it.
    slots += [_Slot('conv', ('conv_stem1',), f'{stem}/0/conv2d'),
              _Slot('bn', ('bn_stem1',), f'{stem}/1/bn'),
              _Slot('conv', ('conv_stem2',), f'{stem}/2/conv2d'),
              _Slot('bn', ('bn_stem2',), f'{stem}/3/bn'),
              _Slot('conv', ('conv_init',), f'{stem}/4/conv2d'),
              _Slot('bn', ('bn_init',), f'{stem}/6/bn')]
  else:
    slots += [_Slot('conv', ('conv_init',), f'{stem}/0/conv2d'),
              _Slot('bn', ('bn_init',), f'{stem}/2/bn')]
  for g, num_blocks in enumerate(stage_sizes):
    for b in range(num_blocks):
      name = f'stage{g + 1}_block{b}'
      tf2 = f'block_groups/{g}/layers/{b}'
      if b == 0:  # The reference creates the shortcut first.
        # ResNet-D shortcut layers: [FixedPadding if strided,] AvgPool, conv.
        k = (2 if g > 0 else 1) if sk else 0
        slots += [
            _Slot('conv', (name, 'proj_conv'),
                  f'{tf2}/projection_layers/{k}/conv2d'),
            _Slot('bn', (name, 'proj_bn'),
                  f'{tf2}/projection_layers/{k + 1}/bn')]
      main = f'{tf2}/conv_relu_dropblock_layers'
      slots += [_Slot('conv', (name, 'conv1'), f'{main}/0/conv2d'),
                _Slot('bn', (name, 'bn1'), f'{main}/1/bn')]
      if sk:
        skp = f'{main}/3'
        slots += [
            _Slot('conv', (name, 'sk_conv', 'conv'),
                  f'{skp}/conv2d_fixed_padding/conv2d'),
            _Slot('bn', (name, 'sk_conv', 'bn'), f'{skp}/batch_norm_relu/bn'),
            _Slot('conv', (name, 'sk_conv', 'reduce_conv'), f'{skp}/conv2d_0'),
            _Slot('bn', (name, 'sk_conv', 'reduce_bn'),
                  f'{skp}/batch_norm_relu_1/bn'),
            _Slot('conv', (name, 'sk_conv', 'expand_conv'), f'{skp}/conv2d_1'),
            _Slot('conv', (name, 'conv3'), f'{main}/5/conv2d'),
            _Slot('bn', (name, 'bn3'), f'{main}/6/bn')]
      else:
        slots += [_Slot('conv', (name, 'conv2'), f'{main}/3/conv2d'),
                  _Slot('bn', (name, 'bn2'), f'{main}/4/bn'),
                  _Slot('conv', (name, 'conv3'), f'{main}/6/conv2d'),
                  _Slot('bn', (name, 'bn3'), f'{main}/7/bn')]
  return slots


def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('import_tf_checkpoint needs TensorFlow to read the '
                      'checkpoint: pip install tensorflow-cpu') from e
  try:  # Reading a checkpoint needs no accelerator; keep TF off the GPUs.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass
  return tf


def _checkpoint_prefix(tf, path: str) -> str:
  """The variables prefix of a SavedModel directory; other paths unchanged."""
  path = path.rstrip('/')
  if any(tf.io.gfile.exists(f'{path}/saved_model.{ext}')
         for ext in ('pb', 'pbtxt')):
    return f'{path}/variables/variables'
  if tf.io.gfile.exists(f'{path}/variables.index'):  # saved_model/variables
    return f'{path}/variables'
  return path


def _attribute_names(graph_bytes: bytes) -> dict[str, str]:
  """Positional checkpoint keys -> attribute paths, from the object graph.

  A SavedModel's checkpoint keys each variable by the first path to it in a
  breadth-first walk from the root, and the SavedModel graph has extra edges
  that checkpoints lack: the authors' `trainable_variables_list` at the
  root, and Keras's `variables`, `trainable_variables`,
  `non_trainable_variables` lists and `layers` on every layer, which Keras
  lists before the attributes. So the stored key is e.g.
  `trainable_variables_list/7` or `model/variables/12`, and the position
  says nothing about which variable it is. The TrackableObjectGraph records
  every child edge by local name, so the same variable node is also reached
  through the model's attributes. This walks the graph breadth-first again
  without entering lists of variables (nodes whose children are all
  variables named by their positions) and, at each node, takes the `layers`
  edge last: Keras's `layers` holds the sublayers also reachable as
  attributes, but the reference's BlockGroup has an attribute `layers` of
  its own, so it cannot be skipped. The first path found is then the
  attribute path a `tf.train.Checkpoint(model=...)` stores.

  Only keys whose parent is a list of variables are renamed; keys that are
  attribute paths already (TF2 training checkpoints) are kept as stored.
  """
  # pylint: disable-next=g-import-not-at-top
  from tensorflow.core.protobuf import trackable_object_graph_pb2 as pb
  graph = pb.TrackableObjectGraph.FromString(graph_bytes)
  nodes = graph.nodes
  keys = {i: a.checkpoint_key for i, n in enumerate(nodes)
          for a in n.attributes if a.name == 'VARIABLE_VALUE'}

  def variable_list(i):
    children = nodes[i].children
    return bool(children) and all(
        c.local_name.isdigit() and c.node_id in keys for c in children)

  paths, queue = {0: ()}, [0]
  for i in queue:  # Breadth-first; the queue grows as it is read.
    children = sorted(nodes[i].children, key=lambda c: c.local_name == 'layers')
    for child in children:
      if child.node_id in paths or variable_list(child.node_id):
        continue
      paths[child.node_id] = paths[i] + (child.local_name,)
      queue.append(child.node_id)

  renamed = {}
  for i, key in keys.items():
    parts = key[:-len(_TF2_SUFFIX)].split('/') if key.endswith(
        _TF2_SUFFIX) else None
    if parts is None or i not in paths:
      continue
    node = 0  # Walk the stored key to its parent node.
    for part in parts[:-1]:
      node = next((c.node_id for c in nodes[node].children
                   if c.local_name == part), None)
      if node is None:
        break
    if node is not None and variable_list(node):
      renamed[key] = '/'.join(paths[i]) + _TF2_SUFFIX
  return renamed


class _Reader:
  """Checkpoint tensors by normalised name; tracks which were used."""

  def __init__(self, path: str):
    tf = _import_tf()
    reader = tf.train.load_checkpoint(_checkpoint_prefix(tf, path))
    self._reader = reader
    self.tf2 = any(_TF2_SUFFIX in n for n in reader.get_variable_to_shape_map())
    renamed = {}
    if self.tf2 and reader.has_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'):
      renamed = _attribute_names(
          reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._raw: dict[str, str] = {}
    for raw, shape in reader.get_variable_to_shape_map().items():
      stored, raw = raw, renamed.get(raw, raw)
      if _IGNORED.search(raw):
        continue
      name = raw[:-len(_TF2_SUFFIX)] if raw.endswith(_TF2_SUFFIX) else raw
      if self.tf2 and not raw.endswith(_TF2_SUFFIX):
        continue  # Object-graph bookkeeping, not a variable.
      if name in self.shapes:
        raise ValueError(f'two checkpoint variables read as {name!r}')
      self.shapes[name] = tuple(shape)
      self._raw[name] = stored
    self.used: set[str] = set()

  def get(self, name: str) -> np.ndarray:
    if name not in self.shapes:
      raise ValueError(f'the checkpoint has no variable {name!r}')
    self.used.add(name)
    return np.asarray(self._reader.get_tensor(self._raw[name]), np.float32)

  def find(self, pattern: str) -> list[re.Match]:
    return [m for m in map(re.compile(pattern).search, sorted(self.shapes))
            if m]


def _tf1_slot_names(reader: _Reader, slots: list[_Slot]) -> dict[_Slot, str]:
  """TF1 names by creation order: the n-th conv slot is conv2d_{n}."""
  prefix = reader.find(_TF1_CONV.pattern)[0].group(1)
  names, counts = {}, {'conv': 0, 'bn': 0}
  for slot in slots:
    n = counts[slot.kind]
    counts[slot.kind] += 1
    base = 'conv2d' if slot.kind == 'conv' else 'batch_normalization'
    names[slot] = f'{prefix}base_model/{base}' + (f'_{n}' if n else '')
  return names


def _infer_tf1(reader: _Reader) -> tuple[int, bool, bool]:
  """(depth, sk, cifar_stem) from the creation-ordered conv shapes."""
  convs = sorted((int(m.group(2) or 0), reader.shapes[m.string])
                 for m in reader.find(_TF1_CONV.pattern))
  shapes = [s for _, s in convs]
  if not shapes:
    raise ValueError('no base_model/conv2d*/kernel variables: not a SimCLR '
                     'TF1 checkpoint')
  deep_stem = (len(shapes) > 1 and shapes[0][:2] == (3, 3) and
               shapes[1][:2] == (3, 3))
  cifar_stem = shapes[0][:2] == (3, 3) and not deep_stem
  stem_convs = 3 if deep_stem else 1
  num_bns = len({m.group(2) for m in reader.find(_TF1_BN.pattern)})
  for depth, (block, sizes) in resnet.STAGE_SIZES.items():
    for sk in (False, True):
      if deep_stem and not sk:
        continue
      per_block = (5 if sk else 3) if block == 'bottleneck' else 2
      if stem_convs + 4 + per_block * sum(sizes) == len(shapes):
        bns = stem_convs + 4 + (4 if sk else 3 if block == 'bottleneck'
                                else 2) * sum(sizes)
        if bns == num_bns:
          return depth, sk, cifar_stem
  raise ValueError(f'{len(shapes)} convs and {num_bns} batch norms match no '
                   'reference ResNet depth')


def _infer_tf2(reader: _Reader, prefix: str) -> tuple[int, bool, bool]:
  stem_convs = {int(m.group(1)) for m in reader.find(
      re.escape(prefix) + r'initial_conv_relu_max_pool/(\d+)/conv2d/kernel$')}
  sizes = [0, 0, 0, 0]
  for m in reader.find(re.escape(prefix) + r'block_groups/(\d)/layers/(\d+)/'):
    g, b = int(m.group(1)), int(m.group(2))
    sizes[g] = max(sizes[g], b + 1)
  basic = bool(reader.find(
      re.escape(prefix) + r'block_groups/.*conv2d_bn_layers'))
  block = 'basic' if basic else 'bottleneck'
  depth = next((d for d, (bt, s) in resnet.STAGE_SIZES.items()
                if bt == block and list(s) == sizes), None)
  if depth is None:
    raise ValueError(f'block groups of sizes {sizes} ({block}) match no '
                     'reference ResNet depth')
  sk = bool(reader.find(re.escape(prefix) + r'.*/conv2d_fixed_padding/conv2d'))
  deep = 4 in stem_convs
  kernel = reader.shapes[f'{prefix}initial_conv_relu_max_pool/0/conv2d/kernel']
  cifar_stem = not deep and kernel[:2] == (3, 3)
  return depth, sk, cifar_stem


def _infer_sk_ratio(slots: list[_Slot], names: dict[_Slot, str],
                    reader: _Reader) -> float:
  """A ratio giving every SK block its checkpoint's squeeze width.

  The reference squeezes to max(int(filters * ratio), 32); released models
  use 1/16, which at 1x width never exceeds the floor of 32, so the ratio is
  only observable on wide models. 1/16 is preferred whenever it fits.
  """
  dims = []
  for slot in slots:
    if slot.path[-1] == 'reduce_conv':
      _, _, filters, mid = reader.shapes[names[slot]]
      dims.append((filters, mid))  # Squeezes the f-channel stream sum.
  # nextafter: mid / f may land a rounding error below the exact ratio.
  candidates = [0.0625] + [r for f, mid in dims if mid > 32
                           for r in (mid / f, float(np.nextafter(mid / f, 2)))]
  for ratio in candidates:
    if all(max(int(f * ratio), 32) == mid for f, mid in dims):
      return ratio
  raise ValueError(f'no sk_ratio reproduces the SK squeeze widths {dims}')


def _head_names(reader: _Reader) -> tuple[list[dict[str, str]],
                                          dict[str, str] | None]:
  """Checkpoint names of the projection head layers and supervised head."""
  layers = []
  if reader.tf2:
    found = reader.find(
        r'^(.*projection_head/linear_layers/)(\d+)/dense/kernel$')
    for m in sorted(found, key=lambda m: int(m.group(2))):
      base = f'{m.group(1)}{m.group(2)}'
      layers.append({'dense': f'{base}/dense', 'bn': f'{base}/bn_relu/bn'})
    sup = reader.find(r'^(.*supervised_head/linear_layer/dense)/kernel$')
  else:
    found = reader.find(r'^(.*head_contrastive/n?l_)(\d+)/dense/kernel$')
    for m in sorted(found, key=lambda m: int(m.group(2))):
      base = f'{m.group(1)}{m.group(2)}'
      layers.append({'dense': f'{base}/dense',
                     'bn': f'{base}/batch_normalization'})
    sup = reader.find(r'^(.*head_supervised/linear_layer/dense)/kernel$')
  return layers, ({'dense': sup[0].group(1)} if sup else None)


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray,
         expected: Any, source: str) -> None:
  if tuple(value.shape) != tuple(expected.shape):
    raise ValueError(f'{source} has shape {value.shape}, this project\'s '
                     f'model expects {tuple(expected.shape)} at '
                     f'{"/".join(path)}')
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = value


def _load_bn(reader: _Reader, base: str, path: tuple[str, ...],
             variables: dict[str, Any], shapes: dict[str, Any]) -> None:
  """Copies one reference BN; a beta-less BN (center=False) has no 'bias'."""
  for tf_name, flax_name in _BN_VARS.items():
    name = f'{base}/{tf_name}'
    collection = 'batch_stats' if flax_name in ('mean', 'var') else 'params'
    expected = _lookup(shapes[collection], path + (flax_name,))
    if expected is None:
      if name in reader.shapes:
        raise ValueError(f'{name} has no place in this project\'s model')
      continue
    _set(variables[collection], path + (flax_name,), reader.get(name),
         expected, name)


def _lookup(tree, path):
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def import_tf_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads a SimCLR v1/v2 TensorFlow checkpoint into this project's model.

  Args:
    path: A checkpoint prefix (e.g. `.../r50_1x_sk1/model.ckpt-250228`, or a
      TF2 `ckpt-N`), a directory holding a `checkpoint` file, or a TF2
      SavedModel: its directory (e.g. the published `.../saved_model/`) or
      its `variables/variables` prefix.

  Returns:
    (model_config, variables): `models.SimCLRModel(**model_config)` is the
    network (depth, width_multiplier, sk_ratio, cifar_stem, maxpool_padding,
    num_proj_layers, proj_out_dim, num_classes, linear_head), and `variables`
    its
    {'params', 'batch_stats'} as float32 numpy arrays: 'encoder',
    'projection_head' and, when the checkpoint has a supervised head,
    'linear_head'. For `config.model` use stem='cifar' if cifar_stem else
    'imagenet', linear_eval_while_pretraining=linear_head and the same
    maxpool_padding: 'tf' for the ImageNet stem, so the reference's TF 'SAME'
    max-pool is reproduced ('torch' for the CIFAR stem, which has no max-pool).
    The supervised head goes to 'linear_head', which reads the encoder
    features h, as the reference does in pretraining (ft_proj_selector=0).
    SimCLRv2's fine-tuned checkpoints fed it the first projection layer
    instead (ft_proj_selector=1): apply those kernels to
    `out['head_hiddens'][1]`.

  Raises:
    ValueError: the checkpoint does not match a reference SimCLR network.
  """
  reader = _Reader(path)
  if reader.tf2:
    stems = reader.find(r'^(.*)initial_conv_relu_max_pool/0/conv2d/kernel$')
    if not stems:
      raise ValueError(f'{path}: no resnet initial_conv_relu_max_pool '
                       'variables: not a SimCLR TF2 checkpoint')
    prefix = stems[0].group(1)
    depth, sk, cifar_stem = _infer_tf2(reader, prefix)
    slots = _encoder_slots(depth, sk, cifar_stem)
    names = {s: prefix + s.tf2 for s in slots}
  else:
    depth, sk, cifar_stem = _infer_tf1(reader)
    slots = _encoder_slots(depth, sk, cifar_stem)
    names = _tf1_slot_names(reader, slots)
  conv_init = next(s for s in slots if s.path == ('conv_init',))
  width = reader.shapes[names[conv_init] + '/kernel'][-1] / 64
  sk_ratio = 0.0
  if sk:
    sk_ratio = _infer_sk_ratio(
        slots, {s: n + '/kernel' for s, n in names.items()}, reader)

  head_layers, sup = _head_names(reader)
  num_classes = reader.shapes[sup['dense'] + '/kernel'][-1] if sup else 1
  proj_out_dim = (reader.shapes[head_layers[-1]['dense'] + '/kernel'][-1]
                  if head_layers else 128)
  model_config = dict(
      depth=depth, width_multiplier=float(width), sk_ratio=float(sk_ratio),
      cifar_stem=bool(cifar_stem),
      # The reference pools with TF 'SAME' padding (see the module doc).
      maxpool_padding='torch' if cifar_stem else 'tf',
      num_proj_layers=len(head_layers),
      proj_out_dim=int(proj_out_dim), num_classes=int(num_classes),
      linear_head=sup is not None)
  model = simclr.SimCLRModel(**model_config)
  size = 32 if cifar_stem else 64
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                         train=False))
  shapes = flax.core.unfreeze(shapes)

  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for slot in slots:
    path = ('encoder',) + slot.path
    if slot.kind == 'conv':
      name = names[slot] + '/kernel'
      _set(variables['params'], path + ('kernel',), reader.get(name),
           _lookup(shapes['params'], path + ('kernel',)), name)
    else:
      _load_bn(reader, names[slot], path, variables, shapes)
  for i, layer in enumerate(head_layers, start=1):
    path = ('projection_head', f'dense{i}', 'kernel')
    name = layer['dense'] + '/kernel'
    _set(variables['params'], path, reader.get(name),
         _lookup(shapes['params'], path), name)
    _load_bn(reader, layer['bn'], ('projection_head', f'bn{i}'), variables,
             shapes)
  if sup:
    for leaf in ('kernel', 'bias'):
      path = ('linear_head', 'dense', leaf)
      name = f'{sup["dense"]}/{leaf}'
      _set(variables['params'], path, reader.get(name),
           _lookup(shapes['params'], path), name)

  expected = {jax.tree_util.keystr(p) for p, _ in
              jax.tree_util.tree_leaves_with_path(shapes)}
  got = {jax.tree_util.keystr(p) for p, _ in
         jax.tree_util.tree_leaves_with_path(variables)}
  if expected != got:
    raise ValueError('the checkpoint left parts of the model unset: '
                     f'{sorted(expected - got)[:5]}')
  unused = sorted(set(reader.shapes) - reader.used)
  if unused:
    raise ValueError(f'{len(unused)} checkpoint variables have no place in '
                     f'the inferred model, e.g. {unused[:3]}')
  return model_config, variables
