"""Gradient caching: the NT-Xent gradient of a large batch in chunk-sized memory.

The contrastive loss couples every example of the global batch (each anchor is
scored against all 2N keys, Chen et al. 2020a), so it cannot be split into
micro-batches and accumulated like a per-example loss. It only couples the
examples through their projections z, though, which are tiny next to the
encoder's activations. Gradient caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") uses that:

  (a) forward every chunk of the batch without keeping activations and collect
      the outputs the loss needs (projections z and the online linear head's
      logits), a `lax.map` over chunks;
  (b) compute the loss over the full global batch and its gradient with respect
      to those outputs (the usual sharded NT-Xent: all-gather, (2b x 2N) logits
      per device);
  (c) re-run the network chunk by chunk under `jax.vjp` and accumulate the
      parameter gradients vjp(dL/dz_chunk), a `lax.scan` whose carry is the
      gradient sum.

For a network whose output for one example does not depend on the other
examples of its chunk, the result is exactly the full-batch gradient, at the
price of one extra forward pass (about 4/3 of the step's FLOPs) and with peak
activation memory of one chunk.

BatchNorm is the exception: in training mode its output depends on the batch
it normalises over. Two modes (`config.grad_cache_bn`):

  'per_chunk' (default): BN runs in training mode and its statistics are those
      of the chunk (still global across devices: every chunk is sharded over
      all of them). This is the gradient of a slightly different loss, the one
      of a network with per-chunk BN, computed exactly. Smaller chunks mean
      noisier statistics (the "ghost batch norm" effect); with chunks of a
      few hundred examples or more the difference is small. The running
      averages are updated with the mean of the chunks' updates: the running
      mean moves towards the global batch mean exactly, the running variance
      towards the mean within-chunk variance, which leaves out the (small)
      variance between chunk means.
  'frozen': BN uses its running statistics (train=False), so every example is
      independent of the rest of the batch and the gradient equals the full
      batch gradient of that network exactly. The running statistics are
      never updated, so this is for continuing from a checkpoint whose
      statistics are meaningful (fine-tuning, a second phase at a larger
      batch) and for verifying the machinery, not for training from scratch:
      at initialisation the running statistics are (0, 1) and BN normalises
      nothing. It also gives up BN's conditioning of the optimisation.

The loops are real loops (lax.map, lax.scan), not unrolled: unrolled, XLA
schedules all chunks' work together and the memory saving disappears (measured
on CPU: the same temporary memory as without caching). On XLA:CPU a
convolution's backward pass inside a loop body is several times slower than
at top level (jax-ml/jax#12868), so on CPU a gradient-cached step is much
slower than the 4/3 it costs in FLOPs; accelerators do not have this problem
(docs/benchmarks.md).

The chunks are interleaved across devices: chunk c holds sub-block c of every
device's local rows, so each chunk is sharded evenly over the mesh and every
device works in every chunk (taking contiguous slices of the global batch
would put a whole chunk on a few devices). The loss is computed on the
original row order, so the result does not depend on the chunking.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.runtime import parallel

BN_MODES = ('per_chunk', 'frozen')

# outputs -> (loss, metrics); outputs is a pytree with leading batch axes.
LossFn = Callable[[Any], tuple[jax.Array, dict]]
# params, x_chunk -> (outputs, aux); aux is not differentiated.
ApplyFn = Callable[[Any, jax.Array], tuple[Any, Any]]


def check_chunks(num_rows: int, num_chunks: int, num_devices: int) -> None:
  """Raises ValueError unless every chunk is sharded evenly over the devices.

  Args:
    num_rows: rows of the batch being chunked (images or views).
    num_chunks: number of chunks.
    num_devices: devices on the data axis.
  """
  if num_chunks <= 0 or num_rows % (num_chunks * num_devices):
    raise ValueError(
        f'grad_cache_chunks={num_chunks} does not split a batch of {num_rows} '
        f'evenly over {num_devices} devices: the batch must be a multiple of '
        f'chunks x devices = {num_chunks * num_devices}')


def _to_chunks(x: jax.Array, num_chunks: int, num_devices: int) -> jax.Array:
  """(R, ...) batch-sharded -> (C, R/C, ...), each chunk sharded over devices.

  Device d holds rows [d*R/D, (d+1)*R/D); chunk c takes the c-th sub-block of
  every device's rows, so the reshapes and the transpose move no data between
  devices.
  """
  r = x.shape[0]
  m = r // (num_chunks * num_devices)
  x = x.reshape((num_devices, num_chunks, m) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((num_chunks, num_devices * m) + x.shape[3:])


def _from_chunks(x: jax.Array, num_chunks: int, num_devices: int) -> jax.Array:
  """Inverse of `_to_chunks`: (C, R/C, ...) -> (R, ...) in the original order."""
  m = x.shape[1] // num_devices
  x = x.reshape((num_chunks, num_devices, m) + x.shape[2:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((num_chunks * num_devices * m,) + x.shape[3:])


def value_and_grad(apply_fn: ApplyFn,
                   loss_fn: LossFn,
                   params: Any,
                   x: jax.Array,
                   *,
                   num_chunks: int,
                   mesh: Mesh | None = None
                   ) -> tuple[tuple[jax.Array, tuple[dict, Any]], Any]:
  """Loss and parameter gradient of loss_fn(apply_fn(params, x)) by chunks.

  Args:
    apply_fn: params, x_chunk -> (outputs, aux); outputs (a pytree of arrays
      with the chunk's rows on axis 0) are what the loss reads, aux (e.g. BN
      statistic updates) is returned per chunk from the forward pass.
    loss_fn: outputs of the whole batch -> (loss, metrics). It may couple all
      rows (NT-Xent) and may use shard_map collectives.
    params: differentiated parameters.
    x: (R, ...) inputs, batch-sharded on the mesh's data axis.
    num_chunks: chunks the batch is processed in; R must be a multiple of
      num_chunks x devices.
    mesh: the data-parallel mesh (None: one device, no sharding constraints).

  Returns:
    ((loss, (metrics, aux stacked over chunks)), grads), grads in the
    parameters' dtype (accumulated in at least float32). The loss is exact; the gradient is exact for a network whose
    per-row outputs do not depend on the other rows of the chunk.
  """
  num_devices = 1 if mesh is None else mesh.shape[parallel.DATA_AXIS]
  check_chunks(x.shape[0], num_chunks, num_devices)

  def constrain(tree, spec):
    if mesh is None:
      return tree
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, spec)), tree)

  to_chunks = lambda t: constrain(jax.tree.map(
      lambda a: _to_chunks(a, num_chunks, num_devices), t),
                                  P(None, parallel.DATA_AXIS))
  from_chunks = lambda t: constrain(jax.tree.map(
      lambda a: _from_chunks(a, num_chunks, num_devices), t),
                                    P(parallel.DATA_AXIS))
  row_sharded = lambda t: constrain(t, P(parallel.DATA_AXIS))

  x_chunks = to_chunks(x)

  # (a) Forward only: nothing is differentiated here, so no activations are
  # kept beyond the chunk being computed.
  def forward(xc):
    return apply_fn(params, row_sharded(xc))

  out_chunks, aux = jax.lax.map(forward, x_chunks)
  outputs = from_chunks(out_chunks)

  # (b) The loss over the whole batch, and its gradient w.r.t. the outputs.
  (loss, metrics), d_outputs = jax.value_and_grad(loss_fn, has_aux=True)(
      outputs)
  d_chunks = to_chunks(d_outputs)

  # (c) Recompute each chunk under vjp and accumulate the parameter gradients.
  def backward(acc, chunk):
    xc, dc = chunk
    _, vjp = jax.vjp(lambda p: apply_fn(p, row_sharded(xc))[0], params)
    (g,) = vjp(row_sharded(dc))
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g), None

  # Accumulate in at least float32 whatever the parameter dtype, and return
  # gradients in the parameters' dtype as jax.grad would.
  zeros = jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
      params)
  grads, _ = jax.lax.scan(backward, zeros, (x_chunks, d_chunks))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (loss, (metrics, aux)), grads


def simclr_grads(model: nn.Module,
                 params: Any,
                 batch_stats: Any,
                 x: jax.Array,
                 labels: jax.Array,
                 *,
                 contrastive_loss: Callable[[jax.Array, jax.Array],
                                            tuple[jax.Array, dict]],
                 head_loss: Callable[[jax.Array, jax.Array],
                                     tuple[jax.Array, jax.Array]],
                 num_chunks: int,
                 mesh: Mesh | None = None,
                 bn: str = 'per_chunk') -> tuple[Any, tuple[dict, Any]]:
  """The SimCLR train step's gradient, computed with gradient caching.

  Same loss as the plain step: NT-Xent on the projections plus the online
  linear head's cross-entropy on its logits (the head reads stop_gradient
  features, so its loss only trains the head). Both are computed on the
  whole batch from the cached outputs.

  Args:
    model: module with `apply(variables, x, train=..., mutable=...)` returning
      a dict with 'projection' and optionally 'logits' (a SimCLRModel).
    params: model parameters (differentiated).
    batch_stats: BN running statistics.
    x: (2N, ...) views, the two views of an image on adjacent rows.
    labels: (2N,) labels for the linear head (< 0: unlabelled).
    contrastive_loss: z_a, z_b -> (loss, metrics), e.g. the shard_mapped
      `losses.sharded_nt_xent`.
    head_loss: logits, labels -> (loss, accuracy) of the linear head.
    num_chunks: chunks of the batch; 2N must split evenly into chunks x devices
      rows (equivalently, N into chunks x devices images).
    mesh: the data-parallel mesh.
    bn: 'per_chunk' or 'frozen' (see the module docstring).

  Returns:
    (grads, (metrics, new_batch_stats)), the structure of the plain step's
    `jax.grad(loss_fn, has_aux=True)`.
  """
  if bn not in BN_MODES:
    raise ValueError(f'grad_cache_bn={bn!r} is not supported; choose one of '
                     f'{", ".join(BN_MODES)}')
  train = bn == 'per_chunk'
  n = x.shape[0] // 2

  def apply_fn(p, xc):
    variables = {'params': p, 'batch_stats': batch_stats}
    if train:
      out, state = model.apply(variables, xc, train=True,
                               mutable=['batch_stats'])
      new_stats = state.get('batch_stats', {})
    else:
      out = model.apply(variables, xc, train=False)
      new_stats = None
    keep = {'projection': out['projection']}
    if out.get('logits') is not None:
      keep['logits'] = out['logits']
    return keep, new_stats

  def loss_fn(outputs):
    z = outputs['projection'].reshape((n, 2, -1))
    loss, metrics = contrastive_loss(z[:, 0], z[:, 1])
    total = loss
    if 'logits' in outputs:
      lin_loss, lin_acc = head_loss(outputs['logits'], labels)
      total = total + lin_loss
      metrics = dict(metrics, linear_loss=lin_loss, linear_acc=lin_acc)
    return total, metrics

  (_, (metrics, chunk_stats)), grads = value_and_grad(
      apply_fn, loss_fn, params, x, num_chunks=num_chunks, mesh=mesh)
  if train:
    # Every chunk's update is momentum * old + (1 - momentum) * chunk stat;
    # their mean is one update with the mean of the chunk statistics.
    new_stats = jax.tree.map(lambda s: jnp.mean(s, axis=0), chunk_stats)
  else:
    new_stats = batch_stats
  return grads, (metrics, new_stats)
