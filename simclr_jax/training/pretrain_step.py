"""The pure functional SimCLR train step and the train state it updates.

`make_train_step` returns `train_step(state, batch, rng) -> (state, metrics)`,
jitted once over the mesh: the batch is sharded on 'data', the state is
replicated and donated. The encoder runs under plain jit on the global batch,
so BatchNorm statistics are global (Chen et al. 2020a, Sec. 2.2: global BN,
both views in one batch); only the loss runs inside shard_map, where each
device all-gathers the projections and scores its own rows against all 2N
keys (docs/algorithms.md#across-devices).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from simclr_jax.data.augment_jax import CROP_AREA_RANGE
from simclr_jax.training import grad_cache
from simclr_jax import methods
from simclr_jax.runtime import parallel
from simclr_jax.training.state import TrainState
from simclr_jax.training.state import init_variables


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array, image_size: int,
                       mesh: Mesh,
                       method: methods.Method | None = None) -> TrainState:
  """Initialises the state directly as replicated arrays on the mesh.

  The method's state (target network, queue, bank) is replicated too: every
  device needs all of it (a queue of all-gathered keys, a bank indexed by
  any image id).
  """

  def init(rng):
    variables = init_variables(model, rng, image_size)
    params = variables['params']
    batch_stats = variables.get('batch_stats', {})
    extra = {}
    if method is not None:
      extra = method.init_extra(params, batch_stats,
                                jax.random.fold_in(rng, 1))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        extra=extra)

  return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def _global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(tree)


def make_views_fn(augment_backend: str, image_size: int,
                  color_strength: float, blur: bool,
                  crop_min_area: float = CROP_AREA_RANGE[0], flip: bool = True
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
    kw = dict(size=image_size, color_strength=color_strength, blur=blur,
              crop_min_area=float(crop_min_area), flip=bool(flip))
    view_a = augment.jax_views(rng_a, batch['images'], **kw)
    view_b = augment.jax_views(rng_b, batch['images'], **kw)
    return jnp.stack([view_a, view_b], axis=1)

  return views


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any],
                    mesh: Mesh,
                    *,
                    method: methods.Method,
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
    method: the contrastive method (`methods.make_method`).
    views_fn: batch, rng -> (N, 2, S, S, 3) float views.
    skip_nonfinite: if the loss or gradients are not finite, keep the old
      state for this step (config on_nan='skip_step') and count it.
    compute_dtype: dtype the views are cast to before the encoder.
    grad_cache_chunks: > 0 computes the gradient by gradient caching in this
      many chunks (simclr_jax/training/grad_cache.py): same loss, activation memory of
      one chunk, one extra forward pass. Needs a method whose loss reads one
      online output per view and, if it has one, its target network's
      outputs (`method.supports_grad_cache`).
    grad_cache_bn: BN under gradient caching, 'per_chunk' or 'frozen'.
    inject_nan_at_step: testing aid (config debug.inject_nan_at_step): the
      update that makes state.step equal to this gets a NaN loss and NaN
      gradients, so tests can drive on_nan through the real jitted step.
  """
  if grad_cache_chunks and not method.supports_grad_cache:
    raise ValueError(f'grad_cache_chunks={grad_cache_chunks} is not supported '
                     f'for method={method.name!r}: its loss needs more than '
                     'one output per view (use 0)')

  def step_inputs(step: jax.Array, batch: dict, rng: jax.Array
                  ) -> methods.StepBatch:
    views = views_fn(batch, rng)
    n = views.shape[0]
    # (N, 2, ...) -> (2N, ...) keeps each device's rows on that device (the
    # two views of an image are neighbours), so this is free under sharding.
    x = views.reshape((2 * n,) + views.shape[2:]).astype(compute_dtype)
    return methods.StepBatch(
        x=x, labels=batch['labels'], index=batch.get('index'),
        rng=jax.random.fold_in(rng, 1), step=step)

  def apply_gradients(state: TrainState, grads: Any, out: methods.LossOutput
                      ) -> tuple[TrainState, dict]:
    """The update from the gradients on: optimiser, method state, metrics."""
    metrics = out.metrics
    grads = method.mask_frozen(grads, state.step)
    if inject_nan_at_step >= 0:
      poison = jnp.where(state.step + 1 == inject_nan_at_step, jnp.nan, 1.0)
      grads = jax.tree.map(lambda g: g * poison, grads)
      metrics = dict(metrics,
                     contrastive_loss=metrics['contrastive_loss'] * poison)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = method.mask_frozen(updates, state.step)
    params = optax.apply_updates(state.params, updates)
    # Outside the gradient; a skipped step (skip_nonfinite) keeps the old,
    # already projected parameters.
    params = method.project_params(params, state.step)
    extra = method.update_extra(state.extra, params, out.payload, state.step)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=out.batch_stats,
                              opt_state=opt_state, extra=extra)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(metrics['contrastive_loss']) & jnp.isfinite(
        grad_norm)
    if skip_nonfinite:
      # Keep the old state (method state included) but still advance the
      # step, so the data stream and the schedule move on.
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

  def train_step(state: TrainState, batch: dict, rng: jax.Array
                 ) -> tuple[TrainState, dict]:
    step_batch = step_inputs(state.step, batch, rng)
    grads, out = jax.grad(
        lambda p: method.loss(model, p, state.batch_stats, state.extra,
                              step_batch), has_aux=True)(state.params)
    return apply_gradients(state, grads, out)

  state_sharding = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  if grad_cache_chunks:
    return HostChunkedStep(
        model, mesh, method, step_inputs, apply_gradients,
        num_chunks=grad_cache_chunks, bn=grad_cache_bn)
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding, state_sharding),
      out_shardings=(state_sharding, state_sharding),
      donate_argnums=(0,))


