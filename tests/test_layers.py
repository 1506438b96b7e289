"""The structure of the suite, checked by parsing the source (no imports executed).

* Layers, lowest first (DESIGN.md): core -> data/models -> losses/schedule/weighting ->
  evaluation library -> recipes -> orchestration.  A module imports only its own layer
  or lower ones, and the module import graph has no cycle.
* Imports sit at module top: no in-function import of the suite's own modules, except
  the ones listed in ``INNER_ALLOWED`` with a reason (lazy imports are for heavy optional
  packages only).
* One training loop: ``.backward(`` appears in exactly one module (the engine).
* Size: no file over 600 lines, no function over 80 lines.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scd", "unisd", "benchmarks")

# (layer, module-name pattern); the first match wins, so more specific patterns come first.
LAYERS = [
    (5, r"^scd\.(cli|__main__|assets)$"),
    (5, r"^benchmarks\.(grid|leaderboard|recovery_study|scd_study|unisd_study|note_numbers|perf|demo)(\.|$)"),
    (0, r"^scd\.core(\.|$)"),
    (0, r"^(scd|unisd|benchmarks)$"),  # package __init__ files
    (0, r"^scd\.recipes$"),  # name -> module table, imports by string on demand
    (1, r"^scd\.(data|models|tokens|heads|data_config)(\.|$)"),
    (2, r"^scd\.(losses|completion_loss|schedule|weighting|teacher_cache)(\.|$)"),
    (3, r"^benchmarks\.(tasks|evaluate|cka|stats|paired|recovery_power|lmeval_bridge|eval_config)(\.|$)"),
    (4, r"^scd\.(sft|teacher|distill|student)(\.|$)"),
    (4, r"^unisd\."),
]
# "path:line imports module inside a function" -> why it must stay lazy.  Keep it empty if you can.
INNER_ALLOWED: dict[str, str] = {}

NAMES = {0: "core", 1: "data/models", 2: "losses/schedule/weighting", 3: "evaluation library", 4: "recipes",
         5: "orchestration"}


def layer_of(module: str) -> int:
    for layer, pattern in LAYERS:
        if re.search(pattern, module):
            return layer
    raise AssertionError(f"module {module} has no layer in tests/test_layers.py LAYERS: add it")


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def suite_targets(node: ast.AST, module: str, is_pkg: bool, known: set[str]) -> list[str]:
    """The suite modules an import statement imports (``from pkg import mod`` counts mod)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = resolve(node, module, is_pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return sorted({n for n in names if n.split(".")[0] in PACKAGES})


def nearest_known(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


class Imports(ast.NodeVisitor):
    def __init__(self):
        self.depth, self.top, self.inner, self.total = 0, [], [], 0

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def _imp(self, node):
        self.total += 1
        (self.inner if self.depth else self.top).append(node)

    def visit_Import(self, node):
        self._imp(node)

    def visit_ImportFrom(self, node):
        if node.module != "__future__":
            self._imp(node)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    lines.add(sub.lineno)
    return lines


def scan():
    files = source_files()
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    inner, total = [], 0
    for path in files:
        mod, is_pkg = module_name(path), path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        v = Imports()
        v.visit(tree)
        skip = _type_checking_only(tree)
        total += v.total
        edges = graph.setdefault(mod, set())
        for node in v.top:
            if node.lineno in skip:
                continue
            for t in suite_targets(node, mod, is_pkg, known):
                target = nearest_known(t, known)
                if target and target != mod:
                    edges.add(target)
        for node in v.inner:
            for t in suite_targets(node, mod, is_pkg, known):
                inner.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t} inside a function")
                target = nearest_known(t, known)
                if target and target != mod:
                    edges.add(target)
    return graph, inner, total


def test_no_upward_import():
    graph, _, _ = scan()
    bad = [f"{m} ({NAMES[layer_of(m)]}) imports {t} ({NAMES[layer_of(t)]})"
           for m, targets in graph.items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _package_of(mod: str, graph: dict) -> bool:
    return any(k.startswith(mod + ".") for k in graph)


def test_no_import_cycle():
    graph, _, _ = scan()
    # a package's __init__ re-exporting its submodules is not a cycle with them
    edges = {m: {t for t in ts if not (_package_of(m, graph) and t.startswith(m + "."))
                 and not (_package_of(t, graph) and m.startswith(t + "."))} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_at_module_top():
    _, inner, total = scan()
    bad = [i for i in inner if i not in INNER_ALLOWED]
    stale = sorted(set(INNER_ALLOWED) - set(inner))
    assert not bad, f"{len(bad)} of {total} imports import the suite inside a function (move them to the " \
        "module top; fix a cycle by moving code to its layer):\n" + "\n".join(bad)
    assert not stale, "INNER_ALLOWED entries that no longer exist:\n" + "\n".join(stale)


def test_one_training_loop():
    hits = sorted({str(p.relative_to(ROOT)) for p in source_files() if ".backward(" in p.read_text(encoding="utf-8")})
    assert hits == ["scd/core/engine.py"], f".backward( outside the engine: {hits}"


@pytest.mark.parametrize("limit_file, limit_fn", [(600, 80)])
def test_sizes(limit_file, limit_fn):
    long_files, long_fns = [], []
    for p in source_files():
        text = p.read_text(encoding="utf-8")
        n = text.count("\n") + (not text.endswith("\n"))
        if n > limit_file:
            long_files.append(f"{p.relative_to(ROOT)}: {n} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit_fn:
                    long_fns.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_fns, "\n".join(long_files + long_fns)


def test_scanner_sees_a_planted_violation(tmp_path):
    """The checks above can fail: a core module importing a recipe is an upward edge."""
    src = "from scd.sft import train_sft\n\ndef f():\n    from scd.distill import run\n"
    tree = ast.parse(src)
    v = Imports()
    v.visit(tree)
    known = {"scd.sft", "scd.distill", "scd.core.x"}
    tops = [t for n in v.top for t in suite_targets(n, "scd.core.x", False, known)]
    inner = [t for n in v.inner for t in suite_targets(n, "scd.core.x", False, known)]
    assert tops == ["scd.sft"] and inner == ["scd.distill"]
    assert layer_of("scd.sft") > layer_of("scd.core.x")
