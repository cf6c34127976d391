"""Export (Flax artifact, torchvision safetensors) and TF checkpoint import.

Big nets are only traced (jax.eval_shape); real forward passes use ResNet-18
and -50 at 64 px (torch comparison) or width 1/8 at 30/32 px (TF import), run
op by op without jit, which is cheaper than compiling them on a 2-core CPU.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.runtime import checkpointing
from simclr_jax.config import defaults
from simclr_jax import export
from simclr_jax import models
from simclr_jax.export import run as export_run
from simclr_jax.models import classifier

BN_EPS = 1e-5


# ----------------------------------------------------------------- helpers


def _abstract(module, size=64):
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(module.init, train=False),
                        jax.random.key(0), x)


def _random_variables(module, size=64, seed=0):
  """Random values for every variable, BN statistics included.

  `init` would zero the last BN gamma of every block (blocks start as the
  identity) and set mean 0 / var 1, which hides mapping mistakes; random
  values exercise every tensor and every transpose.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path[-1:])
    if 'var' in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if 'scale' in name:
      return rng.uniform(0.3, 0.8, s.shape).astype(np.float32)
    if 'mean' in name or 'bias' in name:
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = np.prod(s.shape[:-1])
    return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(
        np.float32)

  return jax.tree_util.tree_map_with_path(fill, _abstract(module, size))


def _expected_torchvision_shapes(depth):
  """torchvision.models.resnet{depth}'s state_dict shapes minus fc, by hand.

  Follows torchvision's ResNet._make_layer: inplanes starts at 64; a stage
  has planes = 64 * 2**i and `downsample` (1x1 conv + BN) on its first block
  when the stride is 2 or inplanes != planes * expansion.
  """
  stages = {18: ('basic', [2, 2, 2, 2]), 34: ('basic', [3, 4, 6, 3]),
            50: ('bottleneck', [3, 4, 6, 3]),
            101: ('bottleneck', [3, 4, 23, 3]),
            152: ('bottleneck', [3, 8, 36, 3])}[depth]
  block, sizes = stages
  expansion = 4 if block == 'bottleneck' else 1
  out = {}

  def bn(prefix, c):
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      out[f'{prefix}.{name}'] = (c,)
    out[f'{prefix}.num_batches_tracked'] = ()

  out['conv1.weight'] = (64, 3, 7, 7)
  bn('bn1', 64)
  inplanes = 64
  for i, n in enumerate(sizes):
    planes = 64 * 2**i
    for j in range(n):
      p = f'layer{i + 1}.{j}'
      stride = 2 if i > 0 and j == 0 else 1
      if block == 'basic':
        convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
      else:
        convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3),
                 (planes * 4, planes, 1, 1)]
      for k, shape in enumerate(convs, start=1):
        out[f'{p}.conv{k}.weight'] = shape
        bn(f'{p}.bn{k}', shape[0])
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        out[f'{p}.downsample.0.weight'] = (planes * expansion, inplanes, 1, 1)
        bn(f'{p}.downsample.1', planes * expansion)
      inplanes = planes * expansion
  return out


def _assert_close_to_scale(got, want, rel, what=''):
  """|got - want| <= rel * max|want| everywhere.

  Two float32 implementations that sum in different orders differ by a few
  rounding errors (eps = 1.2e-7) of the magnitudes they accumulate, i.e. by
  a few ulps of the output's scale, whatever the element's own size (a
  near-zero output of a BN or a pooled ReLU is a difference of large terms).
  """
  got, want = np.asarray(got), np.asarray(want)
  scale = float(np.max(np.abs(want)))
  diff = float(np.max(np.abs(got - want)))
  assert diff <= rel * scale, (
      f'{what}: max |diff| {diff:.2e} > {rel:.0e} * max |want| {scale:.2e} '
      f'(relative {diff / scale:.2e})')


# ------------------------------------------------------ torchvision layout


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_torchvision_keys_and_shapes_match_hand_written_list(depth):
  abstract = _abstract(models.ResNet(depth=depth))
  state_dict = export.to_torchvision(abstract)
  expected = _expected_torchvision_shapes(depth)
  assert sorted(state_dict) == sorted(expected)
  for key, shape in expected.items():
    assert tuple(state_dict[key].shape) == shape, key