class HostChunkedStep:
  """The train step with gradient caching, driven from the host.

  Same signature and result as the jitted plain step, `(state, batch, rng)
  -> (state, metrics)`, made of separately jitted programs: the views, the
  chunked gradient (training/grad_cache.py) and the update. The state is
  donated to the update program as in the plain step.

  A method with a target network (MoCo v3, BYOL: `method.has_targets`)
  gets its outputs first, by chunks too (one 'target' program a chunk and a
  'targets' program joining them): the target takes no gradient, so its
  outputs are inputs of the loss like the labels, and its activations, like
  the online network's, exist for one chunk at a time. Its BN follows
  `bn`: statistics of the chunk, averaged over the chunks, or frozen.
  """

  def __init__(self, model: nn.Module, mesh: Mesh, method: methods.Method,
               step_inputs: Callable, apply_gradients: Callable, *,
               num_chunks: int, bn: str):
    state_sharding = parallel.replicated(mesh)
    batch_sharding = parallel.data_sharding(mesh)

    def cached_loss(a, b, ctx):
      step_batch, targets = ctx
      loss, metrics = method.cached_loss(a, b, targets, step_batch)
      return loss, dict(metrics, contrastive_loss=loss)

    def inputs(step, batch, rng):
      step_batch = step_inputs(step, batch, rng)
      # The linear head's labels, one per view.
      return step_batch, jnp.repeat(step_batch.labels, 2)

    self._inputs = jax.jit(
        inputs, in_shardings=(state_sharding, batch_sharding, state_sharding))
    self._grads = grad_cache.SimCLRGradCache(
        model, contrastive_loss=cached_loss,
        head_loss=methods.base.linear_head_loss, num_chunks=num_chunks,
        mesh=mesh, bn=bn, output=method.cached_output)
    self._has_targets = method.has_targets
    if self._has_targets:
      train = bn == 'per_chunk'
      self._target = jax.jit(
          lambda extra, xc: method.cached_targets(model, extra, xc, train))
      # Frozen BN: every chunk's payload is the same running statistics.
      reduce = grad_cache.mean_over_chunks if train else (lambda p: p[0])
      self._targets = jax.jit(
          lambda outs, payloads: (self._grads.join(outs), reduce(payloads)))
    self._update = jax.jit(
        lambda state, grads, metrics, stats, payload: apply_gradients(
            state, grads, methods.LossOutput(metrics, stats, payload)),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=(0,))

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array,
               record: grad_cache.Recorder = None
               ) -> tuple[TrainState, dict]:
    """One step; `record` as in grad_cache.ChunkedValueAndGrad.__call__."""
    run = functools.partial(grad_cache.run_program, record)
    step_batch, labels = run('inputs', self._inputs, state.step, batch, rng)
    x = step_batch.x
    # Split once: the target network and the cached gradient share chunks.
    chunks = self._grads.split(x, record)
    targets = payload = None
    if self._has_targets:
      outs = [run('target', self._target, state.extra, xc) for xc in chunks]
      targets, payload = run('targets', self._targets,
                             tuple(t for t, _ in outs),
                             tuple(p for _, p in outs))
      del outs
    # The loss reads labels, index, rng and step, not the views themselves.
    grads, (metrics, stats) = self._grads(
        state.params, state.batch_stats, x, labels,
        (step_batch.replace(x=None), targets), record=record, chunks=chunks)
    del step_batch, x, chunks, targets
    return run('update', self._update, state, grads, metrics, stats, payload)
