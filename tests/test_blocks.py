"""Activation checkpointing and regional compile (ldm/training/blocks.py): the same gradients with every
mode, recomputation that really happens (and only of the cheap ops under `selective`), unchanged
state-dict keys, compile equal to eager, the eager fallback when the compiler fails, and training runs
through train/main.py with both (1 process, and 2 processes under DDP and FSDP)."""
import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.config import register_configs
from ldm.training.ema import EMA
from ldm.models.unet import UNetModel
from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet_blocks import ResBlock
from ldm.training.blocks import MODES, apply_activation_checkpointing, compile_blocks, find_blocks
from tests.launch import launch_cmd, run

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()
aten = torch.ops.aten
TINY = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[1, 2],
            channel_mult=[1, 2], num_heads=2, norm_groups=8, context_dim=16)
# One level: 9 blocks in 3 shapes (ResBlock 32->32, ResBlock 64->32, SpatialTransformer 32), cheap to compile.
ONE_LEVEL = dict(TINY, channel_mult=[1], attention_resolutions=[1])


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    model = UNetModel(**(kwargs or TINY))
    with torch.no_grad():  # zero-initialised output layers would leave most gradients zero: nothing to compare
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return model


def unet_inputs(size=8, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([3, 700][:batch]),
            torch.randn(batch, 5, 16, generator=g))


def grads(model, inputs):
    x, t, context = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, context=context)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


class OpLog(TorchDispatchMode):
    """The aten ops that run while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


# -- activation checkpointing ---------------------------------------------------------------------------

def test_unet_gradients_equal_in_every_mode():
    model, inputs = tiny_unet(), unet_inputs()
    reference = grads(model, inputs)
    for mode in ("full", "selective", "none", "full"):  # switching modes in place works too
        n = apply_activation_checkpointing(model, mode)
        assert n == (0 if mode == "none" else 15)  # 8 ResBlocks + 7 SpatialTransformers
        assert_all_close(grads(model, inputs), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_what_backward_recomputes(mode):
    """`full` reruns each block's forward in backward (convolutions included); `selective` reruns only
    the cheap ops (GroupNorm, SiLU) and reads the saved convolution and attention outputs; `none` reruns
    nothing."""
    model, (x, t, context) = tiny_unet(), unet_inputs()
    apply_activation_checkpointing(model, mode)
    loss = model(x, t, context=context).square().mean()
    with OpLog() as log:
        loss.backward()
    reran = {op for op in (aten.convolution.default, aten.native_group_norm.default, aten.silu.default,
                           aten._scaled_dot_product_flash_attention_for_cpu.default) if op in log.ops}
    expected = {"none": set(),
                "full": {aten.convolution.default, aten.native_group_norm.default, aten.silu.default,
                         aten._scaled_dot_product_flash_attention_for_cpu.default},
                "selective": {aten.native_group_norm.default, aten.silu.default}}[mode]
    assert reran == expected


def test_autoencoder_task_gradients_equal_in_every_mode():
    """Stage 1 through its real loss (L1 + KL + PatchGAN with the adaptive weight, which takes a gradient
    through the decoder's last layer before the backward): same gradients with every mode."""
    cfg = compose_train("model=autoencoder_kl_tiny", "++model.task.loss.perceptual_weight=0",
                        "model.task.autoencoder.attn_resolutions=[8]")
    torch.manual_seed(0)
    task = instantiate(cfg.model.task)
    blocks = task.blocks()
    assert {type(b).__name__ for b in blocks} == {"ResnetBlock", "AttnBlock"}
    assert not any(b in set(task.loss.modules()) for b in blocks)  # not the discriminator (nor LPIPS)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def task_grads():
        task.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the posterior sample
        loss, _ = task({"image": images}, 1)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in task.parameters() if p.grad is not None]

    reference = task_grads()
    for mode in ("full", "selective"):
        assert apply_activation_checkpointing(task, mode) == len(blocks) == 18
        assert_all_close(task_grads(), reference, atol=1e-6, rtol=1e-5)


def test_stage2_task_names_its_trainable_blocks():
    cfg = compose_train("model=ldm_txt2img_tiny")
    with torch.device("meta"):
        first_stage = instantiate(compose_train("model=autoencoder_kl_tiny").model.task.autoencoder)
        task = instantiate(cfg.model.task, first_stage=first_stage)
    kinds = [type(b).__name__ for b in task.blocks()]
    assert kinds.count("ResBlock") == 8 and kinds.count("SpatialTransformer") == 7
    assert kinds.count("TransformerBlock") == 2  # the jointly trained text encoder's layers
    assert not any(b in set(task.first_stage.modules()) for b in task.blocks())
    task.conditioner.requires_grad_(False)  # a frozen conditioner runs without gradients: not a block
    assert "TransformerBlock" not in {type(b).__name__ for b in task.blocks()}


