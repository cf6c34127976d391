"""What the command-line programs print: the project's lines, not the libraries'.

By default a run shows only simclr_jax's own log lines (start, progress, kNN
monitor, checkpoint saves, results), as `HH:MM:SS message`, plus errors from
anywhere. Orbax, TensorFlow, JAX and absl internals log dozens of INFO lines
per checkpoint; they come back, in absl's usual format, with --verbosity=1
(absl's flag; it also enables DEBUG) or SIMCLR_JAX_VERBOSE=1 (same INFO level
as the project's lines).

Call configure() as early as possible (before TensorFlow or a JAX backend
starts): TF_CPP_MIN_LOG_LEVEL, which silences the native TensorFlow/XLA
logging, is only read once. Since TensorFlow 2.19 its import writes native
lines (oneDNN notice, absl::InitializeLog warning) that ignore that variable,
so a quiet run imports TensorFlow with file descriptor 2 pointed at
/dev/null; Python exceptions from the import still propagate.
"""

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time
import warnings

from absl import logging as absl_logging

ENV_VAR = 'SIMCLR_JAX_VERBOSE'
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Warnings attributed to a module that is not the project's are dropped.
_LIBRARY_MODULES = r'(?!simclr_jax(\.|$)|__main__$)'


def env_verbose() -> bool:
  return os.environ.get(ENV_VAR, '').strip().lower() not in (
      '', '0', 'false', 'no', 'off')


def verbose_from_argv(argv: list[str]) -> bool:
  """Whether --verbosity/-v >= 1 is on the command line, or the env var set.

  Read before the flags are parsed, so that native logging can be silenced
  before anything imports TensorFlow; main re-checks with the parsed flag.
  """
  if env_verbose():
    return True
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    name, eq, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or name not in ('verbosity', 'v'):
      continue
    if not eq:
      value = args[i + 1] if i + 1 < len(args) else ''
    try:
      return int(value) >= 1
    except ValueError:
      return False
  return False


def _is_project(record: logging.LogRecord) -> bool:
  return (record.name.split('.')[0] in ('simclr_jax', '__main__') or
          os.path.abspath(record.pathname).startswith(
              _PACKAGE_DIR + os.sep))


class _ProjectOnly(logging.Filter):
  """Passes the project's records, and errors from anywhere."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or _is_project(record)


class _ShortFormatter(logging.Formatter):
  """`10:32:01 message`; `10:32:01 WARNING: message` above INFO."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(record.created))
    level = '' if record.levelno <= logging.INFO else f'{record.levelname}: '
    return f'{stamp} {level}{super().format(record)}'


@contextlib.contextmanager
def _native_stderr_silenced():
  """Points file descriptor 2 (native code's stderr) at /dev/null."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


class _SilentLoader(importlib.abc.Loader):
  """Runs another loader's exec_module with native stderr silenced."""

  def __init__(self, loader):
    self._loader = loader

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    module.__loader__ = self._loader
    if getattr(module, '__spec__', None) is not None:
      module.__spec__.loader = self._loader
    with _native_stderr_silenced():
      self._loader.exec_module(module)

  def __getattr__(self, name):
    return getattr(self._loader, name)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
  """Makes `import tensorflow` silent at the native level.

  Stays installed: libraries probe with importlib.util.find_spec long before
  the real import.
  """

  NAMES = ('tensorflow',)

  def __init__(self):
    self._busy = threading.local()

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name not in self.NAMES or getattr(self._busy, 'on', False):
      return None
    self._busy.on = True  # Lets the lookup below reach the real finders.
    try:
      spec = importlib.util.find_spec(name)
    finally:
      self._busy.on = False
    if spec is not None and spec.loader is not None and hasattr(
        spec.loader, 'exec_module'):
      spec.loader = _SilentLoader(spec.loader)
    return spec


_FILTER = _ProjectOnly()
_FINDER = _QuietImportFinder()
_state = {'warning_filter': None}


def configure(verbose: bool) -> None:
  """Quiet (project lines only) or verbose (everything, absl's format).

  Idempotent; a later call replaces an earlier one (except for
  TF_CPP_MIN_LOG_LEVEL, which is set only when unset and quiet). An explicit
  TF_CPP_MIN_LOG_LEVEL, -W or PYTHONWARNINGS is always respected.
  """
  handler = absl_logging.get_absl_handler()
  handler.removeFilter(_FILTER)
  old = _state['warning_filter']
  if old is not None and old in warnings.filters:
    warnings.filters.remove(old)
    # Drop warning registries' cached decisions (CPython-private hook).
    getattr(warnings, '_filters_mutated', lambda: None)()
  _state['warning_filter'] = None
  if _FINDER in sys.meta_path:
    sys.meta_path.remove(_FINDER)
  if verbose:
    handler.setFormatter(absl_logging.PythonFormatter())
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if not any(n in sys.modules for n in _FINDER.NAMES):
    sys.meta_path.insert(0, _FINDER)
  handler.addFilter(_FILTER)
  handler.setFormatter(_ShortFormatter())
  if not sys.warnoptions:
    warnings.filterwarnings('ignore', module=_LIBRARY_MODULES)
    _state['warning_filter'] = warnings.filters[0]
