"""The pure functional SimCLR train step and the train state it updates.

`make_train_step` returns `train_step(state, batch, rng) -> (state, metrics)`,
jitted once over the mesh: the batch is sharded on 'data', the state is
replicated and donated. The encoder runs under plain jit on the global batch,
so BatchNorm statistics are global (REFERENCE §2: global BN, both views in one
batch); only the loss runs inside shard_map, where each device all-gathers the
projections and scores its own rows against all 2N keys (REFERENCE §1).
"""

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from simclr_jax import grad_cache
from simclr_jax import losses
from simclr_jax import parallel


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during pretraining; checkpointed as a whole."""
  step: jax.Array
  params: Any  # {'encoder', 'projection_head', 'linear_head'}
  batch_stats: Any
  opt_state: Any


def init_variables(model: nn.Module, rng: jax.Array, image_size: int
                   ) -> dict[str, Any]:
  """Model variables from a dummy batch (shapes only depend on image size)."""
  x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  return model.init(rng, x, train=False)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, image_size: int,
                       mesh: Mesh) -> TrainState:
  """Initialises the state directly as replicated arrays on the mesh."""

  def init(rng):
    variables = init_variables(model, rng, image_size)
    params = variables['params']
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get('batch_stats', {}),
        opt_state=tx.init(params))

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def _global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(tree)


def _linear_head_metrics(logits: jax.Array, labels: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and accuracy of the online linear head.

  Labels < 0 mark unlabelled examples (e.g. STL-10 'unlabelled'); they are
  left out of both numbers.
  """
  valid = (labels >= 0).astype(jnp.float32)
  safe = jnp.maximum(labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  loss = jnp.sum(nll * valid) / count
  acc = jnp.sum((jnp.argmax(logits, -1) == safe) * valid) / count
  return loss, acc


def make_views_fn(augment_backend: str, image_size: int,
                  color_strength: float, blur: bool
                  ) -> Callable[[dict, jax.Array], jax.Array]:
  """Returns batch, rng -> views (N, 2, S, S, 3) for either input mode.

  With the 'tf' backend the host already made both views; with 'jax' the
  batch holds raw images and the views are made here, inside the jitted step,
  so augmentation runs on the accelerator fused with the model.
  """
  if augment_backend == 'tf':
    return lambda batch, rng: batch['views']

  from simclr_jax.data import augment  # pylint: disable=g-import-not-at-top

  def views(batch, rng):
    rng_a, rng_b = jax.random.split(rng)
    kw = dict(size=image_size, color_strength=color_strength, blur=blur)
    view_a = augment.jax_views(rng_a, batch['images'], **kw)
    view_b = augment.jax_views(rng_b, batch['images'], **kw)
    return jnp.stack([view_a, view_b], axis=1)

  return views


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any],
                    mesh: Mesh,
                    *,
                    temperature: float,
                    views_fn: Callable[[dict, jax.Array], jax.Array],
                    skip_nonfinite: bool = False,
                    compute_dtype: Any = jnp.float32,
                    grad_cache_chunks: int = 0,
                    grad_cache_bn: str = 'per_chunk',
                    inject_nan_at_step: int = -1) -> Callable:
  """Builds the jitted `train_step(state, batch, rng) -> (state, metrics)`.

  Args:
    model: a SimCLRModel (returns features, projection, logits).
    tx: the optimiser.
    schedule: step -> learning rate, for the metrics.
    mesh: 1-D mesh with axis 'data'.
    temperature: NT-Xent temperature.
    views_fn: batch, rng -> (N, 2, S, S, 3) float views.
    skip_nonfinite: if the loss or gradients are not finite, keep the old
      state for this step (config on_nan='skip_step') and count it.
    compute_dtype: dtype the views are cast to before the encoder.
    grad_cache_chunks: > 0 computes the gradient by gradient caching in this
      many chunks (simclr_jax/grad_cache.py): same loss, activation memory of
      one chunk, one extra forward pass.
    grad_cache_bn: BN under gradient caching, 'per_chunk' or 'frozen'.
    inject_nan_at_step: testing aid (config debug.inject_nan_at_step): the
      update that makes state.step equal to this gets a NaN loss and NaN
      gradients, so tests can drive on_nan through the real jitted step.
  """
  loss_fn_sharded = jax.shard_map(
      functools.partial(losses.sharded_nt_xent, temperature=temperature,
                        axis_name=parallel.DATA_AXIS),
      mesh=mesh,
      in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
      out_specs=(P(), P()))

  def train_step(state: TrainState, batch: dict, rng: jax.Array
                 ) -> tuple[TrainState, dict]:
    views = views_fn(batch, rng)
    n = views.shape[0]
    # (N, 2, ...) -> (2N, ...) keeps each device's rows on that device (the
    # two views of an image are neighbours), so this is free under sharding.
    x = views.reshape((2 * n,) + views.shape[2:]).astype(compute_dtype)
    labels = jnp.repeat(batch['labels'], 2)

    def loss_fn(params):
      out, new_model_state = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x,
          train=True, mutable=['batch_stats'])
      z = out['projection'].reshape((n, 2, -1))
      loss, metrics = loss_fn_sharded(z[:, 0], z[:, 1])
      total = loss
      if out.get('logits') is not None:
        # The head sees stop_gradient features, so adding its loss trains
        # the head without shaping the encoder (reference: linear eval while
        # pretraining).
        lin_loss, lin_acc = _linear_head_metrics(out['logits'], labels)
        total = total + lin_loss
        metrics = dict(metrics, linear_loss=lin_loss, linear_acc=lin_acc)
      return total, (metrics, new_model_state['batch_stats'])

    if grad_cache_chunks:
      grads, (metrics, batch_stats) = grad_cache.simclr_grads(
          model, state.params, state.batch_stats, x, labels,
          contrastive_loss=loss_fn_sharded, head_loss=_linear_head_metrics,
          num_chunks=grad_cache_chunks, mesh=mesh, bn=grad_cache_bn)
    else:
      grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
          state.params)
    if inject_nan_at_step >= 0:
      poison = jnp.where(state.step + 1 == inject_nan_at_step, jnp.nan, 1.0)
      grads = jax.tree.map(lambda g: g * poison, grads)
      metrics = dict(metrics,
                     contrastive_loss=metrics['contrastive_loss'] * poison)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(metrics['contrastive_loss']) & jnp.isfinite(
        grad_norm)
    if skip_nonfinite:
      # Keep the old state but still advance the step, so the data stream
      # and the schedule move on.
      kept = state.replace(step=state.step + 1)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                               new_state, kept)
    metrics = dict(
        metrics,
        loss=metrics['contrastive_loss'],
        learning_rate=schedule(state.step),
        grad_norm=grad_norm,
        param_norm=_global_norm(new_state.params),
        skipped=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  state_sharding = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding, state_sharding),
      out_shardings=(state_sharding, state_sharding),
      donate_argnums=(0,))