def test_state_dict_keys_and_parameter_names_unchanged():
    """Checkpoints, EMA names, the ldm.convert key maps and FSDP units see the same names after both."""
    model = tiny_unet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    ema_keys = list(EMA(model).state_dict())
    apply_activation_checkpointing(model, "selective")
    compile_blocks(model)
    assert list(model.state_dict()) == list(state)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(EMA(model).state_dict()) == ema_keys
    assert all(isinstance(b, (ResBlock, SpatialTransformer)) for b in find_blocks(model))  # dispatch unchanged
    model.load_state_dict(state)  # strict
    fresh = tiny_unet()
    fresh.load_state_dict(model.state_dict())


def test_a_deep_copy_runs_its_own_weights():
    model, (x, t, context) = tiny_unet(), unet_inputs()
    apply_activation_checkpointing(model, "full")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    assert not torch.allclose(twin(x, t, context=context), model(x, t, context=context))


def test_a_run_saved_with_the_old_use_checkpoint_key_still_loads(tiny_runs, tmp_path):
    """Runs written before this change carry `model.task.unet.use_checkpoint` (the SD-size presets set it)."""
    import shutil

    from omegaconf import OmegaConf

    from ldm.training.runs import load_run

    run_dir = tmp_path / "old"
    shutil.copytree(tiny_runs["ldm"], run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.model.task.unet.use_checkpoint = True
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _, task, _ = load_run(run_dir)
    assert not hasattr(task.unet, "use_checkpoint") and len(task.blocks()) == 17


def test_bad_calls_fail_with_clear_errors():
    model = tiny_unet()
    with pytest.raises(ValueError, match="activation_checkpointing='some': choose one of none, full, selective"):
        apply_activation_checkpointing(model, "some")
    compile_blocks(model)
    with pytest.raises(ValueError, match="after compile_blocks"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="already compiled"):
        compile_blocks(model)


def test_trainer_keys_and_preset_defaults():
    assert compose_train().trainer.activation_checkpointing.value == "none"
    assert compose_train().trainer.compile is False
    for name in ("sd_v1", "sd_v2", "ldm_txt2img"):  # SD-size UNets: the memory needs it, set by the experiment
        cfg = compose_train(f"experiment={name}")
        assert cfg.trainer.activation_checkpointing.value == "full" and cfg.model.name == name
        assert compose_train(f"model={name}").trainer.activation_checkpointing.value == "none"  # model keys only
        assert compose_train(f"experiment={name}", "trainer.activation_checkpointing=none").trainer \
            .activation_checkpointing.value == "none"
    assert compose_train("model=ldm_txt2img_tiny").trainer.activation_checkpointing.value == "none"
    with pytest.raises(Exception, match="activation_checkpointing"):
        compose_train("trainer.activation_checkpointing=sometimes")


# -- regional compile -----------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per code object: each test starts from an empty cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_blocks_equal_eager_and_share_graphs(mode, fresh_dynamo, capsys):
    """Forward + backward of the compiled tiny UNet (inductor) equal eager; the 9 blocks compile into 3
    graphs, one per block shape (identical blocks reuse the compiled code); no fallback was needed."""
    model, inputs = tiny_unet(**ONE_LEVEL), unet_inputs()
    reference = grads(model, inputs)
    apply_activation_checkpointing(model, mode)
    assert compile_blocks(model) == 9
    assert_all_close(grads(model, inputs), reference, atol=1e-5, rtol=1e-4)
    assert_all_close(grads(model, inputs), reference, atol=1e-5, rtol=1e-4)  # cached: no recompile
    assert fresh_dynamo["stats"]["unique_graphs"] == 3
    assert "torch.compile failed" not in capsys.readouterr().out
    with torch.no_grad():  # evaluation runs the plain blocks: nothing compiled for its shapes
        model(*unet_inputs(batch=1)[:2], context=unet_inputs(batch=1)[2])
    assert fresh_dynamo["stats"]["unique_graphs"] == 3


def test_compile_failure_falls_back_to_eager(monkeypatch, fresh_dynamo, capsys):
    """The compiler fails at the first call (here inductor raises, as without a C compiler): one line per
    block type names it and the error, those blocks run eagerly, and the results are eager's."""
    import torch._inductor.compile_fx

    def no_compiler(*args, **kwargs):
        raise RuntimeError("simulated: no working C++ compiler")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", no_compiler)
    model, inputs = tiny_unet(**ONE_LEVEL), unet_inputs()
    reference = grads(model, inputs)
    apply_activation_checkpointing(model, "full")
    compile_blocks(model)
    assert_all_close(grads(model, inputs), reference, atol=1e-6, rtol=1e-5)
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split(" blocks,")[0] for line in lines) == [
        "[ldm] torch.compile failed for ResBlock", "[ldm] torch.compile failed for SpatialTransformer"]
    assert all("running them eagerly: BackendCompilerFailed: " in line and
               "simulated: no working C++ compiler" in line for line in lines)
    assert_all_close(grads(model, inputs), reference, atol=1e-6, rtol=1e-5)
    assert capsys.readouterr().out == ""  # said once


