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


# Lower layers must not import higher ones (DESIGN.md §2); flwr only inside baffle.flower.
LAYERS = {
    "perturbation": 0, "estimator": 0, "io": 0, "secure": 0, "philox": 0, "_alloc": 0, "_perturb": 0, "rebuild": 0,
    "devices": 0,
    "client": 1, "server": 1, "data": 1, "fast": 1, "models": 2,
    "rounds": 3, "config": 3, "api": 3, "protection": 3,
    "simulation": 4, "cursors": 4, "training": 5, "flower": 5, "report": 5, "analyze": 5, "cli": 6,
}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_every_module_has_a_layer():
    tops = {p.relative_to(SRC).parts[0].removesuffix(".py") for p in SRC.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYERS), f"modules without a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_dependency_direction_and_flwr_confinement():
    bad = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        top = rel[0].removesuffix(".py")
        for mod in _imports(path):
            if mod.split(".")[0] == "flwr" and top != "flower":
                bad.append(f"{path.name} imports flwr")
            parts = mod.split(".")
            if parts[0] == "baffle" and len(parts) > 1 and top in LAYERS and parts[1] in LAYERS:
                if LAYERS[parts[1]] > LAYERS[top]:
                    bad.append(f"{'/'.join(rel)} imports {mod}")
    assert not bad, bad


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
