"""The package layout: folders name the layers and imports only go down.

A module may import from its own layer or from layers listed after it in
LAYERS, never from one listed before it (lazy imports inside functions
included), so the tree reads top-down: the command line, tools and modes
at the top, the runtime at the bottom.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'simclr_jax'
# Top to bottom; the README's layout section lists the same order.
LAYERS = ('main', 'benchmark', 'study', 'prepare_data', 'tools', 'downstream', 'training',
          'evaluation', 'export', 'config', 'methods', 'models', 'losses',
          'data', 'runtime')


def _layer(path: pathlib.Path) -> str:
  first = path.relative_to(ROOT).parts[0]
  return first[:-3] if first.endswith('.py') else first


def _imported_layers(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split('.')[0] == 'simclr_jax'):
      parts = node.module.split('.')
      names = [a.name for a in node.names] if len(parts) == 1 else [parts[1]]
      for name in names:
        yield node.lineno, name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split('.')
        if parts[0] == 'simclr_jax' and len(parts) > 1:
          yield node.lineno, parts[1]


def test_every_module_lives_in_a_known_layer():
  tops = {_layer(p) for p in ROOT.rglob('*.py')} - {'__init__'}
  assert tops == set(LAYERS), tops ^ set(LAYERS)


def test_imports_only_go_down():
  rank = {name: i for i, name in enumerate(LAYERS)}
  upward = []
  for path in sorted(ROOT.rglob('*.py')):
    layer = _layer(path)
    if layer == '__init__':
      continue
    for lineno, target in _imported_layers(ast.parse(path.read_text())):
      assert target in rank, f'{path}:{lineno} imports unknown {target}'
      if rank[target] < rank[layer]:
        upward.append(f'{path.relative_to(ROOT)}:{lineno} ({layer}) -> '
                      f'{target}')
  assert not upward, '\n'.join(upward)
