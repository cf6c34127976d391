r"""Preflight: what a run will need on its target machine, from its config.

A pretraining job on a pod slice or a GPU cluster can fail after the queue
wait, the data staging and minutes of compilation because one program does
not fit in device memory. Preflight answers that question first, on any CPU,
without reading data and without the target hardware:

  plan = preflight.preflight(config, devices=128, device_memory_gb=16,
                             hosts=16)
  print(preflight.format_table(plan))

The train step (and, with gradient caching, each of its programs), and the
encoder forward pass of evaluation, are the project's real programs
(training/pretrain.py `make_step`), built for one device's share of the work
(global batch / devices images, one chunk of them under gradient caching) on
a one-device mesh of this machine and compiled ahead of time from abstract
shapes (`jax.jit(...).lower(ShapeDtypeStruct...).compile()`); their memory is
XLA's static memory analysis of that compile. XLA:CPU schedules and fuses
differently from XLA:TPU and XLA:GPU, so the figures approximate the
accelerator's; they are for finding the plan that cannot fit, not for
squeezing the last gigabyte. Host memory (input pipeline, evaluation
features) and the checkpoint are computed from shapes; the input pipeline's
figure is an estimate (tf.data's own buffers are not counted exactly).

A plan whose device programs exceed the memory given is refused with a
`PlanError`: one line naming the stage that does not fit and the config
field to change; the plan (with its table) is on the error's `plan`.
"""

import copy
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import methods
from simclr_jax import models
from simclr_jax.models import encoders
from simclr_jax.config import resolve as config_resolve
from simclr_jax.config import validation
from simclr_jax.data import datasets
from simclr_jax.evaluation import readout
from simclr_jax.runtime import parallel
from simclr_jax.tools import step_benchmark
from simclr_jax.training import pretrain

GIB = 2 ** 30

# Split sizes and classes of the datasets the recipes are written for, for
# when their metadata cannot be read here (TFDS not installed, or the
# dataset prepared only on the target's storage). From the TFDS catalogue.
KNOWN_SPLIT_SIZES = {
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
    'imagenet2012_subset/1pct': {'train': 12_811, 'validation': 50_000},
    'imagenet2012_subset/10pct': {'train': 128_116, 'validation': 50_000},
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'stl10': {'train': 5_000, 'test': 8_000, 'unlabelled': 100_000},
}
KNOWN_NUM_CLASSES = {
    'imagenet2012': 1000, 'imagenet2012_subset/1pct': 1000,
    'imagenet2012_subset/10pct': 1000, 'cifar10': 10, 'cifar100': 100,
    'stl10': 10,
}
# Mean size of one encoded training image in the shuffle buffer (images stay
# encoded there). ImageNet's JPEGs average about 110 KB; other TFDS datasets
# store small PNGs, taken as their raw pixels (an upper bound).
_ENCODED_IMAGE_BYTES = {'imagenet2012': 110_000}
# tf.data's AUTOTUNE prefetch after batching: not fixed; two batches is the
# estimate used for the input pipeline row.
_TF_DATA_BATCHES = 2


class PlanError(ValueError):
  """A plan that does not fit; the message is one line, the plan attached."""

  def __init__(self, message: str, plan: dict | None = None):
    super().__init__(message)
    self.plan = plan


@dataclasses.dataclass
class DatasetSizes:
  """What the plan knows of the dataset, and where the sizes come from."""
  num_train: int
  num_eval: int
  num_classes: int
  source: str


def _split_size(sizes: dict[str, int], split: str) -> int | None:
  """Size of a split expression such as 'unlabelled+train' or 'train[:90%]'
  from the known sizes, or None."""
  total = 0
  for part in split.split('+'):
    name, _, sl = part.partition('[')
    if name not in sizes:
      return None
    n = sizes[name]
    if sl:
      lo, _, hi = sl.rstrip(']').partition(':')
      frac = lambda s, d: (float(s[:-1]) / 100 * n if s.endswith('%')
                           else float(s)) if s else d
      n = int(frac(hi, n) - frac(lo, 0))
    total += n
  return total


