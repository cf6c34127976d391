"""Views into a model's variable tree ({'params': ..., 'batch_stats': ...}).

One home for how a SimCLRModel's or Classifier's variables split into their
submodules, used by the downstream modes and by export.
"""

from typing import Any, Mapping


def split_variables(variables: Mapping[str, Any], name: str
                    ) -> dict[str, Any]:
  """{'params', 'batch_stats'} of submodule `name` of a SimCLRModel tree.

  Passing an encoder's own variables (no 'encoder' key) returns them as is,
  so every public function accepts either tree.
  """
  params = variables['params']
  stats = variables.get('batch_stats', {}) or {}
  if name in params:
    return {'params': params[name], 'batch_stats': stats.get(name, {})}
  if name == 'encoder':
    return {'params': params, 'batch_stats': stats}
  raise KeyError(f'the variables hold no {name!r} (top-level params: '
                 f'{sorted(params)})')
