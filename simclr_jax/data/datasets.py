"""Which datasets exist: the one place a dataset's kind is decided.

`source_for(config)` reads config.dataset once and returns the DataSource
(data/base.py) of its kind; nothing else in the project asks what kind of
dataset it holds. The kinds:

  * in-memory arrays: 'digits', 'digits_m' (embedded), 'fashion_mnist'
    (its IDX files, data/fashion_mnist.py) and 'synthetic'
    (data/in_memory.py), and unions of them such as 'digits+digits_m';
  * 'folder': the user's own images under config.dataset.folder, read
    directly into memory (data/folder.py), or streamed like TFDS once
    `python -m simclr_jax.prepare_data` has written them as TFRecords;
  * any other name is a TFDS image dataset name[:version] (cifar10,
    imagenet2012, food101, 'oxford_flowers102:2.1.1', ...;
    data/tfds_source.py).

Split resolution lives here too (`resolved_splits`): it is a pure function of
the config and the dataset's metadata, computed once by config/resolve.py.
"""

import copy
from typing import Callable, Mapping

from absl import logging
import ml_collections

from simclr_jax.data import folder
from simclr_jax.data import in_memory
from simclr_jax.data import tfds_source
# The interface every caller uses, re-exported so `datasets` is the one import.
from simclr_jax.data.base import DataSource
from simclr_jax.data.base import DatasetError
from simclr_jax.data.base import DatasetInfo
from simclr_jax.data.base import import_tf
from simclr_jax.data.base import import_tfds
from simclr_jax.data.base import raw_size

FOLDER = 'folder'
# Names read without TFDS, and the source class of each.
_ARRAY_SOURCES: dict[str, Callable[..., in_memory.ArraySource]] = {
    'digits': in_memory.DigitsSource,
    'digits_m': in_memory.DigitsSource,
    'fashion_mnist': in_memory.FashionMnistSource,
    'synthetic': in_memory.SyntheticSource,
}
BUILTIN_DATASETS = tuple(_ARRAY_SOURCES) + (FOLDER,)
# The TFDS datasets the recipes and tests are written for; any other TFDS
# image dataset works the same way.
TFDS_DATASETS = (
    'cifar10',
    'cifar100',
    'stl10',
    'imagenet2012',
    'imagenet2012_subset/1pct',
    'imagenet2012_subset/10pct',
)
KNOWN_DATASETS = tuple(_ARRAY_SOURCES) + TFDS_DATASETS

# (pretraining split, labelled train split, evaluation split) per dataset, for
# recipes to copy into config.dataset: STL-10 pretrains on its 100k unlabelled
# images plus the labelled train set (labels -1 / 0..9), then probes on
# 'train'; ImageNet evaluates on 'validation' (its 'test' has no labels).
RECOMMENDED_SPLITS = {
    'digits': ('train', 'train', 'test'),
    'digits_m': ('train', 'train', 'test'),
    'fashion_mnist': ('train', 'train', 'test'),
    'synthetic': ('train', 'train', 'test'),
    'cifar10': ('train', 'train', 'test'),
    'cifar100': ('train', 'train', 'test'),
    'stl10': ('unlabelled+train', 'train', 'test'),
    'imagenet2012': ('train', 'train', 'validation'),
    'imagenet2012_subset/1pct': ('train', 'train', 'validation'),
    'imagenet2012_subset/10pct': ('train', 'train', 'validation'),
}
# When config.dataset.eval_split is missing from a dataset, the first of
# these it has is evaluated on instead; with only a train split, the last
# 10% of it is held out (TFDS slicing), as `resolved_splits` logs.
_EVAL_SPLIT_FALLBACKS = ('test', 'validation')
_HELD_OUT_PERCENT = 10

__all__ = ['DataSource', 'DatasetError', 'DatasetInfo', 'import_tf',
           'import_tfds', 'raw_size', 'source_for', 'dataset_info',
           'check_name', 'resolved_splits', 'with_overrides', 'overridden',
           'with_name']

with_name = in_memory.with_name


def check_name(config: ml_collections.ConfigDict) -> None:
  """Raises DatasetError for a dataset name no reader can take.

  Any non-empty name is a TFDS name until TFDS says otherwise; an image
  folder is checked when it is listed.
  """
  name = config.dataset.name
  if not isinstance(name, str) or not name.strip():
    raise DatasetError(
        f'config.dataset.name={name!r} is invalid: use one of '
        f'{", ".join(BUILTIN_DATASETS)} or a TFDS dataset name (e.g. '
        "'cifar10', 'food101', 'oxford_flowers102:2.1.1').")