@pytest.mark.parametrize('kwargs,why', [
    (dict(depth=18, width_multiplier=2), 'width_multiplier=2'),
    (dict(depth=50, sk_ratio=0.0625), 'selective-kernel'),
    (dict(depth=200), 'depth 200'),
    (dict(depth=18, cifar_stem=True), 'CIFAR stem'),
])
def test_torchvision_refuses_what_it_cannot_hold(kwargs, why):
  with pytest.raises(ValueError, match=why):
    export.to_torchvision(_abstract(models.ResNet(**kwargs)))


def test_torchvision_cifar_stem_on_request():
  abstract = _abstract(models.ResNet(depth=18, cifar_stem=True), 32)
  state_dict = export.to_torchvision(abstract, allow_cifar_stem=True)
  expected = _expected_torchvision_shapes(18)
  expected['conv1.weight'] = (64, 3, 3, 3)
  assert {k: tuple(v.shape) for k, v in state_dict.items()} == expected


def test_simclr_model_tree_and_head_layout():
  model = models.SimCLRModel(depth=18, width_multiplier=1, num_proj_layers=3,
                             proj_out_dim=16, num_classes=5)
  abstract = _abstract(model)
  assert sorted(export.to_torchvision(abstract)) == sorted(
      _expected_torchvision_shapes(18))
  head = export.projection_head_to_torch(_random_variables(model))
  # nn.Sequential(Linear, BN, ReLU, Linear, BN, ReLU, Linear, BN).
  assert head['0.weight'].shape == (512, 512)
  assert head['3.weight'].shape == (512, 512)
  assert head['6.weight'].shape == (16, 512)
  assert np.all(head['7.bias'] == 0)  # The last BN has no beta in SimCLR.
  assert len(head) == 3 + 3 * 5


# --------------------------------------- Flax artifact and run_export e2e


def _tiny_run_config():
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.augment.backend = 'jax'
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 16
  c.train_steps = 1
  c.optim.warmup_epochs = 0.0
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.evals.random_init.enabled = False
  return c


def _fake_run(workdir, config, model=None):
  """A run workdir as pretraining leaves it: config.json + Orbax checkpoint.

  The state is written with the project's Checkpointer in the layout of the
  TrainState (step, params, batch_stats, optimiser state) from random
  variables, instead of running `train.pretrain`: compiling a train step
  costs a minute on a shared 2-core CPU and adds nothing that export reads.
  (A real 2-step `train.pretrain` run was checked by hand to export the same
  way.)
  """
  os.makedirs(workdir, exist_ok=True)
  model = model or models.build_model(config, num_classes=10)
  variables = _random_variables(model, size=config.dataset.image_size)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  state = dict(step=np.int32(1), params=variables['params'],
               batch_stats=variables['batch_stats'],
               opt_state=jax.tree.map(np.zeros_like, variables['params']))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(1, state, {'step': 1}, force=True)
  ckpt.close()
  return workdir


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
  return _fake_run(str(tmp_path_factory.mktemp('pretrain')),
                   _tiny_run_config())


@pytest.mark.parametrize('size,name', [(64, 'resnet18.safetensors'),
                                       (32, 'resnet18_cifar_stem.safetensors')])
