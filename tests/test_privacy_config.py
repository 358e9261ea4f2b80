"""The protection keys (secure aggregation, DP, robust aggregators, attacks) at the config edge: defaults,
one refusal per impossible or inapplicable setting (one line naming the key), resume and Flower refusals."""
import json

import pytest

from baffle.cli import main
from baffle.config import TrainConfig, make_config

DP = {"dp_clip": 0.01, "dp_noise_multiplier": 1.0, "client_weights": "equal"}


def test_defaults_are_off_for_baffle_and_unset_for_the_other_methods():
    c = TrainConfig()
    assert (c.secure_aggregation, c.secagg_threshold, c.dp_clip, c.dp_delta, c.aggregator, c.attack) == (
        False, None, None, None, "mean", None)
    other = TrainConfig(method="bp-fedavg")
    assert (other.secure_aggregation, other.aggregator) == (None, None)
    dp = make_config(DP)
    assert (dp.dp_delta, dp.dp_target_epsilon) == (1e-5, None)


def test_values_from_toml_and_flags_are_coerced_and_the_aggregator_is_canonical():
    c = make_config({"secure_aggregation": "true", "secagg_threshold": "3", "clients": 5})
    assert c.secure_aggregation is True and c.secagg_threshold == 3
    assert make_config({"aggregator": "norm-bound:1"}).aggregator == "norm-bound:1.0"
    assert make_config({"aggregator": "krum:2", "attack": "sign-flip:2:10"}).attack == "sign-flip:2:10"
    assert make_config({"attack": "label-flip:2", "perturbations": "per-client"}).attack == "label-flip:2"


REFUSALS = [
    # keys that do not apply
    ({"secagg_threshold": 3}, "secagg_threshold (--secagg-threshold): not used here: it needs --secure-aggregation"),
    ({"dp_delta": 1e-6}, "dp_delta (--dp-delta): not used here: it needs --dp-clip"),
    ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier (--dp-noise-multiplier): not used here: it needs --dp-clip"),
    ({"dp_target_epsilon": 3.0}, "dp_target_epsilon (--dp-target-epsilon): not used here: it needs --dp-clip"),
    ({"method": "bp-fedavg", "secure_aggregation": True}, "secure_aggregation (--secure-aggregation): method 'bp-fedavg'"),
    ({"method": "baffle-fedavg", "dp_clip": 0.1}, "dp_clip (--dp-clip): method 'baffle-fedavg'"),
    ({"method": "bp-fedsgd", "aggregator": "median"}, "aggregator (--aggregator): method 'bp-fedsgd'"),
    ({"method": "bp-fedsgd", "attack": "label-flip:2"}, "attack (--attack): method 'bp-fedsgd'"),
    # combinations that cannot work
    ({"secure_aggregation": True, "perturbations": "per-client"}, "secure_aggregation (--secure-aggregation): needs --perturbations shared"),
    ({"secure_aggregation": True, "aggregator": "median"}, "aggregator (--aggregator): 'median' needs every client's vector"),
    ({"secure_aggregation": True, "clip": 0.3, "clip_scope": "client"}, "secure_aggregation (--secure-aggregation): cannot be combined with --clip-scope client"),
    ({"secure_aggregation": True, "clients": 1}, "secure_aggregation (--secure-aggregation): needs at least 2 clients per round"),
    ({"secure_aggregation": True, "fraction": 0.1}, "needs at least 2 clients per round, got 1"),
    ({"secure_aggregation": True, "secagg_threshold": 1}, "secagg_threshold (--secagg-threshold): must be between 2 and the 10"),
    ({"secure_aggregation": True, "secagg_threshold": 11}, "secagg_threshold (--secagg-threshold): must be between 2 and the 10"),
    ({"dp_clip": 0.01}, "dp_clip (--dp-clip): also set --dp-noise-multiplier"),
    ({**DP, "client_weights": "examples"}, "dp_clip (--dp-clip): client-level DP sums unweighted clipped vectors"),
    ({**DP, "dp_clip": -1.0}, "dp_clip (--dp-clip): must be a finite number > 0"),
    ({**DP, "dp_clip": "inf"}, "dp_clip (--dp-clip): must be a finite number > 0"),
    ({**DP, "dp_noise_multiplier": 0.0}, "dp_noise_multiplier (--dp-noise-multiplier): must be a finite number > 0"),
    ({**DP, "dp_delta": 1.0}, "dp_delta (--dp-delta): must be in (0, 1)"),
    ({**DP, "dp_target_epsilon": "nan"}, "dp_target_epsilon (--dp-target-epsilon): must be a finite number > 0"),
    ({**DP, "aggregator": "median"}, "aggregator (--aggregator): 'median' with --dp-clip"),
    ({**DP, "perturbations": "per-client"}, "dp_clip (--dp-clip): needs --perturbations shared"),
    ({"aggregator": "median", "perturbations": "per-client"}, "aggregator (--aggregator): needs --perturbations shared"),
    ({"attack": "sign-flip:2", "perturbations": "per-client"}, "attack (--attack): needs --perturbations shared"),
    ({"aggregator": "median", "clip": 0.3, "clip_scope": "client"}, "aggregator (--aggregator): cannot be combined"),
    ({"aggregator": "average"}, "aggregator (--aggregator): unknown aggregator 'average'"),
    ({"aggregator": "krum"}, "aggregator (--aggregator): aggregator 'krum' needs a parameter"),
    ({"aggregator": "krum:4"}, "aggregator (--aggregator): 'krum:4' needs at least 11 clients per round, got 10"),
    ({"aggregator": "trimmed-mean:5"}, "aggregator (--aggregator): 'trimmed-mean:5' needs at least 11 clients"),
    ({"attack": "sign-flip"}, "attack (--attack): bad attack 'sign-flip'"),
    ({"attack": "scaling:10"}, "attack (--attack): 'scaling:10': F = 10 malicious clients of 10"),
    ({"attack": "label-flip:2:3"}, "attack (--attack): bad attack 'label-flip:2:3': label-flip takes no strength"),
]