def test_a_broken_block_raises_its_own_error_not_a_fallback(fresh_dynamo, capsys):
    block = SpatialTransformer(32, 2, 16, context_dim=8, norm_groups=8)
    compile_blocks(block)
    with pytest.raises(ValueError, match="context_dim=8 but got context=None"):
        block(torch.randn(1, 32, 4, 4, requires_grad=True))
    assert "torch.compile failed" not in capsys.readouterr().out


# -- through train/main.py -----------------------------------------------------------------------------

def stage2_args(shards, first_stage, run_dir, *extra):
    return ["model=ldm_txt2img_tiny", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", "data.image_size=32", "data.shuffle_buffer=0", "trainer=debug",
            "trainer.max_steps=2", "trainer.ckpt_every=1000", "trainer.trace=true", "logger=none",
            f"model.first_stage.ckpt={first_stage}", f"run_dir={run_dir}", *extra]


def first_loss(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return next(float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss" and r["step"] == "1")


def final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(sorted((Path(run_dir) / "checkpoints").glob("step_*"))[-1] / "model.safetensors")


def checksums(run_dir, rank):
    lines = (Path(run_dir) / f"trace_rank{rank}.txt").read_text().splitlines()
    return [line for line in lines if line.startswith(("checksum", "ema_checksum"))]


@pytest.mark.slow
def test_training_with_checkpointing_and_compile_one_process(shapes_shards, tiny_autoencoder, tmp_path):
    """`trainer.activation_checkpointing=full trainer.compile=true` through train/main.py: the first step's
    loss is the plain run's, and the checkpoint has the same keys."""
    plain, both = tmp_path / "plain", tmp_path / "both"
    run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, plain, "data.num_workers=0")))
    out = run(launch_cmd(1, *stage2_args(shapes_shards, tiny_autoencoder, both, "data.num_workers=0",
                                         "trainer.activation_checkpointing=full", "trainer.compile=true")))
    log = out.stdout + out.stderr
    assert "[ldm] activation checkpointing full, compile on: 17 blocks of LatentDiffusionTask" in log
    assert "torch.compile failed" not in log
    assert first_loss(both) == pytest.approx(first_loss(plain), rel=1e-4)
    assert final_state(both).keys() == final_state(plain).keys()
    assert json.loads((both / "final_metrics.json").read_text())["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_training_with_checkpointing_and_compile_two_processes(strategy, shapes_shards, tiny_autoencoder, tmp_path):
    """2 processes (gloo) with both choices on: they train, and every rank ends with the same weights and EMA."""
    run_dir = tmp_path / strategy
    out = run(launch_cmd(2, *stage2_args(shapes_shards, tiny_autoencoder, run_dir, "data.num_workers=1",
                                         f"trainer.strategy={strategy}", "trainer.activation_checkpointing=full",
                                         "trainer.compile=true")), timeout=1200)
    log = out.stdout + out.stderr
    assert "[ldm] activation checkpointing full, compile on: 17 blocks" in log
    assert "torch.compile failed" not in log
    assert checksums(run_dir, 0) == checksums(run_dir, 1) and len(checksums(run_dir, 0)) == 2
    assert json.loads((run_dir / "final_metrics.json").read_text())["step"] == 2


# -- the benchmark scripts (BENCHMARKS.md), at a tiny size ----------------------------------------------

def test_checkpointing_benchmark_runs_and_full_saves_memory():
    import sys

    out = run([sys.executable, "benchmarks/bench_checkpointing.py", "--model", "ldm_txt2img_tiny", "--sizes", "16",
               "--batch", "8", "--steps", "1"]).stdout
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith(" 16x16")}
    assert set(rows) == set(MODES)
    activations = {mode: float(row[-2]) for mode, row in rows.items()}
    assert activations["full"] < activations["selective"] < activations["none"]


@pytest.mark.slow
def test_compile_benchmark_runs():
    import sys

    out = run([sys.executable, "benchmarks/bench_compile.py", "--model", "ldm_txt2img_tiny", "--batch", "4",
               "--steps", "2"]).stdout
    assert "17 blocks compiled" not in out and "15 blocks compiled" in out  # the UNet's blocks only
    assert "speed-up compiled vs eager" in out
    first = out.split("first step:")[1].split("loss ")[1].split()
    assert float(first[0]) == pytest.approx(float(first[2]), rel=1e-4)