def test_run_export_writes_torchvision_file(size, name, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = _tiny_run_config()
  config.model.width_multiplier = 1.0
  config.dataset.image_size = size  # 'auto' stem: CIFAR at <= 32 px.
  run = _fake_run(str(tmp_path / 'run'), config)
  export_config = defaults.base_config()
  export_config.init_from = run
  results = export.run_export(export_config, str(tmp_path / 'out'))
  assert os.path.basename(results['torchvision_state_dict']) == name
  expected = _expected_torchvision_shapes(18)
  if size <= 32:
    expected['conv1.weight'] = (64, 3, 3, 3)
    assert 'nn.Identity()' in results['torchvision_note']
  loaded = load_file(results['torchvision_state_dict'])
  assert {k: v.shape for k, v in loaded.items()} == expected
  assert results['torchvision_num_keys'] == len(expected)


def test_run_export_round_trips_exactly(pretrained_run, tmp_path):
  config = defaults.base_config()
  config.init_from = pretrained_run
  results = export.run_export(config, str(tmp_path))
  assert results['checkpoint_step'] == 1
  assert results['torchvision_state_dict'] is None  # width 1/8: no torchvision
  assert 'width_multiplier=0.125' in results['torchvision_skipped']
  assert os.path.exists(results['projection_head_state_dict'])
  assert results['projection_head_num_keys'] == 2 * 6

  _, variables, _ = checkpointing.load_run(pretrained_run)
  module, loaded = export.load_encoder(str(tmp_path))
  assert (module.depth, module.width_multiplier, module.cifar_stem) == (
      18, 0.125, True)
  want = {'params': variables['params']['encoder'],
          'batch_stats': variables['batch_stats']['encoder']}
  jax.tree.map(np.testing.assert_array_equal, loaded, want)  # bitwise
  assert jax.tree.structure(loaded) == jax.tree.structure(
      jax.tree.map(np.asarray, want))

  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  model = models.build_model(_tiny_run_config(), num_classes=10)
  full = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(module.apply(loaded, x, train=False),
                                full['features'])
  head, head_vars = export.load_projection_head(str(tmp_path))
  z, _ = head.apply(head_vars, full['features'], train=False)
  np.testing.assert_array_equal(z, full['projection'])

  config.export.torchvision = 'require'
  with pytest.raises(ValueError, match='width_multiplier'):
    export.run_export(config, str(tmp_path / 'again'))


def test_run_export_of_a_fine_tuned_run_keeps_its_head_layers(tmp_path):
  config = _tiny_run_config()
  config.model.num_proj_layers = 3
  net = classifier.build_classifier(config, head_layers=1, num_classes=10)
  run = _fake_run(str(tmp_path / 'run'), config, net)
  export_config = defaults.base_config()
  export_config.init_from = run
  results = export.run_export(export_config, str(tmp_path / 'out'))
  assert results['projection_head_num_keys'] == 6  # One Linear + one BN.

  _, variables, _ = checkpointing.load_run(run)
  encoder, encoder_vars = export.load_encoder(str(tmp_path / 'out'))
  head, head_vars = export.load_projection_head(str(tmp_path / 'out'))
  assert isinstance(head, classifier.HeadLayers)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  h = head.apply(head_vars, encoder.apply(encoder_vars, x, train=False),
                 train=False)
  np.testing.assert_array_equal(
      h, net.apply(variables, x, train=False)['features'])


def test_run_export_without_head(pretrained_run, tmp_path):
  config = defaults.base_config()
  config.init_from = pretrained_run
  config.export.include_head = False
  results = export.run_export(config, str(tmp_path))
  assert results['projection_head_state_dict'] is None
  with pytest.raises(ValueError, match='without its projection head'):
    export.load_projection_head(str(tmp_path))


def test_run_export_keeps_tf_maxpool_padding(tmp_path):
  """maxpool_padding='tf' reaches the artifact and blocks torchvision."""
  config = _tiny_run_config()
  config.model.width_multiplier = 1.0
  config.dataset.image_size = 64  # ImageNet stem: the max-pool exists.
  config.model.maxpool_padding = 'tf'
  run = _fake_run(str(tmp_path / 'run'), config)
  export_config = defaults.base_config()
  export_config.init_from = run
  results = export.run_export(export_config, str(tmp_path / 'out'))
  assert results['torchvision_state_dict'] is None
  assert "maxpool_padding='tf'" in results['torchvision_skipped']
  module, loaded = export.load_encoder(str(tmp_path / 'out'))
  assert module.maxpool_padding == 'tf'
  _, variables, _ = checkpointing.load_run(run)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  np.testing.assert_array_equal(
      module.apply(loaded, x, train=False),
      models.build_model(config, num_classes=10).apply(
          variables, x, train=False)['features'])
  export_config.export.torchvision = 'require'
  with pytest.raises(ValueError, match='maxpool_padding'):
    export.run_export(export_config, str(tmp_path / 'again'))


def test_artifact_without_maxpool_padding_loads_as_torch(pretrained_run,
                                                         tmp_path):
  """model.json written before the field existed still loads."""
  config = defaults.base_config()
  config.init_from = pretrained_run
  export.run_export(config, str(tmp_path))
  model_json = tmp_path / 'flax' / 'model.json'
  meta = json.loads(model_json.read_text())
  assert meta['encoder']['maxpool_padding'] == 'torch'
  del meta['encoder']['maxpool_padding']
  model_json.write_text(json.dumps(meta))
  module, _ = export.load_encoder(str(tmp_path))
  assert module.maxpool_padding == 'torch'


def test_run_export_needs_init_from(tmp_path):
  with pytest.raises(ValueError, match='init_from'):
    export.run_export(defaults.base_config(), str(tmp_path))


# --------------------------------------------------- against torchvision
#
# torch runs in a subprocess: importing torch._dynamo (which torchvision does)
# after TensorFlow is loaded segfaults with torch 2.14 / TF 2.21, and other
# tests in this suite load TensorFlow first.

_TORCH_SCRIPT = r"""
import json, sys
import numpy as np
import torch, torchvision
from safetensors.torch import load_file
d = sys.argv[1]
report = {}
x = torch.from_numpy(np.load(f'{d}/x.npy').transpose(0, 3, 1, 2).copy())
for depth in (18, 50):
  net = getattr(torchvision.models, f'resnet{depth}')()
  result = net.load_state_dict(load_file(f'{d}/resnet{depth}.safetensors'),
                               strict=False)
  report[depth] = dict(missing=sorted(result.missing_keys),
                       unexpected=sorted(result.unexpected_keys))
  net.fc = torch.nn.Identity()
  net.eval()
  with torch.no_grad():
    np.save(f'{d}/features{depth}.npy', net(x).numpy())
nn = torch.nn
head = nn.Sequential(nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32),
                     nn.ReLU(), nn.Linear(32, 32, bias=False),
                     nn.BatchNorm1d(32), nn.ReLU(),
                     nn.Linear(32, 16, bias=False), nn.BatchNorm1d(16))
head.load_state_dict(load_file(f'{d}/projection_head.safetensors'))
head.eval()
with torch.no_grad():
  np.save(f'{d}/z.npy', head(torch.from_numpy(np.load(f'{d}/h.npy'))).numpy())
json.dump(report, open(f'{d}/report.json', 'w'))
"""


@pytest.fixture(scope='module')
def torch_outputs(tmp_path_factory):
  """Exports JAX models, runs them in torch; returns both sides."""
  # torch and torchvision are in the test extra: missing, the parity tests
  # fail rather than skip (found, not imported: see above).
  for name in ('torch', 'torchvision'):
    assert importlib.util.find_spec(name) is not None, (
        f"{name} is not installed: pip install -e '.[test]'")
  d = str(tmp_path_factory.mktemp('torch'))
  jax_side = {}
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  np.save(f'{d}/x.npy', x)
  for depth in (18, 50):
    module = models.ResNet(depth=depth)
    variables = _random_variables(module, seed=depth)
    export_run.save_safetensors(f'{d}/resnet{depth}.safetensors',
                                export.to_torchvision(variables), {})
    jax_side[depth] = np.asarray(module.apply(variables, x, train=False))

  head = models.ProjectionHead(num_layers=3, out_dim=16)
  h = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
  shapes = jax.eval_shape(functools.partial(head.init, train=False),
                          jax.random.key(0), h)
  rng = np.random.default_rng(2)
  head_vars = jax.tree.map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)
  np.save(f'{d}/h.npy', h)
  export_run.save_safetensors(f'{d}/projection_head.safetensors',
                              export.projection_head_to_torch(head_vars), {})
  jax_side['z'] = np.asarray(head.apply(head_vars, h, train=False)[0])

  subprocess.run([sys.executable, '-c', _TORCH_SCRIPT, d], check=True,
                 timeout=300)
  with open(f'{d}/report.json') as f:
    report = json.load(f)
  torch_side = {depth: np.load(f'{d}/features{depth}.npy')
                for depth in (18, 50)}
  torch_side['z'] = np.load(f'{d}/z.npy')
  return jax_side, torch_side, report


