"""aim_ds.config: strict parse of the "aim_merging" section (no torch needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aim_ds.config import AimConfig, ConfigError

DEFAULTS = {
    "enabled": True,
    "interval_rule": "paper",
    "initial_interval": 8,
    "initial_interval_fraction": 0.0,
    "min_interval": 2,
    "max_interval": 128,
    "cold_start": 3,
    "window": 3,
    "gamma_up": 2.0,
    "gamma_down": 2.0,
    "threshold_factor": 2.0,
    "forced_activation_multiple": 2,
    "activation_cap": 3,
    "threshold_rule": "factor",
    "threshold_std": 2.0,
    "forgetting_ema": 0.0,
    "learning_signal": "per_step",
    "merge_retries": 2,
    "weight_policy": "signals",
    "w_in": 0.5,
    "w_out": 0.5,
    "importance_quantile": 0.8,
    "importance_beta1": 0.85,
    "importance_beta2": 0.85,
    "rehearsal_steps": "interval",
    "rehearsal_fraction": 1.0,
    "probe_interval": 1,
    "probe_batch_size": 0,
    "probe_source": "memory_forward",
    "anchor": "device",
    "merge_first_task": False,
    "undo": "host",
    "undo_path": None,
}


def err(section) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        AimConfig.from_dict(section)
    return info.value


def test_defaults_of_a_present_section():
    assert AimConfig.from_dict({}).to_dict() == DEFAULTS


def test_missing_section_is_disabled():
    assert AimConfig.from_dict(None).enabled is False
    assert AimConfig.from_ds_config({"train_batch_size": 8}).enabled is False
    assert AimConfig.from_dict(None).to_dict() == {**DEFAULTS, "enabled": False}


def test_from_ds_config_reads_the_section_and_files(tmp_path):
    ds = {"train_batch_size": 8, "aim_merging": {"interval_rule": "reference", "initial_interval": 16}}
    cfg = AimConfig.from_ds_config(ds)
    assert (cfg.enabled, cfg.interval_rule, cfg.initial_interval) == (True, "reference", 16)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    assert AimConfig.from_ds_config(str(path)) == cfg
    assert AimConfig.from_ds_config({"aim_merging": {"enabled": False}}).enabled is False


def test_signal_keys_are_checked_and_each_threshold_rule_reads_only_its_own_key():
    cfg = AimConfig.from_dict({"threshold_rule": "mean_std", "threshold_std": 1.5, "forgetting_ema": 0.8})
    assert (cfg.threshold_rule, cfg.threshold_std, cfg.forgetting_ema) == ("mean_std", 1.5, 0.8)
    e = err({"threshold_rule": "mean_std", "threshold_factor": 1.25})
    assert e.key == "threshold_factor" and 'only applies to threshold_rule "factor"' in str(e)
    e = err({"threshold_std": 1.0})
    assert e.key == "threshold_std" and 'threshold_rule "mean_std" to use it' in str(e)
    assert err({"forgetting_ema": 1.0}).key == "forgetting_ema"
    assert err({"threshold_std": -1, "threshold_rule": "mean_std"}).key == "threshold_std"
    assert err({"learning_signal": "lr"}).key == "learning_signal"
    assert err({"merge_retries": -1}).key == "merge_retries"
    assert err({"merge_retries": True}).key == "merge_retries"


def test_round_trip_of_every_field_changed():
    section = {
        "enabled": False,
        "interval_rule": "fixed",
        "initial_interval": 5,
        "initial_interval_fraction": 0.0,  # a fraction > 0 excludes initial_interval (tested in test_controller)
        "min_interval": 3,
        "max_interval": 9,
        "cold_start": 0,
        "window": 4,
        "gamma_up": 1.5,
        "gamma_down": 3,
        "threshold_factor": 1.25,
        "threshold_rule": "factor",
        "threshold_std": 2.0,
        "forgetting_ema": 0.5,
        "learning_signal": "lr_sqrt",
        "merge_retries": 0,
        "forced_activation_multiple": 3,
        "activation_cap": 1,
        "weight_policy": "fixed",
        "w_in": 0.7,
        "w_out": 1.2,
        "importance_quantile": 0.5,
        "importance_beta1": 0.0,
        "importance_beta2": 0.5,
        "rehearsal_steps": "interval",
        "rehearsal_fraction": 0.5,
        "probe_interval": 2,
        "probe_batch_size": 16,
        "probe_source": "memory_forward",
        "anchor": "host",
        "merge_first_task": True,
        "undo": "nvme",
        "undo_path": "/local/nvme/aim_undo",
    }
    cfg = AimConfig.from_dict(section)
    d = cfg.to_dict()
    assert d == {**section, "gamma_down": 3.0}
    assert isinstance(d["gamma_down"], float)  # ints are accepted for floats and stored as floats
    assert AimConfig.from_dict(d) == cfg
    assert AimConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert AimConfig.from_dict(cfg) is cfg
    with pytest.raises(Exception):
        cfg.window = 5  # frozen


def test_unknown_key_suggests_the_closest():
    e = err({"windw": 3})
    assert e.key == "windw"
    assert "aim_merging.windw is not a known key" in str(e) and "did you mean 'window'?" in str(e)
    e = err({"intervall_rule": "paper"})
    assert "did you mean 'interval_rule'?" in str(e)
    e = err({"zzzz": 1})
    assert "did you mean" not in str(e) and "known keys are enabled, interval_rule" in str(e)


@pytest.mark.parametrize(
    "key,value,typename",
    [
        ("enabled", 1, "int"),
        ("merge_first_task", "yes", "string"),
        ("window", True, "bool"),
        ("initial_interval", 8.0, "float"),
        ("activation_cap", "3", "string"),
        ("gamma_up", True, "bool"),
        ("threshold_factor", "2", "string"),
        ("w_in", None, "null"),
        ("interval_rule", 1, "int"),
        ("anchor", ["device"], "list"),
        ("rehearsal_steps", 2.0, "float"),
        ("probe_batch_size", False, "bool"),
    ],
)
def test_wrong_types(key, value, typename):
    e = err({key: value})
    assert e.key == key
    assert str(e).startswith(f"aim_merging.{key} = {json.dumps(value)} has the wrong type ({typename}): expected ")


def test_the_error_message_is_one_line_naming_key_value_and_range():
    e = err({"min_interval": 0})
    assert str(e) == (
        "aim_merging.min_interval = 0 is out of range: expected an integer >= 1 "
        "(and min_interval <= initial_interval <= max_interval)"
    )
    assert str(err({"interval_rule": "papr"})) == (
        'aim_merging.interval_rule = "papr" is not an accepted value: expected one of "paper", "reference", "fixed"'
    )
    assert str(err({"w_out": 2.5})) == "aim_merging.w_out = 2.5 is out of range: expected a number in [0, 2]"


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("initial_interval", 0, "an integer >= 1"),
        ("max_interval", -1, "an integer >= 1"),
        ("cold_start", -1, "an integer >= 0"),
        ("window", 1, "an integer >= 2"),
        ("gamma_up", 0.5, "a finite number >= 1.0"),
        ("gamma_down", float("inf"), "a finite number >= 1.0"),
        ("threshold_factor", 0, "a finite number > 0"),
        ("threshold_factor", float("nan"), "a finite number > 0"),
        ("forced_activation_multiple", 0, "an integer >= 1"),
        ("activation_cap", 0, "an integer >= 1"),
        ("weight_policy", "ties", 'one of "signals", "fixed", "importance"'),
        ("w_in", -0.1, "a number in [0, 2]"),
        ("importance_quantile", 1.0, "(0, 1)"),
        ("importance_quantile", 0, "(0, 1)"),
        ("importance_beta1", 1.0, "[0, 1)"),
        ("importance_beta2", -0.5, "[0, 1)"),
        ("rehearsal_steps", 0, '"interval" (R = the interval S in force at the merge) or an integer >= 1'),
        ("rehearsal_steps", "new", '"interval"'),
        ("probe_interval", 0, "an integer >= 1"),
        ("rehearsal_fraction", 0.0, "(0, 1]"),
        ("rehearsal_fraction", 1.5, "(0, 1]"),
        ("probe_batch_size", -1, "an integer >= 0"),
        ("anchor", "cpu", 'one of "device", "host"'),
    ],
)
def test_out_of_range(key, value, fragment):
    e = err({key: value})
    assert e.key == key
    msg = str(e)
    assert msg.startswith(f"aim_merging.{key} = ")
    assert ("is out of range" in msg) or ("is not an accepted value" in msg)
    assert fragment in msg


def test_cross_field_interval_chain():
    e = err({"min_interval": 200})  # > max_interval 128
    assert e.key == "min_interval" and "<= max_interval (128)" in str(e)
    e = err({"initial_interval": 1})  # < min_interval 2
    assert e.key == "initial_interval"
    assert str(e) == (
        "aim_merging.initial_interval = 1 is out of range: expected an integer in "
        "[min_interval, max_interval] = [2, 128]"
    )
    e = err({"initial_interval": 129})
    assert e.key == "initial_interval"
    # the chain may be tight
    cfg = AimConfig.from_dict({"initial_interval": 4, "min_interval": 4, "max_interval": 4})
    assert (cfg.min_interval, cfg.initial_interval, cfg.max_interval) == (4, 4, 4)


def test_boundaries_accepted():
    cfg = AimConfig.from_dict(
        {
            "w_in": 0,
            "w_out": 2,
            "importance_beta1": 0,
            "gamma_up": 1,
            "cold_start": 0,
            "window": 2,
            "probe_batch_size": 0,
            "rehearsal_steps": 1,
        }
    )
    assert (cfg.w_in, cfg.w_out, cfg.gamma_up, cfg.importance_beta1) == (0.0, 2.0, 1.0, 0.0)


def test_bad_sections():
    e = err([1, 2])
    assert e.key is None and "expected a JSON object" in str(e)
    with pytest.raises(ConfigError):
        AimConfig.from_ds_config(["not", "a", "dict"])
    with pytest.raises(ConfigError):
        AimConfig.from_dict({1: 2})


def test_direct_construction_validates_and_replace():
    with pytest.raises(ConfigError):
        AimConfig(window=0)
    cfg = AimConfig().replace(interval_rule="reference")
    assert cfg.interval_rule == "reference" and cfg.window == 3
    with pytest.raises(ConfigError):
        AimConfig().replace(widow=2)


def test_config_module_imports_without_torch():
    # bypass the package __init__ (which may import more) to check these three modules alone
    pkg_dir = str(Path(__file__).resolve().parents[1] / "aim_ds")
    code = (
        f"import sys, types; pkg = types.ModuleType('aim_ds'); pkg.__path__ = [{pkg_dir!r}]; "
        "sys.modules['aim_ds'] = pkg; import aim_ds.config, aim_ds.control.policies, aim_ds.control.controller; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rehearsal_fraction_scales_the_interval_rule_only():
    from aim_ds.control.policies import rehearsal_steps

    cfg = AimConfig.from_dict({"rehearsal_fraction": 0.25})
    assert [rehearsal_steps(cfg, s) for s in (1, 2, 8, 9, 32)] == [1, 1, 2, 3, 8]
    assert rehearsal_steps(AimConfig.from_dict({}), 32) == 32
    e = err({"rehearsal_steps": 4, "rehearsal_fraction": 0.5})
    assert e.key == "rehearsal_fraction" and "set R directly" in str(e)


def test_probe_source_training_batch_has_no_probe_forward_to_thin():
    assert AimConfig.from_dict({}).probe_source == "memory_forward"
    cfg = AimConfig.from_dict({"probe_source": "training_batch"})
    assert cfg.probe_source == "training_batch" and cfg.probe_interval == 1 and cfg.probe_batch_size == 0
    for key, value in (("probe_interval", 4), ("probe_batch_size", 4)):
        e = err({"probe_source": "training_batch", key: value})
        assert e.key == key and "training_batch" in str(e) and "memory_forward" in str(e), str(e)
    assert AimConfig.from_dict({"probe_interval": 4, "probe_batch_size": 4}).probe_interval == 4
    e = err({"probe_source": "batch"})
    assert e.key == "probe_source" and '"training_batch"' in str(e)


def test_undo_location_and_its_folder():
    assert (AimConfig.from_dict({}).undo, AimConfig.from_dict({}).undo_path) == ("host", None)
    assert AimConfig.from_dict({"undo": "off"}).undo == "off"
    e = err({"undo": "disk"})
    assert e.key == "undo" and '"host", "nvme", "off"' in str(e)
    for section, fragment in (
        ({"undo": "nvme"}, "is missing"),
        ({"undo": "nvme", "undo_path": " "}, "is empty"),
        ({"undo": "nvme", "undo_path": 3}, "wrong type"),
        ({"undo_path": "/nvme"}, 'no use with undo "host"'),
        ({"undo": "off", "undo_path": "/nvme"}, 'no use with undo "off"'),
    ):
        e = err(section)
        assert e.key == "undo_path" and fragment in str(e), str(e)


# ---------------------------------------------------------------------- one registry per strategy family
def _protocol_members(protocol) -> set[str]:
    own = set(vars(protocol)) | set(getattr(protocol, "__annotations__", {}))
    return {m for m in own if not m.startswith("_")}


def test_config_names_are_the_registries_names():
    """Each name set aim_merging accepts is its registry's keys, and each key is its class's own name."""
    from aim_ds import config
    from aim_ds.control import policies

    assert config.INTERVAL_RULES == tuple(policies.RULES)
    assert config.WEIGHT_POLICIES == tuple(policies.WEIGHTS)
    for registry, protocol in ((policies.RULES, policies.IntervalRule), (policies.WEIGHTS, policies.WeightPolicy)):
        for name, cls in registry.items():
            assert cls.name == name
            missing = [m for m in _protocol_members(protocol) if not hasattr(cls, m)]
            assert not missing, f"{cls.__name__} lacks {missing} of {protocol.__name__}"
    assert {cls.fusion for cls in policies.WEIGHTS.values()} <= set(policies.FUSION_KINDS)
    for key, name in (("interval_rule", "fixed"), ("weight_policy", "importance")):
        assert getattr(AimConfig.from_dict({key: name}), key) == name


def test_torch_side_registries_match_the_pure_names():
    """probe_source names (config) and fusion kinds (policies) are listed without torch; the classes that
    implement them (aim_ds.plugin.probes, aim_ds.plugin.fusers) need it: the two must list the same names."""
    pytest.importorskip("torch")
    from aim_ds import config
    from aim_ds.control import policies
    from aim_ds.plugin import fusers, probes

    assert config.PROBE_SOURCE_NAMES == tuple(probes.PROBE_SOURCES)
    assert policies.FUSION_KINDS == tuple(fusers.FUSERS)
    for registry, protocol in ((probes.PROBE_SOURCES, probes.ProbeSource), (fusers.FUSERS, fusers.Fuser)):
        for name, cls in registry.items():
            assert cls.name == name
            missing = [m for m in _protocol_members(protocol) if not hasattr(cls, m)]
            assert not missing, f"{cls.__name__} lacks {missing} of {protocol.__name__}"
