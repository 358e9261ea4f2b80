"""baffle.secure is a pure layer (DESIGN.md §2): it imports only itself among baffle's modules, never
flwr, and never touches global RNG state."""
import ast
from pathlib import Path

import baffle.secure

SECURE = Path(baffle.secure.__file__).parent


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_secure_imports_nothing_above_it():
    files = sorted(SECURE.glob("*.py"))
    assert len(files) >= 10
    bad = [f"{p.name}: {m}" for p in files for m in _imports(p)
           if (m.startswith("baffle.") and not m.startswith("baffle.secure")) or m.split(".")[0] in ("flwr", "random")]
    assert not bad, bad


def test_no_global_rng_calls():
    banned = ("manual_seed(", "np.random.seed", "random.seed", "np.random.normal", "np.random.rand",
              "torch.randn(", "torch.rand(", "secrets.")
    for path in SECURE.glob("*.py"):
        for line in path.read_text().splitlines():
            for b in banned:
                if b in line and "generator=" not in line:
                    raise AssertionError(f"{path.name}: {line.strip()}")
