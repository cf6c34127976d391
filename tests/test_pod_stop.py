"""A multi-process job stops as one: a signal on one host, a dead host.

Two `simclr_jax.main` processes x 4 virtual CPU devices on localhost, as in
tests/test_multiprocess.py. A SIGTERM that reaches only process 1 must stop
both after the same step with one checkpoint (the save is collective, so a
lone stopper would hang the job), and the re-run must end where an
uninterrupted run ends. A SIGKILLed process must end its peer within
--peer_timeout with one line, and the re-run resumes from the last
checkpoint.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from simclr_jax.runtime import checkpointing
from simclr_jax.runtime import distributed
from conftest import TINY_RECIPE, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enough steps that a signal sent after step 3 lands mid-run; only the
# stop's checkpoint is written (test a), unless a test adds more.
OVERRIDES = {
    'optim.warmup_epochs': 0.0,
    'train_steps': 40,
    'checkpoint_every_steps': 100,
    'log_every_steps': 1,
}
# The step both the reference and the resumed run stop at.
END_STEP = 14
PEER_TIMEOUT_S = 10
STOP_LINE = re.compile(r'Stopped pretrain \(signal (\d+)\) at step (\d+)')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env() -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COORDINATOR', 'JAX_CPU_COLLECTIVES'))}
  # 4 devices per process, XLA's cheap compile settings (tests/conftest.py).
  env.update(XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             TF_NUM_INTEROP_THREADS='1', PYTHONUNBUFFERED='1')
  return env


def _start_job(workdir: str, logs: list[str], *flags: str,
               **overrides) -> list[subprocess.Popen]:
  """Starts both processes of one job; their output goes to `logs`."""
  port = _free_port()
  config = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  procs = []
  for i, log in enumerate(logs):
    cmd = [sys.executable, '-m', 'simclr_jax.main', f'--config={TINY_RECIPE}',
           f'--workdir={workdir}', *config,
           f'--coordinator_address=localhost:{port}', '--num_processes=2',
           f'--process_id={i}', '--initialization_timeout=120',
           f'--peer_timeout={PEER_TIMEOUT_S}', *flags]
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    env=_env(), cwd=ROOT))
  return procs


def _read(path: str) -> str:
  with open(path, errors='replace') as f:
    return f.read()


def _wait_for(log: str, pattern: str, procs, timeout_s: float = 400) -> None:
  """Waits until `pattern` appears in `log` (a step was trained)."""
  deadline = time.time() + timeout_s
  while pattern not in _read(log):
    assert all(p.poll() is None for p in procs), _read(log)[-3000:]
    assert time.time() < deadline, _read(log)[-3000:]
    time.sleep(0.2)


def _finish(procs, logs, timeout_s: float = 400) -> list[int]:
  try:
    return [p.wait(timeout=timeout_s) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p, log in zip(procs, logs):
      if p.returncode not in (0, None):
        print(f'--- {log}\n{_read(log)[-3000:]}')


def _steps(workdir: str, allow_partial: bool = False) -> list[int]:
  """The complete checkpoints; `allow_partial`: a save cut off by a dead
  process may have left its Orbax tmp folder (the next run removes it)."""
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  if not allow_partial:
    assert not [n for n in names if 'tmp' in n], names
  return sorted(int(n) for n in names if n.isdigit())


def test_sigterm_on_one_process_stops_every_process_at_one_step(tmp_path):
  ref_dir, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
  ref_logs = [str(tmp_path / f'ref{i}.log') for i in range(2)]
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  # The uninterrupted reference runs alongside (same topology, so the
  # resumed run must match it to rounding of restore, i.e. exactly here).
  ref = _start_job(ref_dir, ref_logs, f'--stop_after_steps={END_STEP}')
  job = _start_job(run_dir, logs)
  try:
    _wait_for(logs[0], 'step 3/40', job)
    job[1].send_signal(signal.SIGTERM)  # Process 1 only.
    assert _finish(job, logs) == [0, 0]
  finally:
    _finish(ref, ref_logs)
  stops = [STOP_LINE.findall(_read(log)) for log in logs]
  assert stops[0] and stops[0] == stops[1], stops
  signum, stopped = map(int, stops[0][0])
  assert signum == signal.SIGTERM
  assert 3 <= stopped < END_STEP, stopped
  assert _steps(run_dir) == [stopped]
  assert 'Re-run the same command to resume' in _read(logs[0])

  # The re-run resumes at that step and ends where the reference ends.
  job = _start_job(run_dir, logs, f'--stop_after_steps={END_STEP - stopped}')
  assert _finish(job, logs) == [0, 0]
  assert [p.returncode for p in ref] == [0, 0]
  _, resumed, step = checkpointing.load_run(run_dir)
  _, reference, ref_step = checkpointing.load_run(ref_dir)
  assert step == ref_step == END_STEP
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-6), resumed, reference)


def test_dead_process_ends_the_job_with_one_line(tmp_path):
  workdir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  job = _start_job(workdir, logs, checkpoint_every_steps=2)
  try:
    _wait_for(logs[0], 'step 5/40', job)
    job[1].kill()  # SIGKILL: no handler, no goodbye.
    t0 = time.time()
    rc = job[0].wait(timeout=PEER_TIMEOUT_S + 60)
    elapsed = time.time() - t0
  finally:
    _finish(job, logs, timeout_s=1)
  out = _read(logs[0])
  assert rc == distributed.EXIT_PEER_LOST, out[-3000:]
  # JAX's own check would fire _NATIVE_DEADLINE_GRACE_S later, with a
  # native stack trace; the watch's one line comes first.
  assert elapsed < PEER_TIMEOUT_S + 15, elapsed
  last = out.strip().splitlines()[-1]
  assert last.startswith('error: process 0 of 2 is stopping: process 1 '
                         'stopped responding'), last
  assert 'Check failure' not in out and 'Fatal Python error' not in out
  saved = _steps(workdir, allow_partial=True)
  assert saved and saved[-1] >= 4, saved

  # The re-run resumes from the last complete checkpoint.
  job = _start_job(workdir, logs, '--stop_after_steps=1',
                   checkpoint_every_steps=2)
  assert _finish(job, logs) == [0, 0]
  assert _steps(workdir)[-1] == saved[-1] + 1
