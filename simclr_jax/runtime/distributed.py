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
- Non-zero processes log warnings and errors only, so a job's log is one
  process's narrative rather than N interleaved copies.
"""

import os
import socket
import sys
import threading
import time

from absl import logging
import jax

# Exit status of a process that gave up joining the job (main.py uses 2 for
# bad configs and inputs; this is the environment, not the config).
EXIT_INIT_TIMEOUT = 1
# The C++ deadline is set this much later than the watchdog's, so the
# watchdog's one-line message always wins the race against the native abort.
_NATIVE_DEADLINE_GRACE_S = 30


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
    os._exit(EXIT_INIT_TIMEOUT)  # pylint: disable=protected-access


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


def _quiet_other_processes() -> None:
  """Leaves INFO logging to process 0; warnings and errors still show."""
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto: bool = False,
               timeout_s: float = 300) -> bool:
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
  logging.info('Joining distributed job: %s (timeout %g s)',
               kwargs or 'auto-detected cluster', timeout_s)
  t0 = time.time()
  native_timeout = int(timeout_s) + _NATIVE_DEADLINE_GRACE_S
  with _Watchdog(timeout_s, lambda: _timeout_message(
      coordinator_address, num_processes, process_id, timeout_s)):
    try:
      jax.distributed.initialize(initialization_timeout=native_timeout,
                                 **kwargs)
    except (ValueError, RuntimeError) as e:
      # Auto-detection outside a cluster: "coordinator_address should be
      # defined." Keep the first line only; the rest is JAX internals.
      first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise InitializationError(
          f'jax.distributed.initialize failed: {first}') from None
  _quiet_other_processes()
  logging.info('Process %d of %d joined in %.1f s; %d local and %d global '
               'devices', jax.process_index(), jax.process_count(),
               time.time() - t0, jax.local_device_count(), jax.device_count())
  return True
