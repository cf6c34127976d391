"""Multi-process runs on JAX's distributed runtime, on localhost CPUs.

The 2-process test is the real thing at toy size: two `simclr_jax.main`
processes x 4 virtual CPU devices join through a coordinator on a free local
port, run their collectives over gloo, read disjoint halves of every global
batch, and write one Orbax checkpoint together. It must train exactly what
one process with 8 devices trains, and its end-of-run read-outs, from
features that each process holds only half of, must be what one process
holding them whole reads out of the same weights.
"""

import json
import os
import socket
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import pytest

from simclr_jax.config import defaults
from simclr_jax.runtime import checkpointing
from simclr_jax.runtime import distributed
from simclr_jax.data import pipeline
from simclr_jax.data import streams
from simclr_jax.training import pretrain
from conftest import TINY_RECIPE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny run with no warmup, so 3 steps move the weights far (about 1.4 at
# most) compared with the tolerance below; a checkpoint at step 3 (where the
# 1-process run stops) and the read-outs of the encoder only, with few-shot
# probes of 1 and 5 labels per class.
OVERRIDES = {
    'optim.warmup_epochs': 0.0,
    'train_steps': 4,  # With stop_after_steps=3: same schedule, no evaluation.
    'checkpoint_every_steps': 3,
    'eval.fewshot_draws': 2,
    'eval.fewshot_shots': (1, 5),
    'evals.pixel.enabled': False,
    # The tolerances below were measured with the reference augmentation
    # and T 0.2. The digits recipe's gentler crop and T 0.1 amplify rounding
    # further over 3 steps (measured: 1.4e-3 in a parameter, 2.2e-5 in the
    # step-3 gradient norm), which says nothing about processes; step 1's
    # 1e-6 check is unchanged.
    'loss.temperature': 0.2,
    'augment.crop_min_area': 0.08,
    'augment.flip': True,
}
STOP_AFTER = 3
# Same program and data, but the gradient all-reduce runs over gloo between
# processes instead of inside one process, so the 8 devices' terms add in
# another order. Step 1 shows that rounding alone (measured: 1.6e-7 relative
# in loss and gradient norm); training then amplifies it about 10x a step
# through LARS's per-layer ratios, most in the BatchNorm scales and biases,
# whose gradients are sums with cancellation (measured after 3 steps: 2.5e-4
# at most, in the stem's BN bias). A real fault (a host reading the wrong
# rows, a gradient scaled by 1/processes) differs at step 1 by far more.
STEP1_RTOL = 1e-6
LOSS_RTOL = 2e-5
PARAM_RTOL = PARAM_ATOL = 1e-3
# The 2-process job runs on to the end and reads out with every split's
# features spread over the processes (no split is gathered), recording its
# kNN predictions; one process with 8 devices then reads out the same
# checkpoint with the features whole, as a 1-process run does.
SHARDED_EVAL = ('--config.eval.feature_gather_max_bytes=0',
                '--config.debug.record_knn_predictions=True')
# The probes fit the same objective with their sums over rows in another
# order (each process's rows first); a tenth of a point at most.
PROBE_ATOL = 1e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COORDINATOR', 'JAX_CPU_COLLECTIVES'))}
  # Both runs compile with the same cheap XLA settings (tests/conftest.py):
  # the comparison is between topologies, not optimisation levels.
  env.update(XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             TF_NUM_INTEROP_THREADS='1')
  return env


def _main_cmd(workdir, *flags):
  overrides = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return [sys.executable, '-m', 'simclr_jax.main', f'--config={TINY_RECIPE}',
          f'--workdir={workdir}', *overrides, *flags]


def _metric(workdir, name):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)[name] for line in f]


def _tail(path, n=3000):
  with open(path, errors='replace') as f:
    return f.read()[-n:]


def _start(cmd, devices, log):
  with open(log, 'w') as f:
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=_env(devices), cwd=ROOT)


def _one_process_readout(workdir: str) -> dict:
  """The read-outs of a run's final checkpoint, computed here: one process,
  8 devices, every split's features gathered whole (the default)."""
  config, variables, _ = checkpointing.load_run(workdir)
  config.eval.feature_gather_max_bytes = (
      defaults.base_config().eval.feature_gather_max_bytes)
  setup = pretrain.build(config)
  return pretrain.evaluate_encoder(setup, types.SimpleNamespace(**variables))


