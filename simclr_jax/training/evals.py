"""The end-of-run read-outs config.evals declares, and their baselines.

Each entry names a read-out type (evaluation/registry.py) and the dataset
it reads. Its features are computed here, once per (dataset, network)
however many entries read them: the pretrained encoder's, the same network
at random init (the exact network pretraining started from, BN statistics
re-estimated), or the raw pixels. Host memory holds the splits' features
and at most one batch of images; a split whose features exceed
eval.feature_gather_max_bytes stays spread over the hosts, each holding its
own rows. Results are named by entry (registry.named); the encoder's
feature counts on the pretraining dataset keep the names results.json has
always had (probe_train_examples, feature_bytes_per_process).
"""

import contextlib
import time
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
from absl import logging

from simclr_jax.evaluation import features as features_lib
from simclr_jax.evaluation import readout
from simclr_jax.evaluation import registry
from simclr_jax.training import state as state_lib

# Batches of eval.batch_size training images that re-estimate the BN
# statistics of the random-init baseline: a fixed number, whatever the size
# of the split. With BN momentum 0.9 the initial (0, 1) statistics keep
# 0.9^50 < 1% of their weight after them, and the last ten batches hold
# about two thirds of it, which is why the batches are shuffled: in split
# order a split sorted by class (an image folder) would give those last
# batches a few classes only.
RANDOM_INIT_BN_BATCHES = 50

# What the log calls each network whose features are read out.
_WHAT = {'encoder': 'the pretrained encoder',
         'random_init': 'the same network at random init',
         'pixels': 'the raw pixels'}


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


def recalibrate_batch_stats(setup: Any, variables: dict,
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


def labelled(setup: Any, entry: readout.Entry) -> bool:
  """Whether the dataset an entry reads has labels to score it with."""
  from simclr_jax.data import datasets  # pylint: disable=g-import-not-at-top
  if not entry.dataset:
    return setup.info.labelled
  return datasets.dataset_info(entry.config).labelled


def skipped_why(entries: list[readout.Entry]) -> str:
  """The one line saying which entries cannot run, and how to fix it."""
  d = entries[0].config.dataset
  names = ', '.join(e.name for e in entries)
  return (f'probes skipped ({names}): {d.name} {d.train_split!r} has no '
          'labels; set config.evals.<entry>.dataset.name (and .folder, '
          '.train_split, .eval_split) to probe on a labelled dataset')


@contextlib.contextmanager
def _logged_readout(k: int, n: int, what: str, names: str) -> Iterator[None]:
  """Logs read-out k of n and its time: each takes minutes on a CPU and
  writes no step lines of its own, so the log would otherwise stall."""
  logging.info('Read-out %d/%d: %s (%s)', k, n, what, names)
  start = time.time()
  yield
  logging.info('Read-out %d/%d finished in %.0f s', k, n, time.time() - start)


def evaluate(setup: Any, variables: dict,
             init_variables: Callable[[], dict]) -> dict:
  """Runs every enabled config.evals entry at the end of the run.

  variables: the pretrained encoder's. init_variables: those pretraining
  started from (same seed), called only when a random_init entry runs.
  results.json records the bytes of the encoder's features each process
  held (feature_bytes_per_process).
  """
  c = setup.config
  t0 = time.time()
  results, skipped, has_labels = {}, {}, {}
  groups: dict[tuple[str, tuple], list[readout.Entry]] = {}
  for entry in readout.entries(c, setup.steps_per_epoch):
    if entry.dataset not in has_labels:
      has_labels[entry.dataset] = labelled(setup, entry)
    if not has_labels[entry.dataset]:
      skipped.setdefault(entry.dataset, []).append(entry)
      continue
    groups.setdefault((entry.type.features, entry.dataset), []).append(entry)
  if skipped:
    results['probes_skipped'] = '; '.join(map(skipped_why, skipped.values()))
    logging.warning('%s.', results['probes_skipped'])
  if not groups:
    return results
  # The encoder first, then its baselines, each on its datasets in order.
  order = sorted(groups, key=lambda g: registry.FEATURES.index(g[0]))
  apply = readout.feature_fn(setup.model)
  for k, (network, key) in enumerate(order, 1):
    group = groups[(network, key)]
    ec = group[0].config
    what = _WHAT[network] + (
        f' on {ec.dataset.name} {ec.dataset.eval_split!r}' if key else '')
    with _logged_readout(k, len(order), what,
                         ', '.join(e.name for e in group)):
      train, test, stats = _features(setup, network, ec, apply, variables,
                                     init_variables)
      ctx = registry.Context(
          c.eval, c.seed, setup.mesh, record_predictions=(
              network == 'encoder' and c.debug.record_knn_predictions))
      for entry in group:
        results.update(registry.named(
            entry.name, entry.type.fn(train, test, ctx)))
    if network == 'encoder' and not key:
      # The names results.json had before read-outs were entries.
      results['probe_train_examples'] = stats['train_examples']
      results['probe_test_examples'] = stats['test_examples']
      results['feature_bytes_per_process'] = stats['feature_bytes_per_process']
    else:
      for entry in group:
        results.update(registry.named(entry.name, stats))
  results['eval_wall_time_s'] = time.time() - t0
  return results


def _features(setup: Any, network: str, ec: ml_collections.ConfigDict,
              apply: Callable, variables: dict,
              init_variables: Callable[[], dict]
              ) -> tuple[readout.Labelled, readout.Labelled, dict]:
  """(train, test, what to record) of one network on `ec`'s dataset."""
  c = setup.config
  splits = {'train': ec.dataset.train_split, 'test': ec.dataset.eval_split}
  if network == 'pixels':
    train, test = (readout.sample_pixels(
        ec, split, max_examples=c.eval.pixel_max_examples, seed=c.seed,
        batch_size=c.eval.batch_size) for split in splits.values())
    return train, test, {'train_examples': len(train[1]),
                         'test_examples': len(test[1])}
  if network == 'random_init':
    variables = recalibrate_batch_stats(setup, init_variables(), ec)
  # Streamed: only the features of each split are held, never its images.
  train, test = (readout.featurize_split(
      apply, variables, ec, split, batch_size=c.eval.batch_size,
      mesh=setup.mesh, gather_max_bytes=c.eval.feature_gather_max_bytes)
                 for split in splits.values())
  if network == 'random_init':
    # Those batches are the train split shuffled with this seed.
    return train, test, {'bn_batches': RANDOM_INIT_BN_BATCHES,
                         'bn_shuffle_seed': c.seed}
  held = {}  # Split name -> bytes of its features on each process.
  for name, (features, _) in zip(splits, (train, test)):
    held[name] = readout.bytes_per_process(features)
    spread = isinstance(features, features_lib.ShardedFeatures)
    logging.info('Features of %r: %d x %d (%d bytes), held %s; bytes '
                 'per process: %s', splits[name], *features.shape,
                 4 * features.shape[0] * features.shape[1],
                 'spread over the processes' if spread else
                 'whole on every process', held[name])
  return train, test, {'train_examples': len(train[1]),
                       'test_examples': len(test[1]),
                       'feature_bytes_per_process': held}
