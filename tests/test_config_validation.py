"""Every bad config value fails fast with one line naming field and value.

`config_validation.validate` runs in `train.build` before any dataset read or
compilation, so these are the messages a user sees seconds after a bad launch.
"""

import math
import os
import subprocess
import sys

import pytest

from simclr_jax import methods
from simclr_jax.config import validation as config_validation
from simclr_jax.config import defaults
from simclr_jax.config.validation import ConfigError
from simclr_jax.runtime import durations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits():
  return defaults.load_recipe(os.path.join(ROOT, 'configs', 'digits.py'))


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for part in parents:
    config = config[part]
  config[leaf] = value


# (field, bad value, what the message must say besides field and value).
BAD = [
    ('batch_size', 100, 'multiple of the number of devices (8)'),
    ('batch_size', 0, 'positive multiple'),
    ('dataset.image_size', 4, 'too small for the cifar stem: must be >= 8'),
    ('loss.temperature', 0.0, 'must be > 0'),
    ('loss.temperature', -0.5, 'must be > 0'),
    ('loss.temperature', math.nan, 'must be > 0'),
    ('optim.name', 'adam_typo', 'choose one of'),
    ('optim.lr_scaling', 'cubic', 'choose one of'),
    ('optim.base_learning_rate', 0.0, 'must be > 0'),
    ('optim.base_learning_rate', -1.0, 'must be > 0'),
    ('optim.momentum', 1.0, 'must be in [0, 1)'),
    ('optim.weight_decay', -1e-6, 'must be >= 0'),
    ('optim.warmup_epochs', -1.0, 'must be >= 0'),
    ('optim.warmup_epochs', 31.0, 'longer than training'),
    ('method', 'simclr_typo', 'choose one of'),
    ('augment.backend', 'torch', 'choose one of tf, jax'),
    ('augment.crop_min_area', 0.0, 'must be in (0, 1]'),
    ('augment.crop_min_area', math.nan, 'must be in (0, 1]'),
    ('augment.finetune_crop_min_area', 1.5, 'must be in (0, 1]'),
    ('on_nan', 'ignore', 'choose one of stop, skip_step'),
    ('dataset.name', '', 'or a TFDS dataset name'),
    ('dataset.on_corrupt', 'ignore', 'choose one of skip, fail'),
    ('model.depth', 19, 'choose one of'),
    ('model.stem', 'big', 'choose one of'),
    ('model.width_multiplier', 0.0, 'must be > 0'),
    ('model.compute_dtype', 'float16', 'choose one of'),
    ('train_steps', -5, 'must be an integer >= 0'),
    ('num_epochs', -1, 'must be >= 0'),
    ('log_every_steps', 0, 'must be an integer >= 1'),
    ('checkpoint_every_steps', 0, 'must be an integer >= 1'),
    ('keep_checkpoints', 0, 'must be an integer >= 1'),
    ('max_batch_per_device', -1, 'must be an integer >= 0'),
    ('eval.knn_k', 0, 'must be an integer >= 1'),
    ('eval.knn_temperature', 0.0, 'must be > 0'),
    ('eval.fewshot_draws', 0, 'must be an integer >= 1'),
    ('eval.fewshot_shots', (1, 0), 'must be an integer >= 1'),
    ('debug.inject_nan_at_step', -2, 'must be an integer >= -1'),
    ('finetune.label_fraction', 0.0, 'must be in (0, 1]'),
    ('finetune.label_fraction', 1.5, 'must be in (0, 1]'),
    ('evals.linear_probe.type', '', 'name a read-out type'),
    ('evals.knn.every_steps', -1, 'must be an integer >= 0'),
    ('evals.knn.every_epochs', -2.0, 'must be >= 0'),
    ('evals.linear_probe.dataset.name', ' ', "'' reads the pretraining"),
]


@pytest.mark.parametrize('field,value,expected', BAD,
                         ids=[f'{f}={v!r}' for f, v, _ in BAD])