def dataset_sizes(config: ml_collections.ConfigDict,
                  num_train_examples: int | None = None) -> DatasetSizes:
  """Split sizes from an argument, the dataset's metadata, or known sizes.

  Steps per epoch, a method's per-example state and the evaluation features
  all scale with the train split, so the plan needs its size before any data
  is there. Metadata is read only where that is cheap (in-memory datasets, a
  TFDS dataset prepared in data_dir): never images, never a download. The
  result says which of the three the size came from.

  Raises:
    PlanError: the size is in none of them.
  """
  d = config.dataset
  base = d.name.split(':')[0]
  known = KNOWN_SPLIT_SIZES.get(base, {})
  num_eval = _split_size(known, d.eval_split) if known else None
  num_classes = KNOWN_NUM_CLASSES.get(base, 0)
  if num_train_examples:
    return DatasetSizes(int(num_train_examples), num_eval or 0, num_classes,
                        'num_train_examples argument')
  try:
    source = datasets.source_for(config)
    info = source.info()
    try:
      num_eval = source.split_size(d.eval_split)
    except Exception:  # pylint: disable=broad-except
      pass
    return DatasetSizes(info.num_train_examples, num_eval or 0,
                        info.num_classes, 'dataset metadata')
  except Exception:  # pylint: disable=broad-except
    pass  # TFDS missing or the dataset not prepared here: known sizes.
  num_train = _split_size(known, d.train_split) if known else None
  if num_train is None:
    raise PlanError(
        f'preflight: the size of {d.name!r} {d.train_split!r} is neither in '
        'metadata readable here nor known; pass num_train_examples '
        '(--preflight_num_train_examples)')
  return DatasetSizes(num_train, num_eval or 0, num_classes,
                      'known size (TFDS catalogue)')


def _bytes(tree: Any) -> int:
  return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                 for a in jax.tree.leaves(tree)))


def _abstract(tree: Any) -> Any:
  """Arrays or tracers -> ShapeDtypeStruct (no sharding: one device)."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
      if hasattr(a, 'shape') and hasattr(a, 'dtype') else a, tree)


def _memory(compiled: Any) -> dict:
  """XLA's static memory analysis of one compiled program, and its peak:
  arguments + outputs - donated aliases + temporaries."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes'))
         for k in ('argument', 'output', 'alias', 'temp')}
  out['program_bytes'] = (out['argument'] + out['output'] - out['alias'] +
                          out['temp'])
  return out


def _one_device_mesh():
  """One CPU device: the plan is the same wherever it is made, and making it
  never takes memory from an accelerator that may be busy."""
  return parallel.make_mesh(jax.devices('cpu')[:1])


def _setup(config: ml_collections.ConfigDict, mesh: Any, data: DatasetSizes,
           steps_per_epoch: int, total_steps: int) -> pretrain.Setup:
  """pretrain.build's Setup without reading the dataset: the same model,
  method and optimiser, from the plan's split size and class count."""
  method = methods.make_method(config, mesh=mesh, total_steps=total_steps,
                               num_train_examples=data.num_train)
  model = models.build_model(config, max(data.num_classes, 1),
                             **method.model_overrides())
  tx, schedule = pretrain.make_optimizer(config, steps_per_epoch, total_steps)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  info = datasets.DatasetInfo(config.dataset.name, data.num_train,
                              data.num_classes, (None, None, 3))
  return pretrain.Setup(config, mesh, info, steps_per_epoch, total_steps,
                        model, method, tx, schedule, init_rng, step_rng)


def _abstract_batch(setup: pretrain.Setup) -> dict:
  """The per-device batch as shapes: the benchmark's synthetic batch of the
  config's input mode, plus example ids for methods that index by them."""
  batch = _abstract(step_benchmark.synthetic_batch(setup.config, setup.mesh))
  if setup.method.needs_index:
    batch['index'] = jax.ShapeDtypeStruct((setup.config.batch_size,),
                                          jnp.int32)
  return batch


