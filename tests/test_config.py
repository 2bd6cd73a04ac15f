"""Every YAML in conf/ composes against the schema; bad keys and types fail before compute, naming the key."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from ldm.config import ConfigError, check_targets, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "experiment"])
def test_every_yaml_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for name in options:
        cfg = compose_train([f"{group}={name}", "data.shards=x.tar"] if group == "data" else [f"{group}={name}"])
        assert cfg.run_dir and "${" not in str(cfg.run_dir)
        check_targets(cfg.model.task, "model.task")


def test_unknown_top_level_key_names_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["+trainer.max_stepz=3"])
    assert "max_stepz" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["trainer.max_steps=abc"])
    assert "max_steps" in str(e.value.__cause__ or e.value)


def test_bad_enum_names_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["trainer.mixed_precision=fp8"])
    assert "mixed_precision" in str(e.value.__cause__ or e.value)


def test_unknown_model_argument_names_full_key():
    cfg = compose_train(["+model.task.autoencoder.chh=64"])
    with pytest.raises(ConfigError, match=r"model\.task\.autoencoder\.chh: unknown argument"):
        check_targets(cfg.model.task, "model.task")


def test_wrong_model_argument_type_names_full_key():
    cfg = compose_train(["model.task.autoencoder.ch=wide"])
    with pytest.raises(ConfigError, match=r"model\.task\.autoencoder\.ch: expected"):
        check_targets(cfg.model.task, "model.task")


def test_run_dir_is_deterministic():
    a, b = compose_train(), compose_train()
    assert a.run_dir == b.run_dir
