"""How the command-line programs start and fail: one way for all of them.

`python -m simclr_jax.main`, `.benchmark`, `.study` and `.prepare_data` all
promise the same things: quiet logs unless asked (set before anything imports
TensorFlow or JAX, whose native logging reads its settings once), bad flags,
configs and inputs reported as one `error: ...` line on stderr with exit
status 2 rather than a traceback, and, for the programs that touch devices,
joining a multi-process job and refusing an accelerator recipe on CPU-only
JAX before any work. Keeping those steps here keeps the programs' behaviour
identical.

Imports JAX only inside the functions that need it, so a program can import
this module first thing and still configure logging before JAX loads.
"""

import contextlib
import sys
from typing import Callable, Iterator, NoReturn, Sequence

from simclr_jax.runtime import logs
# Imported before JAX: its exit hook then runs after JAX's shutdown, which
# can still meet a dead coordinator (stderr_filter.close).
from simclr_jax.runtime import stderr_filter  # pylint: disable=unused-import

# Exit status of bad flags, configs and inputs (a diverged run exits 1).
USAGE_ERROR = 2


def print_error(message: object) -> int:
  """Prints `error: message` on stderr; returns the exit status to return."""
  print(f'error: {message}', file=sys.stderr)
  return USAGE_ERROR


def fail(message: object, code: int = USAGE_ERROR) -> NoReturn:
  """Ends the program with one `error: message` line and exit status `code`."""
  print_error(message)
  sys.exit(code)


@contextlib.contextmanager
def exit_on_error(
    usage: tuple[type[BaseException], ...] = (ValueError,),
    diverged: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
  """Turns a run's expected failures into one line and an exit status.

  `usage` errors (a bad config, unusable data, a missing run to start from:
  ConfigError and DatasetError are ValueErrors) exit 2; `diverged` errors (a
  non-finite loss, whose diagnostic the run already wrote) exit 1. Anything
  else is a bug and keeps its traceback.
  """
  try:
    yield
  except diverged as e:
    fail(e, code=1)
  except usage as e:
    fail(e)


def configure_logs(argv: Sequence[str] | None = None) -> None:
  """Quiet logs unless --verbosity>=1 on `argv` (default sys.argv) or
  SIMCLR_JAX_VERBOSE=1; call before importing TensorFlow or JAX."""
  logs.configure(logs.verbose_from_argv(list(
      sys.argv if argv is None else argv)))


def reconfigure_logs(verbosity: int) -> None:
  """Re-applies the log set-up from the parsed --verbosity flag."""
  logs.configure(verbosity >= 1 or logs.env_verbose())


def run_absl(main: Callable[[list[str]], None],
             flags_parser: Callable[[list[str]], list[str]]) -> None:
  """Runs an absl program with quiet logs set before its flags are parsed.

  `flags_parser` is config.cli.parse_flags for the programs that take a
  --config recipe (loading a recipe imports JAX, so logs come first).
  """
  configure_logs()
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=flags_parser)


def join_job(coordinator_address: str | None, num_processes: int | None,
             process_id: int | None, *, auto: bool, timeout_s: float,
             peer_timeout_s: float = 60) -> None:
  """Joins a multi-process job (if the flags ask) before any device use."""
  from simclr_jax.runtime import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(coordinator_address, num_processes, process_id,
                           auto=auto, timeout_s=timeout_s,
                           peer_timeout_s=peer_timeout_s)
  except distributed.InitializationError as e:
    fail(e)


def check_accelerator(config, allow_cpu: bool) -> None:
  """Stops an accelerator run that JAX would run on CPUs (see accelerator)."""
  from simclr_jax.runtime import accelerator  # pylint: disable=g-import-not-at-top
  try:
    accelerator.check(config, allow_cpu)
  except accelerator.AcceleratorError as e:
    fail(e)