@pytest.mark.parametrize('depth', [18, 50])
def test_torchvision_features_match_jax(depth, torch_outputs):
  jax_side, torch_side, report = torch_outputs
  assert report[str(depth)] == dict(missing=['fc.bias', 'fc.weight'],
                                    unexpected=[])
  got, want = jax_side[depth], torch_side[depth]
  diff = np.max(np.abs(got - want))
  print(f'resnet{depth} torchvision vs JAX: max |diff| {diff:.2e}, '
        f'max |feature| {np.max(np.abs(want)):.2e}')
  # Checked: max |diff| <= 1e-6 * max |feature| of torchvision's output, a
  # few float32 ulps of the feature scale; the line above prints both.
  _assert_close_to_scale(got, want, 1e-6, f'resnet{depth}')


def test_projection_head_loads_into_torch_sequential(torch_outputs):
  jax_side, torch_side, _ = torch_outputs
  print('projection head torch vs JAX: max |diff| '
        f'{np.max(np.abs(jax_side["z"] - torch_side["z"])):.2e}, max |z| '
        f'{np.max(np.abs(torch_side["z"])):.2e}')
  # Checked: max |diff| <= 1e-6 * max |z| of torch's output.
  _assert_close_to_scale(jax_side['z'], torch_side['z'], 1e-6, 'z')