# Under gradient caching the step is several programs run one after another;
# what the step holds on the device besides each program's arguments stays
# live while it runs: per program, the parts of the train state it does not
# take, the step's views and their chunks, the input batch.
_RESIDENT = {
    'inputs': ('params', 'batch_stats', 'opt_state', 'extra'),
    'split': ('params', 'batch_stats', 'opt_state', 'extra', 'batch'),
    # A target network's chunks (MoCo v3, BYOL) and their join.
    'target': ('params', 'batch_stats', 'opt_state', 'views', 'chunks',
               'batch'),
    'targets': ('params', 'batch_stats', 'opt_state', 'extra', 'views',
                'chunks', 'batch'),
    'forward': ('opt_state', 'extra', 'views', 'chunks', 'batch'),
    'loss': ('params', 'batch_stats', 'opt_state', 'extra', 'views',
             'chunks', 'batch'),
    'zeros': ('batch_stats', 'opt_state', 'extra', 'views', 'chunks',
              'batch'),
    'backward': ('opt_state', 'extra', 'views', 'chunks', 'batch'),
    'update': ('batch',),
}


def _train_programs(setup: pretrain.Setup) -> tuple[list[dict], dict]:
  """Every program of the per-device train step, compiled from shapes.

  Returns (one row per program with its memory, the state's parts in bytes).
  """
  state = jax.eval_shape(lambda: pretrain.initial_state(setup))
  parts = {k: _bytes(getattr(state, k))
           for k in ('params', 'batch_stats', 'opt_state', 'extra')}
  batch = _abstract_batch(setup)
  key = jax.eval_shape(lambda: jax.random.key(0))
  step_fn = pretrain.make_step(setup)
  if hasattr(step_fn, 'lower'):  # The plain step: one jitted program.
    row = _memory(step_fn.lower(state, batch, key).compile())
    return [dict(row, program='step', resident_bytes=0)], parts
  recorded: dict[str, tuple[Any, Any]] = {}

  def record(name, program, args):
    recorded.setdefault(name, (program, _abstract(args)))

  # Tracing the host-driven step records each program's abstract arguments
  # without running anything.
  jax.eval_shape(lambda s, b, k: step_fn(s, b, k, record=record), state,
                 batch, key)
  s = setup.config.dataset.image_size
  dtype = np.dtype(setup.config.model.compute_dtype)
  sizes = dict(parts, batch=_bytes(batch),
               views=2 * setup.config.batch_size * s * s * 3 * dtype.itemsize)
  sizes['chunks'] = sizes['views']
  rows = []
  for name, (program, args) in recorded.items():
    row = _memory(program.lower(*args).compile())
    resident = sum(sizes[k] for k in _RESIDENT.get(name, ()))
    rows.append(dict(row, program=name, resident_bytes=resident))
  return rows, parts


def _loss_allowance(config: ml_collections.ConfigDict, per_device: int,
                    devices: int, proj_dim: int) -> int:
  """Bytes the cross-device loss adds on the target over the one-device
  compile: each device scores its 2b views against all 2N keys, so it holds
  the gathered keys (and their gradient) and a (2b x 2N) logit matrix (its
  softmax and gradient too) where the one-device program holds 2b of them."""
  if devices <= 1:
    return 0
  n = config.batch_size
  extra_keys = 2 * (n - per_device)
  return int(4 * (2 * extra_keys * proj_dim + 3 * 2 * per_device * extra_keys))


def _eval_program(setup: pretrain.Setup, per_device: int) -> tuple[dict, int]:
  """The evaluation encoder forward for one device's rows, and the feature
  width."""
  s = setup.config.dataset.image_size
  state = jax.eval_shape(lambda: pretrain.initial_state(setup))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  x = jax.ShapeDtypeStruct((per_device, s, s, 3), jnp.float32)
  apply = readout.feature_fn(setup.model)
  width = int(math.prod(jax.eval_shape(apply, variables, x).shape[1:]))
  return _memory(apply.lower(variables, x).compile()), width


