"""Test setup: 8 virtual CPU devices unless the caller already chose, and
XLA's cheap compile settings.

A persistent compilation cache shared by this run's tests and the
training subprocesses they start (one per pytest-xdist worker): resume, fault and CLI tests compile the
same train step several times, and on a 2-core CI machine compilation is
most of their cost. The cache lives in a fresh temporary directory, so no
test can pass on a program compiled by an earlier run.

Also the tiny run most training tests start from (configs/digits.py:tiny),
which test modules import from here.
"""

import ast
import os
import shutil
import tempfile

# Nearly every test's cost on a 2-core machine is XLA compiling a train step
# (in the test process or in a program the test starts), not running it:
# the tests run a step or a few. XLA's cheap settings compile several times
# faster and change no result beyond the last bits, so the test processes
# and the programs they start all use them, and a run in a subprocess can be
# compared with one computed inside the test process to rounding. The code
# they compile runs about 2x slower, so the one test that trains 100 steps
# (test_pretrain_backends.py) does so in a process with the defaults.
CHEAP_COMPILE = ('--xla_backend_optimization_level=0',
                 '--xla_llvm_disable_expensive_passes=true')


def xla_flags(devices: int = 8, cheap: bool = True) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` virtual CPU devices and,
  with `cheap`, the cheap compile settings."""
  return ' '.join((f'--xla_force_host_platform_device_count={devices}',
                   *(CHEAP_COMPILE if cheap else ())))


def _with_cheap_compile(flags: str) -> str:
  """The caller's XLA_FLAGS (8 devices if it named no count) plus the cheap
  compile settings it does not set itself."""
  words = flags.split()
  if not any(w.startswith('--xla_force_host_platform_device_count=')
             for w in words):
    words.append('--xla_force_host_platform_device_count=8')
  for flag in CHEAP_COMPILE:
    if not any(w.startswith(flag.split('=')[0] + '=') for w in words):
      words.append(flag)
  return ' '.join(words)


os.environ['XLA_FLAGS'] = _with_cheap_compile(os.environ.get('XLA_FLAGS', ''))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Keep TensorFlow and XLA from fighting over the 2 cores of a CI machine.
os.environ.setdefault('TF_NUM_INTEROP_THREADS', '1')
# The cache this process made (None in an xdist worker, which inherits the
# controller's, or where the caller chose one); pytest_sessionfinish removes it.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='simclr_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
# Under pytest-xdist every worker inherits the controller's environment, so
# the workers would share one cache directory and could read an entry while
# another process writes it; give each worker its own.
if os.environ.get('PYTEST_XDIST_WORKER'):
  _cache = os.path.join(os.environ['JAX_COMPILATION_CACHE_DIR'],
                        os.environ['PYTEST_XDIST_WORKER'])
  os.makedirs(_cache, exist_ok=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Sizes XLA's CPU thread pool for the 8 devices before any test creates the
# CPU client (simclr_jax/runtime/cpu_threads.py).
import simclr_jax  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --config value of the tiny run: a few steps of a ResNet-18 at width 1/8 on
# 16 px digits with cheap read-outs (get_config of configs/digits.py).
TINY_RECIPE = os.path.join(ROOT, 'configs', 'digits.py') + ':tiny'


def tiny_config(*flags: str):
  """configs/digits.py:tiny with `--config.FIELD=VALUE` flags applied.

  For in-process runs that must match a command line's config: a value is
  taken as written for a string field and as a Python literal otherwise.
  """
  from simclr_jax.config import defaults  # pylint: disable=g-import-not-at-top
  path, _, arg = TINY_RECIPE.rpartition(':')
  c = defaults.load_recipe(path, arg)
  for flag in flags:
    field, value = flag[len('--config.'):].split('=', 1)
    *parents, leaf = field.split('.')
    section = c
    for p in parents:
      section = section[p]
    old = section[leaf]
    section[leaf] = value if isinstance(old, str) else type(old)(
        ast.literal_eval(value))
  return c


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """Removes the compilation cache this run made: a cache is only useful
  within one run (see the module docstring), and each holds tens of MB."""
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
