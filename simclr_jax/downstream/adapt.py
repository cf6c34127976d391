r"""Domain adaptation: labelled source images, unlabelled target images.

  python -m simclr_jax.main --config=configs/digits_adapt.py --workdir=RUN \
      --mode=adapt --config.adapt.method=dann [--config.init_from=PRETRAINED]

Trains an encoder + linear classifier on the labelled source
(config.dataset) while aligning its features with those of the target
(config.adapt.target), whose training images come without labels. Every
batch holds adapt.batch_size images of each domain, both sharded over the
mesh (training/adapt_step.py). Methods (config.adapt.method):

  source_only   the baseline: supervised on the source alone;
  adabn         source_only, then BN statistics re-estimated on the target's
                training images for predicting on the target (Li et al.
                2016, AdaBN);
  dann          domain classifier behind gradient reversal (Ganin &
                Lempitsky 2015);
  coral, mmd    second-order / multi-kernel statistic alignment (Sun &
                Saenko 2016; Long et al. 2015);
  contrastive   SimCLR on the source and target images together first
                (the target unlabelled, adapt.contrastive_epochs, in
                RUN/contrastive), then the source classifier on that
                encoder; contrastive+dann / +coral / +mmd add the alignment.

The target's labels are read for evaluation only: `domain_arrays` drops
them before anything trains, the contrastive phase sees the target as
unlabelled, and no choice (checkpoint, schedule) depends on the target.
results.json holds source and target top-1 and, with
adapt.compare_source_only, those of `source_only` at the same budget
(trained in RUN/source_only).
"""

import copy
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from simclr_jax.config import downstream as dcfg
from simclr_jax.data import datasets
from simclr_jax.data import labelled
from simclr_jax.data import pipeline
from simclr_jax.downstream import common
from simclr_jax.models import classifier
from simclr_jax.training import adapt_step
from simclr_jax.training import state as state_lib
from simclr_jax.training import supervised
from simclr_jax.training import workdir as workdir_lib

ALIGNING = ('dann', 'coral', 'mmd')
METHODS = (('source_only', 'adabn') + ALIGNING + ('contrastive',)
           + tuple(f'contrastive+{a}' for a in ALIGNING))
# AdaBN: passes over the target's training images that re-estimate BN.
_ADABN_PASSES = 3


def parse_method(method: str) -> tuple[bool, str]:
  """'contrastive+dann' -> (True, 'dann'); 'source_only' -> (False, 'none')."""
  if method not in METHODS:
    raise ValueError(f'config.adapt.method={method!r} is invalid: choose one '
                     f'of {", ".join(METHODS)}')
  parts = method.split('+')
  contrastive = parts[0] == 'contrastive'
  rest = parts[1:] if contrastive else parts
  kind = rest[0] if rest and rest[0] in ALIGNING else 'none'
  return contrastive, kind