def test_two_processes_train_what_one_process_trains(tmp_path):
  two_dir, one_dir = str(tmp_path / 'two'), str(tmp_path / 'one')
  stop = f'--stop_after_steps={STOP_AFTER}'
  port = _free_port()
  logs = [str(tmp_path / f'{name}.log') for name in ('p0', 'p1', 'one')]
  # All three at once: the 2-process job, which trains on to the end and
  # reads out, and the 1 process x 8 devices reference, which runs the same
  # config through the same entry point up to step 3.
  procs = [
      _start(_main_cmd(two_dir, f'--coordinator_address=localhost:{port}',
                       '--num_processes=2', f'--process_id={i}',
                       '--initialization_timeout=120', *SHARDED_EVAL), 4,
             logs[i])
      for i in range(2)]
  procs.append(_start(_main_cmd(one_dir, stop), 8, logs[2]))
  try:
    for p, log in zip(procs, logs):
      assert p.wait(timeout=600) == 0, _tail(log)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()

  # The checkpoint both processes wrote at step 3 restores in this single
  # process (8 devices here, none of them the 2-process job's) and holds
  # what the 1-process run trained.
  _, two, step = checkpointing.load_run(two_dir, STOP_AFTER)
  _, one, one_step = checkpointing.load_run(one_dir)
  assert step == one_step == STOP_AFTER
  assert jax.tree.structure(two) == jax.tree.structure(one)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=PARAM_RTOL, atol=PARAM_ATOL), two, one)
  # Not vacuous: training moved the weights far more than the tolerance
  # (the largest single change from init is about 1.4).
  norms = _metric(one_dir, 'param_norm')
  assert abs(norms[-1] - norms[0]) > 20 * PARAM_ATOL, norms

  # Same loss at every step; process 0 alone wrote the logs and results.
  for name in ('loss', 'grad_norm'):
    two_m, one_m = _metric(two_dir, name), _metric(one_dir, name)
    assert len(two_m) == STOP_AFTER + 1 and len(one_m) == STOP_AFTER
    np.testing.assert_allclose(two_m[0], one_m[0], rtol=STEP1_RTOL)
    np.testing.assert_allclose(two_m[:STOP_AFTER], one_m, rtol=LOSS_RTOL)
  results = []
  for workdir in (two_dir, one_dir):
    with open(os.path.join(workdir, 'results.json')) as f:
      results.append(json.load(f))
  assert results[1]['steps'] == STOP_AFTER and results[1]['interrupted']
  assert results[0]['steps'] == STOP_AFTER + 1
  assert not results[0]['interrupted']
  np.testing.assert_allclose(_metric(two_dir, 'loss')[STOP_AFTER - 1],
                             results[1]['final_train_loss'], rtol=LOSS_RTOL)
  log0, log1 = _tail(logs[0], 10**6), _tail(logs[1], 10**6)
  assert 'global batch 64 on 8 x cpu (cpu), 2 processes' in log0
  assert 'step 3/4' in log0 and 'step 3/4' not in log1

  # The read-outs of the 2-process job, each process holding its half of
  # every split's features, against one process holding them whole.
  two_r = results[0]
  one_r = _one_process_readout(two_dir)
  assert two_r['knn_predictions'] == one_r['knn_predictions']  # 0 differ.
  assert two_r['knn_accuracy'] == one_r['knn_accuracy']
  assert two_r['linear_probe_c'] == one_r['linear_probe_c']
  assert abs(two_r['linear_probe_accuracy'] -
             one_r['linear_probe_accuracy']) <= PROBE_ATOL
  for shot, accuracy in one_r['fewshot_probe_accuracy'].items():
    assert abs(two_r['fewshot_probe_accuracy'][shot] - accuracy) <= PROBE_ATOL
  # Bytes each process held: the whole split here; there, the rows of its
  # 4 devices of each 8-device batch (batches of eval.batch_size, the
  # last one padded), half of the padded split.
  n = {'train': one_r['probe_train_examples'],
       'test': one_r['probe_test_examples']}
  batch = defaults.base_config().eval.batch_size
  for split, rows in n.items():
    (whole,) = one_r['feature_bytes_per_process'][split]
    width = whole // (4 * rows)
    assert whole == rows * width * 4
    chunk = min(batch, rows)
    devices_rows = -(-chunk // 8) * 8
    half = -(-rows // chunk) * devices_rows // 2 * width * 4
    assert two_r['feature_bytes_per_process'][split] == [half, half]
    assert half < whole
  assert (f"bytes per process: {two_r['feature_bytes_per_process']['train']}"
          in log0)
  assert 'spread over the processes' in log0


def test_unreachable_coordinator_fails_fast_with_one_line(tmp_path):
  timeout_s = 5
  t0 = time.time()
  r = subprocess.run(
      _main_cmd(str(tmp_path), f'--coordinator_address=localhost:'
                f'{_free_port()}', '--num_processes=2', '--process_id=1',
                f'--initialization_timeout={timeout_s}'),
      capture_output=True, text=True, env=_env(4), cwd=ROOT, timeout=120)
  elapsed = time.time() - t0
  assert r.returncode == distributed.EXIT_INIT_TIMEOUT, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error: process 1 of 2 could not reach the '
                         'coordinator at localhost:'), last
  assert 'Traceback' not in r.stderr and 'Check failure' not in r.stderr
  # Python and JAX start-up plus the deadline; far below the native 35 s.
  assert elapsed < timeout_s + 25, elapsed


@pytest.mark.parametrize('kwargs,expected', [
    (dict(coordinator_address='localhost:1234', num_processes=2),
     'needs --process_id too'),
    (dict(coordinator_address='localhost', num_processes=2, process_id=0),
     'must be HOST:PORT'),
    (dict(coordinator_address='localhost:1234', num_processes=2,
          process_id=2), '--process_id=2 must be in 0..1'),
])
def test_bad_distributed_flags_are_one_line(kwargs, expected):
  with pytest.raises(distributed.InitializationError, match=expected):
    distributed.initialize(**kwargs)


def test_single_process_run_initializes_nothing():
  assert distributed.initialize() is False


@pytest.mark.parametrize('process_count', [2, 4])
def test_host_shards_are_disjoint_and_cover_each_epoch(process_count):
  c = ml_collections.ConfigDict({'seed': 3, 'batch_size': 48})
  num_examples, spe = 1000, 1000 // 48
  local = c.batch_size // process_count
  # Two epochs from a stream that starts mid-epoch (a resumed run).
  resumed = [streams.epoch_rows(c, num_examples, start_step=spe + 5,
                                  spe=spe, local_batch=local, process_index=p)
             for p in range(process_count)]
  for epoch in (0, 1):
    perm = pipeline.epoch_permutation(c.seed, epoch, num_examples)
    rows = [next(s) for s in
            (streams.epoch_rows(c, num_examples, start_step=epoch * spe,
                                  spe=spe, local_batch=local, process_index=p)
             for p in range(process_count))]
    assert all(e == epoch for e, _ in rows)
    per_host = [r for _, r in rows]
    union = np.concatenate(per_host)
    assert len(union) == spe * c.batch_size
    assert len(np.unique(union)) == len(union)  # Disjoint across hosts.
    # Together they are exactly the epoch's full batches, and step by step
    # the hosts' rows laid side by side are the 1-process global batch.
    np.testing.assert_array_equal(np.sort(union),
                                  np.sort(perm[:spe * c.batch_size]))
    side_by_side = np.stack([r.reshape(spe, local) for r in per_host], 1)
    np.testing.assert_array_equal(side_by_side.reshape(-1),
                                  perm[:spe * c.batch_size])
  first = [next(r) for r in resumed]
  assert all(e == 1 for e, _ in first)
  union = np.concatenate([r for _, r in first])
  assert len(union) == len(np.unique(union)) == (spe - 5) * c.batch_size
  perm1 = pipeline.epoch_permutation(c.seed, 1, num_examples)
  np.testing.assert_array_equal(
      np.sort(union), np.sort(perm1[5 * c.batch_size:spe * c.batch_size]))
