"""Joining a multi-process job: jax.distributed.initialize, with a deadline.

Every process of a multi-host (or multi-process) run calls `initialize` before
anything touches a device; afterwards `jax.devices()` lists the devices of all
processes and one jitted program spans them (README, Multi-host runs).

Why a wrapper rather than a bare `jax.distributed.initialize`:
- A process that cannot reach the coordinator, or whose peers never arrive,
  is killed by XLA's C++ runtime (LOG(FATAL), SIGABRT, a native stack trace)
  when `initialization_timeout` runs out. On a pod that reads like a crash.
  Here a watchdog thread ends the process first, at `timeout_s`, with one
  line saying which address it waited for and what was missing.
- Multi-process CPU runs (the localhost test setup, launch/multiprocess_cpu.sh)
  need a cross-process collectives implementation for the CPU backend; this
  module pins gloo (TCP) unless the user chose one.
- A process that dies mid-run (SIGKILL, OOM, a lost host) would leave the
  others blocked in collectives, or ended by JAX's heartbeat check with a
  native abort. `_PeerWatch` ends them first, within `--peer_timeout`, with
  one line naming the process that went silent; `errors_await_peer_watch`
  keeps a collective that failed on the dead peer from ending the process
  with a traceback first. Process 0 hosts JAX's coordination service, and
  its death makes JAX's client in every other process abort at once, in
  native code that Python cannot intercept; `stderr_filter` turns what that
  abort prints into the same kind of line (docs/robustness.md).
- Non-zero processes log warnings and errors only, so a job's log is one
  process's narrative rather than N interleaved copies.
"""

import contextlib
import inspect
import os
import socket
import sys
import threading
import time
from typing import Iterator

from absl import logging
import jax

from simclr_jax.runtime import stderr_filter

# Exit status of a process that gave up joining the job (main.py uses 2 for
# bad configs and inputs; this is the environment, not the config).
EXIT_INIT_TIMEOUT = 1
# Exit status of a process whose peer died mid-run (the job cannot go on; a
# re-run resumes from the last checkpoint). Also the environment.
EXIT_PEER_LOST = 1
# The C++ deadline is set this much later than the watchdog's, so the
# watchdog's one-line message always wins the race against the native abort.
_NATIVE_DEADLINE_GRACE_S = 30
# The running job's `_PeerWatch`, for `errors_await_peer_watch`.
_watch = None


class InitializationError(RuntimeError):
  """Arguments that cannot start a job, or cluster detection that failed."""


def _parse_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise InitializationError(
        f'--coordinator_address={address!r} must be HOST:PORT, e.g. '
        'localhost:12345 or 10.0.0.2:8476')
  return host.strip('[]'), int(port)


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
  """True if something accepts TCP connections at HOST:PORT."""
  try:
    host, port = _parse_address(address)
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except (OSError, InitializationError):
    return False


def _timeout_message(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, timeout_s: float) -> str:
  """Says what was missing when the deadline passed."""
  who = (f'process {process_id} of {num_processes}'
         if num_processes is not None else 'this process')
  if coordinator_address is None:
    return (f'{who} did not join the distributed job within {timeout_s:g} s '
            '(cluster auto-detection); check that every host runs the '
            'command, or pass --coordinator_address, --num_processes and '
            '--process_id')
  if process_id != 0 and not _reachable(coordinator_address):
    return (f'{who} could not reach the coordinator at {coordinator_address} '
            f'within {timeout_s:g} s (--initialization_timeout); is process 0 '
            'running, and is that host:port right and open from this host?')
  return (f'{who} reached the coordinator at {coordinator_address} but not '
          f'all {num_processes} processes joined within {timeout_s:g} s '
          '(--initialization_timeout); start every process with the same '
          '--num_processes and distinct --process_id in 0..'
          f'{(num_processes or 1) - 1}')


