#!/usr/bin/env python3
"""Fail when src/phitune breaks its layering: an import cycle, a stage importing a later stage, or a
command module importing another command. Run by `make lint`.

Stages, in order (a module may import its own stage and earlier ones, never a later one or a sibling at
the same rank):
  0  phitune (the package itself: __version__), errors
  1  data          readers, templates, encoding
  2  config        the flag / YAML schema of a run
  3  models        base model + tokenizer loading, LoRA adapters
  4  hardware      device plans, CPU kernels, memory model
  5  training | generation
  6  serving | exporting
  7  commands      every other top-level module (cli, train, chat, ...); a command may import
                   config_commands (shared flag schemas) but no other command

Every import counts, including those inside functions and under `if TYPE_CHECKING:`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

RANK = {"": 0, "errors": 0, "data": 1, "config": 2, "models": 3, "hardware": 4, "training": 5, "generation": 5,
        "serving": 6, "exporting": 6}
COMMAND_RANK = 7
SHARED_COMMAND_MODULES = {"config_commands", "cli"}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, name: str, known: set[str]) -> set[str]:
    """The phitune modules that the file at path imports (resolved to modules, not names in them)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from phitune.data import records` imports the module records
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == "phitune" or m.startswith("phitune.")}


def stage(module: str) -> tuple[str, int]:
    """(stage name, rank) of a phitune module."""
    parts = module.split(".")[1:]
    if not parts:
        return "", 0
    if parts[0] in RANK:
        return parts[0], RANK[parts[0]]
    return "commands", COMMAND_RANK


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle to report."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(root: Path) -> list[str]:
    """Every layering problem under the package directory root, as messages."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph = {m: {d for d in imports(root, p, m, known) if d != m} for m, p in files.items()}
    problems = []
    for m, deps in sorted(graph.items()):
        s, r = stage(m)
        for d in sorted(deps):
            ds, dr = stage(d)
            if ds == s and s != "commands":
                continue
            if s == "commands":
                if ds == "commands" and d.split(".")[-1] not in SHARED_COMMAND_MODULES:
                    problems.append(f"{m} imports the command module {d}: move what both need into a stage folder")
                continue
            if dr >= r:
                problems.append(f"{m} ({s}) imports {d} ({ds}): a stage may import only earlier stages")
    for comp in cycles(graph):
        problems.append("import cycle: " + " <-> ".join(comp))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent / "src" / "phitune")
    problems = check(root)
    for p in problems:
        print(f"check_layout: {p}", file=sys.stderr)
    if not problems:
        print(f"check_layout: {root}: no cycles, every import points to an earlier stage")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
