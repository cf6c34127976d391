"""A multi-process job stops as one: a signal on one host, a dead host.

Two `simclr_jax.main` processes x 4 virtual CPU devices on localhost, as in
tests/test_multiprocess.py. A SIGTERM that reaches only process 1 must stop
both after the same step with one checkpoint (the save is collective, so a
lone stopper would hang the job), and the re-run must end where an
uninterrupted run ends. A SIGKILLed process 1 must end process 0 within
--peer_timeout with one line and nothing else; a SIGKILLed process 0 (the
coordinator) must end process 1 non-zero in time, with one line as well
instead of JAX's native abort. Each re-run resumes from the last complete
checkpoint, and the last ends where the uninterrupted run, shared by both
tests, ends. No process started for a job (the stderr filters included)
outlives it.
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
import pytest

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


def _stderr_filters(procs) -> list[str]:
  """The command lines of the job's stderr filter processes still running
  (simclr_jax/runtime/stderr_filter.py; the job's address names them)."""
  address = next(a for a in procs[0].args if a.startswith(
      '--coordinator_address=')).split('=', 1)[1]
  ps = subprocess.run(['ps', '-eo', 'stat=,args='], capture_output=True,
                      text=True, check=True).stdout.splitlines()
  return [line for line in ps if 'stderr_filter.py' in line
          and f' {address}' in line and not line.lstrip().startswith('Z')]


def _wait_for_stderr_filters(procs, timeout_s: float = 10) -> None:
  """Waits until the job's filters have forwarded their last lines and
  ended, as they must once their process has ended."""
  deadline = time.time() + timeout_s
  while _stderr_filters(procs) and time.time() < deadline:
    time.sleep(0.1)
  assert not _stderr_filters(procs), _stderr_filters(procs)


def _finish(procs, logs, timeout_s: float = 400) -> list[int]:
  try:
    return [p.wait(timeout=timeout_s) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    _wait_for_stderr_filters(procs)
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


class _Reference:
  """The uninterrupted run to END_STEP, computed once for this file's tests.

  It starts when first asked for and runs alongside the first test's job;
  `state()` waits for it.
  """

  def __init__(self, tmp_dir: str):
    self.workdir = os.path.join(tmp_dir, 'ref')
    self.logs = [os.path.join(tmp_dir, f'ref{i}.log') for i in range(2)]
    self.job = _start_job(self.workdir, self.logs,
                          f'--stop_after_steps={END_STEP}')
    self._state = None

  def state(self):
    if self._state is None:
      assert _finish(self.job, self.logs) == [0, 0]
      _, self._state, step = checkpointing.load_run(self.workdir)
      assert step == END_STEP
    return self._state

  def close(self) -> None:
    for p in self.job:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  ref = _Reference(str(tmp_path_factory.mktemp('reference')))
  try:
    yield ref
  finally:
    ref.close()


def _assert_equal_to_reference(workdir: str, reference: _Reference) -> None:
  """Same topology as the reference, so a resumed run matches it to the
  rounding of restore, i.e. exactly here."""
  _, resumed, step = checkpointing.load_run(workdir)
  assert step == END_STEP
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-6, atol=1e-6), resumed, reference.state())


def test_sigterm_on_one_process_stops_every_process_at_one_step(
    tmp_path, reference):
  run_dir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  job = _start_job(run_dir, logs)
  try:
    _wait_for(logs[0], 'step 3/40', job)
    job[1].send_signal(signal.SIGTERM)  # Process 1 only.
    assert _finish(job, logs) == [0, 0]
  finally:
    _finish(job, logs, timeout_s=1)
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
  _assert_equal_to_reference(run_dir, reference)


def _kill(job, logs, victim: int, after: str) -> tuple[int, float, str]:
  """SIGKILLs process `victim` (no handler, no goodbye) once process 0 has
  logged `after`; returns the survivor's exit status, the seconds it took
  to exit, and what it printed after the kill (read once its stderr
  filter has ended). Kills what is left."""
  survivor = 1 - victim
  try:
    _wait_for(logs[0], after, job)
    offset = len(_read(logs[survivor]))
    job[victim].kill()
    t0 = time.time()
    rc = job[survivor].wait(timeout=PEER_TIMEOUT_S + 60)
    elapsed = time.time() - t0
  finally:
    _finish(job, logs, timeout_s=1)
  return rc, elapsed, _read(logs[survivor])[offset:]


def test_dead_process_ends_the_job_and_the_rerun_resumes(tmp_path, reference):
  workdir = str(tmp_path / 'run')
  logs = [str(tmp_path / f'p{i}.log') for i in range(2)]
  # Process 1 dies: process 0 (which hosts JAX's coordination service) ends
  # within --peer_timeout with the watch's line and nothing else: no
  # traceback of the collective that failed, nor of Orbax's checkpoint
  # thread at interpreter shutdown.
  job = _start_job(workdir, logs, checkpoint_every_steps=2)
  rc, elapsed, out = _kill(job, logs, victim=1, after='step 5/40')
  assert rc == distributed.EXIT_PEER_LOST, out[-3000:]
  assert elapsed < PEER_TIMEOUT_S + 30, elapsed
  lines = out.strip().splitlines()
  assert lines[-1].startswith('error: process 0 of 2 is stopping: process 1 '
                              'stopped responding'), out[-3000:]
  # Before it, only the project's own log lines ("HH:MM:SS message").
  assert all(re.match(r'\d\d:\d\d:\d\d ', line) for line in lines[:-1]), (
      out[-3000:])
  saved = _steps(workdir, allow_partial=True)
  assert saved and saved[-1] >= 4, saved

  # The re-run resumes from that checkpoint; then process 0 dies. Process 1
  # loses the coordinator, and with it JAX's coordination service: it exits
  # non-zero at once (JAX's client aborts: SIGABRT), and its stderr filter
  # prints one line in place of the abort's native logs and stack dumps.
  job = _start_job(workdir, logs, checkpoint_every_steps=2)
  rc, elapsed, out = _kill(job, logs, victim=0,
                           after=f'step {saved[-1] + 4}/40')
  assert f'Resumed from step {saved[-1]}' in _read(logs[0])
  assert rc != 0, out[-3000:]
  assert elapsed < PEER_TIMEOUT_S + 30, elapsed
  lines = out.strip().splitlines()
  assert lines[-1].startswith('error: process 1 of 2 is stopping: process 0 '
                              '(the coordinator'), out[-3000:]
  assert lines[-1].endswith('Re-run the same command on every host to '
                            'resume from the last checkpoint'), lines[-1]
  assert all(re.match(r'\d\d:\d\d:\d\d ', line) for line in lines[:-1]), (
      out[-3000:])
  for native in ('.cc:', 'Traceback', 'Fatal Python error',
                 'Extension modules', 'Check failure'):
    assert native not in out, out[-3000:]
  # A save cut off by the kill is not listed; the one before it is.
  resumed = _steps(workdir, allow_partial=True)[-1]
  assert saved[-1] <= resumed < END_STEP, (saved, resumed)

  # The second re-run ends where the uninterrupted run ends.
  job = _start_job(workdir, logs, f'--stop_after_steps={END_STEP - resumed}',
                   checkpoint_every_steps=2)
  assert _finish(job, logs) == [0, 0]
  assert f'Resumed from step {resumed}' in _read(logs[0])
  _assert_equal_to_reference(workdir, reference)
