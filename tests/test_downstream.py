"""Downstream modes: label fractions, frozen encoders, fine-tuning, distillation.

Tiny networks (ResNet-18 at width 0.125, 16 px digits) and a handful of steps;
every check compares against an independent computation (NumPy formulas, the
pretraining model's own head outputs, the source checkpoint).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax.runtime import checkpointing
from simclr_jax.config import defaults
from simclr_jax import downstream
from simclr_jax.downstream import common
from simclr_jax import main
from simclr_jax.training import supervised
from simclr_jax.training import pretrain as train
from simclr_jax.config.validation import ConfigError
from simclr_jax.data import digits
from simclr_jax.data import labelled
from simclr_jax.models import classifier
from simclr_jax.models import simclr


def _config(init_from: str = ''):
  c = defaults.base_config()
  c.dataset.name = 'digits'
  c.dataset.image_size = 16
  c.model.depth = 18
  c.model.width_multiplier = 0.125
  c.model.proj_out_dim = 16
  c.batch_size = 64
  c.train_steps = 2
  c.optim.warmup_epochs = 0.1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval.batch_size = 128
  c.eval.knn_k = 5
  c.eval.fewshot_draws = 1
  c.evals.random_init.enabled = False
  c.init_from = init_from
  for section in (c.linear_eval, c.finetune, c.distill):
    section.batch_size = 64
    section.lr_scaling = 'linear'
    section.learning_rate = 0.1
  c.linear_eval.epochs = 0.1  # 3 steps.
  c.finetune.epochs = 2  # 5 steps on 144 labels.
  c.distill.epochs = 0.1
  return c


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """Workdir laid out as pretraining leaves it, at its initial state.

  Written the way train.pretrain writes (same state tree, Checkpointer,
  config.json) without compiling the contrastive step, to keep the file fast.
  """
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  c = _config()
  setup = train.build(c)
  state = train.initial_state(setup)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(2, state.replace(step=state.step + 2), {'step': 2}, force=True)
  ckpt.close()
  train.check_resume_compatible(workdir, c)  # Writes config.json.
  return workdir


@pytest.fixture(scope='module')
def finetuned(pretrained, tmp_path_factory):
  """(workdir, results) of fine-tuning after block 1 on 10% of the labels."""
  workdir = str(tmp_path_factory.mktemp('finetune'))
  c = _config(pretrained)
  c.model.ft_proj_selector = 1
  c.finetune.fine_tune_after_block = 1
  results = main.run_downstream('finetune', c, workdir)
  return workdir, results


def _tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_label_fraction_is_stratified_and_seeded():
  _, labels = digits.load_digits('train')
  idx = labelled.label_subset(labels, 0.1, seed=0)
  assert len(np.unique(idx)) == len(idx)
  for cls in range(10):
    count = int(np.sum(labels == cls))
    # Independent count: round half up of 10% of the class, at least 1.
    assert np.sum(labels[idx] == cls) == max(1, int(count * 0.1 + 0.5))
  np.testing.assert_array_equal(idx, labelled.label_subset(labels, 0.1, 0))
  assert not np.array_equal(idx, labelled.label_subset(labels, 0.1, 1))


def test_label_fraction_comes_from_train_split_only():
  c = _config()
  images, labels, idx = labelled.load_labelled_arrays(c, 0.1, seed=3)
  train_x, train_y = digits.load_digits('train')
  test_x, _ = digits.load_digits('test')
  small = digits.resize_bilinear(train_x[idx], 16)
  np.testing.assert_array_equal(images, np.clip(np.round(small), 0, 255))
  np.testing.assert_array_equal(labels, train_y[idx])
  test_small = np.clip(np.round(digits.resize_bilinear(test_x, 16)), 0, 255)
  test_bytes = {x.astype(np.uint8).tobytes() for x in test_small}
  assert not any(x.tobytes() in test_bytes for x in images)


def test_imagenet_fractions_are_the_official_subsets():
  assert (labelled.imagenet_source('imagenet2012', 0.01) ==
          'imagenet2012_subset/1pct')
  assert (labelled.imagenet_source('imagenet2012', 0.1) ==
          'imagenet2012_subset/10pct')
  with pytest.raises(ValueError, match='label_fraction=0.05'):
    labelled.imagenet_source('imagenet2012', 0.05)


def test_index_stream_uses_every_example_each_epoch():
  stream = labelled.index_stream(10, 4, seed=0)
  first = np.concatenate([next(stream) for _ in range(5)])  # 2 epochs.
  assert sorted(first[:10]) == list(range(10))
  assert sorted(first[10:20]) == list(range(10))


def test_distillation_loss_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 5)) * 3
  labels = np.array([1, -1, 4, -1, 0, 2])
  tau, w = 2.0, 0.3

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  p_t = np.exp(log_softmax(t / tau))
  distill = tau**2 * np.mean(-np.sum(p_t * log_softmax(s / tau), -1))
  got = supervised.distillation_loss(jnp.asarray(s), jnp.asarray(t), tau)
  np.testing.assert_allclose(got, distill, rtol=1e-5)
  known = labels >= 0
  ce = -np.mean(log_softmax(s)[known][np.arange(known.sum()), labels[known]])
  loss, metrics = supervised.distill_loss_fn(tau, w)(
      jnp.asarray(s), jnp.asarray(labels), jnp.asarray(t))
  np.testing.assert_allclose(loss, (1 - w) * distill + w * ce, rtol=1e-5)
  assert metrics['teacher_agreement'] == np.mean(
      s.argmax(-1) == t.argmax(-1))


def _perturbed(variables):
  """Non-trivial running statistics, so inference-mode BN matters."""
  rng = np.random.default_rng(0)
  stats = jax.tree.map(
      lambda v: np.asarray(rng.uniform(0.5, 1.5, v.shape), np.float32),
      variables['batch_stats'])
  return jax.tree.map(np.asarray, {'params': variables['params'],
                                   'batch_stats': stats})


def test_ft_proj_selector_picks_head_layer():
  c = _config()
  c.model.num_proj_layers = 3
  full = simclr.build_model(c, num_classes=10)
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  variables = _perturbed(jax.jit(lambda k: full.init(k, x, train=False))(
      jax.random.key(1)))
  hiddens = jax.jit(lambda v: full.apply(v, x, train=False))(
      variables)['head_hiddens']
  # Whole classifier (encoder, copied weights, kept layer) at selector 1.
  model = classifier.build_classifier(c, head_layers=1, num_classes=10)
  mine = common.init_variables(model, c, jax.random.key(2), variables)
  assert set(mine['params']['projection_head']) == {'dense1', 'bn1'}
  features = jax.jit(lambda v: model.apply(v, x, train=False))(
      mine)['features']
  np.testing.assert_allclose(features, hiddens[1], rtol=1e-5, atol=1e-6)
  # Every selector, including the output layer (no ReLU, no BN beta), on the
  # encoder output; the head is cheap enough to run eagerly.
  for selector in range(4):
    head = classifier.HeadLayers(selector, 3, c.model.proj_out_dim)
    names = {f'{layer}{i}' for i in range(1, selector + 1)
             for layer in ('dense', 'bn')}
    pick = lambda tree: {k: v for k, v in tree.items() if k in names}
    out = head.apply(
        {'params': pick(variables['params']['projection_head']),
         'batch_stats': pick(variables['batch_stats']['projection_head'])},
        hiddens[0], train=False)
    np.testing.assert_allclose(out, hiddens[selector], rtol=1e-5, atol=1e-6)


def test_frozen_mask_numbering():
  c = _config()
  model = classifier.build_classifier(c, head_layers=1, num_classes=10)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False))['params']
  mask = supervised.frozen_mask(params, fine_tune_after_block=2)
  enc = mask['encoder']
  assert enc['conv_init']['kernel'] and enc['bn_init']['scale']
  assert enc['stage1_block1']['conv2']['kernel']
  assert enc['stage2_block0']['proj_conv']['kernel']
  assert not enc['stage3_block0']['conv1']['kernel']
  assert not any(jax.tree.leaves(mask['projection_head']))
  assert not any(jax.tree.leaves(mask['classifier']))
  assert not any(jax.tree.leaves(supervised.frozen_mask(params, -1)))
  assert all(jax.tree.leaves(supervised.frozen_mask(params, 4)['encoder']))


def test_linear_eval_leaves_encoder_bit_identical(pretrained, tmp_path):
  c = _config(pretrained)
  results = downstream.run_linear_eval(c, str(tmp_path))
  assert 0 <= results['top1_accuracy'] <= results['top5_accuracy'] <= 1
  assert results['num_test_examples'] == 360 and results['steps'] == 3
  assert 0 <= results['fast_probe']['linear_probe_accuracy'] <= 1
  _, source, _ = checkpointing.load_run(pretrained)
  _, after, step = checkpointing.load_run(str(tmp_path))
  assert step == 3 and set(after['params']) == {'encoder', 'classifier'}
  _tree_equal(source['params']['encoder'], after['params']['encoder'])
  _tree_equal(source['batch_stats']['encoder'],
              after['batch_stats']['encoder'])


def test_finetune_results_and_checkpoint(pretrained, finetuned):
  workdir, results = finetuned
  with open(os.path.join(workdir, 'results.json')) as f:
    saved = json.load(f)
  assert saved['top1_accuracy'] == results['top1_accuracy']
  assert 0 <= saved['top1_accuracy'] <= saved['top5_accuracy'] <= 1
  _, train_y = digits.load_digits('train')
  per_class = [max(1, int(np.sum(train_y == k) * 0.1 + 0.5)) for k in range(10)]
  assert saved['num_train_examples'] == sum(per_class) == 145
  assert saved['steps'] == 5  # ceil(2 epochs * 145 / 64).
  assert np.isfinite(saved['final_train_loss'])
  config, after, _ = checkpointing.load_run(workdir)
  assert config.model.ft_proj_selector == 1
  assert set(after['params']) == {'encoder', 'projection_head', 'classifier'}
  assert set(after['params']['projection_head']) == {'dense1', 'bn1'}
  _, source, _ = checkpointing.load_run(pretrained)
  src, new = source['params']['encoder'], after['params']['encoder']
  # fine_tune_after_block=1: stem and stage 1 frozen, the rest trained.
  for name in ('conv_init', 'bn_init', 'stage1_block0', 'stage1_block1'):
    _tree_equal(src[name], new[name])
  assert not np.array_equal(src['stage4_block1']['conv1']['kernel'],
                            new['stage4_block1']['conv1']['kernel'])
  assert not np.array_equal(
      source['params']['projection_head']['dense1']['kernel'],
      after['params']['projection_head']['dense1']['kernel'])


def test_finetune_rejects_bad_fraction(pretrained, tmp_path):
  c = _config(pretrained)
  c.finetune.label_fraction = 1.5
  with pytest.raises(ConfigError, match=r'finetune.label_fraction=1.5 .*'
                     r'\(0, 1\]'):
    downstream.run_finetune(c, str(tmp_path))


def test_distill_from_finetuned_teacher(finetuned, tmp_path):
  c = _config(finetuned[0])
  results = downstream.run_distill(c, str(tmp_path))
  assert 0 <= results['agreement'] <= 1
  assert 0 <= results['top1_accuracy'] <= 1
  assert results['teacher_top1_accuracy'] == finetuned[1]['top1_accuracy']
  _, student, _ = checkpointing.load_run(str(tmp_path))
  assert set(student['params']) == {'encoder', 'classifier'}


def test_distill_needs_a_classifier(pretrained, tmp_path):
  with pytest.raises(ValueError, match='fine-tuned teacher'):
    downstream.run_distill(_config(pretrained), str(tmp_path))


def test_embed_writes_png(pretrained, tmp_path):
  c = _config(pretrained)
  c.embed.method = 'pca'
  results = downstream.run_embed(c, str(tmp_path))
  with open(results['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert results['num_points'] == 360


def test_embed_of_two_domains_colours_by_domain_and_class(pretrained,
                                                          tmp_path):
  c = _config(pretrained)
  c.embed.update(dict(method='pca', target='digits_m'))
  results = downstream.run_embed(c, str(tmp_path))
  with open(results['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  saved = np.load(os.path.join(str(tmp_path), 'embedding_pca.npz'))
  assert results['num_points'] == 720
  assert np.bincount(saved['domains']).tolist() == [360, 360]
  # Both halves carry the (same) digits test labels.
  np.testing.assert_array_equal(saved['labels'][:360], saved['labels'][360:])
