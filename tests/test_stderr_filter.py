"""The stderr filter of multi-process runs, fed lines directly.

tests/test_pod_stop.py checks it on a real job whose process 0 is killed;
these check what it forwards, holds and replaces, without a job.
"""

import os
import subprocess
import sys
import time

from simclr_jax.runtime import stderr_filter

FATAL = (b'F1207 14:26:24.391758   31700 client.h:80] Terminating process '
         b'because the JAX distributed service detected fatal errors. This '
         b'most likely indicates that another task died. absl::Status: '
         b'UNAVAILABLE: Failed to send RPC to coordination service. Either '
         b'the leader task was preempted/died/restarted unexpectedly\n')
ERROR = (b'E1207 14:26:24.391750   31700 coordination_service_agent.cc:289] '
         b'Polled an error from coordination service\n')


def _start() -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, '-I', '-S', stderr_filter.__file__, '1', '2',
       'localhost:1234'], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_a_coordination_fatal_becomes_one_line():
  p = _start()
  out, _ = p.communicate(
      b'14:00:00 pretrain step 3/40\n' + ERROR + FATAL +
      b'*** Check failure stack trace: ***\n    @ 0x7f  SendToLog()\n'
      b'Fatal Python error: Aborted\n\nExtension modules: numpy (total: 1)\n',
      timeout=30)
  assert out.decode().splitlines() == [
      '14:00:00 pretrain step 3/40',
      'error: process 1 of 2 is stopping: process 0 (the coordinator, at '
      'localhost:1234) stopped responding (killed, out of memory, or its host '
      'was lost); the job cannot continue without it. Re-run the same '
      'command on every host to resume from the last checkpoint']


def test_other_lines_pass_unchanged_and_in_order():
  p = _start()
  p.stdin.write(b'14:00:00 one\n' + ERROR + b'14:00:01 two\n')
  p.stdin.flush()
  # The native line, and what follows it, wait for a fatal error that does
  # not come, then are forwarded while the process still runs.
  deadline = time.time() + 20
  seen = b''
  while seen.count(b'\n') < 3 and time.time() < deadline:
    seen += os.read(p.stdout.fileno(), 1 << 16)
  assert seen == b'14:00:00 one\n' + ERROR + b'14:00:01 two\n'
  # Any other native crash keeps its trace; a line without a newline still
  # arrives.
  other = b'F1207 14:26:25.000000   31700 foo.cc:1] Check failed: x\n'
  out, _ = p.communicate(other + b'trace\npartial', timeout=30)
  assert out == other + b'trace\npartial'
  assert p.returncode == 0
