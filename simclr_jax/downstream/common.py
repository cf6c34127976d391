"""What the downstream modes share: the source run, the network's variables,
the labelled stream, and training a classifier through the shared loop.

Every training mode (linear_eval, finetune, distill) records its config in
its workdir before the first step and checkpoints through training/loop.py,
so it resumes after preemption like pretraining does, and refuses a workdir
that holds another mode's run, another source, label fraction or model.
"""

import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from simclr_jax.config import defaults
from simclr_jax.config import downstream as dcfg
from simclr_jax.config import durations
from simclr_jax.data import datasets
from simclr_jax.data import labelled
from simclr_jax.data import pipeline
from simclr_jax.models import classifier
from simclr_jax.models import heads
from simclr_jax.runtime import checkpointing
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.training import loop
from simclr_jax.training import state as state_lib
from simclr_jax.training import supervised
from simclr_jax.training import workdir as workdir_lib


def load_source(config: ml_collections.ConfigDict):
  """(config, variables, step) of the run named by config.init_from."""
  if not config.init_from:
    raise ValueError('config.init_from is empty: pass '
                     '--config.init_from=WORKDIR_OF_THE_SOURCE_RUN')
  if not epath.Path(config.init_from).is_dir():
    raise FileNotFoundError(f'config.init_from={config.init_from!r} is not a '
                            'directory')
  return checkpointing.load_run(config.init_from)


def head_layers_in(params: dict) -> int:
  """Projection-head layers a checkpoint holds (dense1, dense2, ...)."""
  return heads.num_head_layers(params.get('projection_head', {}))


def init_variables(model: classifier.Classifier, config, rng: jax.Array,
                   source: dict | None) -> dict:
  """Random init, then (unless `source` is None) the source's weights.

  Copies the encoder and the kept head layers by name, params and BN
  statistics alike; only the classifier stays random.
  """
  variables = jax.device_get(jax.jit(
      lambda k: state_lib.init_variables(model, k, config.dataset.image_size))(
          rng))
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


@dataclasses.dataclass
class TrainData:
  """A labelled stream that can start at any step, and its size."""
  batches: Callable[[int], Iterator[dict]]
  num_examples: int
  details: dict


def train_data(config, section, *, fraction: float = 1.0,
               label_seed: int = 0, label_rows: Any = None) -> TrainData:
  """The labelled training stream of a mode.

  `label_rows` (distillation) keeps the labels of those rows of the full
  train split and marks every other example unlabelled (-1).
  """
  kw = dict(global_batch=section.batch_size, seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count())
  name, split = config.dataset.name, config.dataset.train_split
  if not datasets.source_for(config).fits_in_memory():
    if label_rows is not None:
      raise ValueError('config.distill.labelled_weight > 0 needs an '
                       f'in-memory dataset; {name!r} is streamed, use 0')
    subset = labelled.imagenet_source(name, fraction)
    source = datasets.source_for(datasets.with_name(config, subset))
    return TrainData(
        lambda start: source.labelled_stream(split, start_step=start, **kw),
        source.split_size(split), {'label_source': subset})
  images, labels, _ = labelled.load_labelled_arrays(config, fraction,
                                                    label_seed)
  if label_rows is not None:
    keep = np.zeros(len(labels), bool)
    keep[label_rows] = True
    labels = np.where(keep, labels, -1).astype(np.int32)
  return TrainData(
      lambda start: labelled.array_batches(images, labels, start_step=start,
                                           **kw),
      len(labels), {'label_source': f'{name}:{split}'})


def train_classifier(config: ml_collections.ConfigDict, mode: str,
                     workdir: str, model: Any, variables: dict, frozen: Any,
                     loss_fn: supervised.LossFn, data: TrainData,
                     recorded: ml_collections.ConfigDict, *,
                     name: str | None = None, teacher: Any = None,
                     teacher_variables: Any = None,
                     stop_after_steps: int | None = None,
                     make_step: Callable | None = None) -> loop.LoopResult:
  """Trains `model` from `variables` for config[mode].epochs in the loop.

  Records `recorded` as the workdir's config.json first (refusing an
  incompatible run there), so an interrupted run resumes on re-run.
  `make_step(tx, schedule, mesh, total_steps)` replaces the supervised step
  (adapt's two-domain step); `loss_fn` is then unused.
  """
  section = config[mode]
  dcfg.check_training(mode, section, num_devices=jax.device_count(),
                      process_count=jax.process_count())
  workdir_lib.check_and_record(workdir, recorded,
                               defaults.resume_fields(recorded, mode))
  mesh = parallel.make_mesh()
  steps_per_epoch = data.num_examples / section.batch_size
  total = max(1, math.ceil(section.epochs * steps_per_epoch))
  tx, schedule = optim.make_supervised_optimizer(section, total, frozen)
  if make_step is not None:
    step_fn = make_step(tx, schedule, mesh, total)
  else:
    step_fn = supervised.make_train_step(
        model, tx, schedule, mesh, frozen, loss_fn,
        config.dataset.image_size, teacher=teacher,
        teacher_variables=teacher_variables,
        skip_nonfinite=config.on_nan == 'skip_step',
        crop_min_area=config.augment.finetune_crop_min_area,
        flip=config.augment.finetune_flip)
  spec = loop.LoopSpec(
      name=name or mode, step_fn=step_fn, batches=data.batches,
      total_steps=total, steps_per_epoch=steps_per_epoch,
      batch_size=section.batch_size,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1), mesh=mesh,
      on_nan=config.on_nan,
      log_every_steps=durations.steps(config, 'log_every', steps_per_epoch,
                                      minimum=1),
      checkpoint_every_steps=durations.steps(
          config, 'checkpoint_every', steps_per_epoch, minimum=1),
      keep_checkpoints=config.keep_checkpoints, prefetch=config.dataset.prefetch,
      accuracy_key='accuracy', position=lambda step: {'step': step})
  return loop.run(spec, state_lib.create_state(tx, variables, mesh), workdir,
                  stop_after_steps=stop_after_steps)


def test_logits(config, model, variables) -> tuple[np.ndarray, np.ndarray]:
  """(logits, labels) of the evaluation split."""
  chunks = pipeline.eval_batches(config, config.dataset.eval_split,
                                 config.eval.batch_size)
  return supervised.predict_logits(model, variables, chunks,
                                   config.eval.batch_size, parallel.make_mesh())


def accuracies(logits: np.ndarray, labels: np.ndarray) -> dict:
  return {'top1_accuracy': supervised.topk_accuracy(logits, labels, 1),
          'top5_accuracy': supervised.topk_accuracy(logits, labels, 5),
          'num_test_examples': int(len(labels))}


def summary(config, mode: str, source_step: int,
            fit: loop.LoopResult) -> dict:
  """The results.json fields every training mode has."""
  return {'mode': mode, 'init_from': config.init_from,
          'source_step': source_step, 'steps': fit.steps,
          'total_steps': fit.total_steps, 'interrupted': fit.interrupted,
          'resumed_from_step': fit.resumed_from_step,
          'epochs': config[mode].epochs,
          'final_train_loss': fit.final_loss,
          'skipped_steps': fit.skipped_steps,
          'train_wall_time_s': fit.wall_time_s}
