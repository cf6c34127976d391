"""The one train-state type every mode trains, and how it is built.

Pretraining and the supervised modes (linear_eval, finetune, distill) all
checkpoint a `TrainState`, so one loop saves, restores and resumes them all,
and `checkpointing.load_run` reads any of them.
"""

from typing import Any, Iterable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.runtime import parallel


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; checkpointed as a whole."""
  step: jax.Array
  params: Any  # e.g. {'encoder', 'projection_head', 'linear_head'}
  batch_stats: Any
  opt_state: Any
  # Method state (simclr_jax/methods): momentum encoder, queue, memory bank.
  extra: Any = flax.struct.field(default_factory=dict)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int
                   ) -> dict[str, Any]:
  """Model variables from a dummy batch (shapes only depend on image size)."""
  x = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  return model.init(rng, x, train=False)


def variables_of(state: TrainState) -> dict[str, Any]:
  """The variables `model.apply` needs, from a train state."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def create_state(tx: optax.GradientTransformation, variables: dict,
                 mesh: Any, extra: Any = None) -> TrainState:
  """A replicated train state at step 0 around existing variables."""
  params = variables['params']
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}),
                     opt_state=tx.init(params),
                     extra={} if extra is None else extra)
  return jax.device_put(state, parallel.replicated(mesh))


def recalibrate_batch_stats(model: Any, variables: dict, images: Any, *,
                            batch_size: int, num_devices: int,
                            passes: int = 20) -> dict:
  """Re-estimates BN running statistics by forwarding `images` in train mode.

  `passes` shuffled passes (seed 0) of batches of `batch_size` (a multiple
  of the devices); the parameters are untouched. With BN momentum 0.9 a
  pass of 20+ batches already forgets the old statistics to a few percent.
  Used for AdaBN (adapt), whose target split is held in memory; a split
  that is only streamed goes through `batch_stats_from_batches`.
  """
  bs = min(batch_size, len(images))
  bs = max(num_devices, bs // num_devices * num_devices)

  def batches() -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    for _ in range(passes):
      idx = rng.permutation(len(images))
      for i in range(0, len(images) - bs + 1, bs):
        yield images[idx[i:i + bs]]

  return batch_stats_from_batches(model, variables, batches())


def batch_stats_from_batches(model: Any, variables: dict,
                             batches: Iterable[np.ndarray]) -> dict:
  """BN running statistics updated by forwarding each batch in train mode.

  The parameters are untouched; one jitted update per batch shape, so the
  batches should share one shape. Host memory is one batch at a time.
  """

  @jax.jit
  def update(batch_stats, x):
    _, new = model.apply({'params': variables['params'],
                          'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'])
    return new['batch_stats']

  batch_stats = variables['batch_stats']
  for x in batches:
    batch_stats = update(batch_stats, jnp.asarray(x))
  return {'params': variables['params'], 'batch_stats': batch_stats}
