"""Downstream modes: linear_eval, finetune, distill, embed.

  python -m simclr_jax.main --config=configs/digits.py --workdir=DIR \
      --mode=linear_eval|finetune|distill|embed --config.init_from=RUN

`config.init_from` names the --workdir of the run to start from: a
pretraining run for linear_eval/finetune/embed (a fine-tuning run also
works), and the fine-tuned TEACHER run for distill. The architecture always
comes from that run's config.json; dataset and training settings from the
current config (config.linear_eval, .finetune, .distill, .embed).

linear_eval, finetune and distill save a checkpoint and config.json in their
workdir, with params {'encoder', 'projection_head' (kept layers, if any),
'classifier'}, so `checkpointing.load_run` reads them and a fine-tuned run
can be the teacher of a distillation. Each returns the dict main writes as
results.json.
"""

import io
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from simclr_jax.runtime import checkpointing
from simclr_jax.config import downstream as dcfg
from simclr_jax.runtime import parallel
from simclr_jax.runtime import paths
from simclr_jax.training import supervised
from simclr_jax.data import datasets
from simclr_jax.data import labelled
from simclr_jax.data import pipeline
from simclr_jax.evaluation import features as features_lib
from simclr_jax.models import classifier
from simclr_jax.models import resnet


def _load_source(config: ml_collections.ConfigDict):
  """(config, variables, step) of config.init_from."""
  if not config.init_from:
    raise ValueError('config.init_from is empty: pass '
                     '--config.init_from=WORKDIR_OF_THE_SOURCE_RUN')
  if not epath.Path(config.init_from).is_dir():
    raise FileNotFoundError(f'config.init_from={config.init_from!r} is not a '
                            'directory')
  return checkpointing.load_run(config.init_from)


def _head_layers_in(params: dict) -> int:
  """Projection-head layers a checkpoint holds (dense1, dense2, ...)."""
  head = params.get('projection_head', {})
  return sum(1 for k in head if k.startswith('dense'))


def _init_variables(model: classifier.Classifier, config, rng: jax.Array,
                    source: dict | None) -> dict:
  """Random init, then (unless `source` is None) the source's weights.

  Copies the encoder and the kept head layers by name, params and BN
  statistics alike; only the classifier stays random.
  """
  size = config.dataset.image_size
  x = jnp.zeros((2, size, size, 3), jnp.float32)
  variables = jax.device_get(
      jax.jit(lambda k: model.init(k, x, train=False))(rng))
  variables = jax.tree.map(np.asarray, dict(variables))
  if source is None:
    return variables
  for col in ('params', 'batch_stats'):
    for module in ('encoder', 'projection_head'):
      target = variables.get(col, {}).get(module)
      if target is None:
        continue
      src = source[col][module]
      picked = {k: src[k] for k in target}  # Kept head layers only.
      shapes = jax.tree.map(np.shape, picked)
      if shapes != jax.tree.map(np.shape, dict(target)):
        raise ValueError(f'{col}/{module} of config.init_from does not fit the '
                         'model built from its config.json')
      variables[col] = dict(variables[col], **{module: picked})
  return variables


def _train_data(config, section, *, fraction: float = 1.0,
                label_seed: int = 0, label_rows: Any = None):
  """(host-local batch iterator, number of training examples, details).

  `label_rows` (distillation) keeps the labels of those rows of the full
  train split and marks every other example unlabelled (-1).
  """
  kw = dict(global_batch=section.batch_size, seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count())
  name, split = config.dataset.name, config.dataset.train_split
  if labelled.is_streamed(name):
    if label_rows is not None:
      raise ValueError('config.distill.labelled_weight > 0 needs an '
                       f'in-memory dataset; {name!r} is streamed, use 0')
    source = labelled.imagenet_source(name, fraction)
    n = labelled.tfds_num_examples(config, source, split)
    return labelled.tfds_batches(config, source, split, **kw), n, {
        'label_source': source}
  images, labels, idx = labelled.load_labelled_arrays(config, fraction,
                                                      label_seed)
  if label_rows is not None:
    keep = np.zeros(len(labels), bool)
    keep[label_rows] = True
    labels = np.where(keep, labels, -1).astype(np.int32)
  del idx
  return labelled.array_batches(images, labels, **kw), len(labels), {
      'label_source': f'{name}:{split}'}


