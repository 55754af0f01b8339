"""The package layering: imports run one way (tokenizer <- var_mclr <- eval <- experiments) and no module cycle.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("tokenizer", "var_mclr", "eval", "experiments")  # each may import only the ones before it


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            name = _module_name(path)
            found = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = {m for m in found if m.split(".")[0] in LAYERS}
    # Keep only edges to modules of ours (`from pkg import module` names the module; `from m import f` names m).
    return {k: {m for m in v if m in graph} for k, v in graph.items()}


def test_imports_run_one_way():
    graph = _imports()
    assert len(graph) > 30  # the walk found the packages
    wrong = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
             if LAYERS.index(b.split(".")[0]) > LAYERS.index(a.split(".")[0])]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or nxt.startswith(node + "."):  # a package importing its own submodule is not a cycle
                continue
            assert state.get(nxt) != 1, " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
