"""Supervised training of a `Classifier`: losses, optimiser, step, loop.

Shared by linear evaluation, fine-tuning and distillation. The step is jitted
once over the mesh like the pretraining step: the batch is sharded on 'data',
the state (and a distillation teacher's variables) replicated, the state
donated; BatchNorm statistics are global because the encoder runs under jit
on the global batch.

Optimiser (REFERENCE §5, and the TF2 reference's fine-tuning commands):
momentum SGD, Nesterov by default, peak learning rate scaled by the global
batch (base * B/256 'linear' or base * sqrt(B) 'sqrt'), no warmup, cosine
decay to 0, weight decay on kernels only. Frozen parameters get no update
at all (neither gradient, momentum nor weight decay) and are copied through
unchanged, so they stay bit-identical.
"""

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from simclr_jax.runtime import checkpointing
from simclr_jax import losses
from simclr_jax.runtime import metric_writer
from simclr_jax.runtime import optim
from simclr_jax.runtime import parallel
from simclr_jax.evaluation import features as features_lib
from simclr_jax.training.pretrain_step import TrainState

# Encoder submodules before stage 1, "block 0" of fine_tune_after_block.
_STEM_MODULES = ('conv_init', 'bn_init', 'conv_stem1', 'bn_stem1',
                 'conv_stem2', 'bn_stem2')

LossFn = Callable[[jax.Array, jax.Array, jax.Array | None],
                  tuple[jax.Array, dict]]


# Labels < 0 (distillation's unlabelled data) count in neither number.
cross_entropy = losses.masked_cross_entropy


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """SimCLRv2 distillation loss (REFERENCE §5), scaled by tau^2.

  L = tau^2 * mean_x [-sum_y P_T(y|x; tau) log P_S(y|x; tau)], with
  P(y|x; tau) = softmax(logits / tau). The tau^2 factor keeps the gradient
  magnitude independent of tau (Hinton et al. 2015). The teacher gets no
  gradient.
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  p_teacher = jax.nn.softmax(t / temperature, axis=-1)
  log_p_student = jax.nn.log_softmax(
      student_logits.astype(jnp.float32) / temperature, axis=-1)
  per_example = -jnp.sum(p_teacher * log_p_student, axis=-1)
  return temperature**2 * jnp.mean(per_example)


def classification_loss_fn() -> LossFn:
  """Cross-entropy on the batch labels (linear evaluation, fine-tuning)."""

  def loss_fn(logits, labels, teacher_logits):
    del teacher_logits
    loss, accuracy = cross_entropy(logits, labels)
    return loss, {'loss': loss, 'accuracy': accuracy}

  return loss_fn


def distill_loss_fn(temperature: float, labelled_weight: float) -> LossFn:
  """(1 - w) * distillation + w * labelled cross-entropy (SimCLRv2, eq. 3).

  The paper weights the distillation term by alpha; here w = 1 - alpha is the
  weight of the labelled term, so w = 0 is pure distillation, what SimCLRv2
  uses when labels are few.
  """

  def loss_fn(logits, labels, teacher_logits):
    distill = distillation_loss(logits, teacher_logits, temperature)
    ce, accuracy = cross_entropy(logits, labels)
    loss = (1.0 - labelled_weight) * distill + labelled_weight * ce
    agreement = jnp.mean(jnp.argmax(logits, -1) ==
                         jnp.argmax(teacher_logits, -1))
    return loss, {'loss': loss, 'distill_loss': distill,
                  'labelled_loss': ce, 'accuracy': accuracy,
                  'teacher_agreement': agreement}

  return loss_fn


def _module_block(name: str) -> int | None:
  """fine_tune_after_block index of an encoder submodule (stem 0, stage i)."""
  if name in _STEM_MODULES:
    return 0
  if name.startswith('stage'):
    return int(name[len('stage'):].split('_')[0])
  return None


def frozen_mask(params: Any, fine_tune_after_block: int = -1,
                frozen_encoder: bool = False) -> Any:
  """Tree of bools, True for parameters that must not change.

  Numbering as the TF2 reference's fine_tune_after_block: -1 trains
  everything; 0 freezes the stem; k in 1..4 freezes the stem and stages 1..k
  (stage k = torchvision's layer{k}), so 4 freezes the whole encoder. Head
  layers and the classifier always train. `frozen_encoder` freezes the
  whole encoder whatever the block.
  """

  def frozen(path, _):
    keys = [str(getattr(p, 'key', p)) for p in path]
    if keys[0] != 'encoder':
      return False
    if frozen_encoder:
      return True
    block = _module_block(keys[1])
    if block is None:
      raise ValueError(f'unexpected encoder parameter {"/".join(keys)}')
    return block <= fine_tune_after_block

  return jax.tree_util.tree_map_with_path(frozen, params)


def make_optimizer(section: ml_collections.ConfigDict, total_steps: int,
                   frozen: Any
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """Momentum SGD with cosine decay from the config section's peak LR."""
  peak = optim.peak_learning_rate(section.learning_rate, section.batch_size,
                                  section.lr_scaling)
  # REFERENCE §5: no warmup; cosine decay to 0 as the reference's schedule.
  schedule = optax.cosine_decay_schedule(peak, max(total_steps, 1))
  train = optax.chain(
      optax.add_decayed_weights(section.weight_decay, mask=optim.decay_mask),
      optax.sgd(schedule, momentum=section.momentum,
                nesterov=section.nesterov))
  labels = jax.tree.map(lambda f: 'frozen' if f else 'train', frozen)
  tx = optax.multi_transform(
      {'train': train, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule


def create_state(tx: optax.GradientTransformation, variables: dict,
                 mesh: Any) -> TrainState:
  """A replicated train state around existing (e.g. pretrained) variables."""
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=tx.init(params))
  return jax.device_put(state, parallel.replicated(mesh))


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    schedule: Callable, mesh: Any, frozen: Any,
                    loss_fn: LossFn, image_size: int,
                    teacher: Any = None) -> Callable:
  """Builds the jitted `step(state, batch, rng, teacher_variables)`.

  Batches hold either raw uint8 'images' (cropped and flipped here, on
  device) or ready 'views'. A teacher, if given, sees the same augmented
  view in inference mode, as in SimCLRv2's self-training.
  """
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top

  frozen_leaves = jax.tree.leaves(frozen)

  def step(state: TrainState, batch: dict, rng: jax.Array,
           teacher_variables: Any) -> tuple[TrainState, dict]:
    if 'views' in batch:
      x = batch['views']
    else:  # REFERENCE §4: crop + flip only for fine-tuning / linear eval.
      x = augment.jax_finetune_views(rng, batch['images'], image_size)
    teacher_logits = None
    if teacher is not None:
      teacher_logits = teacher.apply(teacher_variables, x,
                                     train=False)['logits']

    def loss(params):
      out, new_state = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x,
          train=True, mutable=['batch_stats'])
      value, metrics = loss_fn(out['logits'], batch['labels'],
                               teacher_logits)
      return value, (metrics, new_state['batch_stats'])

    grads, (metrics, batch_stats) = jax.grad(loss, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Copy frozen leaves through (p + 0 turns -0.0 into +0.0).
    leaves = [old if f else new for old, new, f in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(new_params),
        frozen_leaves)]
    params = jax.tree.unflatten(jax.tree.structure(state.params), leaves)
    metrics = dict(metrics, learning_rate=schedule(state.step))
    return state.replace(step=state.step + 1, params=params,
                         batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep, rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))