def _train(config, section, model, variables, frozen, loss_fn, batches,
           num_examples, mesh, *, name, teacher=None, teacher_variables=None):
  """Builds optimiser, state and step, and runs section.epochs epochs."""
  steps_per_epoch = num_examples / section.batch_size
  total = max(1, math.ceil(section.epochs * steps_per_epoch))
  tx, schedule = supervised.make_optimizer(section, total, frozen)
  state = supervised.create_state(tx, variables, mesh)
  step_fn = supervised.make_train_step(
      model, tx, schedule, mesh, frozen, loss_fn,
      config.dataset.image_size, teacher=teacher)
  if teacher_variables is not None:
    teacher_variables = jax.device_put(teacher_variables,
                                       parallel.replicated(mesh))
  logging.info('%s: %d steps (%.2f per epoch) of global batch %d on %d '
               'examples, %d devices', name, total, steps_per_epoch,
               section.batch_size, num_examples, mesh.devices.size)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  return supervised.fit(step_fn, state, batches, total_steps=total,
                        steps_per_epoch=steps_per_epoch, mesh=mesh, rng=rng,
                        log_every=config.log_every_steps, name=name,
                        teacher_variables=teacher_variables,
                        prefetch=config.dataset.prefetch)


def _variables(state) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def _test_logits(config, model, variables, mesh):
  return supervised.predict_logits(model, variables,
                                   labelled.eval_chunks(config),
                                   config.eval.batch_size, mesh)


def _accuracies(logits: np.ndarray, labels: np.ndarray) -> dict:
  return {'top1_accuracy': supervised.topk_accuracy(logits, labels, 1),
          'top5_accuracy': supervised.topk_accuracy(logits, labels, 5),
          'num_test_examples': int(len(labels))}


def _common(config, section_name: str, source_step: int, fit) -> dict:
  return {'mode': section_name, 'init_from': config.init_from,
          'source_step': source_step, 'steps': int(fit.state.step),
          'epochs': config[section_name].epochs,
          'final_train_loss': fit.final_metrics.get('loss'),
          'train_wall_time_s': fit.wall_time_s}


def _check(config, name: str, mesh) -> None:
  dcfg.check_training(name, config[name], num_devices=mesh.devices.size,
                      process_count=jax.process_count())


def run_linear_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """REFERENCE §5 linear evaluation on the frozen encoder, plus fast probes.

  The encoder runs in inference mode behind stop_gradient and gets no update;
  a linear classifier on its output h is trained with Nesterov momentum SGD
  on crop + flip views of every training label.
  """
  mesh = parallel.make_mesh()
  _check(config, 'linear_eval', mesh)
  supervised.check_fresh_workdir(workdir)
  src_config, src_vars, src_step = _load_source(config)
  num_classes = datasets.dataset_info(config).num_classes
  model = classifier.build_classifier(src_config, head_layers=0,
                                      num_classes=num_classes,
                                      frozen_encoder=True)
  variables = _init_variables(model, config, jax.random.key(config.seed),
                              src_vars)
  frozen = supervised.frozen_mask(variables['params'], frozen_encoder=True)
  batches, n, details = _train_data(config, config.linear_eval)
  fit = _train(config, config.linear_eval, model, variables, frozen,
               supervised.classification_loss_fn(), batches, n, mesh,
               name='linear_eval')
  logits, labels = _test_logits(config, model, _variables(fit.state), mesh)
  results = dict(_common(config, 'linear_eval', src_step, fit),
                 **_accuracies(logits, labels), **details,
                 num_train_examples=n)
  if config.linear_eval.fast_probe:
    results['fast_probe'] = _fast_probe(config, model,
                                        _variables(fit.state), mesh)
  supervised.save_run(workdir, dcfg.recorded_config(
      config, src_config, head_layers=0, mode='linear_eval',
      label_fraction=1.0, label_seed=0), fit.state)
  return results