# ------------------------------------------- importing the authors' TF ckpts
#
# A minimal TensorFlow re-implementation of the reference forward pass
# (google-research/simclr resnet.py / model_util.py, inference mode), which
# creates its variables in the reference's order and names them either the
# TF1 way (base_model/conv2d_{n}, by creation order) or the TF2 way (Keras
# attribute paths of tf2/resnet.py and tf2/model.py).


class _RefVars:
  """Creates random variables with the reference's TF1 or TF2 names."""

  def __init__(self, tf2, seed=0):
    self.tf2 = tf2
    self.rng = np.random.default_rng(seed)
    self.tensors = {}
    self.count = {'conv': 0, 'bn': 0}

  def _put(self, tf1_name, tf2_name, value):
    if self.tf2:
      self.tensors[f'model/{tf2_name}/.ATTRIBUTES/VARIABLE_VALUE'] = value
    else:
      self.tensors[tf1_name] = value
    return value

  def _next(self, kind, base):
    n = self.count[kind]
    self.count[kind] += 1
    return f'base_model/{base}' + (f'_{n}' if n else '')

  def conv(self, k, cin, cout, tf2_path):
    w = (self.rng.standard_normal((k, k, cin, cout)) *
         np.sqrt(2.0 / (k * k * cin))).astype(np.float32)
    return self._put(self._next('conv', 'conv2d') + '/kernel',
                     f'resnet_model/{tf2_path}/kernel', w)

  def bn(self, c, tf2_path, center=True, tf1_base=None, tf2_base=None):
    tf1_base = tf1_base or self._next('bn', 'batch_normalization')
    tf2_base = tf2_base or f'resnet_model/{tf2_path}'
    values = dict(
        gamma=self.rng.uniform(0.3, 0.8, c),
        beta=0.1 * self.rng.standard_normal(c) if center else None,
        moving_mean=0.1 * self.rng.standard_normal(c),
        moving_variance=self.rng.uniform(0.5, 1.5, c))
    return {k: self._put(f'{tf1_base}/{k}', f'{tf2_base}/{k}',
                         v.astype(np.float32))
            for k, v in values.items() if v is not None}

  def dense(self, cin, cout, tf1_base, tf2_base, bias=False):
    w = (0.3 * self.rng.standard_normal((cin, cout))).astype(np.float32)
    out = {'kernel': self._put(f'{tf1_base}/kernel', f'{tf2_base}/kernel', w)}
    if bias:
      out['bias'] = self._put(f'{tf1_base}/bias', f'{tf2_base}/bias',
                              (0.1 * self.rng.standard_normal(cout)).astype(
                                  np.float32))
    return out

  def save(self, prefix, extras):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tensors = dict(self.tensors, **extras)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                      shape_and_slices=[''] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