def target_dataset(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The target domain as fields replacing config.dataset's."""
  a = config.adapt
  return {'name': a.target, 'data_dir': a.target_data_dir,
          'train_split': a.target_train_split,
          'eval_split': a.target_eval_split}


def target_config(config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """The config whose dataset is the target domain (same image sizes)."""
  return datasets.with_overrides(config, target_dataset(config))


def domain_arrays(config: ml_collections.ConfigDict
                  ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
  """((source images, labels), target images): raw uint8 training arrays.

  The one place the target's training split is read; its labels are
  dropped here.
  """
  source = pipeline.load_train_arrays_raw(config)
  target_images, _ = pipeline.load_train_arrays_raw(target_config(config))
  return source, target_images


def domain_batches(source: tuple[np.ndarray, np.ndarray],
                   target_images: np.ndarray, *, global_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   start_step: int = 0) -> Iterator[dict]:
  """Host-local two-domain batches: global_batch images of each domain.

  Each domain is its own seeded epoch stream (labelled.array_batches), so
  process p takes the same rows of both as a 1-process run would, and a
  resumed run continues both streams where they were.
  """
  kw = dict(global_batch=global_batch, process_index=process_index,
            process_count=process_count, start_step=start_step)
  src = labelled.array_batches(*source, seed=seed, **kw)
  tgt = labelled.array_batches(
      target_images, np.full(len(target_images), -1, np.int32),
      seed=seed + 1, **kw)
  for s, t in zip(src, tgt):
    yield {'source_images': s['images'], 'source_labels': s['labels'],
           'target_images': t['images']}


def adabn_variables(model: Any, variables: dict,
                    target: ml_collections.ConfigDict) -> dict:
  """AdaBN (Li et al. 2016): the network with its BN statistics
  re-estimated on the target's training images (labels unused), for
  predicting on the target."""
  images, _ = pipeline.load_eval_arrays(target, target.dataset.train_split)
  return state_lib.recalibrate_batch_stats(
      model, jax.device_get(variables), images,
      batch_size=target.adapt.batch_size, num_devices=jax.device_count(),
      passes=_ADABN_PASSES)


def _contrastive_phase(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_steps: int | None):
  """SimCLR on source + target images; (config, variables, step) or None
  if interrupted."""
  from simclr_jax.training import pretrain  # pylint: disable=g-import-not-at-top
  a = config.adapt
  try:
    union = datasets.union_name(config.dataset.name, a.target)
  except datasets.DatasetError as e:
    raise ValueError(
        f'config.adapt.method={a.method!r} pretrains on '
        f'{config.dataset.name}+{a.target}, which needs both domains in '
        'memory (digits, digits_m, synthetic); for TFDS domains pretrain '
        'first and pass --config.init_from=THAT_RUN with a non-contrastive '
        'method') from e
  c = copy.deepcopy(config)
  c.dataset.name = union  # The target part is unlabelled (-1).
  # adapt.contrastive_epochs, unless config.train_steps fixes the phase's
  # steps (as it fixes pretraining's; tests and smoke runs).
  c.num_epochs = int(a.contrastive_epochs)
  c.optim.warmup_epochs = min(c.optim.warmup_epochs, c.num_epochs)
  for entry in c.evals.values():  # No read-outs during this phase.
    entry.every_steps, entry.every_epochs = 0, 0.0
  sub = os.path.join(workdir, 'contrastive')
  setup = pretrain.build(c)
  pretrain.prepare_workdir(sub)
  out = pretrain.pretrain(c, sub, setup, stop_after_steps=stop_after_steps)
  if out['interrupted']:
    return None
  variables = jax.tree.map(np.asarray, jax.device_get(
      state_lib.variables_of(out['state'])))
  return c, variables, out['steps']


def run_adapt(config: ml_collections.ConfigDict, workdir: str, *,
              stop_after_steps: int | None = None) -> dict:
  """Adapts (or resumes adapting); returns results.json."""
  a = config.adapt
  contrastive, kind = parse_method(a.method)
  dcfg.check_adapt(config)
  source_step = 0
  if contrastive:
    phase = _contrastive_phase(config, workdir, stop_after_steps)
    if phase is None:
      return {'mode': 'adapt', 'method': a.method, 'interrupted': True,
              'phase': 'contrastive'}
    arch_config, source_vars, source_step = phase
  elif config.init_from:
    arch_config, source_vars, source_step = common.load_source(config)
  else:
    arch_config, source_vars = config, None
  num_classes = datasets.dataset_info(config).num_classes
  model = classifier.build_classifier(
      arch_config, head_layers=0, num_classes=num_classes,
      domain_hidden_dim=a.domain_hidden_dim if kind == 'dann' else 0)
  variables = common.init_variables(model, config, jax.random.key(config.seed),
                                    source_vars)
  frozen = supervised.frozen_mask(variables['params'])  # Nothing frozen.
  source, target_images = domain_arrays(config)
  data = common.TrainData(
      lambda start: domain_batches(
          source, target_images, global_batch=a.batch_size, seed=config.seed,
          process_index=jax.process_index(),
          process_count=jax.process_count(), start_step=start),
      len(source[1]),
      {'source': f'{config.dataset.name}:{config.dataset.train_split}',
       'target': f'{a.target}:{a.target_train_split} (labels unused)'})
  recorded = dcfg.recorded_config(
      config, arch_config, head_layers=0, mode='adapt', method=a.method,
      target=a.target)

  def make_step(tx, schedule, mesh, total_steps):
    return adapt_step.make_adapt_step(
        model, tx, schedule, mesh, alignment_kind=kind, weight=a.weight,
        total_steps=total_steps, dann_gamma=a.dann_gamma,
        image_size=config.dataset.image_size,
        crop_min_area=config.augment.finetune_crop_min_area,
        flip=config.augment.finetune_flip,
        skip_nonfinite=config.on_nan == 'skip_step')

  fit = common.train_classifier(
      config, 'adapt', workdir, model, variables, frozen, None, data,
      recorded, name=f'adapt({a.method})', stop_after_steps=stop_after_steps,
      make_step=make_step)
  results = dict(common.summary(config, 'adapt', source_step, fit),
                 **data.details, method=a.method, weight=a.weight,
                 num_source_examples=len(source[1]),
                 num_target_examples=len(target_images))
  if fit.interrupted:
    return results
  v = state_lib.variables_of(fit.state)
  target = target_config(config)
  results['source_top1_accuracy'] = common.accuracies(
      *common.test_logits(config, model, v))['top1_accuracy']
  if a.method == 'adabn':
    v = adabn_variables(model, v, target)
  results['target_top1_accuracy'] = common.accuracies(
      *common.test_logits(target, model, v))['top1_accuracy']
  if a.compare_source_only and a.method != 'source_only':
    base = copy.deepcopy(config)
    base.adapt.method, base.adapt.compare_source_only = 'source_only', False
    sub = os.path.join(workdir, 'source_only')
    workdir_lib.prepare_workdir(sub)
    ref = run_adapt(base, sub, stop_after_steps=stop_after_steps)
    if ref.get('interrupted'):
      return dict(results, interrupted=True)
    results['source_only'] = {k: ref[k] for k in (
        'source_top1_accuracy', 'target_top1_accuracy', 'train_wall_time_s')}
    results['target_gain_over_source_only'] = (
        results['target_top1_accuracy'] - ref['target_top1_accuracy'])
  return results
