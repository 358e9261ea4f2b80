"""Project-level checks: the README's example works, every flag is documented, imports point downward."""
import ast
import contextlib
import io
import re

from baffle.config import FIELDS, flag
from conftest import REPO

SRC = REPO / "src" / "baffle"
README = (REPO / "README.md").read_text()


def test_readme_python_example_trains_a_user_module():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README.md", "exec"), {})
    accuracy = float(buf.getvalue().split()[-1])
    assert accuracy > 0.9  # chance is about 1/3 on this 3-class problem


def test_readme_documents_every_flag():
    missing = [flag(name) for name in FIELDS if f"`{flag(name)}`" not in README]
    assert not missing


# Lower layers must not import higher ones (DESIGN.md §2); flwr only inside baffle.flower; no import cycles.
LAYERS = {
    "perturbation": 0, "estimator": 0, "io": 0, "secure": 0, "philox": 0, "_alloc": 0, "_perturb": 0, "rebuild": 0,
    "devices": 0, "_forward": 0,
    "client": 1, "server": 1, "data": 1, "fast": 1, "models": 2,
    "rounds": 3, "config": 3, "api": 3, "protection": 3,
    "simulation": 4, "cursors": 4, "workers": 4, "training": 5, "flower": 5, "report": 5, "analyze": 5, "cli": 6,
}


def _modules(src=SRC):
    """{dotted name: path} of every module of the package (a package by its __init__)."""
    out = {}
    for path in src.rglob("*.py"):
        parts = ("baffle", *path.relative_to(src).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _import_graph(src=SRC):
    """{module: {baffle modules it imports}}, every import statement counted (also those inside
    functions); ``from pkg import name`` points at pkg.name when that is a module, else at pkg."""
    modules = _modules(src)

    def owner(name):  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . / from .x
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[mod] = {owner(t) for t in targets if t.split(".")[0] == "baffle" and owner(t)} - {mod}
    return graph


def _cycle(graph):
    """One import cycle as [m0, m1, ..., m0], or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _layer(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_has_a_layer_and_every_layer_a_module():
    tops = {_layer(m) for m in _modules()} - {None}
    assert tops == set(LAYERS), (f"modules without a layer in LAYERS: {sorted(tops - set(LAYERS))}; "
                                 f"LAYERS entries without a module: {sorted(set(LAYERS) - tops)}")


def _absolute_imports(path):
    """The top-level packages a file imports by absolute name (``import a.b`` / ``from a.b import c``: a)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0]


def test_dependency_direction_and_flwr_confinement():
    bad = []
    for path in SRC.rglob("*.py"):
        top = path.relative_to(SRC).parts[0].removesuffix(".py")
        if "flwr" in _absolute_imports(path) and top != "flower":
            bad.append(f"{path.name} imports flwr")
    for mod, targets in _import_graph().items():
        for target in targets:
            low, high = _layer(mod), _layer(target)
            if low in LAYERS and high in LAYERS and LAYERS[high] > LAYERS[low]:
                bad.append(f"{mod} imports {target}")
    assert not bad, bad


def test_secure_is_a_self_contained_pure_layer():
    """baffle.secure (DESIGN.md §2) imports no other baffle module, nor flwr, nor the global-state
    ``random`` module."""
    secure = {m: path for m, path in _modules().items() if _layer(m) == "secure"}
    assert len(secure) >= 10
    graph = _import_graph()
    bad = [f"{m} imports {t}" for m in secure for t in graph[m] if _layer(t) != "secure"]
    bad += [f"{m} imports {top}" for m, path in secure.items() for top in _absolute_imports(path)
            if top in ("flwr", "random")]
    assert not bad, bad


def test_no_import_cycles():
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles_through_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "baffle"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from baffle import b\n")
    (pkg / "b.py").write_text("import baffle.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    assert _cycle(_import_graph(pkg)) == ["baffle.a", "baffle.b", "baffle.sub.c", "baffle.a"]
    (pkg / "sub" / "c.py").write_text("from ..x import y\n")  # baffle.x does not exist: no edge
    assert _cycle(_import_graph(pkg)) is None


_WITHOUT_EXTRA = """
import sys
for name in ("flwr", "cryptography", "ray"):
    sys.modules[name] = None  # any import of them now fails, as without the [flower] extra
from baffle.cli import main
assert main(["train", "--help"]) == 0
"""


def test_cli_works_without_the_flower_extra(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRA], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    deploy = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRA.replace('["train", "--help"]) == 0',
                             '["deploy", "--engine", "simulation", "--rounds", "1", "--out", r"%s"]) == 2'
                             % (tmp_path / "o"))], capture_output=True, text=True, env=env)
    assert deploy.returncode == 0, deploy.stderr
    assert "pip install -e '.[flower]'" in deploy.stderr