def _tf_reference_forward(x, v, depth, width, sk_ratio, cifar_stem,
                          num_proj_layers, proj_out_dim, num_classes):
  """The reference network in inference mode; returns (h, z, logits)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sizes = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]

  def conv(x, k, cout, stride, path):
    w = v.conv(k, x.shape[-1], cout, path)
    if stride > 1:  # fixed_padding: (k-1)//2 before, the rest after.
      b = (k - 1) // 2
      x = tf.pad(x, [[0, 0], [b, k - 1 - b], [b, k - 1 - b], [0, 0]])
    return tf.nn.conv2d(x, w, stride, 'SAME' if stride == 1 else 'VALID')

  def bn(x, path, relu=True, center=True, **names):
    p = v.bn(x.shape[-1], path, center, **names)
    x = tf.nn.batch_normalization(x, p['moving_mean'], p['moving_variance'],
                                  p.get('beta'), p['gamma'], BN_EPS)
    return tf.nn.relu(x) if relu else x

  def sk_conv(x, f, stride, path):
    x = conv(x, 3, 2 * f, stride, f'{path}/conv2d_fixed_padding/conv2d')
    x = bn(x, f'{path}/batch_norm_relu/bn')
    x = tf.stack(tf.split(x, 2, axis=-1))
    g = tf.reduce_mean(tf.reduce_sum(x, 0), [1, 2], keepdims=True)
    g = conv(g, 1, max(int(f * sk_ratio), 32), 1, f'{path}/conv2d_0')
    g = bn(g, f'{path}/batch_norm_relu_1/bn')
    m = conv(g, 1, 2 * f, 1, f'{path}/conv2d_1')
    m = tf.nn.softmax(tf.stack(tf.split(m, 2, axis=-1)), axis=0)
    return tf.reduce_sum(x * m, 0)

  def bottleneck(x, f, stride, projection, path):
    shortcut = x
    if projection:  # Created first, as in the reference.
      pl = f'{path}/projection_layers'
      if sk_ratio > 0:  # ResNet-D: average pool, then a stride-1 1x1 conv.
        if stride > 1:
          s = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
          s = tf.nn.avg_pool2d(s, 2, stride, 'VALID')
        else:
          s = tf.nn.avg_pool2d(x, 2, 1, 'SAME')
        k = 2 if stride > 1 else 1
        s = conv(s, 1, 4 * f, 1, f'{pl}/{k}/conv2d')
        shortcut = bn(s, f'{pl}/{k + 1}/bn', relu=False)
      else:
        s = conv(x, 1, 4 * f, stride, f'{pl}/0/conv2d')
        shortcut = bn(s, f'{pl}/1/bn', relu=False)
    main = f'{path}/conv_relu_dropblock_layers'
    x = bn(conv(x, 1, f, 1, f'{main}/0/conv2d'), f'{main}/1/bn')
    if sk_ratio > 0:
      x = sk_conv(x, f, stride, f'{main}/3')
      x = bn(conv(x, 1, 4 * f, 1, f'{main}/5/conv2d'), f'{main}/6/bn',
             relu=False)
    else:
      x = bn(conv(x, 3, f, stride, f'{main}/3/conv2d'), f'{main}/4/bn')
      x = bn(conv(x, 1, 4 * f, 1, f'{main}/6/conv2d'), f'{main}/7/bn',
             relu=False)
    return tf.nn.relu(x + shortcut)

  w = lambda c: int(c * width)
  stem = 'initial_conv_relu_max_pool'
  x = tf.constant(x)
  if cifar_stem:
    x = bn(conv(x, 3, w(64), 1, f'{stem}/0/conv2d'), f'{stem}/2/bn')
  else:
    if sk_ratio > 0:
      x = bn(conv(x, 3, w(64) // 2, 2, f'{stem}/0/conv2d'), f'{stem}/1/bn')
      x = bn(conv(x, 3, w(64) // 2, 1, f'{stem}/2/conv2d'), f'{stem}/3/bn')
      x = bn(conv(x, 3, w(64), 1, f'{stem}/4/conv2d'), f'{stem}/6/bn')
    else:
      x = bn(conv(x, 7, w(64), 2, f'{stem}/0/conv2d'), f'{stem}/2/bn')
    x = tf.nn.max_pool2d(x, 3, 2, 'SAME')  # The reference's max-pool.
  for g, n in enumerate(sizes):
    for b in range(n):
      x = bottleneck(x, w(64 * 2**g), 2 if g > 0 and b == 0 else 1, b == 0,
                     f'block_groups/{g}/layers/{b}')
  h = tf.reduce_mean(x, [1, 2])

  z = h
  for j in range(num_proj_layers):
    last = j == num_proj_layers - 1
    tf1 = f'head_contrastive/nl_{j}'
    tf2 = f'_projection_head/linear_layers/{j}'
    d = v.dense(z.shape[-1], proj_out_dim if last else z.shape[-1],
                f'{tf1}/dense', f'{tf2}/dense')
    z = bn(tf.matmul(z, d['kernel']), None, relu=not last, center=not last,
           tf1_base=f'{tf1}/batch_normalization', tf2_base=f'{tf2}/bn_relu/bn')
  d = v.dense(h.shape[-1], num_classes, 'head_supervised/linear_layer/dense',
              'supervised_head/linear_layer/dense', bias=True)
  logits = tf.matmul(h, d['kernel']) + d['bias']
  return h.numpy(), z.numpy(), logits.numpy()


_TF_CASES = {
    # name: (tf2, depth, width, sk_ratio, cifar_stem, proj layers)
    'v1_tf1_r50': (False, 50, 0.125, 0.0, False, 2),
    'v2_tf1_r50_sk': (False, 50, 0.125, 0.0625, False, 3),
    'v2_tf2_r50_sk': (True, 50, 0.125, 0.0625, False, 3),
    'v2_tf2_r50': (True, 50, 0.125, 0.0, False, 3),
    # sk_ratio 1: the stage-4 squeeze (64) exceeds the floor of 32, so the
    # ratio is observable and must be inferred from the shapes.
    'tf1_r50_cifar_sk_ratio1': (False, 50, 0.125, 1.0, True, 2),
}


def _import_and_compare(case, size, tmp_path, write=None):
  """Saves a reference checkpoint, imports it; returns (config, vars, x, ref).

  Also checks the imported model against the reference forward pass.
  `write(refs, tmp_path)`, if given, saves the variables its own way and
  returns the path to import.
  """
  tf2, depth, width, sk_ratio, cifar_stem, layers = _TF_CASES[case]
  x = np.random.default_rng(3).uniform(size=(2, size, size, 3)).astype(
      np.float32)
  refs = _RefVars(tf2, seed=4)
  h, z, logits = _tf_reference_forward(
      x, refs, depth, width, sk_ratio, cifar_stem, layers, proj_out_dim=8,
      num_classes=5)
  prefix = str(tmp_path / 'model.ckpt-100')
  if tf2:  # Optimiser slots and counters that the importer must skip.
    slot = next(iter(refs.tensors)).replace(
        '/.ATTRIBUTES', '/.OPTIMIZER_SLOT/optimizer/momentum/.ATTRIBUTES')
    extras = {slot: np.zeros(1, np.float32),
              'save_counter/.ATTRIBUTES/VARIABLE_VALUE': np.int64(1)}
  else:
    extras = {'global_step': np.int64(100),
              'base_model/conv2d/kernel/Momentum': np.zeros(1, np.float32)}
  refs.save(prefix, extras)
  if write is not None:
    prefix = write(refs, tmp_path)

  config, variables = export.import_tf_checkpoint(prefix)
  assert config == dict(
      depth=depth, width_multiplier=width, sk_ratio=sk_ratio,
      cifar_stem=cifar_stem,
      maxpool_padding='torch' if cifar_stem else 'tf',
      num_proj_layers=layers, proj_out_dim=8, num_classes=5, linear_head=True)
  out = models.SimCLRModel(**config).apply(variables, x, train=False)
  diffs = {k: float(np.max(np.abs(np.asarray(out[k]) - ref)))
           for k, ref in (('features', h), ('projection', z),
                          ('logits', logits))}
  print(f'{case} at {size} px: max |JAX - TF| {diffs}')
  # Checked, as a fraction of the TF reference output's max |value|:
  # max |diff| <= 1.5e-6 for the features, <= 3e-6 for the projection and
  # the logits.
  _assert_close_to_scale(out['features'], h, 1.5e-6, 'features')
  _assert_close_to_scale(out['projection'], z, 3e-6, 'projection')
  _assert_close_to_scale(out['logits'], logits, 3e-6, 'logits')
  return config, variables, x, h


@pytest.mark.parametrize('case', sorted(_TF_CASES))
def test_import_tf_checkpoint_matches_reference_forward(case, tmp_path):
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  # 30 px: the stem output (15) is odd, where TF 'SAME' max-pooling and
  # torch's (1, 1) padding coincide.
  _import_and_compare(case, 16 if _TF_CASES[case][4] else 30, tmp_path)


@pytest.mark.parametrize('case', ['v1_tf1_r50', 'v2_tf2_r50_sk'])
def test_import_tf_checkpoint_matches_reference_at_even_size(case, tmp_path):
  """32 px: a 16 px stem output, where TF 'SAME' pads the max-pool (0, 1).

  The imported config's maxpool_padding='tf' makes the model match; with
  torch's (1, 1) padding the same weights do not (the pre-fix behaviour).
  """
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  config, variables, x, h = _import_and_compare(case, 32, tmp_path)
  torch_padded = models.SimCLRModel(**dict(config, maxpool_padding='torch'))
  h_torch = np.asarray(torch_padded.apply(variables, x, train=False)[
      'features'])
  rel = np.max(np.abs(h_torch - h)) / np.max(np.abs(h))
  print(f'{case} at 32 px with torch padding: max relative diff {rel:.2e}')
  assert rel > 1e-3


def _write_saved_model(refs, tmp_path):
  """Saves `refs`' TF2 variables as the authors' tf2/run.py exports them.

  `build_saved_model` wraps the Keras model in a tf.Module holding `model`
  and `trainable_variables_list = model.trainable_variables`, and
  `tf.saved_model.save`s it. This rebuilds the model's object structure from
  the TF2 attribute paths (a trackable per layer, lists for the reference's
  layer lists, empty ones for layers without variables) and gives every
  layer, ahead of its attributes as Keras 2 does, the SavedModel-only
  children Keras adds: lists `variables`, `trainable_variables`,
  `non_trainable_variables` and `layers` (the sublayers). Returns the
  SavedModel directory.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  trackable = tf.__internal__.tracking.AutoTrackable
  tree, created = {}, []
  for key, value in refs.tensors.items():
    parts = key[:-len('/.ATTRIBUTES/VARIABLE_VALUE')].split('/')[1:]
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = tf.Variable(
        value, name='/'.join(p.lstrip('_') for p in parts),
        trainable=parts[-1] not in ('moving_mean', 'moving_variance'))
    created.append(node[parts[-1]])

  def leaves(obj):
    if isinstance(obj, tf.Variable):
      return [obj]
    items = obj.values() if isinstance(obj, dict) else obj
    return [v for item in items for v in leaves(item)]

  def build(spec):
    if spec and all(k.isdigit() for k in spec):  # A list of layers.
      return [build(spec.get(str(i), {}))
              for i in range(max(map(int, spec)) + 1)]
    layer = trackable()
    variables = leaves(spec)
    children = {k: v if isinstance(v, tf.Variable) else build(v)
                for k, v in spec.items()}
    layer.variables = variables
    layer.trainable_variables = [v for v in variables if v.trainable]
    layer.non_trainable_variables = [v for v in variables if not v.trainable]
    if 'layers' not in children:
      layer.layers = [c for v in children.values() if not isinstance(
          v, tf.Variable) for c in (v if isinstance(v, list) else [v])]
    for k, v in children.items():
      setattr(layer, k, v)
    return layer

  class SimCLRModel(tf.Module):  # As build_saved_model's.

    def __init__(self, model):
      super().__init__()
      self.model = model
      self.trainable_variables_list = [v for v in created if v.trainable]

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3])])
    def __call__(self, inputs):
      return tf.reduce_mean(inputs, [1, 2])

  export_dir = str(tmp_path / 'saved_model')
  tf.saved_model.save(SimCLRModel(build(tree)), export_dir)
  return export_dir


