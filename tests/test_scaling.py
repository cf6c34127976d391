"""The scaling formulas, by hand and against what XLA actually compiles."""

import functools
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from simclr_jax import losses
from simclr_jax.runtime import parallel
from simclr_jax.tools import scaling


def test_hand_derived_float32_case():
  # N=4096 on D=8, d=128: b=512, logits (1024 x 8192), gathered (8192 x 128).
  mem = scaling.loss_memory(4096, 8, 128, 'float32')
  assert mem.logits == 1024 * 8192 * 4 == 32 * 2**20
  assert mem.gathered == 8192 * 128 * 4 == 4 * 2**20
  assert mem.fwd_bwd == 2 * (32 + 4) * 2**20
  com = scaling.gather_traffic(4096, 8, 128, 'float32')
  # 7 other devices x their 1024 rows x 128 x 4 bytes, each way.
  assert com.forward_per_device == com.backward_per_device == 7 * 1024 * 512
  assert com.per_device == 7 * 2**20
  assert com.total == 8 * 7 * 2**20


def test_hand_derived_bfloat16_case():
  # N=64 on D=4, d=16: b=16, logits (32 x 128), gathered (128 x 16).
  mem = scaling.loss_memory(64, 4, 16, 'bfloat16')
  assert (mem.logits, mem.gathered) == (32 * 128 * 2, 128 * 16 * 2)
  com = scaling.gather_traffic(64, 4, 16, 'bfloat16')
  assert com.forward_per_device == 3 * 32 * 16 * 2
  # One device: nothing to gather.
  assert scaling.gather_traffic(64, 1, 16).per_device == 0
  with pytest.raises(ValueError, match='does not split evenly'):
    scaling.loss_memory(100, 8, 16)


def test_table_lists_every_case():
  table = scaling.markdown_table()
  assert len(table.splitlines()) == 2 + 3 * 4
  assert '| 32768 | 1024 | 32 | 32.0 | 64.0 | 96.0 |' in table


def _sharded_loss_grad(mesh):
  loss = jax.shard_map(
      functools.partial(losses.sharded_nt_xent, temperature=0.5,
                        axis_name=parallel.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
      out_specs=(P(), P()))
  return jax.jit(jax.grad(lambda a, b: loss(a, b)[0], argnums=(0, 1)))


@pytest.mark.skipif(jax.device_count() != 8, reason='needs 8 CPU devices')
def test_formulas_match_the_compiled_sharded_loss():
  n, d = 2048, 8  # Big enough that the logits dominate XLA's temporaries.
  mesh = parallel.make_mesh()
  z = jax.ShapeDtypeStruct((n, d), jnp.float32,
                           sharding=parallel.data_sharding(mesh))
  fn = _sharded_loss_grad(mesh)
  mem = scaling.loss_memory(n, 8, d)
  com = scaling.gather_traffic(n, 8, d)

  # Logits: what the loss's matmuls produce per device (jaxpr of the body).
  jaxpr = jax.make_jaxpr(fn)(z, z)
  body = next(e.params['jaxpr'] for e in jaxpr.eqns[0].params['jaxpr'].eqns
              if e.primitive.name == 'shard_map')
  gathered = [e.outvars[0].aval for e in body.eqns
              if e.primitive.name == 'all_gather']
  assert [a.shape for a in gathered] == [(n, d), (n, d)]
  assert sum(a.size * a.dtype.itemsize for a in gathered) == mem.gathered
  b = n // 8
  logits = [e.outvars[0].aval for e in body.eqns
            if e.primitive.name == 'dot_general'
            and e.outvars[0].aval.shape == (b, n)]
  assert len(logits) == 4  # ab, aa, ba, bb: together (2b x 2N).
  assert sum(a.size * a.dtype.itemsize for a in logits) == mem.logits

  # Traffic: the collectives in the compiled HLO, costed as ring algorithms.
  compiled = fn.lower(z, z).compile()
  moved = {'all-gather': 0, 'reduce-scatter': 0}
  pattern = r'= f32\[([\d,]+)\]\S* (all-gather|reduce-scatter)\('
  for dims, kind in re.findall(pattern, compiled.as_text()):
    nbytes = 4 * math.prod(int(x) for x in dims.split(','))
    # all-gather result: the full array, (D-1)/D of it arrives; reduce-scatter
    # result: one shard, (D-1) shards' worth leave and arrive.
    moved[kind] += nbytes * 7 // 8 if kind == 'all-gather' else nbytes * 7
  assert moved['all-gather'] == com.forward_per_device
  assert moved['reduce-scatter'] == com.backward_per_device

  # Memory: XLA's own per-device temporaries for forward + backward.
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip('no memory analysis on this backend')
  ratio = analysis.temp_size_in_bytes / mem.fwd_bwd
  assert 0.75 < ratio < 1.25, (analysis.temp_size_in_bytes, mem.fwd_bwd)
