"""The command line's config handling: `--config` recipes and overrides.

Kept apart from the schema checks (validation.py): this reads argv and the
recipe files it names, so a missing, broken or mistyped recipe or override
ends the program with one `error: ...` line (exit 2) before absl and
ml_collections would print a traceback.
"""

import sys


def _recipe_files() -> list[str]:
  """The recipes shipped in configs/ and configs/methods/, as paths to type
  (relative to the current directory where they lie under it)."""
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  found = []
  for sub in ('configs', os.path.join('configs', 'methods')):
    folder = os.path.join(root, sub)
    if os.path.isdir(folder):
      found += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                if f.endswith('.py') and not f.startswith('_')]
  shown = []
  for path in found:
    rel = os.path.relpath(path)
    shown.append(path if rel.startswith('..') else rel)
  return shown


def _config_flag_value(argv: list[str]) -> str | None:
  """The value of --config=PATH[:ARG] (or `--config PATH`) in argv."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == '--':
      break
    if arg in ('--config', '-config'):
      return args[i + 1] if i + 1 < len(args) else None
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
  return None


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _where(e: BaseException, path: str) -> str:
  """' (line N)' of the deepest frame of e's traceback inside path."""
  import os  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  target = os.path.abspath(path)
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if f.filename and os.path.abspath(f.filename) == target]
  if isinstance(e, SyntaxError) and e.filename and (
      os.path.abspath(e.filename) == target):
    return ''  # Its message already names the line.
  return f' (line {lines[-1]})' if lines else ''


def check_recipe(value: str) -> str | None:
  """Why --config=value cannot give a config (one line), or None if it can.

  Loads the recipe the way ml_collections will (which would otherwise defer a
  missing file to a traceback at first use, and print a traceback for a
  recipe that raises), and calls its get_config. Recipes are cheap, pure
  functions, so running one twice costs milliseconds.
  """
  import difflib  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path, has_arg, arg = value.partition(':')
  if not os.path.isfile(path):
    recipes = _recipe_files()
    close = difflib.get_close_matches(path, recipes, n=1, cutoff=0.8)
    hint = f'did you mean {close[0]}? ' if close else ''
    listing = ', '.join(recipes) if recipes else '(none found)'
    what = ('names no file' if not path else f'recipe file {path} is a '
            'directory' if os.path.isdir(path) else
            f'recipe file {path} does not exist')
    return (f'--config={value}: {what}; {hint}'
            f'recipes: {listing}')
  try:
    loader = importlib.machinery.SourceFileLoader('_simclr_jax_recipe', path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    return (f'--config={value}: recipe {path} failed to load{_where(e, path)}'
            f': {_one_line(e)}')
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    return (f'--config={value}: recipe {path} defines no get_config() '
            'function')
  call = f'get_config({arg!r})' if has_arg else 'get_config()'
  try:
    config = get_config(*([arg] if has_arg else []))
  except Exception as e:  # pylint: disable=broad-except
    return (f'--config={value}: {call} of {path} failed{_where(e, path)}: '
            f'{_one_line(e)}')
  if config is None:
    return f'--config={value}: {call} of {path} returned None'
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser for main (and the benchmark): config errors are one line.

  A --config recipe that is missing, fails to import, lacks get_config or
  raises in it is reported by check_recipe before ml_collections loads it
  (ml_collections defers a missing file to a traceback at first use).
  ml_collections rejects an override of a field the config does not have
  (good: a typo must not be silently ignored) but raises it as a traceback
  out of flag parsing; this prints `error: ...` and exits 2 like every other
  config error. Other flag errors keep absl's own one-line message.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  value = _config_flag_value(argv)
  problem = check_recipe(value) if value is not None else None
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(2)
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    detail = e
    while isinstance(detail, BaseException) and detail.args:
      detail = detail.args[0]  # ml_collections nests KeyError in the error.
    lines = str(detail).splitlines() or ['?']
    name = lines[0].strip('\'"')
    flag = next((a.split('=')[0] for a in argv[1:]
                 if a.startswith('--config.') and
                 name in a.split('=')[0].split('.')), None)
    hint = ' '.join(' '.join(lines[1:]).split())
    print(f'error: {flag or name}: the config has no field {name!r}'
          + (f'; {hint}' if hint else ''), file=sys.stderr)
    sys.exit(2)