@pytest.mark.parametrize("overrides, message", REFUSALS, ids=[m.split(":")[0] + "-" + str(i) for i, (_, m) in
                                                                 enumerate(REFUSALS)])
def test_each_refusal_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as e:
        make_config(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def _flags(overrides):
    argv = []
    for k, v in overrides.items():
        argv += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    return argv


@pytest.mark.parametrize("overrides", [REFUSALS[0][0], REFUSALS[9][0], REFUSALS[16][0]])
def test_the_cli_refuses_before_writing_anything(tmp_path, capsys, overrides):
    out = tmp_path / "o"
    assert main(["train", "--out", str(out), *_flags(overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("baffle: error: ") and err.count("\n") == 1
    assert not out.exists()


TINY = ["--rounds", "2", "--clients", "4", "--hidden", "8", "--num-perturbations", "5", "--eval-every", "2",
        "--threads", "1", "--no-progress", "--client-weights", "equal"]


@pytest.mark.parametrize("change", [["--secure-aggregation", "false"], ["--dp-noise-multiplier", "2.0"],
                                    ["--dp-target-epsilon", "100"], ["--aggregator", "median"]])
def test_a_resumed_run_with_a_different_privacy_setting_is_refused(tmp_path, capsys, change):
    out = tmp_path / "run"
    setting = ["--secure-aggregation", "true", "--dp-clip", "0.01", "--dp-noise-multiplier", "1.0"]
    if change[0] == "--aggregator":
        setting = []
    assert main(["train", *TINY, *setting, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", *change]) == 2
    err = capsys.readouterr().err
    assert "--resume: settings differ" in err and change[0] in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


@pytest.mark.parametrize("overrides, key", [({"secure_aggregation": True}, "--secure-aggregation"),
                                            (DP, "--dp-clip"), ({"aggregator": "median"}, "--aggregator"),
                                            ({"attack": "label-flip:2"}, "--attack")])
def test_flower_refuses_the_protection_keys_it_does_not_run_yet(overrides, key):
    from baffle.flower.serverstate import check_flower_config

    check_flower_config(TrainConfig())  # the plain config runs
    with pytest.raises(ValueError, match=f"^{key}: not available on Flower yet"):
        check_flower_config(make_config(overrides))
