"""The jitted step of `--mode=adapt`: source cross-entropy + alignment.

Each batch holds B labelled source images and B unlabelled target images
('source_images', 'source_labels', 'target_images'), each sharded on the
mesh's 'data' axis, so every device holds an equal share of both domains.
The target's labels are not in the batch: nothing here could read them.

BatchNorm: `source_only` runs the network on the source images alone (the
baseline never sees the target); the aligning methods run it once on the
joint batch, so BN normalises both domains with the joint batch's
statistics, as the reference DANN and Deep CORAL implementations do when
they concatenate the two batches.

Alignment terms (losses/alignment.py) on the classifier's input features:
  dann   binary cross-entropy of the domain classifier behind the gradient
         reversal layer, scaled by weight x the DANN schedule;
  coral  weight x Deep CORAL;  mmd  weight x MK-MMD^2.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from simclr_jax import losses
from simclr_jax.losses import alignment
from simclr_jax.runtime import parallel
from simclr_jax.training import supervised
from simclr_jax.training.state import TrainState

ALIGNMENTS = ('none', 'dann', 'coral', 'mmd')


def alignment_loss(kind: str, out: dict, num_source: int,
                   weight: float) -> tuple[jax.Array, dict]:
  """(weighted alignment term, metrics) of a joint forward pass `out`."""
  if kind == 'none':
    return jnp.zeros((), jnp.float32), {}
  fs, ft = out['features'][:num_source], out['features'][num_source:]
  if kind == 'coral':
    value = alignment.coral(fs, ft)
  elif kind == 'mmd':
    value = alignment.mmd(fs, ft)
  elif kind == 'dann':
    logits = out['domain_logits'][:, 0]
    domain = (jnp.arange(logits.shape[0]) >= num_source).astype(jnp.float32)
    value = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, domain))
    accuracy = jnp.mean((logits > 0) == (domain > 0))
    # The reversal layer carries the weight; the loss is reported unscaled.
    return value, {'domain_loss': value, 'domain_accuracy': accuracy}
  else:
    raise ValueError(f'unknown alignment {kind!r}')
  return weight * value, {f'{kind}_loss': value}


def make_adapt_step(model: Any, tx: optax.GradientTransformation,
                    schedule: Callable, mesh: Any, *, alignment_kind: str,
                    weight: float, total_steps: int, dann_gamma: float,
                    image_size: int, crop_min_area: float, flip: bool,
                    skip_nonfinite: bool = False) -> Callable:
  """Builds the jitted `step(state, batch, rng) -> (state, metrics)`."""
  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top
  if alignment_kind not in ALIGNMENTS:
    raise ValueError(f'alignment {alignment_kind!r}: choose one of '
                     f'{", ".join(ALIGNMENTS)}')

  def step(state: TrainState, batch: dict, rng: jax.Array):
    rs, rt = jax.random.split(rng)
    xs = augment.jax_finetune_views(rs, batch['source_images'], image_size,
                                    crop_min_area, flip)
    n = xs.shape[0]
    if alignment_kind == 'none':
      x = xs
    else:
      xt = augment.jax_finetune_views(rt, batch['target_images'],
                                      image_size, crop_min_area, flip)
      x = jnp.concatenate([xs, xt])
    progress = state.step.astype(jnp.float32) / max(total_steps, 1)
    reversal = weight * alignment.dann_schedule(progress, dann_gamma)

    def loss(params):
      out, new_state = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x,
          train=True, mutable=['batch_stats'], reversal_scale=reversal)
      ce, accuracy = losses.masked_cross_entropy(out['logits'][:n],
                                                 batch['source_labels'])
      align, metrics = alignment_loss(alignment_kind, out, n, weight)
      total = ce + align
      metrics = dict(metrics, loss=total, source_loss=ce, accuracy=accuracy)
      return total, (metrics, new_state['batch_stats'])

    grads, (metrics, batch_stats) = jax.grad(loss, has_aux=True)(
        state.params)
    new_state, finite = supervised.update_state(
        state, grads, batch_stats, tx, metrics['loss'],
        skip_nonfinite=skip_nonfinite)
    metrics = dict(metrics, learning_rate=schedule(state.step),
                   reversal_scale=reversal,
                   skipped=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, data, rep),
                 out_shardings=(rep, rep), donate_argnums=(0,))
