"""Allocator tuning: explicit via ``tune_malloc``, automatic on the first forward-heavy API call unless
BAFFLE_TUNE_MALLOC=0, reported, and harmless where it does not apply."""
import json
import os
import platform
import subprocess
import sys

import pytest

from baffle import _alloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Fresh interpreter: the settings are process-wide, so each case needs a process of its own.
_SCRIPT = """
import json, sys, torch
from torch import nn
from torch.nn.functional import cross_entropy
import baffle
from baffle import _alloc, fast
before = _alloc.malloc_settings()
if sys.argv[1] == "explicit":
    _alloc.tune_malloc(trim_threshold=1 << 28)
model = nn.Sequential(nn.Linear(4, 3))
batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
engine = fast.ClientEngine(fast.FastOptions(mode="batched")) if sys.argv[1] == "engine" else None
baffle.compute_loss_diffs(model, batch, loss_fn=cross_entropy, seed=1, num_perturbations=2, sigma=1e-3, engine=engine)
print(json.dumps({"before": before, "after": _alloc.malloc_settings()}))
"""


def _run(case: str, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _alloc.ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"
    if env_value is not None:
        env[_alloc.ENV_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", _SCRIPT, case], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_malloc_reports_what_it_set():
    import baffle.client  # noqa: F401 - importing the library must not tune the allocator

    if _alloc.malloc_settings() is not None:  # another test in this process already tuned it
        assert _alloc.tune_malloc()
        return
    applied = _alloc.tune_malloc(trim_threshold=1 << 28)
    if GLIBC:
        assert applied and _alloc.malloc_settings() == {"trim_threshold": 1 << 28,
                                                        "mmap_threshold": _alloc.MMAP_THRESHOLD}
    else:
        assert not applied and _alloc.malloc_settings() is None


@pytest.mark.parametrize("case, env_value", [("compute_loss_diffs", None), ("engine", None),
                                             ("compute_loss_diffs", "1")])
def test_first_forward_heavy_call_tunes_the_allocator(case, env_value):
    got = _run(case, env_value)
    defaults = {"trim_threshold": _alloc.TRIM_THRESHOLD, "mmap_threshold": _alloc.MMAP_THRESHOLD}
    assert got["before"] is None  # not on import
    assert got["after"] == (defaults if GLIBC else None)


@pytest.mark.parametrize("case", ["compute_loss_diffs", "engine"])
def test_environment_variable_opts_out(case):
    assert _run(case, "0") == {"before": None, "after": None}


def test_automatic_tuning_keeps_settings_chosen_explicitly():
    got = _run("explicit", None)
    assert got["after"] == ({"trim_threshold": 1 << 28, "mmap_threshold": _alloc.MMAP_THRESHOLD} if GLIBC else None)
