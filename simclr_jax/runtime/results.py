"""results.json: what a finished (or interrupted) run measured, as JSON.

Every mode of the main command ends by writing it; the study reads it back
for its report. Values come out of JAX and NumPy as scalars and arrays, and
a diverged metric is NaN, which JSON cannot hold, so everything goes through
json_safe (NaN and infinities become null) before it is written.
"""

import json
import math
import os
from typing import Any, Iterable

NAME = 'results.json'


def json_safe(x: Any) -> Any:
  """`x` with NumPy/JAX scalars as Python numbers and non-finite floats None.

  Dict keys become strings (JSON allows no others), tuples become lists.
  """
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if hasattr(x, 'item'):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_results(workdir: str, results: dict[str, Any],
                  name: str = NAME) -> str:
  """Writes `results` to workdir/name (local or gs://); returns its path.

  Only process 0 writes, so a multi-host run leaves one file rather than
  every host racing on the same path; every process gets the path back.
  """
  # Imported here: the entry points import this module before logging is
  # configured, and JAX must not start logging before that.
  import jax  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, name)
  if jax.process_index() == 0:
    with epath.Path(path).open('w') as f:
      json.dump(json_safe(results), f, indent=2, sort_keys=True)
  return path


def summary(results: dict[str, Any], omit: Iterable[str] = ()) -> str:
  """One JSON line of `results` for the log, without the bulky `omit` keys."""
  omit = set(omit)
  return json.dumps(json_safe({k: v for k, v in results.items()
                               if k not in omit}))
