"""The package layout: folders name the layers and imports only go down.

A module may import from its own layer or from layers listed after it in
LAYERS, never from one listed before it (lazy imports inside functions
included), so the tree reads top-down: the command line, tools and modes
at the top, the runtime at the bottom. And no module imports itself round a
loop of others (within a layer too): a cycle is a module split in the wrong
place, and it breaks as soon as one of its imports moves to the top.
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


def _module_name(path: pathlib.Path) -> str:
  parts = ('simclr_jax',) + path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> dict[str, set[str]]:
  """simclr_jax's modules -> the simclr_jax modules each imports anywhere.

  Lazy imports inside functions count: they run in the same process, and a
  cycle through one only waits for the call that closes it. `from P import
  x` names module P.x where x is a module, else P itself (its __init__).
  A package's __init__ importing its own children (re-exports) is left
  out: those edges are the package's public face, and with them every
  child that imports a sibling through its package would read as a cycle.
  """
  files = {_module_name(p): p for p in ROOT.rglob('*.py')}
  packages = {_module_name(p) for p in ROOT.rglob('__init__.py')}

  def known(name: str) -> str | None:
    while name and name not in files:
      name = name.rpartition('.')[0]  # simclr_jax.m.attr -> simclr_jax.m
    return name or None

  graph = {}
  for module, path in files.items():
    package = module if module in packages else module.rpartition('.')[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets.update(known(a.name) for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # Relative: the package, then level - 1 up.
          anchor = package.rsplit('.', node.level - 1)[0]
          base = f'{anchor}.{base}' if base else anchor
        for alias in node.names:
          child = f'{base}.{alias.name}'
          targets.add(child if child in files else known(base))
    targets.discard(None)
    targets.discard(module)
    if module in packages:
      targets = {t for t in targets if not t.startswith(module + '.')}
    graph[module] = {t for t in targets if t.startswith('simclr_jax')}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (its first module repeated at the end) per strongly connected
  component of more than one module (Tarjan's algorithm), so a failure
  names every tangle at once, not only the first one met."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(set(component))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return sorted(_shortest_cycle(graph, c) for c in components)


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]
                    ) -> list[str]:
  """The shortest way from the component's first module back to itself."""
  start = min(component)
  parent, frontier = {start: None}, [start]
  while frontier:
    next_frontier = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w not in parent:
          parent[w] = v
          next_frontier.append(w)
    frontier = next_frontier
  raise AssertionError(f'{sorted(component)} is not strongly connected')


def test_no_import_cycles_between_modules():
  cycles = _cycles(_import_graph())
  assert not cycles, 'import cycles:\n' + '\n'.join(
      ' -> '.join(c) for c in cycles)
