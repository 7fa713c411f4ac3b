"""Imports inside `dq` point one way, down the layers, and form no cycle.

Every module under dq/ is parsed with `ast`; every `import` / `from ... import` counts, also the
deferred ones inside functions. A module may import modules of its own layer or a lower one
(never a higher one), nothing in the library imports a CLI tool (`dq.tools.*`) or a trainer
(`dq.train.*_trainer`), and the import graph has no cycle.

  layer | modules
  ------+-----------------------------------------------------------------------------------
    0   | dq, dq.weights, dq.sharding, dq.distributed, dq.checkpoint, dq.run_files, dq.fields,
        | dq.data.*,
        | dq.models.*,
        | dq.losses.*, dq.official.* (official-weight conversion), dq.summaries.* (pictures,
        | statistics), dq.stage2 (package) and its model modules dq.stage2.{transformer,
        | tokens, layout, losses, progressive, build, sampler, sampler_checks, token_data}
    1   | tokenizer / generator: dq.tokenizer, dq.generator, dq.stage2.token_encoding
    2   | dq.train.*, dq.evaluation.*, dq.validate.*, dq.configs
    3   | dq.main, dq.tools.* (entry points: leaves nothing in the library imports)

`pkg.*` covers the package and every module under it; any other module must be named in
`LAYERS`, so a new module that is not fails `test_layer_map_covers_every_module`.
"""
from __future__ import annotations

import ast
import fnmatch
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS: dict[int, tuple[str, ...]] = {
    0: ("dq", "dq.weights", "dq.sharding", "dq.distributed", "dq.checkpoint", "dq.run_files",
        "dq.fields",
        "dq.data", "dq.data.*", "dq.models", "dq.models.*", "dq.losses", "dq.losses.*",
        "dq.official", "dq.official.*", "dq.summaries", "dq.summaries.*",
        "dq.stage2", "dq.stage2.transformer", "dq.stage2.tokens", "dq.stage2.layout",
        "dq.stage2.losses", "dq.stage2.progressive", "dq.stage2.build", "dq.stage2.sampler",
        "dq.stage2.sampler_checks", "dq.stage2.token_data"),
    1: ("dq.tokenizer", "dq.generator", "dq.stage2.token_encoding"),
    2: ("dq.train", "dq.train.*", "dq.evaluation", "dq.evaluation.*", "dq.validate",
        "dq.validate.*", "dq.configs"),
    3: ("dq.main", "dq.tools", "dq.tools.*"),
}
ENTRY_POINTS = ("dq.main", "dq.tools", "dq.tools.*")  # may import tools and trainers
LEAVES = ("dq.tools", "dq.tools.*", "dq.train.*_trainer")  # nothing in the library imports these


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted((ROOT / "dq").rglob("*.py"))}


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)


def _layer(module: str) -> int | None:
  found = [layer for layer, patterns in LAYERS.items() if _matches(module, patterns)]
  return found[0] if len(found) == 1 else None


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The dq module `name` refers to (its longest known prefix), or None outside dq."""
  parts = name.split(".")
  while parts:
    if ".".join(parts) in modules:
      return ".".join(parts)
    parts.pop()
  return None


def _imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The dq modules `module` imports anywhere in its file (module and function level)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import sub` imports the submodule pkg.sub when there is one.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
               for alias in node.names]
    for name in names:
      target = _resolve(name, modules)
      if target is not None and target != module:
        found.add(target)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {module: _imports(module, path, modules) for module, path in modules.items()}


def _violations(graph: dict[str, set[str]]) -> set[tuple[str, str, str]]:
  """(module, imported module, why) for every import against the rule."""
  found = set()
  for module, targets in graph.items():
    for target in sorted(targets):
      a, b = _layer(module), _layer(target)
      if a is not None and b is not None and b > a:
        found.add((module, target, f"layer {a} -> layer {b}"))
      if not _matches(module, ENTRY_POINTS) and _matches(target, LEAVES):
        found.add((module, target, f"layer {a} -> layer {b}: the library imports a CLI tool or "
                                   "a trainer"))
  return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def _cycle_path(component: list[str], graph: dict[str, set[str]]) -> str:
  """One cycle through the component's first module, as `a -> b -> ... -> a`."""
  members, start = set(component), component[0]
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    node = frontier.pop(0)
    for succ in sorted(graph[node] & members):
      if succ == start:
        return " -> ".join(paths[node] + [start])
      if succ not in paths:
        paths[succ] = paths[node] + [succ]
        frontier.append(succ)
  return " <-> ".join(component)


def test_layer_map_covers_every_module():
  unmapped = [m for m in _modules() if _layer(m) is None]
  assert not unmapped, ("modules missing from (or in more than one layer of) LAYERS in "
                        f"tests/test_import_layers.py: {unmapped}")


def test_imports_point_down_the_layers():
  graph = _graph()
  bad = sorted(_violations(graph))
  assert not bad, "imports against the layer rule:\n" + "\n".join(
      f"  {module} -> {target} ({why})" for module, target, why in bad)


def test_no_import_cycles():
  graph = _graph()
  cycles = _cycles(graph)
  assert not cycles, "import cycles among dq modules:\n" + "\n".join(
      f"  {_cycle_path(c, graph)}" for c in cycles)
