"""One line, not JAX's native abort, when a multi-process job loses process 0.

Process 0 hosts JAX's coordination service. When it dies, the JAX client in
every other process polls the error within a millisecond and ends the
process with LOG(FATAL) in a C++ thread: glog lines (`E... Polled an error
from coordination service`, `F... Terminating process because the JAX
distributed service detected fatal errors`), a native stack trace, Python's
fault handler dump of every thread and extension module, then SIGABRT. No
Python code runs in between, and JAX 0.10 takes no handler for it that
works (docs/robustness.md). What can still be chosen is where that text
goes: `install` routes the process's file descriptor 2 through a small
filter process (this file, run as a script) that

- forwards every line unchanged and at once, except glog-format native
  lines (`E1207 14:26:24.391750 31700 file.cc:289] ...`), which it holds
  for `_GRACE_S` together with whatever follows them, so that order is
  kept; held lines not followed by a fatal coordination error are then
  forwarded as they were;
- on a fatal coordination error (an `F` line from JAX's distributed
  service), drops the held lines and everything after them (the native
  trace, the fault handler dump), and prints the project's one `error:`
  line instead, as the peer watch does for any other dead process.

The process still ends by SIGABRT (exit status 134 in a shell, -6 from
Python's subprocess), which is non-zero, as a lost peer's should be.

The filter is a separate process because the abort leaves none of this one
to act: it reads until every writer has closed the pipe, so it outlives the
abort by the few milliseconds it needs. It starts under setsid (a process
group of its own) and ignores SIGINT and SIGTERM, so a Ctrl-C or a
launcher's signal to the process group stops the training process (which
checkpoints) and not the filter before it has forwarded the last lines. It
needs only the standard library and starts in isolated mode (`-I -S`), so
no environment variable or site package changes what it does.

Only multi-process runs install it; a single-process run's stderr is left as
it is.
"""

import atexit
import os
import re
import select
import signal
import subprocess
import sys
import time

# A glog line as absl's native logging writes it: level, date, time,
# thread, file:line.
_GLOG = re.compile(rb'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (\S+):\d+\] ')
# How long a native line waits for a fatal error that may follow it. The
# coordination agent writes its error lines and the fatal one from the same
# thread within microseconds.
_GRACE_S = 2.0
# A partial line (no newline yet) is forwarded after this long.
_PARTIAL_S = 0.2
# How long a closing process waits for the filter to forward its last lines.
_CLOSE_WAIT_S = 10.0

# In the training process: the filter and the stderr it writes to.
_sidecar: subprocess.Popen | None = None
_original_fd: int | None = None


def install(process_index: int, process_count: int,
            coordinator_address: str) -> None:
  """Routes this process's stderr (fd 2) through the filter process.

  Call once, after joining the job (the filter's line names this process).
  `close` undoes it; it also runs at exit.
  """
  global _sidecar, _original_fd
  if _sidecar is not None:
    return
  sys.stderr.flush()
  read_end, write_end = os.pipe()
  original = os.dup(2)
  try:
    _sidecar = subprocess.Popen(
        [sys.executable, '-I', '-S', os.path.abspath(__file__),
         str(process_index), str(process_count), coordinator_address],
        stdin=read_end, stdout=original, stderr=original,
        start_new_session=True)
  except OSError:
    os.close(original)
    return  # Unfiltered stderr is better than none.
  finally:
    os.close(read_end)
  os.dup2(write_end, 2)
  os.close(write_end)
  _original_fd = original


def close() -> None:
  """Points fd 2 back at the original stderr and waits for the filter.

  Run at exit (registered at import, before JAX registers its shutdown, so
  that it runs after it) and before any os._exit: a parent reading the log
  once this process has ended then finds every line in it.
  """
  global _sidecar, _original_fd
  if _sidecar is None:
    return
  try:
    sys.stderr.flush()
  except (OSError, ValueError):
    pass
  os.dup2(_original_fd, 2)  # Closes the pipe's last write end here.
  os.close(_original_fd)
  try:
    _sidecar.wait(timeout=_CLOSE_WAIT_S)
  except subprocess.TimeoutExpired:
    pass  # It ends on its own once the pipe is drained.
  _sidecar = _original_fd = None


atexit.register(close)


def _fatal_line(line: bytes) -> bool:
  """An `F` line from JAX's coordination client: the native abort to hide."""
  return line.startswith(b'F') and (b'JAX distributed service' in line or
                                    b'oordination' in line)


def _error_line(process_index: int, process_count: int, coordinator: str,
                fatal: bytes) -> bytes:
  """The project's one line for the fatal error JAX's client reported."""
  if (b'leader task' in fatal or
      b'Failed to send RPC to coordination service' in fatal):
    reason = (f'process 0 (the coordinator, at {coordinator}) stopped '
              'responding (killed, out of memory, or its host was lost); '
              'the job cannot continue without it')
  else:
    status = fatal.split(b'absl::Status: ', 1)[-1].decode(errors='replace')
    status = status.strip().split('. ')[0][:300]
    reason = ('JAX\'s coordination service reported that the job failed '
              f'({status})')
  return (f'error: process {process_index} of {process_count} is stopping: '
          f'{reason}. Re-run the same command on every host to resume from '
          'the last checkpoint\n').encode()


def _write(data: bytes) -> None:
  """Writes all of `data` to stdout; a vanished stdout loses it silently."""
  try:
    while data:
      data = data[os.write(1, data):]
  except OSError:
    pass


def _filter(process_index: int, process_count: int, coordinator: str) -> None:
  """Copies stdin to stdout line by line, as the module docstring says."""
  buf = b''
  held: list[bytes] = []
  held_until = 0.0
  partial_since = None
  mid_line = False  # The start of the current line was forwarded already.
  dropping = False
  while True:
    now = time.monotonic()
    deadlines = [held_until] if held else []
    if partial_since is not None and not held:
      deadlines.append(partial_since + _PARTIAL_S)
    timeout = max(0.0, min(deadlines) - now) if deadlines else None
    ready, _, _ = select.select([0], [], [], timeout)
    data = os.read(0, 1 << 16) if ready else None
    if data == b'':  # Every writer closed the pipe: the process ended.
      if not dropping:
        _write(b''.join(held) + buf)
      return
    if dropping:
      continue
    if data:
      buf += data
    now = time.monotonic()
    *lines, buf = buf.split(b'\n')
    for line in lines:
      line += b'\n'
      if _GLOG.match(line) and not mid_line:
        if _fatal_line(line):
          dropping = True
          _write(_error_line(process_index, process_count, coordinator, line))
          break
        if not held:
          held_until = now + _GRACE_S
        held.append(line)
      elif held:
        held.append(line)
      else:
        _write(line)
      mid_line = False
    if dropping:
      continue
    if held and now >= held_until:
      _write(b''.join(held))
      held = []
    if not buf:
      partial_since = None
    elif partial_since is None:
      partial_since = now
    elif not held and now - partial_since >= _PARTIAL_S:
      # A line written in pieces (a progress counter): forward what is
      # there; the rest of it is forwarded without a second look.
      _write(buf)
      buf, partial_since, mid_line = b'', None, True


if __name__ == '__main__':
  for _sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_sig, signal.SIG_IGN)
  _filter(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
