"""fastrollout.config: defaults, the three file formats, Trinity configs, and path-naming errors."""
from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest
import yaml

from fastrollout import (
    Config,
    ConfigError,
    DynamicTimeoutConfig,
    ExplorerConfig,
    MonitorConfig,
    OverRolloutConfig,
    PipelineConfig,
)

CUSTOM = {
    "mode": "explore",
    "explorer": {
        "runner_per_model": 64, "max_retry_times": 0, "max_timeout": 12.5,
        "max_repeat_times_per_runner": 4, "concurrent_mode": "asynchronous",
        "over_rollout": {"ratio": 0.25, "wait_after_min": 5.0, "return_partial_tasks": True},
        "dynamic_timeout": {"enable": True, "ratio": 2.0, "warmup_min_steps": 3},
    },
    "monitor": {"detailed_stats": True, "backends": ["tensorboard"], "project": "p"},
    "pipeline": {"sink": "discard", "max_buffered_experiences": 1000, "path": "log",
                 "segment_bytes": 1 << 20,
                 "operators": [{"type": "grpo", "epsilon": 1e-5, "norm_std": False},
                               {"type": "staleness_filter", "max_staleness": 2}]},
    "weight_sync": {"mode": "keep"},
    "freeze_heap": True,
}

TOML = """
mode = "explore"
freeze_heap = true
[explorer]
runner_per_model = 64
max_retry_times = 0
max_timeout = 12.5
max_repeat_times_per_runner = 4
concurrent_mode = "asynchronous"
[explorer.over_rollout]
ratio = 0.25
wait_after_min = 5.0
return_partial_tasks = true
[explorer.dynamic_timeout]
enable = true
ratio = 2.0
warmup_min_steps = 3
[monitor]
detailed_stats = true
backends = ["tensorboard"]
project = "p"
[pipeline]
sink = "discard"
max_buffered_experiences = 1000
path = "log"
segment_bytes = 1048576
[[pipeline.operators]]
type = "grpo"
epsilon = 1e-5
norm_std = false
[[pipeline.operators]]
type = "staleness_filter"
max_staleness = 2
[weight_sync]
mode = "keep"
"""


def test_defaults_are_trinitys():
    config = Config()
    assert config.mode == "both"
    assert config.explorer == ExplorerConfig(
        runner_per_model=8, max_retry_times=2, max_timeout=1800.0,
        max_repeat_times_per_runner=None, concurrent_mode="sequential",
        over_rollout=OverRolloutConfig(ratio=0.0, wait_after_min=30.0, return_partial_tasks=False),
        dynamic_timeout=DynamicTimeoutConfig(enable=False, ratio=3.0, warmup_min_steps=1))
    assert config.monitor == MonitorConfig(detailed_stats=False)
    assert config.pipeline == PipelineConfig(sink="memory", max_buffered_experiences=None)
    assert Config.default() == config
    assert Config.from_dict({}) == Config.from_dict(None) == config


def test_finalize_timeout_covers_every_attempt():
    assert Config().finalize_timeout == 1800.0 * 3
    config = Config.from_dict({"explorer": {"max_timeout": 10, "max_retry_times": 0}})
    assert config.finalize_timeout == 10.0


def test_from_dict_sets_every_field_and_round_trips():
    config = Config.from_dict(CUSTOM)
    assert config.to_dict() == CUSTOM
    assert config.explorer.over_rollout.return_partial_tasks is True
    assert config.pipeline.max_buffered_experiences == 1000
    assert Config.from_dict(config.to_dict()) == config


def test_partial_sections_keep_other_defaults():
    config = Config.from_dict({"explorer": {"over_rollout": {"ratio": 0.5}}})
    assert config.explorer.over_rollout == OverRolloutConfig(ratio=0.5)
    assert config.explorer.runner_per_model == 8
    assert config.explorer.max_timeout == 1800.0


def test_integer_seconds_become_floats():
    config = Config.from_dict({"explorer": {"max_timeout": 30}})
    assert config.explorer.max_timeout == 30.0 and isinstance(config.explorer.max_timeout, float)


@pytest.mark.parametrize("suffix,text", [
    (".yaml", yaml.safe_dump(CUSTOM)),
    (".yml", yaml.safe_dump(CUSTOM)),
    (".json", json.dumps(CUSTOM)),
    (".toml", TOML),
])
def test_from_file_by_suffix(tmp_path, suffix, text):
    path = tmp_path / f"config{suffix}"
    path.write_text(text)
    assert Config.from_file(path) == Config.from_dict(CUSTOM)
    assert Config.from_file(str(path)) == Config.from_dict(CUSTOM)