def test_bad_value_names_field_value_and_rule(field, value, expected):
  c = _digits()
  _set(c, field, value)
  with pytest.raises(ConfigError) as e:
    config_validation.validate(c, num_devices=8)
  msg = str(e.value)
  assert '\n' not in msg
  assert f'config.{field}=' in msg, msg
  shown = value[-1] if isinstance(value, tuple) else value
  assert repr(shown) in msg or str(shown) in msg, msg
  assert expected in msg, msg


def test_an_evals_entry_has_only_its_fields():
  c = _digits()
  c.evals.knn.every_step = 3
  with pytest.raises(ConfigError, match=r'^config.evals.knn.every_step is '
                     r'not a field of a read-out: use type, enabled, '
                     r'dataset, every_steps, every_epochs$'):
    config_validation.validate(c, num_devices=8)
  c = _digits()
  c.evals.extra = defaults.eval_entry('probe')
  c.evals.extra.dataset.split = 'test'
  with pytest.raises(ConfigError, match=r'^config.evals.extra.dataset.split '
                     r'is not a dataset field that a read-out can replace'):
    config_validation.validate(c, num_devices=8)
  with pytest.raises(ValueError, match='unknown dataset fields'):
    defaults.eval_entry('probe', split='test')


# Checked against the read-out registry when a run is built.
BAD_READOUTS = [
    ('evals.linear_probe.type', 'prob', "config.evals.linear_probe.type="
     "'prob' is invalid: choose one of probe, fewshot, knn, random_init, "
     'pixels'),
    ('evals.pixel.every_epochs', 1.0, 'config.evals.pixel.every_epochs=1.0 '
     "is invalid: the 'pixels' baseline does not change during pretraining"),
    ('evals.random_init.every_steps', 5, 'config.evals.random_init.'
     'every_steps=5 is invalid'),
]


@pytest.mark.parametrize('field,value,expected', BAD_READOUTS,
                         ids=[f'{f}={v!r}' for f, v, _ in BAD_READOUTS])
def test_bad_readout_type_fails_before_the_run_is_built(field, value,
                                                        expected):
  from simclr_jax.evaluation import registry  # pylint: disable=g-import-not-at-top
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  c = _digits()
  _set(c, field, value)
  config_validation.validate(c, num_devices=8)  # The fields are fine ...
  with pytest.raises(ConfigError) as e:
    registry.check(c)  # ... the registry has no such read-out.
  assert '\n' not in str(e.value) and str(e.value).startswith(expected)
  with pytest.raises(ConfigError, match='^config.evals'):
    pretrain.build(c)
  _set(c, field.rsplit('.', 1)[0] + '.enabled', False)
  registry.check(c)  # An entry that is off is not read.


def test_imagenet_stem_needs_32_pixels():
  c = _digits()
  c.model.stem = 'imagenet'
  c.dataset.image_size = 16
  with pytest.raises(ConfigError, match=r'config.dataset.image_size=16 is too '
                     r'small for the imagenet stem: must be >= 32'):
    config_validation.validate(c, num_devices=1)
  c.dataset.image_size = 32
  config_validation.validate(c, num_devices=1)


def test_batch_must_divide_over_processes():
  c = _digits()
  c.batch_size = 256  # A multiple of 8 devices, not of 3 processes.
  with pytest.raises(ConfigError, match='config.batch_size=256 must divide '
                     'over 3 processes'):
    config_validation.validate(c, num_devices=8, process_count=3)


def test_epochs_and_steps_cannot_both_be_zero():
  c = _digits()
  c.num_epochs, c.train_steps = 0, 0
  with pytest.raises(ConfigError, match='one of them must be > 0'):
    config_validation.validate(c, num_devices=8)


def test_short_step_count_may_stay_in_warmup():
  """train_steps overrides epochs (smoke runs): a long warmup is allowed."""
  c = _digits()
  c.train_steps = 3
  c.optim.warmup_epochs = 50.0
  config_validation.validate(c, num_devices=8)


def test_every_recipe_is_valid():
  paths = [os.path.join(d, f) for d in ('configs', 'configs/methods')
           if os.path.isdir(os.path.join(ROOT, d))
           for f in sorted(os.listdir(os.path.join(ROOT, d)))
           if f.endswith('.py')]
  assert paths
  for path in paths:
    c = defaults.load_recipe(os.path.join(ROOT, path))
    config_validation.validate(c, num_devices=8)


