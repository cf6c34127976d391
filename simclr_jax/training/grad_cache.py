"""Gradient caching: the NT-Xent gradient of a large batch in chunk-sized memory.

The contrastive loss couples every example of the global batch (each anchor is
scored against all 2N keys, Chen et al. 2020a), so it cannot be split into
micro-batches and accumulated like a per-example loss. It only couples the
examples through their projections z, though, which are tiny next to the
encoder's activations. Gradient caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") uses that:

  (a) forward every chunk of the batch without keeping activations and collect
      the outputs the loss needs (projections z and the online linear head's
      logits);
  (b) compute the loss over the full global batch and its gradient with respect
      to those outputs (the usual sharded NT-Xent: all-gather, (2b x 2N) logits
      per device);
  (c) re-run the network chunk by chunk under `jax.vjp` and accumulate the
      parameter gradients vjp(dL/dz_chunk).

For a network whose output for one example does not depend on the other
examples of its chunk, the result is exactly the full-batch gradient, at the
price of one extra forward pass (about 4/3 of the step's FLOPs) and with peak
activation memory of one chunk.

The chunks are driven from the host, as the GradCache authors' code does:
(a), (b) and (c) are separately jitted programs (one forward program and one
backward program, each called once per chunk, and one loss program), and a
Python loop dispatches them. Dispatch is asynchronous, so the device runs the
programs back to back; only one chunk's activations ever exist, because no
program holds more than one chunk. An earlier version put the chunks in a
`lax.map` / `lax.scan` inside one jitted step. That is the same arithmetic,
but it made the cost depend on how a backend compiles loop bodies: XLA:CPU
compiles a convolution's backward pass inside a loop body several times
slower than at top level (jax-ml/jax#12868), and a 2-chunk step took 14x
the plain one. As separate programs every chunk's convolutions are top-level
code on every backend (docs/benchmarks.md has the measured ratios).

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

The chunks are interleaved across devices: chunk c holds sub-block c of every
device's local rows, so each chunk is sharded evenly over the mesh and every
device works in every chunk (taking contiguous slices of the global batch
would put a whole chunk on a few devices). The loss is computed on the
original row order, so the result does not depend on the chunking.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from simclr_jax.runtime import parallel

BN_MODES = ('per_chunk', 'frozen')

# outputs, ctx -> (loss, metrics); outputs is a pytree with leading batch axes.
LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]
# params, state, x_chunk -> (outputs, aux); state and aux are not differentiated.
ApplyFn = Callable[[Any, Any, jax.Array], tuple[Any, Any]]
# Records (program name, jitted function, its arguments) when asked to, so a
# benchmark can compile and analyse every program of a step.
Recorder = Callable[[str, Any, tuple], None] | None


def run_program(record: Recorder, name: str, program: Any, *args) -> Any:
  """program(*args), after telling `record` (if given) its name and
  arguments: how a host-driven step lets a benchmark or preflight compile
  and analyse each of its programs."""
  if record is not None:
    record(name, program, args)
  return program(*args)


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


class ChunkedValueAndGrad:
  """Loss and parameter gradient of loss_fn(apply_fn(params, x)) by chunks.

  Built once per train step (its jitted programs are compiled on the first
  call and reused); calling it runs steps (a)-(c) of the module docstring,
  each a separately jitted program dispatched from the host.
  """

  def __init__(self, apply_fn: ApplyFn, loss_fn: LossFn, *, num_chunks: int,
               mesh: Mesh | None = None,
               reduce_aux: Callable[[Any], Any] = lambda aux: aux):
    """
    Args:
      apply_fn: params, state, x_chunk -> (outputs, aux). Outputs (a pytree
        of arrays with the chunk's rows on axis 0) are what the loss reads;
        aux (e.g. BN statistic updates) is collected from the forward pass.
      loss_fn: outputs of the whole batch, ctx -> (loss, metrics). It may
        couple all rows (NT-Xent) and may use shard_map collectives.
      num_chunks: chunks the batch is processed in; the batch must be a
        multiple of num_chunks x devices.
      mesh: the data-parallel mesh (None: one device, no sharding).
      reduce_aux: the tuple of every chunk's aux -> what is returned (runs
        inside the loss program).
    """
    self.num_chunks = num_chunks
    self.mesh = mesh
    self.num_devices = 1 if mesh is None else mesh.shape[parallel.DATA_AXIS]
    self._apply_fn = apply_fn
    self._loss_fn = loss_fn
    self._reduce_aux = reduce_aux
    rows = None if mesh is None else NamedSharding(mesh, P(parallel.DATA_AXIS))
    self._split = jax.jit(
        self._split_impl,
        out_shardings=None if rows is None else (rows,) * num_chunks)
    self._forward = jax.jit(apply_fn)
    self._loss = jax.jit(self._loss_impl)
    self._zeros = jax.jit(
        _zeros_like_accumulator,
        out_shardings=None if mesh is None else NamedSharding(mesh, P()))
    self._backward = jax.jit(self._backward_impl, donate_argnums=(0,))

  def _constrain(self, tree: Any, spec: P) -> Any:
    if self.mesh is None:
      return tree
    sharding = NamedSharding(self.mesh, spec)
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)

  def _split_impl(self, x: jax.Array) -> tuple[jax.Array, ...]:
    chunks = self._constrain(
        _to_chunks(x, self.num_chunks, self.num_devices),
        P(None, parallel.DATA_AXIS))
    return tuple(chunks[c] for c in range(self.num_chunks))

  def _loss_impl(self, out_chunks: tuple, aux_chunks: tuple, ctx: Any):
    c, d = self.num_chunks, self.num_devices
    outputs = self.join(out_chunks)
    (loss, metrics), d_outputs = jax.value_and_grad(
        self._loss_fn, has_aux=True)(outputs, ctx)
    d_stacked = self._constrain(
        jax.tree.map(lambda a: _to_chunks(a, c, d), d_outputs),
        P(None, parallel.DATA_AXIS))
    d_chunks = tuple(jax.tree.map(lambda a, i=i: a[i], d_stacked)
                     for i in range(c))
    return loss, metrics, self._reduce_aux(aux_chunks), d_chunks

  def _backward_impl(self, acc: Any, params: Any, state: Any, xc: jax.Array,
                     dc: Any) -> Any:
    _, vjp = jax.vjp(lambda p: self._apply_fn(p, state, xc)[0], params)
    (g,) = vjp(dc)
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, g)

  def split(self, x: jax.Array, record: Recorder = None
            ) -> tuple[jax.Array, ...]:
    """The chunks of x (R, ...) this engine differentiates, in its order
    (the 'split' program)."""
    check_chunks(x.shape[0], self.num_chunks, self.num_devices)
    return run_program(record, 'split', self._split, x)

  def join(self, chunks: tuple) -> Any:
    """Inverse of `split` for per-chunk outputs (pytrees with the chunk's
    rows on axis 0): the whole batch in the original row order, sharded on
    the data axis. Traceable (call it inside a jitted program)."""
    c, d = self.num_chunks, self.num_devices
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *chunks)
    return self._constrain(
        jax.tree.map(lambda a: _from_chunks(a, c, d), stacked),
        P(parallel.DATA_AXIS))

  def __call__(self, params: Any, state: Any, x: jax.Array, ctx: Any = None,
               record: Recorder = None, chunks: tuple | None = None
               ) -> tuple[tuple[jax.Array, tuple[dict, Any]], Any]:
    """((loss, (metrics, reduced aux)), grads) for the batch x.

    Args:
      params: differentiated parameters.
      state: what apply_fn reads but does not differentiate (BN statistics).
      x: (R, ...) inputs, batch-sharded on the mesh's data axis.
      ctx: anything else the loss reads (labels, the step's rng).
      record: if given, called as record(name, program, args) before each
        program runs (benchmarks compile and analyse them).
      chunks: `split(x)`, when the caller has split x already (to run
        something else over the same chunks), so it is not split twice.

    Returns:
      Gradients in the parameters' dtype, accumulated in at least float32.
      The loss is exact; the gradient is exact for a network whose per-row
      outputs do not depend on the other rows of the chunk.
    """
    if chunks is None:
      chunks = self.split(x, record)
    run = functools.partial(run_program, record)
    forwards = [run('forward', self._forward, params, state, xc)
                for xc in chunks]
    loss, metrics, aux, d_chunks = run(
        'loss', self._loss, tuple(o for o, _ in forwards),
        tuple(a for _, a in forwards), ctx)
    del forwards
    grads = run('zeros', self._zeros, params)
    for xc, dc in zip(chunks, d_chunks):
      grads = run('backward', self._backward, grads, params, state, xc, dc)
    if any(g.dtype != p.dtype for g, p in zip(jax.tree.leaves(grads),
                                              jax.tree.leaves(params))):
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, (metrics, aux)), grads


def mean_over_chunks(chunk_stats: tuple) -> Any:
  """The mean of the chunks' BN statistic updates (pytrees of one shape).

  Every chunk's update is momentum * old + (1 - momentum) * chunk stat;
  their mean is one update with the mean of the chunk statistics.
  """
  return jax.tree.map(lambda *s: sum(s) / len(s), *chunk_stats)


def _zeros_like_accumulator(params: Any) -> Any:
  """Zero gradients in at least float32, whatever the parameter dtype."""
  return jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
      params)


class SimCLRGradCache:
  """The SimCLR train step's gradient, computed with gradient caching.

  Same loss as the plain step: the method's projection loss plus the online
  linear head's cross-entropy on its logits (the head reads stop_gradient
  features, so its loss only trains the head). Both are computed on the
  whole batch from the cached outputs.
  """

  def __init__(self, model: nn.Module, *,
               contrastive_loss: Callable[[jax.Array, jax.Array, Any],
                                          tuple[jax.Array, dict]],
               head_loss: Callable[[jax.Array, jax.Array],
                                   tuple[jax.Array, jax.Array]],
               num_chunks: int,
               mesh: Mesh | None = None,
               bn: str = 'per_chunk',
               output: str = 'projection'):
    """
    Args:
      model: module with `apply(variables, x, train=..., mutable=...)`
        returning a dict with `output` and optionally 'logits' (a
        SimCLRModel).
      contrastive_loss: z_a, z_b, ctx -> (loss, metrics), e.g. the
        shard_mapped `losses.sharded_nt_xent`, of the two views' `output`
        rows; ctx is what the caller passes.
      head_loss: logits, labels -> (loss, accuracy) of the linear head.
      num_chunks: chunks of the batch; 2N must split evenly into chunks x
        devices rows (equivalently, N into chunks x devices images).
      mesh: the data-parallel mesh.
      bn: 'per_chunk' or 'frozen' (see the module docstring).
      output: the model output the loss reads and the cache holds: the
        projection z, or a predictor's 'prediction' (MoCo v3, BYOL).
    """
    if bn not in BN_MODES:
      raise ValueError(f'grad_cache_bn={bn!r} is not supported; choose one '
                       f'of {", ".join(BN_MODES)}')
    train = bn == 'per_chunk'

    def apply_fn(params, batch_stats, xc):
      variables = {'params': params, 'batch_stats': batch_stats}
      if train:
        out, new = model.apply(variables, xc, train=True,
                               mutable=['batch_stats'])
        new_stats = new.get('batch_stats', {})
      else:
        out, new_stats = model.apply(variables, xc, train=False), None
      keep = {output: out[output]}
      if out.get('logits') is not None:
        keep['logits'] = out['logits']
      return keep, new_stats

    def loss_fn(outputs, ctx):
      labels, user_ctx = ctx
      z = outputs[output].reshape((outputs[output].shape[0] // 2, 2, -1))
      loss, metrics = contrastive_loss(z[:, 0], z[:, 1], user_ctx)
      total = loss
      if 'logits' in outputs:
        lin_loss, lin_acc = head_loss(outputs['logits'], labels)
        total = total + lin_loss
        metrics = dict(metrics, linear_loss=lin_loss, linear_acc=lin_acc)
      return total, metrics

    def reduce_aux(chunk_stats):
      if not train:
        return None
      return mean_over_chunks(chunk_stats)

    self._engine = ChunkedValueAndGrad(apply_fn, loss_fn,
                                       num_chunks=num_chunks, mesh=mesh,
                                       reduce_aux=reduce_aux)
    self.split, self.join = self._engine.split, self._engine.join

  def __call__(self, params: Any, batch_stats: Any, x: jax.Array,
               labels: jax.Array, ctx: Any = None, record: Recorder = None,
               chunks: tuple | None = None
               ) -> tuple[Any, tuple[dict, Any]]:
    """(grads, (metrics, new_batch_stats)) of the loss on views x.

    Args:
      params: model parameters (differentiated).
      batch_stats: BN running statistics.
      x: (2N, ...) views, the two views of an image on adjacent rows.
      labels: (2N,) labels for the linear head (< 0: unlabelled).
      ctx: passed to contrastive_loss.
      record, chunks: see ChunkedValueAndGrad.__call__.

    Returns:
      The structure of the plain step's `jax.grad(loss_fn, has_aux=True)`;
      frozen BN returns the statistics unchanged.
    """
    (_, (metrics, new_stats)), grads = self._engine(
        params, batch_stats, x, (labels, ctx), record=record, chunks=chunks)
    return grads, (metrics, batch_stats if new_stats is None else new_stats)