def test_empty_yaml_file_is_the_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert Config.from_file(path) == Config()


def test_unknown_suffix_is_refused(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text("[explorer]\n")
    with pytest.raises(ConfigError, match=r"config\.ini: unknown config file suffix '\.ini'"):
        Config.from_file(path)


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "explorer: [unclosed"),
    (".json", '{"explorer": '),
    (".toml", "[explorer\n"),
])
def test_syntax_errors_name_the_file(tmp_path, suffix, text):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid {suffix[1:].upper()}")):
        Config.from_file(path)


def test_value_errors_in_a_file_name_the_file_and_the_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("explorer:\n  max_timeout: -5\n")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(info.value).startswith(f"{path}: explorer.max_timeout: ")
    assert "(value: -5)" in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Config.from_file(tmp_path / "absent.yaml")


def _nest(path: str, value):
    data = value
    for part in reversed(path.split(".")):
        data = {part: data}
    return data


@pytest.mark.parametrize("path", [
    "colour", "explorer.colour", "explorer.over_rollout.colour",
    "explorer.dynamic_timeout.colour", "monitor.colour", "pipeline.colour",
])
def test_unknown_keys_name_their_path(path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: unknown key \(known keys: "):
        Config.from_dict(_nest(path, 1))


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"explorer": {"max_timeouts": 5}})
    assert "max_timeout," in str(info.value) and "dynamic_timeout" in str(info.value)


def test_unknown_key_in_an_operator_lists_that_operators_keys():
    data = {"pipeline": {"operators": [{"type": "grpo"},
                                       {"type": "dynamic_filter", "thresold": 0.1}]}}
    with pytest.raises(ConfigError, match=r"^pipeline\.operators\[1\]\.thresold: unknown key "
                                          r"\(known keys: threshold\)$"):
        Config.from_dict(data)


def test_bad_value_in_an_operator_is_shown():
    data = {"pipeline": {"operators": [{"type": "grpo", "epsilon": -1}]}}
    with pytest.raises(ConfigError, match=r"^pipeline\.operators\[0\]\.epsilon: .*\(value: -1\)$"):
        Config.from_dict(data)


# (path, bad value): wrong types first, then values out of range.
BAD_VALUES = [
    ("mode", 3), ("mode", "evaluate"),
    ("explorer", 5), ("explorer", None),
    ("explorer.runner_per_model", "8"), ("explorer.runner_per_model", 2.5),
    ("explorer.runner_per_model", True), ("explorer.runner_per_model", 0),
    ("explorer.max_retry_times", -1), ("explorer.max_retry_times", None),
    ("explorer.max_timeout", "30s"), ("explorer.max_timeout", 0), ("explorer.max_timeout", -1.0),
    ("explorer.max_timeout", float("nan")), ("explorer.max_timeout", False),
    ("explorer.max_repeat_times_per_runner", 0), ("explorer.max_repeat_times_per_runner", "2"),
    ("explorer.concurrent_mode", "threads"), ("explorer.concurrent_mode", None),
    ("explorer.over_rollout", [0.1]),
    ("explorer.over_rollout.ratio", -0.1), ("explorer.over_rollout.ratio", 1.0),
    ("explorer.over_rollout.ratio", "0.1"),
    ("explorer.over_rollout.wait_after_min", -1), ("explorer.over_rollout.wait_after_min", "30"),
    ("explorer.over_rollout.return_partial_tasks", "yes"),
    ("explorer.over_rollout.return_partial_tasks", 1),
    ("explorer.dynamic_timeout.enable", "true"), ("explorer.dynamic_timeout.ratio", 0),
    ("explorer.dynamic_timeout.ratio", -2.0), ("explorer.dynamic_timeout.warmup_min_steps", -1),
    ("explorer.dynamic_timeout.warmup_min_steps", 1.5),
    ("monitor.detailed_stats", "no"), ("monitor", "verbose"),
    ("pipeline.sink", "kafka"), ("pipeline.sink", 0),
    ("pipeline.max_buffered_experiences", 0), ("pipeline.max_buffered_experiences", "many"),
]


@pytest.mark.parametrize("path,value", BAD_VALUES)
def test_bad_values_name_their_path(path, value):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(_nest(path, value))
    assert str(info.value).startswith(f"{path}: ")
    assert f"(value: {value!r})" in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        Config.from_dict({"explorer": {"max_timeout": -1}})


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^<top level>: expected `object`, got `array`"):
        Config.from_dict([("mode", "both")])