def source_for(config: ml_collections.ConfigDict) -> DataSource:
  """The DataSource of config.dataset: the one place its kind is decided."""
  check_name(config)
  name = config.dataset.name
  if name in _ARRAY_SOURCES:
    return _ARRAY_SOURCES[name](config)
  parts = in_memory.union_parts(name, tuple(_ARRAY_SOURCES))
  if parts:
    return in_memory.UnionSource(
        config, [source_for(with_name(config, p)) for p in parts])
  if name == FOLDER:
    if folder.is_prepared(config.dataset.folder):
      return tfds_source.TfdsSource(config, directory=config.dataset.folder)
    return folder.FolderSource(config)
  return tfds_source.TfdsSource(config, builtin=BUILTIN_DATASETS)


def union_name(*names: str) -> str:
  """The name of the in-memory union of datasets `names` ('a+b'), or
  DatasetError when they cannot be joined (only array datasets can)."""
  name = '+'.join(names)
  if not in_memory.union_parts(name, tuple(_ARRAY_SOURCES)):
    raise DatasetError(
        f'{name!r} cannot be read as one dataset: only in-memory datasets '
        f'({", ".join(_ARRAY_SOURCES)}) can be joined')
  return name


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """The DatasetInfo of config.dataset (train split size, classes)."""
  return source_for(config).info()


def resolved_splits(config: ml_collections.ConfigDict,
                    source: DataSource | None = None) -> tuple[str, str]:
  """(train split, evaluation split) the run should read; the config is
  left as it is.

  config.dataset.eval_split is kept when the dataset has it (or when its
  splits cannot be known, as under tfds.testing.mock_data). Otherwise the
  first of 'test', 'validation' it has is used; a TFDS dataset with only its
  training split has the last 10% of it held out for evaluation and
  pretrains on the rest. Nothing changes for a split expression ('a+b',
  'train[:50%]'), which TFDS checks when reading.
  """
  d = config.dataset
  source = source or source_for(config)
  splits = source.splits()
  if not splits or d.eval_split in splits or any(
      c in d.eval_split for c in '+[:'):
    return d.train_split, d.eval_split
  for candidate in _EVAL_SPLIT_FALLBACKS:
    if candidate in splits:
      logging.info('%s has no split %r; evaluating on %r.', d.name,
                   d.eval_split, candidate)
      return d.train_split, candidate
  if d.train_split in splits and source.slices_splits:
    keep = 100 - _HELD_OUT_PERCENT
    train, held = f'{d.train_split}[:{keep}%]', f'{d.train_split}[{keep}%:]'
    logging.info('%s has only %s; pretraining on %r and evaluating on the '
                 'held-out %r.', d.name, ', '.join(splits), train, held)
    return train, held
  raise DatasetError(
      f'Dataset {d.name!r} has no split {d.eval_split!r} to evaluate on; its '
      f'splits: {splits}; set config.dataset.eval_split.')


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping,
                   *, resolve_splits: bool = False
                   ) -> ml_collections.ConfigDict:
  """A copy of `config` reading another dataset: the one way to name one.

  `overrides` holds fields of config.dataset (name, folder, data_dir,
  train_split, eval_split); its empty values keep config.dataset's. A
  config.evals entry's `dataset` (a labelled dataset to probe an encoder
  pretrained on unlabelled images, another split), the target of adapt and
  of embed all go through here. With resolve_splits, the splits are
  settled as the pretraining dataset's are (`resolved_splits`).
  """
  out = copy.deepcopy(config)
  with out.unlocked():
    for key, value in overrides.items():
      if value not in ('', None):
        out.dataset[key] = value
  if resolve_splits:
    out.dataset.train_split, out.dataset.eval_split = resolved_splits(out)
  return out


def overridden(overrides: Mapping | None) -> tuple[tuple[str, str], ...]:
  """The fields `overrides` sets, sorted: () for the pretraining dataset.
  Two read-outs with the same ones read the same data."""
  return tuple(sorted((k, str(v)) for k, v in (overrides or {}).items()
                      if v not in ('', None)))