def test_fashion_mnist_method_recipes_keep_the_short_run_settings():
  # The methods of the Fashion-MNIST table: that dataset's recipe underneath,
  # valid with each method's settings on top (no data read).
  base = defaults.load_recipe(os.path.join(ROOT, 'configs',
                                           'fashion_mnist.py'))
  for method in ('moco_v2', 'byol', 'swav', 'supcon'):
    c = _method_recipe(method, 'fashion_mnist')
    config_validation.validate(c, num_devices=8)
    assert (c.method, c.dataset.name, c.model.width_multiplier,
            c.num_epochs) == (method, 'fashion_mnist',
                              base.model.width_multiplier, base.num_epochs)
  moco = _method_recipe('moco_v2', 'fashion_mnist')
  assert moco.moco_v2.momentum == 0.99
  assert moco.moco_v2.queue_size % (2 * moco.batch_size) == 0
  swav = _method_recipe('swav', 'fashion_mnist')
  # The prototypes stay frozen for the first epoch: 60,000 // 256 steps; on
  # digits 1,437 // 256 and on CIFAR-10 50,000 // 512, as before.
  assert durations.steps(swav.swav, 'freeze_prototypes', 60000 // 256) == 234
  for dataset, steps_per_epoch, steps in (('digits', 1437 // 256, 5),
                                          ('cifar10', 50000 // 512, 97)):
    s = _method_recipe('swav', dataset).swav
    assert durations.steps(s, 'freeze_prototypes', steps_per_epoch) == steps
  # No queue on Fashion-MNIST (chosen on its validation split); the digits
  # keep theirs. The published queue row's overrides still validate.
  assert swav.swav.queue_length == 0 and swav.swav.num_prototypes == 100
  assert _method_recipe('swav', 'digits').swav.queue_length == 1024
  swav.swav.queue_length, swav.swav.queue_start_epochs = 3840, 0.5
  config_validation.validate(swav, num_devices=8)
  byol = _method_recipe('byol', 'fashion_mnist')
  assert (byol.byol.momentum, byol.byol.predictor_hidden_dim) == (0.99, 256)


def test_unknown_config_field_is_one_line_from_the_cli(tmp_path):
  r = subprocess.run(
      [sys.executable, '-m', 'simclr_jax.main',
       '--config=' + os.path.join(ROOT, 'configs', 'digits.py'),
       f'--workdir={tmp_path}', '--config.model.widht_multiplier=1'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 2, r.stderr[-2000:]
  assert 'Traceback' not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --config.model.widht_multiplier: the config '
                         "has no field 'widht_multiplier'"), last
  assert 'width_multiplier' in last.split(';', 1)[1]


def _method_recipe(method: str, dataset: str | None = None):
  return defaults.load_recipe(
      os.path.join(ROOT, 'configs', 'methods', f'{method}.py'), dataset)


# Each method validates its own section (Method.validate): (method, field,
# bad value, what the message must say besides field and value).
BAD_METHOD = [
    ('moco_v2', 'moco_v2.queue_size', 1000,
     'must be a multiple of 2 x batch_size = 512'),
    ('moco_v2', 'moco_v2.queue_size', 0, 'must be an integer >= 1'),
    ('moco_v2', 'moco_v2.momentum', 1.0, 'must be in [0, 1)'),
    ('moco_v3', 'moco_v3.momentum', math.nan, 'must be in [0, 1)'),
    ('moco_v3', 'moco_v3.predictor_hidden_dim', 0, 'must be an integer >= 1'),
    ('byol', 'byol.momentum', -0.1, 'must be in [0, 1)'),
    ('byol', 'byol.predictor_hidden_dim', -4, 'must be an integer >= 1'),
    ('swav', 'swav.num_prototypes', 1, 'must be an integer >= 2'),
    ('swav', 'swav.sinkhorn_iterations', 0, 'must be an integer >= 1'),
    ('swav', 'swav.epsilon', 0.0, 'must be > 0'),
    ('swav', 'swav.freeze_prototypes_steps', -1, 'must be an integer >= 0'),
    ('instdisc', 'instdisc.num_negatives', 0, 'must be an integer >= 1'),
    ('instdisc', 'instdisc.bank_momentum', 1.0, 'must be in [0, 1)'),
    ('hcl', 'hcl.beta', -1.0, 'must be >= 0'),
    ('hcl', 'hcl.tau_plus', 1.0, 'must be in [0, 1)'),
    ('supcon', 'supcon.base_temperature', -0.1, 'must be >= 0'),
    ('triplet', 'margin.margin', 0.0, 'must be > 0'),
    ('contrastive_margin', 'margin.margin', -1.0, 'must be > 0'),
]


@pytest.mark.parametrize('method,field,value,expected', BAD_METHOD,
                         ids=[f'{m}:{f}={v!r}' for m, f, v, _ in BAD_METHOD])
def test_bad_method_setting_is_one_line_naming_the_field(method, field, value,
                                                         expected):
  c = _method_recipe(method)
  config_validation.validate(c, num_devices=8)  # The recipe itself is fine.
  _set(c, field, value)
  with pytest.raises(ConfigError) as e:
    config_validation.validate(c, num_devices=8)
  msg = str(e.value)
  assert '\n' not in msg
  assert f'config.{field}={value!r}' in msg, msg
  assert expected in msg, msg
  # The method's own check raises the same error without the whole config.
  with pytest.raises(ConfigError, match=f'config.{field}='):
    methods.METHODS[method].validate(c)


def test_only_the_selected_method_is_validated():
  c = _digits()  # method = simclr
  c.moco_v2.queue_size = 1000  # Would be invalid for moco_v2.
  c.swav.num_prototypes = 0
  config_validation.validate(c, num_devices=8)


def test_every_method_section_exists_and_is_named_after_it():
  c = defaults.base_config()
  for name, cls in methods.METHODS.items():
    assert cls.name == name
    if cls.section:
      assert cls.section in c, name
      # One section per method, named as the method; the margin section is
      # shared by the two margin losses.
      assert cls.section in (name, 'margin'), name


@pytest.mark.parametrize('method', sorted(methods.METHODS))
def test_grad_cache_support_is_the_methods_own(method):
  c = _method_recipe(method) if method != 'simclr' else _digits()
  c.grad_cache_chunks = 2
  if methods.METHODS[method].supports_grad_cache:
    config_validation.validate(c, num_devices=8)
  else:
    with pytest.raises(ConfigError) as e:
      config_validation.validate(c, num_devices=8)
    msg = str(e.value)
    assert '\n' not in msg and f'method={method!r}' in msg, msg
    assert ('use 0, or one of byol, contrastive_margin, hcl, invaspread, '
            'moco_v3, simclr, supcon, triplet') in msg, msg
  # Methods scoring one output per view (and a target network's outputs)
  # can be chunked; a queue, prototypes or a memory bank cannot.
  assert {n for n, m in methods.METHODS.items() if m.supports_grad_cache} == {
      'simclr', 'hcl', 'supcon', 'triplet', 'contrastive_margin',
      'invaspread', 'moco_v3', 'byol'}


# The fields that fix the shapes of each method's checkpointed state.
RESUME_SHAPE_FIELDS = {
    'moco_v2': ('moco_v2.queue_size',),
    'moco_v3': ('moco_v3.predictor_hidden_dim', 'moco_v3.predictor_out_bn'),
    'byol': ('byol.predictor_hidden_dim',),
    'swav': ('swav.num_prototypes', 'swav.queue_length'),
    'instdisc': ('dataset.train_split',),
    'deepcluster': ('deepcluster.num_clusters', 'deepcluster.pca_dim',
                    'dataset.train_split'),
}


@pytest.mark.parametrize('method', sorted(methods.METHODS))
def test_resume_shape_fields(method):
  c = defaults.base_config()
  c.method = method
  fields = methods.resume_shape_fields(c)
  assert fields == RESUME_SHAPE_FIELDS.get(method, ())
  for field in fields:  # Each names a field the config has.
    node = c
    for part in field.split('.'):
      node = node[part]
