r"""What the sharded NT-Xent costs per device, as the batch and the pod grow.

The loss (losses.sharded_nt_xent; docs/algorithms.md#across-devices) runs
inside shard_map: each of D devices holds b = N/D images (2b projections, both
views), all-gathers the (2N x d) projections of the global batch, and scores
its own 2b anchors against all 2N keys. So per device:

  similarity/logits matrix   (2b x 2N)  = 4 N^2 / D elements
  gathered projections       (2N x d)   = 2 N d elements

and the backward pass holds a cotangent of each of the same shape, hence
"fwd+bwd" = 2 x (both). The logits term grows with N^2 / D: doubling the
batch at a fixed device count quadruples it, which is what limits the batch
on small pods; the gathered term does not shrink with D at all.

Communication per step: the forward all-gather brings every device the
(D-1)/D of the gathered array it does not hold, and its transpose in the
backward pass is a reduce-scatter of the (2N x d) gradient, which in a
bandwidth-optimal (ring) implementation sends and receives the same (D-1)/D.
Per device that is (D-1)/D * 2Nd elements each way, per pass; the total over
the job is D times that. The scalar psum of the loss statistics is ignored.

The implementation casts projections to float32 before the loss whatever
model.compute_dtype is, so `dtype='float32'` is what a run actually moves;
the argument exists to ask what bfloat16 would save.

  python -m simclr_jax.tools.scaling    # prints the markdown table of docs/scaling.md
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LossMemory:
  """Bytes per device of the loss's two big buffers, forward and backward."""
  logits: int  # (2b x 2N) similarity matrix, forward.
  gathered: int  # (2N x d) all-gathered projections, forward.

  @property
  def forward(self) -> int:
    return self.logits + self.gathered

  @property
  def fwd_bwd(self) -> int:
    """Forward buffers plus their cotangents of the same shapes."""
    return 2 * self.forward


@dataclasses.dataclass(frozen=True)
class GatherTraffic:
  """Bytes the projection all-gather and its gradient move per step."""
  forward_per_device: int  # All-gather: received (= sent, ring) per device.
  backward_per_device: int  # Reduce-scatter of the gradient, per device.
  num_devices: int

  @property
  def per_device(self) -> int:
    return self.forward_per_device + self.backward_per_device

  @property
  def total(self) -> int:
    """Summed over every device of the job."""
    return self.num_devices * self.per_device


def local_batch(global_batch: int, num_devices: int) -> int:
  """Images per device; the mesh needs the batch to split evenly."""
  if global_batch <= 0 or num_devices <= 0 or global_batch % num_devices:
    raise ValueError(f'global batch {global_batch} does not split evenly '
                     f'over {num_devices} devices')
  return global_batch // num_devices


def _itemsize(dtype) -> int:
  if str(dtype) == 'bfloat16':  # NumPy has no bfloat16 without ml_dtypes.
    return 2
  return np.dtype(dtype).itemsize


def loss_memory(global_batch: int, num_devices: int, proj_dim: int,
                dtype='float32') -> LossMemory:
  """Per-device bytes of the logits and gathered projections (see module)."""
  b = local_batch(global_batch, num_devices)
  n = global_batch
  size = _itemsize(dtype)
  return LossMemory(logits=(2 * b) * (2 * n) * size,
                    gathered=(2 * n) * proj_dim * size)


def gather_traffic(global_batch: int, num_devices: int, proj_dim: int,
                   dtype='float32') -> GatherTraffic:
  """Bytes moved per step by the forward all-gather and backward reduce-scatter.

  Each device contributes 2b rows and needs the other (D-1) devices' 2b rows:
  (D-1) * 2b * d elements = (D-1)/D * 2Nd, the same again for the gradient.
  """
  b = local_batch(global_batch, num_devices)
  per_pass = (num_devices - 1) * (2 * b) * proj_dim * _itemsize(dtype)
  return GatherTraffic(forward_per_device=per_pass,
                       backward_per_device=per_pass, num_devices=num_devices)


def _mib(x: int) -> str:
  return f'{x / 2**20:,.1f}'


def markdown_table(batches=(4096, 8192, 32768), devices=(8, 64, 256, 1024),
                   proj_dim: int = 128, dtype='float32') -> str:
  """The table of docs/scaling.md (MiB; GiB for the job-wide traffic)."""
  rows = ['| global batch N | devices D | b = N/D | logits fwd+bwd MiB '
          '| gathered fwd+bwd MiB | loss total MiB/device '
          '| gather+scatter MiB/device/step | job total GiB/step |',
          '|---:|---:|---:|---:|---:|---:|---:|---:|']
  for n in batches:
    for d in devices:
      mem = loss_memory(n, d, proj_dim, dtype)
      com = gather_traffic(n, d, proj_dim, dtype)
      rows.append(
          f'| {n} | {d} | {n // d} | {_mib(2 * mem.logits)} '
          f'| {_mib(2 * mem.gathered)} | {_mib(mem.fwd_bwd)} '
          f'| {_mib(com.per_device)} | {com.total / 2**30:,.2f} |')
  return '\n'.join(rows)


def main() -> None:
  print('Projection dim 128, float32 (what the loss computes in).\n')
  print(markdown_table())


if __name__ == '__main__':
  main()