class _Watchdog:
  """Ends the process with one line if initialisation outlives a deadline.

  The main thread is blocked inside XLA's connect (which releases the GIL),
  so a Python thread can still act; os._exit because nothing worth cleaning
  up exists yet and a normal exit would wait on that blocked call.
  """

  def __init__(self, timeout_s: float, message_fn):
    self._done = threading.Event()
    self._timeout_s = timeout_s
    self._message_fn = message_fn
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='distributed-init-watchdog')

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()

  def _run(self):
    if self._done.wait(self._timeout_s):
      return
    try:
      message = self._message_fn()
    except Exception as e:  # pylint: disable=broad-except
      message = f'distributed initialisation timed out ({e})'
    sys.stderr.write(f'error: {message}\n')
    sys.stderr.flush()
    stderr_filter.close()
    os._exit(EXIT_INIT_TIMEOUT)  # pylint: disable=protected-access


class _PeerWatch:
  """Ends this process with one line when another process of the job dies.

  A process killed mid-run (SIGKILL, the OOM killer, a lost host) leaves the
  others blocked in a collective that cannot finish. JAX's coordination
  service notices the missing heartbeats, but ends every survivor with
  LOG(FATAL): SIGABRT, a native and a Python stack trace, which on a pod
  reads like a crash of every host; and its callback for this event cannot
  be set from Python (JAX 0.10 takes one, but cannot pass it the C++
  status: the process ends in std::bad_cast). So each process also keeps a
  heartbeat of its own in the job's key-value store (a counter it bumps
  every `interval_s`) and watches everyone else's: a peer whose counter has
  not moved for `timeout_s` by this process's clock, or a coordinator that
  has not answered for as long, ends this process with one `error:` line and
  EXIT_PEER_LOST. JAX's own heartbeat deadline is set
  _NATIVE_DEADLINE_GRACE_S later, as a backstop.

  A daemon thread, so it never delays a normal exit; it keeps running
  through JAX's shutdown barrier, where a process that finished waits for
  the others, so a peer that dies then is caught too. os._exit because the
  main thread may be blocked in a collective that will never finish.
  """

  _PREFIX = 'simclr_jax/peer_heartbeat/'

  def __init__(self, client, timeout_s: float, coordinator_address: str):
    self._client = client
    self._timeout_s = timeout_s
    self._interval_s = min(5.0, max(0.5, timeout_s / 5))
    self._coordinator = coordinator_address
    self._me = jax.process_index()
    self._count = jax.process_count()
    # Per peer: (its last counter, when it last changed, by our clock).
    self._seen: dict[str, tuple[str | None, float]] = {}
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name='peer-watch')

  def start(self) -> None:
    self._thread.start()

  def _fail(self, message: str) -> None:
    sys.stderr.write(
        f'error: process {self._me} of {self._count} is stopping: {message}; '
        f'the job cannot continue without it (--peer_timeout='
        f'{self._timeout_s:g} s). Re-run the same command on every host to '
        'resume from the last checkpoint\n')
    sys.stderr.flush()
    stderr_filter.close()  # The parent finds this line once we have ended.
    os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access

  def _counters(self) -> dict[str, str | None]:
    with self._lock:
      return {peer: value for peer, (value, _) in self._seen.items()}

  def await_verdict(self) -> None:
    """Blocks until every peer is known to be alive, or ends the process.

    For the main thread after an error, which may be the first sign of a
    dead peer (a collective whose TCP peer reset the connection fails at
    once): returns when every peer's counter in the store has moved since
    the call (they are alive; the error is this process's own); a dead
    peer's stays still, and the watch, or this call once `timeout_s` and a
    few beats have passed, ends the process with the one line.
    """
    began = time.monotonic()
    start = self._fresh_counters()
    deadline = began + self._timeout_s + 4 * self._interval_s
    peers = [p for p in range(self._count) if p != self._me]
    silent = peers
    while time.monotonic() < deadline:
      time.sleep(self._interval_s / 2)
      now = self._fresh_counters()
      silent = [p for p in peers
                if now.get(str(p)) in (None, start.get(str(p)))]
      if not silent:
        return
    # A peer silent for longer than the timeout is gone by the watch's own
    # rule; the watch thread may simply not have run yet on a busy host.
    self._fail(f'process {silent[0]} stopped responding '
               f'{time.monotonic() - began:.0f} s ago (killed, out of memory, '
               'or its host was lost)')

  def _fresh_counters(self) -> dict[str, str | None]:
    """Every peer's heartbeat counter, read from the store now (the watch's
    last reading if the store does not answer)."""
    try:
      entries = self._client.key_value_dir_get(self._PREFIX)
    except Exception:  # pylint: disable=broad-except
      return self._counters()
    return {key.rsplit('/', 1)[-1]: value for key, value in entries}

  def _run(self) -> None:
    beat = 0
    last_ok = time.monotonic()
    seen = self._seen
    while True:
      now = time.monotonic()
      beat += 1
      try:
        self._client.key_value_set(f'{self._PREFIX}{self._me}', str(beat),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(self._PREFIX)
        last_ok = now
      except Exception:  # pylint: disable=broad-except
        if now - last_ok > self._timeout_s:
          self._fail(f'the coordinator (process 0 at {self._coordinator}) '
                     f'has not answered for {now - last_ok:.0f} s; process 0 '
                     'died or its host was lost')
        time.sleep(self._interval_s)
        continue
      for key, value in entries:
        peer = key.rsplit('/', 1)[-1]
        if peer == str(self._me):
          continue
        old = seen.get(peer)
        if old is None or old[0] != value:
          with self._lock:
            seen[peer] = (value, now)
      for peer in range(self._count):
        if peer == self._me:
          continue
        # A peer not yet heard from counts from the watch's start.
        with self._lock:
          value, since = seen.setdefault(str(peer), (None, now))
        silent = now - since
        if silent > self._timeout_s:
          self._fail(f'process {peer} stopped responding {silent:.0f} s ago '
                     '(killed, out of memory, or its host was lost)')
      time.sleep(self._interval_s)


def _watch_peers(timeout_s: float, coordinator_address: str | None) -> None:
  """Starts `_PeerWatch` on the client jax.distributed.initialize made."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
    client = jax_distributed.global_state.client
  except (ImportError, AttributeError):
    client = None
  if client is None or not hasattr(client, 'key_value_dir_get'):
    logging.warning('No key-value store on this JAX version: a dead process '
                    'ends the job through JAX\'s own heartbeat check only.')
    return
  global _watch
  _watch = _PeerWatch(client, timeout_s,
                      coordinator_address or 'the auto-detected address')
  _watch.start()


@contextlib.contextmanager
def errors_await_peer_watch() -> Iterator[None]:
  """Lets a dead peer, not the error it caused here, end a multi-process run.

  When a process is killed, its peers' collectives fail at once (gloo:
  "Connection reset by peer") or block. An error escaping here would print
  a traceback, and the interpreter's shutdown would then meet Orbax's
  checkpoint thread mid-save (more tracebacks) before the watch's line
  arrives. So an error waits for the watch's verdict first: a dead peer ends
  the process with the one `error:` line and EXIT_PEER_LOST; if every peer
  is alive, the error goes on as before. No-op in a single-process run.
  """
  try:
    yield
  except Exception:
    if _watch is not None:
      _watch.await_verdict()
    raise


def _use_gloo_on_cpu() -> None:
  """Picks gloo for cross-process collectives of the CPU backend.

  Without an implementation, a CPU computation whose devices live in several
  processes cannot run its all-gathers and all-reduces. Only the CPU client
  reads this option, so setting it on GPU/TPU hosts changes nothing; an
  explicit choice (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) is respected.
  """
  platforms = jax.config.jax_platforms or ''
  if platforms and 'cpu' not in platforms.split(','):
    return
  if os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def _disable_preemption_service() -> None:
  """Turns off JAX's preemption sync service, which this project does not use.

  Stops are agreed by the training loop's own all-reduced signal flag. The
  service would only add a native SIGTERM handler (replaced by the loop's)
  and, when the coordinator dies, one more native error line. Orbax reads a
  disabled service as "no preemption".
  """
  if 'jax_enable_preemption_service' in getattr(jax.config, 'values', {}):
    jax.config.update('jax_enable_preemption_service', False)


def _quiet_other_processes() -> None:
  """Leaves INFO logging to process 0; warnings and errors still show."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto: bool = False,
               timeout_s: float = 300,
               peer_timeout_s: float = 60) -> bool:
  """Joins the job if the flags ask for one; returns whether it did.

  Args:
    coordinator_address: HOST:PORT of process 0 (it binds that port).
    num_processes: processes in the job.
    process_id: this process, 0..num_processes-1.
    auto: with no explicit arguments, call jax.distributed.initialize() bare
      and let JAX read the cluster (Cloud TPU metadata, Slurm variables).
    timeout_s: how long to wait for the coordinator and all peers. After it,
      the process exits with status EXIT_INIT_TIMEOUT and one line on
      stderr (see module docstring).
    peer_timeout_s: how long the job runs on after a process stops sending
      heartbeats (killed, out of memory, host lost) before every survivor
      exits non-zero with one line; see `_PeerWatch`.

  Returns:
    False for a single-process run (no flags): nothing is initialised.

  Raises:
    InitializationError: inconsistent arguments, or auto-detection that found
      no cluster. The message is one line.
  """
  explicit = (coordinator_address is not None or num_processes is not None
              or process_id is not None)
  if not explicit and not auto:
    return False
  if timeout_s <= 0:
    raise InitializationError(
        f'--initialization_timeout={timeout_s:g} must be > 0 seconds')
  if peer_timeout_s < 1:
    raise InitializationError(
        f'--peer_timeout={peer_timeout_s:g} must be >= 1 second')
  if explicit:
    missing = [name for name, v in (('--coordinator_address',
                                     coordinator_address),
                                    ('--num_processes', num_processes),
                                    ('--process_id', process_id)) if v is None]
    if missing:
      raise InitializationError(
          f'a multi-process run needs {", ".join(missing)} too (or none of '
          'them and --distributed on Cloud TPU / Slurm)')
    _parse_address(coordinator_address)
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise InitializationError(
          f'--process_id={process_id} must be in 0..{num_processes - 1} '
          f'for --num_processes={num_processes}')
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  else:
    kwargs = {}
  if num_processes != 1:
    _use_gloo_on_cpu()
    _disable_preemption_service()
  logging.info('Joining distributed job: %s (timeout %g s)',
               kwargs or 'auto-detected cluster', timeout_s)
  t0 = time.time()
  native_timeout = int(timeout_s) + _NATIVE_DEADLINE_GRACE_S
  with _Watchdog(timeout_s, lambda: _timeout_message(
      coordinator_address, num_processes, process_id, timeout_s)):
    try:
      if 'heartbeat_timeout_seconds' in inspect.signature(
          jax.distributed.initialize).parameters:  # JAX >= 0.7.
        kwargs['heartbeat_timeout_seconds'] = (int(peer_timeout_s)
                                               + _NATIVE_DEADLINE_GRACE_S)
      jax.distributed.initialize(initialization_timeout=native_timeout,
                                 **kwargs)
    except (ValueError, RuntimeError) as e:
      # Auto-detection outside a cluster: "coordinator_address should be
      # defined." Keep the first line only; the rest is JAX internals.
      first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise InitializationError(
          f'jax.distributed.initialize failed: {first}') from None
  _quiet_other_processes()
  if jax.process_count() > 1:
    stderr_filter.install(jax.process_index(), jax.process_count(),
                          coordinator_address or 'the auto-detected address')
    _watch_peers(peer_timeout_s, coordinator_address)
  logging.info('Process %d of %d joined in %.1f s; %d local and %d global '
               'devices', jax.process_index(), jax.process_count(),
               time.time() - t0, jax.local_device_count(), jax.device_count())
  return True
