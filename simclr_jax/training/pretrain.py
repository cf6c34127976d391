"""Pretraining: builds model, method, optimiser and stream from a config.

`pretrain(config, workdir)` is what `main --mode=pretrain` calls; it hands
the shared loop (training/loop.py) a jitted step and a stream that can start
at any step, so re-running on the same workdir resumes from the last complete
checkpoint with the input stream at the same position, and an interrupted run
ends where an uninterrupted one would. `evaluate_encoder` then reads the
frozen representation out (probes, few-shot probes, kNN), pretrained against
random init.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from simclr_jax import methods
from simclr_jax import models
from simclr_jax.config import defaults
from simclr_jax.config import durations
from simclr_jax.config import resolve as config_resolve
from simclr_jax.config.validation import ConfigError
from simclr_jax.evaluation import features as features_lib
from simclr_jax.evaluation import knn_monitor
from simclr_jax.evaluation import readout
from simclr_jax.models import encoders
from simclr_jax.runtime import accelerator
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.training import loop
from simclr_jax.training import pretrain_step as train_step_lib
from simclr_jax.training import state as state_lib
from simclr_jax.training import workdir as workdir_lib

NonFiniteError = loop.NonFiniteError
prepare_workdir = workdir_lib.prepare_workdir


@dataclasses.dataclass
class Setup:
  """What a run is built from; shared by pretraining, evaluation, benchmark."""
  config: ml_collections.ConfigDict
  mesh: Any
  info: Any
  steps_per_epoch: int
  total_steps: int
  model: Any
  method: Any  # methods.Method: the loss and any state besides params.
  tx: Any
  schedule: Any
  init_rng: jax.Array
  step_rng: jax.Array


def check_resume_compatible(workdir: str, config: ml_collections.ConfigDict
                            ) -> None:
  """Stops a resume whose config would not fit the checkpointed state."""
  workdir_lib.check_and_record(
      workdir, config, defaults.resume_fields(config, 'pretrain'))


def _data_position(setup: Setup, step: int) -> dict:
  return {'step': step, 'epoch': step // setup.steps_per_epoch,
          'batch_in_epoch': step % setup.steps_per_epoch,
          'seed': setup.config.seed, 'dataset': setup.config.dataset.name}


def build(config: ml_collections.ConfigDict, mesh=None) -> Setup:
  """Resolves the config (once) and builds model, optimiser and schedule.

  Setup.config is the resolved config (config/resolve.py): the one the run
  records and every later stage reads.
  """
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh() if mesh is None else mesh
  config = config_resolve.resolve(config, num_devices=mesh.devices.size,
                                  process_count=jax.process_count())
  info = datasets.dataset_info(config)
  steps_per_epoch = pipeline.steps_per_epoch(config, info)
  if steps_per_epoch <= 0:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is larger than the '
        f'{info.num_train_examples} training examples of {config.dataset.name}')
  total_steps = config.train_steps or config.num_epochs * steps_per_epoch
  method = methods.make_method(config, mesh=mesh, total_steps=total_steps,
                               num_train_examples=info.num_train_examples)
  # The online linear head needs a width even without labels (its loss is
  # then 0: every label is -1).
  model = models.build_model(config, max(info.num_classes, 1),
                             **method.model_overrides())
  tx, schedule = make_optimizer(config, steps_per_epoch, total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  return Setup(config, mesh, info, steps_per_epoch, total_steps, model,
               method, tx, schedule, init_rng, step_rng)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                   total_steps: int):
  """(optimizer, schedule) of pretraining, with what the encoder declares:
  the leaves without weight decay or LARS adaptation, and the parts that
  never train (MoCo v3's frozen patch projection)."""
  return optim.make_optimizer(
      config, steps_per_epoch, total_steps,
      frozen=encoders.frozen_mask(config.model, config.dataset.image_size),
      no_decay=encoders.no_decay_leaves())


def views_fn(setup: Setup):
  """batch, rng -> the two views the step trains on (made on the device for
  the 'jax' backend, read from the batch for 'tf')."""
  c = setup.config
  return train_step_lib.make_views_fn(
      c.augment.backend, c.dataset.image_size, c.augment.color_strength,
      c.augment.blur, c.augment.crop_min_area, c.augment.flip)


def make_step(setup: Setup):
  c = setup.config
  return train_step_lib.make_train_step(
      setup.model, setup.tx, setup.schedule, setup.mesh,
      method=setup.method, views_fn=views_fn(setup),
      skip_nonfinite=c.on_nan == 'skip_step',
      inject_nan_at_step=c.debug.inject_nan_at_step,
      compute_dtype=jnp.dtype(c.model.compute_dtype),
      grad_cache_chunks=c.grad_cache_chunks, grad_cache_bn=c.grad_cache_bn)


def initial_state(setup: Setup) -> state_lib.TrainState:
  return train_step_lib.create_train_state(
      setup.model, setup.tx, setup.init_rng, setup.config.dataset.image_size,
      setup.mesh, setup.method)


def _knn_hook(setup: Setup, workdir: str):
  """The loop's after_step hook for the kNN monitor, or None if it is off."""
  if not knn_monitor.interval(setup.config, setup.steps_per_epoch):
    return None  # Off: read no evaluation dataset at start-up.
  ec, labelled = probe_dataset(setup)
  if not labelled:
    logging.warning('kNN monitor off: %s has no labels to score it with.',
                    ec.dataset.name)
    return None
  monitor = knn_monitor.KnnMonitor(setup, workdir, ec)

  def after_step(step: int, state) -> dict | None:
    if not monitor.due(step, setup.total_steps):
      return None
    return {'knn_accuracy': monitor.measure(step, state_lib.variables_of(state))}

  return after_step


def _host_update_hook(setup: Setup):
  """The loop's before_step hook from `method.host_update`, or None.

  Each call streams the train split (eval preprocessing) through the
  encoder and keeps only its features.
  """
  method = setup.method
  if type(method).host_update is methods.Method.host_update:
    return None
  c = setup.config
  apply = readout.feature_fn(setup.model)

  def featurize(variables):
    # Streamed in split order: row i is example i of the train split.
    return readout.featurize_split(apply, variables, c, c.dataset.train_split,
                                   batch_size=c.eval.batch_size,
                                   mesh=setup.mesh)[0]

  context = methods.HostContext(
      config=c, mesh=setup.mesh, model=setup.model,
      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps,
      featurize=featurize)
  return lambda step, state: method.host_update(step, state, context)


def loop_spec(setup: Setup, workdir: str,
              input_stats: dict | None = None) -> loop.LoopSpec:
  """Pretraining as the shared loop runs it."""
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = setup.config
  input_stats = {} if input_stats is None else input_stats

  def batches(start_step: int):
    return pipeline.make_pretrain_iterator(
        c, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start_step,
        include_index=setup.method.needs_index, stats=input_stats)

  return loop.LoopSpec(
      name='pretrain', step_fn=make_step(setup), batches=batches,
      total_steps=setup.total_steps, steps_per_epoch=setup.steps_per_epoch,
      batch_size=c.batch_size, rng=setup.step_rng, mesh=setup.mesh,
      on_nan=c.on_nan,
      log_every_steps=durations.steps(c, 'log_every', setup.steps_per_epoch,
                                      minimum=1),
      checkpoint_every_steps=durations.steps(
          c, 'checkpoint_every', setup.steps_per_epoch, minimum=1),
      keep_checkpoints=c.keep_checkpoints, prefetch=c.dataset.prefetch,
      accuracy_key='contrastive_acc',
      position=functools.partial(_data_position, setup),
      after_step=_knn_hook(setup, workdir),
      before_step=_host_update_hook(setup))


def pretrain(config: ml_collections.ConfigDict, workdir: str,
             setup: Setup | None = None,
             stop_after_steps: int | None = None) -> dict:
  """Runs (or resumes) pretraining; returns the results dict.

  `stop_after_steps` ends this invocation early (with a checkpoint) after that
  many steps, for time-boxed scheduler slots; running again continues.

  Returns a dict with steps, final_train_loss, resumed_from_step, wall_time_s
  and 'state' (the final TrainState, not JSON).
  """
  t_start = time.time()
  setup = setup or build(config)
  config = setup.config  # Resolved: what the workdir records.
  workdir_lib.prepare_workdir(workdir)
  check_resume_compatible(workdir, config)
  input_stats = {}  # The stream counts corrupt images it skipped here.
  spec = loop_spec(setup, workdir, input_stats)
  logging.info('Pretraining %s: %d steps (%d per epoch), global batch %d on '
               '%s', config.dataset.name, setup.total_steps,
               setup.steps_per_epoch, config.batch_size, accelerator.describe())
  corrupt = lambda: {'corrupt_images_skipped': input_stats.get(
      'corrupt_images_skipped', 0)}
  out = loop.run(spec, initial_state(setup), workdir,
                 stop_after_steps=stop_after_steps, extra_metrics=corrupt)
  return {
      'steps': out.steps,
      'total_steps': out.total_steps,
      'interrupted': out.interrupted,
      'final_train_loss': out.final_loss,
      'final_metrics': out.final_metrics,
      'resumed_from_step': out.resumed_from_step,
      'skipped_steps': out.skipped_steps,
      'corrupt_images_skipped': input_stats.get('corrupt_images_skipped', 0),
      'knn_monitor': knn_monitor.read_history(workdir),
      'pretrain_wall_time_s': time.time() - t_start,
      'state': out.state,
  }


# Batches of eval.batch_size training images that re-estimate the BN
# statistics of the random-init baseline: a fixed number, whatever the size
# of the split. With BN momentum 0.9 the initial (0, 1) statistics keep
# 0.9^50 < 1% of their weight after them, and the last ten batches hold
# about two thirds of it, which is why the batches are shuffled: in split
# order a split sorted by class (an image folder) would give those last
# batches a few classes only.
RANDOM_INIT_BN_BATCHES = 50


def _cycled_batches(config: ml_collections.ConfigDict, split: str,
                    batch_size: int, count: int,
                    seed: int) -> Iterator[np.ndarray]:
  """`count` batches of exactly `batch_size` eval images of a split.

  The split's stream, shuffled with a seed drawn from (`seed`, pass), is
  re-cut into equal batches (one shape, one compilation; no ragged last
  batch with noisy statistics) and read again, in a new order, when it ends
  before `count` batches, so small splits such as digits contribute every
  image. Only one batch and one chunk are held (a streamed split shuffles
  in a bounded buffer: DataSource.eval_batches).
  """
  from simclr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from simclr_jax.data import streams  # pylint: disable=g-import-not-at-top
  pending, rows, made, passes = [], 0, 0, 0
  while made < count:
    empty = True
    chunks = pipeline.eval_batches(
        config, split, batch_size,
        shuffle_seed=streams.seed31(seed, passes))
    passes += 1
    for x, _ in chunks:
      empty = empty and not len(x)
      pending.append(np.asarray(x))
      rows += len(x)
      while rows >= batch_size and made < count:
        joined = np.concatenate(pending)
        yield joined[:batch_size]
        pending, rows, made = [joined[batch_size:]], rows - batch_size, made + 1
      if made >= count:
        return
    if empty:
      raise ValueError(f'split {split!r} has no images for the BN statistics')


def recalibrate_batch_stats(setup: Setup, variables: dict,
                            config: ml_collections.ConfigDict | None = None,
                            batches: int = RANDOM_INIT_BN_BATCHES) -> dict:
  """BN running statistics re-estimated on `batches` train-split batches.

  Used for the random-init baseline: its running averages are still the
  initial (0, 1), which would make a fair network look broken. The images
  are `config`'s (default the run's) train split, streamed in an order
  shuffled with the run's seed (`_cycled_batches`): the same batches for
  the same seed, a bounded cost on any dataset, at most eval.batch_size
  images in memory besides a streamed split's shuffle buffer.
  """
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  c = setup.config if config is None else config
  split = c.dataset.train_split
  devices = setup.mesh.devices.size
  bs = min(setup.config.eval.batch_size,
           datasets.source_for(c).split_size(split))
  bs = max(devices, bs // devices * devices)
  return state_lib.batch_stats_from_batches(
      setup.model, variables,
      _cycled_batches(c, split, bs, batches, seed=setup.config.seed))


def probe_dataset(setup: Setup) -> tuple[ml_collections.ConfigDict, bool]:
  """(the config whose dataset the read-outs use, whether it has labels)."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  ec = datasets.evaluation_config(setup.config)
  info = setup.info if ec is setup.config else datasets.dataset_info(ec)
  return ec, info.labelled


@contextlib.contextmanager
def _logged_readout(k: int, n: int, what: str) -> Iterator[None]:
  """Logs read-out k of n and its time: each takes minutes on a CPU and
  writes no step lines of its own, so the log would otherwise stall."""
  logging.info('Read-out %d/%d: %s (probe, few-shot probes, kNN)', k, n, what)
  start = time.time()
  yield
  logging.info('Read-out %d/%d finished in %.0f s', k, n, time.time() - start)


def evaluate_encoder(setup: Setup, state: state_lib.TrainState) -> dict:
  """Frozen-feature probes, few-shot probes and kNN, pretrained vs random.

  Every baseline reads the images the encoder is read out on: the
  random-init baseline is the exact network pretraining started from (same
  seed), with BN statistics re-estimated on RANDOM_INIT_BN_BATCHES seeded,
  shuffled batches of training images; the pixel baseline is the flattened
  images of both splits (eval.pixel_max_examples caps it where they would
  not fit). Host memory holds the splits' features and at most one batch of
  images; a split whose features exceed eval.feature_gather_max_bytes stays
  spread over the hosts, each holding its own rows. results.json records
  the bytes of features each process held (feature_bytes_per_process).
  """
  c = setup.config
  ec, labelled = probe_dataset(setup)
  if not labelled:
    why = (f'probes skipped: {ec.dataset.name} {ec.dataset.train_split!r} has '
           'no labels; set config.eval.dataset.name (and .folder, '
           '.train_split, .eval_split) to probe on a labelled dataset')
    logging.warning('%s.', why)
    return {'probes_skipped': why}
  apply = readout.feature_fn(setup.model)
  t0 = time.time()

  held = {}  # Split name -> bytes of its features on each process.

  def probe(variables: dict, record: bool = False) -> dict:
    # Streamed: only the features of each split are held, never its images.
    splits = {'train': ec.dataset.train_split, 'test': ec.dataset.eval_split}
    train, test = (readout.featurize_split(
        apply, variables, ec, split, batch_size=c.eval.batch_size,
        mesh=setup.mesh, gather_max_bytes=c.eval.feature_gather_max_bytes)
                   for split in splits.values())
    if record:
      for name, (features, _) in zip(splits, (train, test)):
        held[name] = readout.bytes_per_process(features)
        spread = isinstance(features, features_lib.ShardedFeatures)
        logging.info('Features of %r: %d x %d (%d bytes), held %s; bytes '
                     'per process: %s', splits[name], *features.shape,
                     4 * features.shape[0] * features.shape[1],
                     'spread over the processes' if spread else
                     'whole on every process', held[name])
    return {**readout.evaluate_frozen(
        train, test, eval_config=c.eval, seed=c.seed, mesh=setup.mesh,
        knn_predictions=record and c.debug.record_knn_predictions),
            'probe_train_examples': len(train[1]),
            'probe_test_examples': len(test[1])}

  n = 1 + bool(c.eval.probe_random_init) + bool(c.eval.probe_pixels)
  with _logged_readout(1, n, 'the pretrained encoder'):
    results = probe(state_lib.variables_of(state), record=True)
  results['feature_bytes_per_process'] = held
  if c.eval.probe_random_init:
    with _logged_readout(2, n, 'the same network at random init'):
      init = jax.device_get(initial_state(setup))
      rand = probe(recalibrate_batch_stats(
          setup, state_lib.variables_of(init), ec))
    # The README's results.json names: random_init_probe_accuracy for the
    # all-label probe, random_init_fewshot_probe_accuracy, ...
    results.update(readout.prefixed('random_init_', {
        k: v for k, v in rand.items() if not k.endswith('_examples')}))
    results['random_init_bn_batches'] = RANDOM_INIT_BN_BATCHES
    # Those batches are the train split shuffled with this seed.
    results['random_init_bn_shuffle_seed'] = c.seed
  if c.eval.probe_pixels:
    with _logged_readout(n, n, 'the raw pixels'):
      pixels = [readout.sample_pixels(
          ec, split, max_examples=c.eval.pixel_max_examples, seed=c.seed,
          batch_size=c.eval.batch_size)
                for split in (ec.dataset.train_split, ec.dataset.eval_split)]
      results.update(readout.prefixed('pixel_', readout.evaluate_pixels(
          *pixels, eval_config=c.eval, seed=c.seed, mesh=setup.mesh)))
    results['pixel_train_examples'] = len(pixels[0][1])
    results['pixel_test_examples'] = len(pixels[1][1])
  results['eval_wall_time_s'] = time.time() - t0
  return results