def test_import_tf_saved_model_matches_reference_forward(tmp_path):
  """A SavedModel's positional keys import as the name-keyed TF2 ckpt."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  export_dir = None

  def write(refs, path):
    nonlocal export_dir
    export_dir = _write_saved_model(refs, path)
    return export_dir

  config, variables, x, _ = _import_and_compare('v2_tf2_r50_sk', 30, tmp_path,
                                                write)
  keys = [k for k, _ in tf.train.list_variables(
      f'{export_dir}/variables/variables')]
  # The weights really are stored by position, not by attribute path.
  assert not [k for k in keys if k.startswith('model/resnet_model/')]
  assert sum(k.startswith('trainable_variables_list/') for k in keys) > 100
  assert [k for k in keys if k.startswith('model/variables/')]

  by_name = export.import_tf_checkpoint(str(tmp_path / 'model.ckpt-100'))
  assert by_name[0] == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, by_name[1], variables)
  # The variables prefix imports too.
  prefix = export.import_tf_checkpoint(f'{export_dir}/variables/variables')
  jax.tree_util.tree_map(np.testing.assert_array_equal, prefix[1], variables)


def test_imported_tf_padding_is_refused_by_torchvision():
  """An imported (maxpool_padding='tf') encoder has no torchvision twin."""
  abstract = _abstract(models.ResNet(depth=50, maxpool_padding='tf'))
  with pytest.raises(ValueError, match="maxpool_padding='tf'"):
    export.to_torchvision(abstract, maxpool_padding='tf')
  export.to_torchvision(abstract, maxpool_padding='torch')  # Explicit opt-in.
  # The CIFAR stem has no max-pool, so its padding setting is moot.
  cifar = _abstract(models.ResNet(depth=18, cifar_stem=True), 32)
  export.to_torchvision(cifar, allow_cifar_stem=True, maxpool_padding='tf')


def test_import_tf_checkpoint_rejects_unknown_variables(tmp_path):
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  refs = _RefVars(False)
  x = np.zeros((1, 30, 30, 3), np.float32)
  _tf_reference_forward(x, refs, 50, 0.125, 0.0, False, 2, 8, 5)
  prefix = str(tmp_path / 'ckpt')
  refs.save(prefix, {'head_contrastive/extra/kernel': np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match='no place'):
    export.import_tf_checkpoint(prefix)
