"""Property-based fuzzing of the config layer and of checkpoint loading (hypothesis; bounded, derandomized).

* random TOML documents and random flag combinations never raise out of ``baffle.cli.main``: either the
  configuration is accepted (the run would start: the test stops it where the data would load) or
  the refusal is one line on stderr with exit status 2;
* random byte damage to a checkpoint is refused as "truncated or corrupt checkpoint", or leaves its
  content bit-identical (a byte that no reader uses): it never resumes silently from other numbers.

``BAFFLE_FUZZ_EXAMPLES`` raises the example count (default 60 per property).
"""
import contextlib
import functools
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import baffle.training as training
from baffle.cli import main
from baffle.config import APPLIES, FIELDS, REQUIRES, TrainConfig, flag

FUZZ = settings(max_examples=int(os.environ.get("BAFFLE_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

INTERESTING = ["none", "None", "", "inf", "-inf", "nan", "0", "-1", "1", "2", "3.5", "1e400", "1e-300", "true",
               "false", "yes", "mnist", "digits", "fashion-mnist", "cifar10", "imagenet", "baffle",
               "baffle-fedavg", "bp-fedsgd", "bp-fedavg", "sgd", "adam", "iid", "shards:0", "shards:2",
               "dirichlet:0.5", "dirichlet:-1", "1,2", "0.9,0.999", "0.9", "epoch", "round", "client", "server",
               "central", "twice-fd", "rademacher", "per-client", "shared", "group", "lenet", "wrn", "mlp",
               "channels_last", "crop-flip", "published", "9" * 30, "\u00e9", "a,b", " 3 ", "5m", "10s"]
scalars = st.one_of(st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(INTERESTING),
                    st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3))
JUNK_KEYS = ["bogus", "num_perturbation", "lr-gamma", "num-perturbations", "x.lr", ""]


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _plausible(name: str) -> list:
    """Values a user would write for ``name``: its defaults (also the method-dependent ones) and 'none'."""
    found = [getattr(TrainConfig(), name), getattr(TrainConfig(method="baffle-fedavg"), name),
             APPLIES.get(name, (None,))[0], REQUIRES.get(name, (None,))[0]]
    return [_plain(v) for v in found if v is not None] + ["none"]


def _entry(name: str):
    usual = st.sampled_from(_plausible(name))
    return st.tuples(st.just(name), st.one_of(usual, usual, usual, values))  # mostly plausible


keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(JUNK_KEYS))
entries = st.one_of(st.sampled_from(FIELDS).flatmap(_entry), st.tuples(keys, values))
tables = st.lists(entries, max_size=6).map(dict)
documents = st.tuples(tables, st.dictionaries(st.sampled_from(["optim", "estimator", "run"]), tables, max_size=2))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a TOML basic string (surrogates make the file invalid TOML: also a refusal)


def _toml(doc) -> str:
    top, sections = doc
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class Accepted(Exception):
    """Raised where the data would load: the configuration layer accepted the input."""


@pytest.fixture
def stop_before_data(monkeypatch, tmp_path):
    def accepted(config, **_options):  # the runtime options (workers) do not matter here
        raise Accepted(config)

    monkeypatch.setattr(training, "Simulation", accepted)
    monkeypatch.chdir(tmp_path)  # relative --out values land here (nothing is written before the data)


def _outcome(argv: list[str]) -> str:
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except Accepted:
        return "accepted"
    except SystemExit as e:  # argparse
        rc = e.code
    text = err.getvalue()
    assert rc == 2, (argv, rc, text)
    assert text.count("\n") == 1 and text.startswith("baffle") and "error: " in text, (argv, text)
    assert "Traceback" not in text + out.getvalue()
    return "refused"


@FUZZ
@given(doc=documents)
def test_random_toml_documents_are_accepted_or_refused_in_one_line(stop_before_data, tmp_path, doc):
    path = tmp_path / "fuzz.toml"
    path.write_text(_toml(doc), encoding="utf-8", errors="surrogatepass")
    _outcome(["train", "--config", str(path), "--no-progress"])


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_random_text_as_a_config_file_is_accepted_or_refused_in_one_line(stop_before_data, tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _outcome(["train", "--config", str(path), "--no-progress"])


RUN_FLAGS = {"--threads": ["1", "2", "0", "2000"], "--checkpoint-every": ["10", "5m", "10,30s", "none", "0"],
             "--log-every": ["1", "30s", "none"], "--config": ["missing.toml", "."], "--bogus": ["1"]}
flag_values = st.one_of(st.sampled_from(INTERESTING), st.text(max_size=6)).filter(
    lambda v: not v.startswith(("-h", "--h")))  # -h/--help prints the help and exits 0, by design


def _flag_entry(name: str):
    key = name[2:].replace("-", "_")
    usual = RUN_FLAGS.get(name) or [",".join(map(str, v)) if isinstance(v, list) else str(v).lower()
                                    if isinstance(v, bool) else str(v) for v in _plausible(key)]
    return st.tuples(st.just(name), st.one_of(st.sampled_from(usual), st.sampled_from(usual), flag_values))


pairs = st.lists(st.sampled_from([flag(k) for k in FIELDS] + list(RUN_FLAGS)).flatmap(_flag_entry), max_size=6)


@FUZZ
@given(pairs=pairs, resume=st.booleans(), dangling=st.booleans())
def test_random_flag_combinations_are_accepted_or_refused_in_one_line(stop_before_data, pairs, resume, dangling):
    argv = ["train", "--no-progress"] + (["--resume"] if resume else [])
    for name, value in pairs:
        argv += [name, value]
    if dangling:
        argv.append(pairs[0][0] if pairs else "--lr")  # a flag without its value
    _outcome(argv)


# ---------------------------------------------------------------- checkpoint damage

@functools.lru_cache(maxsize=1)
def _good_checkpoint() -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="baffle-fuzz-"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--rounds", "2", "--clients", "2", "--hidden", "4", "--num-perturbations", "3",
                     "--ema-decay", "0.9", "--threads", "1", "--no-progress", "--out", str(folder / "run")]) == 0
    return (folder / "run" / "checkpoint.pt").read_bytes()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and repr(a) == repr(b)


damage = st.one_of(
    st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=3).map(
        lambda edits: ("flip", edits)),
    st.integers(min_value=0).map(lambda cut: ("truncate", cut)),
    st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=8)).map(lambda ins: ("insert", ins)),
)


@FUZZ
@given(damage=damage)
def test_random_checkpoint_damage_never_loads_other_content(tmp_path, damage):
    good = _good_checkpoint()
    raw = bytearray(good)
    kind, arg = damage
    if kind == "flip":
        for at, mask in arg:
            raw[at % len(raw)] ^= mask
    elif kind == "truncate":
        raw = raw[: arg % len(raw)]
    else:
        at, data = arg
        raw[at % len(raw):at % len(raw)] = data
    (tmp_path / "checkpoint.pt").write_bytes(bytes(raw))
    try:
        loaded = training.load_checkpoint(tmp_path)
    except ValueError as e:
        assert "truncated or corrupt checkpoint" in str(e) and "\n" not in str(e)
        return
    assert _same(loaded, training.load_checkpoint(_good_folder(tmp_path, good)))


def _good_folder(tmp_path, good: bytes) -> Path:
    folder = tmp_path / "good"
    folder.mkdir(exist_ok=True)
    (folder / "checkpoint.pt").write_bytes(good)
    return folder