def _host_feature_bytes(config: ml_collections.ConfigDict, rows: int,
                        width: int, devices: int, hosts: int
                        ) -> tuple[int, bool]:
  """(bytes of a split's features on one host, whether they are spread).

  What evaluation/features.py holds: the whole (rows x width) float32 split
  on every host up to eval.feature_gather_max_bytes, else each host's rows
  of every evaluation batch. A batch is eval.batch_size images (at most the
  split) rounded up to a multiple of the devices, so a host's share is the
  batches times its devices' rows, padding included.
  """
  whole = rows * width * 4
  if whole <= int(config.eval.feature_gather_max_bytes):
    return whole, False
  chunk = min(int(config.eval.batch_size), rows)
  batch = -(-chunk // devices) * devices
  batches = -(-rows // chunk)
  return batches * (batch // hosts) * width * 4, True


def _step_field(config: ml_collections.ConfigDict, chunk_rows: int) -> str:
  """The field to change when the train step does not fit: smaller
  gradient-cache chunks where the method has gradient caching, else the
  global batch (or more devices for the same batch)."""
  if chunk_rows > 1 and methods.method_class(config).supports_grad_cache:
    return 'max_batch_per_device'
  return 'batch_size'


def _stage(name: str, scope: str, nbytes: int, limit: int | None,
           field: str, note: str) -> dict:
  return {'stage': name, 'scope': scope, 'bytes': int(nbytes),
          'limit_bytes': limit, 'fits': None if limit is None else
          nbytes <= limit, 'field': field, 'note': note}


def preflight(config: ml_collections.ConfigDict, *, devices: int,
              device_memory_gb: float, hosts: int = 1,
              num_train_examples: int | None = None,
              host_memory_gb: float | None = None) -> dict:
  """The plan of a pretraining run on `devices` devices over `hosts` hosts.

  Args:
    config: the run's config as given (left unchanged).
    devices: accelerator devices of the target job (all hosts).
    device_memory_gb: memory of one device, GiB (16 for a TPU v3 core).
    hosts: processes (hosts) of the target job.
    num_train_examples: the training split's size, when neither the
      dataset's metadata nor the known sizes give it.
    host_memory_gb: memory of one host, GiB; None checks no host stage.

  Returns:
    The plan: the settled batch, chunking, split size (and its source),
    steps per epoch and in total, and 'stages', one dict per row of the
    table (bytes per device or per host, the limit, whether it fits).

  Raises:
    PlanError: a stage does not fit (one line naming the stage and the
      config field to change; the plan is on the error's `plan`).
    ConfigError: the config is invalid for this many devices and hosts.
  """
  if devices < 1 or hosts < 1 or devices % hosts:
    raise PlanError(f'preflight: {devices} devices cannot be spread evenly '
                    f'over {hosts} hosts')
  config = copy.deepcopy(config)
  validation.validate(config, num_devices=devices, process_count=hosts)
  per_device = config.batch_size // devices
  chunks = config.get('grad_cache_chunks', 0) or config_resolve.chunks_for(
      per_device, config.get('max_batch_per_device', 0))
  if chunks != config.get('grad_cache_chunks', 0):
    config.grad_cache_chunks = chunks
    validation.validate(config, num_devices=devices, process_count=hosts)
  data = dataset_sizes(config, num_train_examples)
  steps_per_epoch = data.num_train // config.batch_size
  if steps_per_epoch <= 0:
    raise PlanError(
        f'preflight: config.batch_size={config.batch_size} is larger than '
        f'the {data.num_train} training examples; lower batch_size')
  total_steps = int(config.train_steps or config.num_epochs * steps_per_epoch)
  device_limit = int(device_memory_gb * GIB)
  host_limit = None if host_memory_gb is None else int(host_memory_gb * GIB)

  # One device's share: its images (the whole per-device batch; the step
  # chunks it itself under gradient caching) on a one-device mesh.
  local = copy.deepcopy(config)
  local.batch_size = per_device
  local.dataset.name = 'synthetic'  # Nothing of the step reads the data.
  mesh = _one_device_mesh()
  setup = _setup(local, mesh, data, steps_per_epoch, total_steps)
  programs, parts = _train_programs(setup)
  state_bytes = sum(parts.values())

  s = config.dataset.image_size
  if config.augment.backend == 'jax':
    r = config.dataset.raw_size or s
    example_bytes, example_note = r * r * 3, 'raw uint8 images'
  else:
    example_bytes, example_note = 2 * s * s * 3 * 4, '2 float32 views'
  prefetched = int(config.dataset.prefetch) * per_device * example_bytes
  allowance = _loss_allowance(config, per_device, devices,
                              int(config.model.proj_out_dim))
  step_field = _step_field(config, per_device // max(chunks, 1))
  stages = []
  peak_row, peak = None, -1
  for row in programs:
    total = row['program_bytes'] + row['resident_bytes'] + prefetched + (
        allowance if row['program'] in ('step', 'loss') else 0)
    row['device_bytes'] = total
    if total > peak:
      peak_row, peak = row, total
  chunk_rows = per_device // chunks if chunks else per_device
  stages.append(_stage(
      'train step', 'device', peak, device_limit, step_field,
      f'per device: {per_device} images'
      + (f' in {chunks} chunks of {chunk_rows}' if chunks else '') +
      f'; peak program {peak_row["program"]!r} (temp '
      f'{_fmt(peak_row["temp"])}) + {config.dataset.prefetch} prefetched '
      'batches + cross-device loss allowance'))
  if chunks:
    for row in programs:
      stages.append(_stage(
          f'  grad-cache {row["program"]}', 'device', row['device_bytes'],
          device_limit, step_field,
          f'args {_fmt(row["argument"])}, temp {_fmt(row["temp"])}, '
          f'live besides args {_fmt(row["resident_bytes"])}'))

  eval_rows = -(-int(config.eval.batch_size) // devices)
  eval_mem, width = _eval_program(setup, eval_rows)
  eval_bytes = (eval_mem['program_bytes'] + state_bytes -
                parts['params'] - parts['batch_stats'])
  stages.append(_stage(
      'eval forward', 'device', eval_bytes, device_limit, 'eval.batch_size',
      f'per device: {eval_rows} images (eval.batch_size '
      f'{config.eval.batch_size} over {devices} devices), temp '
      f'{_fmt(eval_mem["temp"])}, + the train state'))

  per_host = config.batch_size // hosts
  base = config.dataset.name.split(':')[0]
  raw = config.dataset.raw_size or s
  encoded = _ENCODED_IMAGE_BYTES.get(base, raw * raw * 3)
  shuffle = int(config.dataset.shuffle_buffer_multiplier) * per_host
  input_bytes = (per_host * example_bytes *
                 (int(config.dataset.prefetch) + _TF_DATA_BATCHES) +
                 shuffle * encoded)
  stages.append(_stage(
      'host input pipeline', 'host', input_bytes, host_limit,
      'dataset.shuffle_buffer_multiplier',
      f'estimate: {per_host} images/host of {example_note} x '
      f'({config.dataset.prefetch} prefetched + {_TF_DATA_BATCHES} tf.data) '
      f'+ shuffle buffer of {shuffle} encoded images (~{_fmt(encoded)} each)'))

  feature_bytes, feature_notes = 0, []
  for name, rows in (('train', data.num_train), ('eval', data.num_eval)):
    held, spread = _host_feature_bytes(config, rows, width, devices, hosts)
    feature_bytes += held
    feature_notes.append(
        f'{name} {rows} x {width} float32 ' +
        (f'spread over the hosts: {_fmt(held)} a host' if spread else
         f'whole on every host: {_fmt(held)}'))
  stages.append(_stage(
      'host evaluation features', 'host', feature_bytes, host_limit,
      'eval.feature_gather_max_bytes',
      '; '.join(feature_notes) + ' (eval.feature_gather_max_bytes '
      f'{_fmt(int(config.eval.feature_gather_max_bytes))})'))
  stages.append(_stage(
      'checkpoint', 'storage', state_bytes, None, '',
      f'params {_fmt(parts["params"])} + optimiser {_fmt(parts["opt_state"])}'
      f' + BN stats {_fmt(parts["batch_stats"])} + method state '
      f'{_fmt(parts["extra"])}'))

  plan = {
      'model': encoders.describe(config.model, s),
      'image_size': s, 'compute_dtype': config.model.compute_dtype,
      'devices': devices, 'hosts': hosts,
      'device_memory_gb': device_memory_gb, 'host_memory_gb': host_memory_gb,
      'global_batch': config.batch_size, 'per_device_batch': per_device,
      'per_host_batch': per_host, 'grad_cache_chunks': chunks,
      'eval_batch_per_device': eval_rows, 'feature_width': width,
      'dataset': config.dataset.name, 'train_split': config.dataset.train_split,
      'num_train_examples': data.num_train, 'num_eval_examples': data.num_eval,
      'train_size_source': data.source,
      'steps_per_epoch': steps_per_epoch, 'total_steps': total_steps,
      'memory_source': "XLA:CPU compile of the per-device program "
                       "(memory_analysis); approximates the accelerator's",
      'stages': stages, 'programs': programs,
  }
  plan['fits'] = all(st['fits'] is not False for st in stages)
  for st in stages:
    if st['fits'] is False:
      hint = ''
      if st['field'] == 'max_batch_per_device':
        hint = f' (e.g. {_suggest(chunk_rows, st["bytes"], device_limit)})'
      elif st['field'] == 'eval.batch_size':
        hint = (f' (e.g. '
                f'{_suggest(eval_rows, st["bytes"], device_limit) * devices})')
      raise PlanError(
          f"preflight: stage '{st['stage'].strip()}' needs "
          f"{_fmt(st['bytes'])} per {st['scope']} but the limit is "
          f"{_fmt(st['limit_bytes'])}; change config.{st['field']}{hint}",
          plan)
  return plan


def _suggest(rows: int, needed: int, limit: int) -> int:
  """A per-device row count to try: the current one scaled by limit/needed
  (memory is mostly activations, linear in rows), down to a power of two.
  A first guess for the next preflight, not a promise."""
  target = max(1, int(rows * limit / max(needed, 1)))
  return 1 << (target.bit_length() - 1)


def _fmt(n: int | None) -> str:
  if n is None:
    return '-'
  for unit, size in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if n >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n} B'


def format_table(plan: dict) -> str:
  """The plan as one markdown table and its totals."""
  lines = [
      f"{plan['model']} at {plan['image_size']} px ({plan['compute_dtype']}),"
      f" global batch {plan['global_batch']} on {plan['devices']} devices / "
      f"{plan['hosts']} hosts: {plan['per_device_batch']} per device"
      + (f" in {plan['grad_cache_chunks']} grad-cache chunks"
         if plan['grad_cache_chunks'] else '') + '.',
      f"{plan['dataset']} {plan['train_split']!r}: "
      f"{plan['num_train_examples']:,} examples ({plan['train_size_source']});"
      f" {plan['steps_per_epoch']:,} steps/epoch, {plan['total_steps']:,} "
      'total steps.',
      '',
      '| stage | per | bytes | limit | fits | field | detail |',
      '|---|---|---|---|---|---|---|',
  ]
  for st in plan['stages']:
    fits = {None: '-', True: 'yes', False: '**NO**'}[st['fits']]
    lines.append(
        f"| {st['stage'].strip()} | {st['scope']} | {_fmt(st['bytes'])} | "
        f"{_fmt(st['limit_bytes'])} | {fits} | {st['field'] or '-'} | "
        f"{st['note']} |")
  lines += ['', f"Device memory: {plan['memory_source']}."]
  return '\n'.join(lines)