def _fast_probe(config, model, variables, mesh) -> dict:
  """The main job's read-outs (evaluation.evaluate_features) of h."""
  from simclr_jax import evaluation  # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)['features'])
  limit = config.linear_eval.probe_max_examples or None
  feats = []
  for split in (config.dataset.train_split, config.dataset.eval_split):
    x, y = pipeline.load_eval_arrays(config, split, max_examples=limit)
    feats.append((features_lib.extract_features(
        apply, x, config.eval.batch_size, mesh, variables=variables), y))
  (f_train, y_train), (f_test, y_test) = feats
  t0 = time.time()
  out = evaluation.evaluate_features(
      f_train, y_train, f_test, y_test, knn_k=config.eval.knn_k,
      knn_temperature=config.eval.knn_temperature,
      shots=tuple(config.eval.fewshot_shots), draws=config.eval.fewshot_draws,
      seed=config.seed)
  out['wall_time_s'] = time.time() - t0
  return out


def run_finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Semi-supervised fine-tuning (REFERENCE §5), or the from-scratch baseline.

  Network: encoder + the first model.ft_proj_selector projection-head layers
  of the source run + a new linear classifier. Trains on
  finetune.label_fraction of the training labels (ImageNet: the TFDS 1pct /
  10pct subsets; others: a seeded, class-stratified subset).
  """
  mesh = parallel.make_mesh()
  _check(config, 'finetune', mesh)
  supervised.check_fresh_workdir(workdir)
  f = config.finetune
  src_config, src_vars, src_step = _load_source(config)
  dcfg.check_finetune(config, _head_layers_in(src_vars['params']))
  head_layers = config.model.ft_proj_selector
  num_classes = datasets.dataset_info(config).num_classes
  # A wholly frozen encoder (block 4) runs in inference mode, as in linear
  # evaluation; a partly frozen one keeps BN in training mode throughout.
  model = classifier.build_classifier(
      src_config, head_layers=head_layers, num_classes=num_classes,
      frozen_encoder=f.fine_tune_after_block == 4)
  variables = _init_variables(model, config, jax.random.key(config.seed),
                              None if f.from_scratch else src_vars)
  frozen = supervised.frozen_mask(variables['params'], f.fine_tune_after_block)
  batches, n, details = _train_data(config, f, fraction=f.label_fraction,
                                    label_seed=f.label_seed)
  name = 'finetune(scratch)' if f.from_scratch else 'finetune'
  fit = _train(config, f, model, variables, frozen,
               supervised.classification_loss_fn(), batches, n, mesh,
               name=name)
  logits, labels = _test_logits(config, model, _variables(fit.state), mesh)
  results = dict(
      _common(config, 'finetune', src_step, fit),
      **_accuracies(logits, labels), **details, num_train_examples=n,
      label_fraction=f.label_fraction, label_seed=f.label_seed,
      from_scratch=f.from_scratch, ft_proj_selector=head_layers,
      fine_tune_after_block=f.fine_tune_after_block)
  supervised.save_run(workdir, dcfg.recorded_config(
      config, src_config, head_layers=head_layers, mode='finetune',
      label_fraction=f.label_fraction, label_seed=f.label_seed,
      from_scratch=f.from_scratch), fit.state)
  return results


def _load_teacher(config):
  """(model, variables, config, step) of the fine-tuned teacher run."""
  t_config, t_vars, t_step = _load_source(config)
  params = t_vars['params']
  if 'classifier' not in params:
    raise ValueError(f'config.init_from={config.init_from!r} has no '
                     'classifier: distill needs a fine-tuned teacher, so run '
                     '--mode=finetune first and pass its workdir')
  num_classes = params['classifier']['dense']['kernel'].shape[-1]
  model = classifier.build_classifier(
      t_config, head_layers=_head_layers_in(params), num_classes=num_classes)
  return model, t_vars, t_config, t_step


def run_distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """SimCLRv2 self-training: a student learns the teacher's soft labels.

  The teacher (config.init_from, a fine-tuning run) labels every training
  image, unlabelled included, as it is augmented for the student; the student
  (config.model's ResNet with no head layers, from random init) minimises
  supervised.distill_loss_fn. With distill.labelled_weight > 0 the labels of
  the teacher's own labelled subset are mixed in.
  """
  mesh = parallel.make_mesh()
  _check(config, 'distill', mesh)
  dcfg.check_distill(config)
  supervised.check_fresh_workdir(workdir)
  d = config.distill
  teacher, t_vars, t_config, t_step = _load_teacher(config)
  num_classes = teacher.num_classes
  student = classifier.build_classifier(config, head_layers=0,
                                        num_classes=num_classes)
  variables = _init_variables(student, config, jax.random.key(config.seed),
                              None)
  frozen = supervised.frozen_mask(variables['params'])
  label_rows = None
  if d.labelled_weight > 0:
    info = t_config.get('downstream', {})
    _, labels = pipeline.load_train_arrays_raw(config)
    label_rows = labelled.label_subset(
        labels, info.get('label_fraction', 1.0), info.get('label_seed', 0))
  batches, n, details = _train_data(config, d, label_rows=label_rows)
  fit = _train(config, d, student, variables, frozen,
               supervised.distill_loss_fn(d.temperature, d.labelled_weight),
               batches, n, mesh, name='distill', teacher=teacher,
               teacher_variables=t_vars)
  s_logits, labels = _test_logits(config, student, _variables(fit.state),
                                  mesh)
  t_logits, _ = _test_logits(config, teacher, t_vars, mesh)
  teacher_acc = _accuracies(t_logits, labels)
  results = dict(
      _common(config, 'distill', t_step, fit), **_accuracies(s_logits, labels),
      **details, num_train_examples=n,
      teacher_top1_accuracy=teacher_acc['top1_accuracy'],
      teacher_top5_accuracy=teacher_acc['top5_accuracy'],
      agreement=float(np.mean(np.argmax(s_logits, -1) ==
                              np.argmax(t_logits, -1))),
      temperature=d.temperature, labelled_weight=d.labelled_weight,
      student_depth=config.model.depth,
      student_width_multiplier=config.model.width_multiplier)
  supervised.save_run(workdir, dcfg.recorded_config(
      config, config, head_layers=0, mode='distill',
      teacher=config.init_from, temperature=d.temperature), fit.state)
  return results


def run_embed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """2-D PCA / t-SNE of the test-split encoder features, as a PNG."""
  from simclr_jax.evaluation import embedding  # pylint: disable=g-import-not-at-top
  dcfg.check_embed(config)
  e = config.embed
  src_config, src_vars, src_step = _load_source(config)
  m = src_config.model
  encoder = resnet.ResNet(
      depth=m.depth, width_multiplier=m.width_multiplier, sk_ratio=m.sk_ratio,
      cifar_stem=classifier.uses_cifar_stem(m, src_config.dataset.image_size),
      maxpool_padding=m.get('maxpool_padding', 'torch'))
  variables = {'params': src_vars['params']['encoder'],
               'batch_stats': src_vars['batch_stats']['encoder']}
  mesh = parallel.make_mesh()
  apply = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
  feats, labels = [], []
  for x, y in labelled.eval_chunks(config):
    feats.append(features_lib.extract_features(
        apply, x, config.eval.batch_size, mesh, variables=variables))
    labels.append(y)
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  if len(labels) > e.max_points:  # Seeded subsample keeps t-SNE fast.
    keep = np.sort(np.random.default_rng(config.seed).choice(
        len(labels), e.max_points, replace=False))
    feats, labels = feats[keep], labels[keep]
  t0 = time.time()
  points = embedding.project_2d(feats, e.method, seed=config.seed)
  path = os.path.join(workdir, f'embedding_{e.method}.png')
  title = (f'{e.method.upper()} of {config.dataset.name} '
           f'{config.dataset.eval_split} encoder features\n'
           f'{config.init_from} (step {src_step})')
  if jax.process_index() == 0:
    embedding.plot_embedding(points, labels, path, title)
    buffer = io.BytesIO()  # np.savez needs a seekable file; GCS has none.
    np.savez(buffer, points=points, labels=labels)
    epath.Path(workdir, f'embedding_{e.method}.npz').write_bytes(
        buffer.getvalue())
  return {'mode': 'embed', 'init_from': config.init_from,
          'source_step': src_step, 'method': e.method,
          'num_points': int(len(labels)), 'feature_dim': int(feats.shape[1]),
          'png': paths.abspath(path), 'projection_wall_time_s':
          time.time() - t0}