@pytest.mark.parametrize("value", [0, -2])
def test_range_limits_are_in_the_message(value):
    with pytest.raises(ConfigError, match=r"explorer\.runner_per_model: expected `int` >= 1"):
        Config.from_dict({"explorer": {"runner_per_model": value}})


def test_validate_checks_a_config_built_in_python():
    good = Config(explorer=ExplorerConfig(runner_per_model=4))
    assert good.validate() is good
    bad = Config(explorer=ExplorerConfig(
        dynamic_timeout=DynamicTimeoutConfig(ratio=-1.0)))
    with pytest.raises(ConfigError, match=r"^explorer\.dynamic_timeout\.ratio: "):
        bad.validate()
    wrong_type = Config(monitor=MonitorConfig(detailed_stats="yes"))
    with pytest.raises(ConfigError, match=r"^monitor\.detailed_stats: "):
        wrong_type.validate()
    not_data = Config(mode=object())
    with pytest.raises(ConfigError, match="not plain data"):
        not_data.validate()


def _trinity_like(**explorer_overrides):
    explorer = dict(
        runner_per_model=64, max_retry_times=0, max_timeout=12.5, max_repeat_times_per_runner=4,
        concurrent_mode="asynchronous",
        over_rollout=SimpleNamespace(ratio=0.25, wait_after_min=5.0, return_partial_tasks=True),
        dynamic_timeout=SimpleNamespace(enable=True, ratio=2.0, warmup_min_steps=3),
        # Trinity has many more explorer attributes; they are not ours to read.
        name="explorer", eval_interval=100, rollout_model=SimpleNamespace(engine_num=2),
    )
    explorer.update(explorer_overrides)
    return SimpleNamespace(mode="explore", project="p", explorer=SimpleNamespace(**explorer),
                           monitor=SimpleNamespace(detailed_stats=True, monitor_type="wandb"))


def test_from_trinity_reads_the_same_attribute_paths():
    # Trinity has no pipeline section of this shape: ours keeps its defaults.
    expected = {**CUSTOM, "pipeline": {}}
    del expected["freeze_heap"], expected["weight_sync"]    # not Trinity's settings
    expected["monitor"] = {"detailed_stats": True}
    assert Config.from_trinity(_trinity_like()) == Config.from_dict(expected)


def test_from_trinity_missing_attributes_take_defaults():
    old = SimpleNamespace(mode="both", explorer=SimpleNamespace(runner_per_model=16))
    config = Config.from_trinity(old)
    assert config.explorer.runner_per_model == 16
    assert config.explorer.over_rollout == OverRolloutConfig()
    assert config.monitor == MonitorConfig()


@pytest.mark.parametrize("override,path", [
    ({"max_timeout": -1}, "explorer.max_timeout"),
    ({"concurrent_mode": "forked"}, "explorer.concurrent_mode"),
    ({"over_rollout": SimpleNamespace(ratio=2.0)}, "explorer.over_rollout.ratio"),
    ({"dynamic_timeout": None}, "explorer.dynamic_timeout"),
])
def test_from_trinity_errors_name_the_attribute_path(override, path):
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: "):
        Config.from_trinity(_trinity_like(**override))


def test_from_trinity_with_trinitys_own_config_dataclass():
    from benchmarks.trinity_coordinator import trinity_modules

    trinity_config = trinity_modules().config
    assert Config.from_trinity(trinity_config.Config()) == Config()

    real = trinity_config.Config(mode="explore")
    real.explorer.runner_per_model = 32
    real.explorer.max_timeout = 60  # an int in Trinity's dataclass
    real.explorer.max_repeat_times_per_runner = 2
    real.explorer.concurrent_mode = "multi-threading"
    real.explorer.over_rollout.ratio = 0.5
    real.explorer.dynamic_timeout.enable = True
    real.monitor.detailed_stats = True
    config = Config.from_trinity(real)
    assert config.mode == "explore"
    assert config.explorer.runner_per_model == 32
    assert config.explorer.max_timeout == 60.0
    assert config.explorer.max_repeat_times_per_runner == 2
    assert config.explorer.concurrent_mode == "multi-threading"
    assert config.explorer.over_rollout.ratio == 0.5
    assert config.explorer.dynamic_timeout.enable is True
    assert config.monitor.detailed_stats is True

    # Every mode of Trinity's is one of ours (the validator sets colocate on one-GPU nodes).
    for mode in ("both", "explore", "train", "colocate", "bench", "serve"):
        assert Config.from_trinity(trinity_config.Config(mode=mode)).mode == mode
    # The Ray stand-ins Trinity's modules were loaded against stay out of sys.modules.
    assert "trinity.common.config" not in sys.modules
    assert "trinity.explorer.scheduler" not in sys.modules
