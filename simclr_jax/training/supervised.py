"""The supervised step of linear_eval, finetune and distill, and its losses.

The step is jitted once over the mesh like the pretraining step: the batch is
sharded on 'data', the state (and a distillation teacher's variables)
replicated, the state donated; BatchNorm statistics are global because the
encoder runs under jit on the global batch. The shared loop
(training/loop.py) drives it; the optimiser comes from
runtime/optim.make_supervised_optimizer. Frozen parameters get no update at
all from the optimiser and are copied through unchanged here, so they stay
bit-identical.
"""

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax import losses
from simclr_jax.evaluation import features as features_lib
from simclr_jax.models import resnet
from simclr_jax.runtime import parallel
from simclr_jax.training.state import TrainState

LossFn = Callable[[jax.Array, jax.Array, jax.Array | None],
                  tuple[jax.Array, dict]]


# Labels < 0 (distillation's unlabelled data) count in neither number.
cross_entropy = losses.masked_cross_entropy


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """SimCLRv2 distillation loss (Chen et al. 2020b, eq. 2), scaled by tau^2.

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


def frozen_mask(params: Any, fine_tune_after_block: int = -1,
                frozen_encoder: bool = False,
                block_of: Callable[[str], int | None] = resnet.fine_tune_block
                ) -> Any:
  """Tree of bools, True for parameters that must not change.

  Numbering as the TF2 reference's fine_tune_after_block: -1 trains
  everything; 0 freezes the stem; k in 1..4 freezes the stem and stages 1..k
  (stage k = torchvision's layer{k}), so 4 freezes the whole encoder. Head
  layers and the classifier always train. `frozen_encoder` freezes the
  whole encoder whatever the block. `block_of` maps the encoder's top-level
  submodules to those numbers: the encoder's own rule
  (`encoders.EncoderKind.fine_tune_block`), the ResNet's by default.
  """

  def frozen(path, _):
    keys = [str(getattr(p, 'key', p)) for p in path]
    if keys[0] != 'encoder':
      return False
    if frozen_encoder:
      return True
    if fine_tune_after_block < 0:
      return False
    block = block_of(keys[1])
    if block is None:
      raise ValueError(f'unexpected encoder parameter {"/".join(keys)}')
    return block <= fine_tune_after_block

  return jax.tree_util.tree_map_with_path(frozen, params)


def update_state(state: TrainState, grads: Any, batch_stats: Any,
                 tx: optax.GradientTransformation, loss: jax.Array, *,
                 skip_nonfinite: bool, frozen_leaves: list | None = None
                 ) -> tuple[TrainState, jax.Array]:
  """One optimiser update of a supervised-style step: (new state, finite).

  Frozen leaves (if given) are copied through unchanged; with
  `skip_nonfinite` a step whose loss or gradients are not finite keeps the
  old state but still advances the step, so the stream and the schedule
  move on (on_nan='skip_step').
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if frozen_leaves is not None:
    # Copy frozen leaves through (p + 0 turns -0.0 into +0.0).
    leaves = [old if f else new for old, new, f in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(params),
        frozen_leaves)]
    params = jax.tree.unflatten(jax.tree.structure(state.params), leaves)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=batch_stats, opt_state=opt_state)
  if skip_nonfinite:
    kept = state.replace(step=state.step + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, kept)
  return new_state, finite


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    schedule: Callable, mesh: Any, frozen: Any,
                    loss_fn: LossFn, image_size: int,
                    teacher: Any = None, teacher_variables: Any = None,
                    skip_nonfinite: bool = False, crop_min_area: float = 0.08,
                    flip: bool = True) -> Callable:
  """Builds the jitted `step(state, batch, rng) -> (state, metrics)`.

  Batches hold either raw uint8 'images' (cropped and flipped here, on
  device) or ready 'views'. A teacher, if given, sees the same augmented
  view in inference mode, as in SimCLRv2's self-training; its variables are
  placed on the mesh once and passed to the jitted step as an argument (not
  baked into the program). `skip_nonfinite` keeps the old state for a step
  whose loss or gradients are not finite (on_nan='skip_step'). `crop_min_area`
  and `flip` shape the on-device crop + flip (config.augment.finetune_*).
  """
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top

  frozen_leaves = jax.tree.leaves(frozen)

  def step(state: TrainState, batch: dict, rng: jax.Array,
           teacher_variables: Any) -> tuple[TrainState, dict]:
    if 'views' in batch:
      x = batch['views']
    else:  # Crop + flip only for fine-tuning / linear eval (SimCLRv2 App. B).
      x = augment.jax_finetune_views(rng, batch['images'], image_size,
                                     crop_min_area, flip)
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
    new_state, finite = update_state(
        state, grads, batch_stats, tx, metrics['loss'],
        skip_nonfinite=skip_nonfinite, frozen_leaves=frozen_leaves)
    metrics = dict(metrics, learning_rate=schedule(state.step),
                   skipped=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  jitted = jax.jit(step, in_shardings=(rep, data, rep, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,))
  bound = {} if teacher_variables is None else jax.device_put(
      teacher_variables, rep)
  return lambda state, batch, rng: jitted(state, batch, rng, bound)


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