@dataclasses.dataclass
class FitResult:
  state: TrainState
  final_metrics: dict
  wall_time_s: float


def fit(step_fn: Callable, state: TrainState, batches: Iterator[dict], *,
        total_steps: int, steps_per_epoch: float, mesh: Any, rng: jax.Array,
        log_every: int, name: str, teacher_variables: Any = None,
        prefetch: int = 2) -> FitResult:
  """Runs `total_steps` steps, logging step/epoch, loss and ETA."""
  t0 = time.time()
  batches = parallel.prefetch_to_mesh(batches, mesh, prefetch)
  teacher_variables = {} if teacher_variables is None else teacher_variables
  metrics, last = None, {}
  t_loop, timed = None, 0
  for step in range(1, total_steps + 1):
    state, metrics = step_fn(state, next(batches),
                             jax.random.fold_in(rng, step),
                             teacher_variables)
    if t_loop is None:  # Exclude compilation from the ETA.
      jax.block_until_ready(metrics)
      t_loop = time.time()
    else:
      timed += 1
    if step % log_every == 0 or step == total_steps:
      last = parallel.fetch(metrics)
      elapsed = time.time() - t_loop
      eta = ((total_steps - step) * elapsed / timed) if timed else math.nan
      logging.info('%s step %d/%d  epoch %.1f  loss %.4f  acc %.3f  lr %.4g  '
                   'ETA %s', name, step, total_steps, step / steps_per_epoch,
                   last['loss'], last['accuracy'], last['learning_rate'],
                   metric_writer.format_eta(eta))
      if not math.isfinite(last['loss']):
        raise ValueError(f'{name}: non-finite loss at step {step}; lower the '
                         'learning rate')
  return FitResult(state, last, time.time() - t0)


def predict_logits(model: Any, variables: dict,
                   chunks: Iterator[tuple[np.ndarray, np.ndarray]],
                   batch_size: int, mesh: Any
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(logits, labels) of every evaluation image, BN in inference mode."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  logits, labels = [], []
  for x, y in chunks:
    logits.append(features_lib.extract_features(apply, x, batch_size, mesh,
                                                variables=variables))
    labels.append(np.asarray(y))
  return np.concatenate(logits), np.concatenate(labels)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of examples whose label is among the k largest logits."""
  k = min(k, logits.shape[-1])
  top = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def check_fresh_workdir(workdir: str) -> None:
  """Downstream runs do not resume: refuse to mix two runs' checkpoints."""
  ckpt_dir = epath.Path(workdir) / 'checkpoints'
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise ValueError(f'{workdir} already holds a checkpoint; use a new '
                     '--workdir for each downstream run')


def save_run(workdir: str, config: ml_collections.ConfigDict,
             state: TrainState) -> str:
  """Checkpoint + config.json, so checkpointing.load_run reads the run."""
  step = int(jax.device_get(state.step))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=1)
  ckpt.save(step, state, {'step': step}, force=True)
  ckpt.close()
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2))
  return ckpt.directory
