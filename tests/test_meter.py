"""The throughput meter (ldm/training/meter.py), the sync-free step and the device-side NaN guard.

FLOP counts are checked against closed forms computed from layer shapes (an independent route: forward
hooks, not the dispatcher); meter arithmetic against an injected clock (no timing asserts); the real
loop in-process for the logged keys, the evaluation kept out of the window and the absence of host
syncs outside log steps."""
import functools
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ldm.config import ConfigError, check_trainer, register_configs
from ldm.errors import NonFiniteError
from ldm.training.meter import ThroughputMeter, count_flops, count_step_flops, default_peak_tflops

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def compose_cfg(shards, run_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "data=shapes", f"data.shards='{shards['train']}'", f"data.val_shards='{shards['val']}'",
            "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=16", "trainer=debug", "logger=none",
            f"run_dir={run_dir}", *overrides])


AE = ["model=autoencoder_kl_tiny", "++model.task.loss.perceptual_weight=0"]


def ldm(first_stage):
    return ["model=ldm_txt2img_tiny", f"model.first_stage.ckpt={first_stage}", "model.task.sample_steps=2"]


def metrics(run_dir) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for row in (Path(run_dir) / "metrics.csv").read_text().splitlines()[1:]:
        step, name, value = row.split(",")
        series.setdefault(name, []).append((int(step), float(value)))
    return series


# ------------------------------------------------------------------------------------------- FLOP counts
def closed_form_step_flops(module: nn.Module, run) -> int:
    """Closed form of `run()` (a forward and a backward): for every Conv2d / Linear call, 2·MACs forward,
    the same again for the weight gradient, and again for the input gradient when the input requires
    one; for every CrossAttention call, 4·B·H·Lq·Lk·D forward and 10·B·H·Lq·Lk·D backward (the fused
    kernels recompute the scores: 5 matmuls). From shapes seen by forward hooks, not from the dispatcher."""
    from ldm.modules.attention import CrossAttention

    total = [0]

    def layer(m, inputs, out):
        x = inputs[0]
        per_out = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        total[0] += 2 * out.numel() * per_out * (2 + x.requires_grad)

    def attention(m, inputs, out):
        x, context = inputs[0], (inputs[1] if len(inputs) > 1 and inputs[1] is not None else inputs[0])
        total[0] += 14 * x.shape[0] * m.heads * x.shape[1] * context.shape[1] * m.dim_head

    hooks = [m.register_forward_hook(attention if isinstance(m, CrossAttention) else layer)
             for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, CrossAttention))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def test_flops_of_a_conv_linear_stack_are_the_closed_form():
    b, c, h, w, hidden = 3, 4, 8, 8, 10
    model = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    x = torch.randn(b, c, h, w)
    conv1 = 2 * b * 8 * h * w * c * 9  # forward; its input needs no gradient: + weight grad only
    conv2 = 2 * b * 8 * 4 * 4 * 8 * 9  # + weight grad + input grad
    fc1, fc2 = 2 * b * 128 * hidden, 2 * b * hidden
    expected = 2 * conv1 + 3 * conv2 + 3 * fc1 + 3 * fc2
    assert count_flops(lambda: model(x).sum().backward()) == expected
    assert closed_form_step_flops(model, lambda: model(x).sum().backward()) == expected


def test_sdpa_on_cpu_is_counted():
    """torch 2.14's FlopCounterMode counts 0 for SDPA on CPU (its CPU kernel has no formula): ours counts
    the CUDA kernels' 4·B·H·L²·D forward + 10·B·H·L²·D backward."""
    b, heads, length, dim = 2, 4, 64, 16
    q, k, v = (torch.randn(b, heads, length, dim, requires_grad=True) for _ in range(3))
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert flops == 14 * b * heads * length * length * dim


def test_flops_of_a_tiny_unet_step_are_the_closed_form():
    from ldm.models.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=16, num_res_blocks=1, attention_resolutions=[1, 2],
                     channel_mult=[1, 2], num_head_channels=8, context_dim=24, norm_groups=8)
    x, t, context = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 5, 24)

    def step():
        unet(x, t, context).square().mean().backward()

    expected = closed_form_step_flops(unet, step)
    assert expected > 0 and count_flops(step) == expected


@pytest.mark.parametrize("size, tflop", [(32, 0.542), (64, 2.470)])
def test_sd_unet_step_counts_on_cpu_what_torch_counted_on_an_h200(size, tflop):
    """The SD-v1 UNet (859.5M parameters) training step at 32² / 64² latents, on fake tensors (no memory,
    no compute): 0.542 / 2.470 TFLOP per image, the figures FlopCounterMode gave on an H200.
    The stock counter on CPU misses the attention (and counts activation checkpointing's recomputation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ldm.models.unet import UNetModel
    from ldm.training.blocks import apply_activation_checkpointing

    with FakeTensorMode():
        unet = UNetModel(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                         attention_resolutions=[4, 2, 1], num_heads=8, context_dim=768)
        apply_activation_checkpointing(unet, "full")
        x, t, context = torch.randn(1, 4, size, size), torch.randint(0, 1000, (1,)), torch.randn(1, 77, 768)
        flops = count_flops(lambda: unet(x, t, context).square().mean().backward())
    assert abs(flops / 1e12 - tflop) < 0.0005


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def test_activation_checkpointing_recomputation_is_not_counted():
    """MFU counts model FLOPs: a checkpointed block costs the same as a plain one."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(3)]
    plain, checkpointed = nn.Sequential(*blocks), nn.Sequential(*[Checkpointed(b) for b in blocks])
    x = torch.randn(8, 32, requires_grad=True)
    flops = count_flops(lambda: plain(x).sum().backward())
    assert flops == 3 * 3 * 2 * (2 * 8 * 32 * 64)  # 3 blocks x 2 layers x (fwd + 2 grads), every input needs a grad
    assert count_flops(lambda: checkpointed(x).sum().backward()) == flops


def test_counting_a_step_changes_nothing():
    """count_step_flops on the real task and batch: parameters, gradients, buffers and both RNG streams
    as before, so the step that follows is the same as without counting (stage 1: BatchNorm buffers in the
    PatchGAN, the adaptive weight's autograd.grad; the GAN phase costs more)."""
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*AE, "model.task.loss.disc_start=1", "data=shapes", "data.shards=x",
                                          "run_dir=x"])
    torch.manual_seed(0)
    task = instantiate(cfg.model.task)
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "key": ["a", "b"]}
    state = {k: v.clone() for k, v in task.state_dict().items()}
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    before_gan = count_step_flops(task, batch, step=0)
    with_gan = count_step_flops(task, batch, step=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in task.parameters())
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in state.items())  # buffers and weights
    assert 0 < before_gan < with_gan and task.step_phase(0) != task.step_phase(1)
    loss, _ = task(batch, 1)
    fresh = instantiate(cfg.model.task)  # never counted
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    assert torch.equal(loss, fresh(batch, 1)[0])


# ------------------------------------------------------------------------------------------ meter math
class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_rates_from_an_injected_clock():
    clock = FakeClock()
    meter = ThroughputMeter(world_size=2, peak_tflops=4.0, clock=clock)
    for _ in range(3):  # 3 micro-batches of 8 images: 1 s waiting for data, 1 s computing each
        with meter.waiting():
            clock.now += 1.0
        clock.now += 1.0
        meter.add(8, 8 * 1e12)
    with meter.excluded():  # an evaluation: out of the window
        clock.now += 50.0
    values = meter.read()
    assert values == {"train/img_per_s": 3 * 8 * 2 / 6, "train/data_wait": 0.5, "train/tflops": 24 / 6,
                      "train/mfu": 24 / 6 / 4.0}
    clock.now += 2.0  # the next window starts at the read
    meter.add(4, 4e12)
    assert meter.read()["train/img_per_s"] == 4 * 2 / 2.0
    assert "train/mfu" not in ThroughputMeter(peak_tflops=None, clock=clock).read()


def test_default_peak_and_its_validation(tmp_path):
    assert default_peak_tflops("cuda", "bf16") == 989.0 and default_peak_tflops("cuda", "no") == 494.5
    assert default_peak_tflops("cpu", "bf16") is None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*AE, "data=shapes", "data.shards=x", "run_dir=x", "trainer.peak_tflops=0"])
    with pytest.raises(ConfigError, match="trainer.peak_tflops=0"):
        check_trainer(cfg)


# ------------------------------------------------------------------------- the real loop, in-process
SYNCS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__"}
# Tensors that live on the host also on a GPU run, so reading them is no device sync:
HOST_SIDE = {
    ("ldm/training/preemption.py", "agreed"),  # the stop flag, all-reduced over a CPU (gloo) group
    ("ldm/modules/conditioning.py", "_captions_with_nulls"),  # the CFG drop mask, drawn on the host (asserted)
    ("torch/utils/data/dataloader.py", None),  # the loader, before to_device (e.g. its workers' base seed)
}


class SyncRecorder(TorchFunctionMode):
    """Records every host read of a tensor's value (item, float, bool, ... : on a GPU each one waits for
    the device queue to drain) with the training step it happened in."""

    def __init__(self, also_allowed=frozenset()):
        super().__init__()
        self.step, self.events, self.allowed = None, [], HOST_SIDE | set(also_allowed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS and self.step is not None:
            stack = traceback.extract_stack()[:-1]
            if not any(f.filename.endswith(path) and fn in (None, f.name) for f in stack for path, fn in self.allowed):
                self.events.append((self.step, name, "".join(traceback.format_list(stack[-4:]))))
        return func(*args, **(kwargs or {}))


def run_recording_syncs(cfg, monkeypatch, also_allowed=frozenset()):
    """train(cfg) with every sync recorded by the step index it happened in (0-based: the log block of
    step index s logs step s + 1)."""
    from ldm.training import loop, step

    recorder = SyncRecorder(also_allowed)
    per_step = cfg.trainer.batch_size // (cfg.trainer.micro_batch_size or cfg.trainer.batch_size)
    real_seed = step.micro_batch_seed

    def seed(s, index):
        recorder.step = index // per_step  # one process
        return real_seed(s, index)

    monkeypatch.setattr(step, "micro_batch_seed", seed)
    with recorder:
        loop.train(cfg)
    return recorder.events


def assert_syncs_only_at_log_steps(events, cfg):
    log_steps = {s for s in range(cfg.trainer.max_steps)
                 if (s + 1) % cfg.trainer.log_every == 0 or s + 1 == cfg.trainer.max_steps}
    outside = [f"step index {s}: {name}\n{where}" for s, name, where in events if s not in log_steps]
    assert not outside, "host syncs inside the step:\n" + "\n".join(outside[:5])
    assert {s for s, _, _ in events} == log_steps  # the recorder sees the log steps' reads: it is not blind


@pytest.mark.slow
def test_stage1_step_is_sync_free_and_logs_the_meter(shapes_shards, tmp_path, monkeypatch, capsys):
    """Stage 1 (two optimizers, the GAN phase starting at step 1: a second FLOP count mid-run) on CPU:
    no host read of a tensor outside log steps. The meter keys reach metrics.csv; MFU with a peak set."""
    cfg = compose_cfg(shapes_shards, tmp_path / "ae", *AE, "model.task.loss.disc_start=1", "trainer.max_steps=5",
                      "trainer.log_every=3", "trainer.ckpt_every=100", "trainer.peak_tflops=0.5")
    assert_syncs_only_at_log_steps(run_recording_syncs(cfg, monkeypatch), cfg)
    series = metrics(tmp_path / "ae")
    for key in ("train/img_per_s", "train/tflops", "train/mfu", "train/data_wait"):
        assert [s for s, _ in series[key]] == [3, 5], key
    assert all(v > 0 for _, v in series["train/tflops"]) and all(0 <= v < 1 for _, v in series["train/data_wait"])
    assert all(math.isclose(m, t / 0.5, rel_tol=1e-5)  # (metrics.csv keeps 6 digits)
               for (_, m), (_, t) in zip(series["train/mfu"], series["train/tflops"]))
    out = capsys.readouterr().out
    assert "GFLOP per image per training step from step 0" in out and "from step 1" in out  # the GAN phase


def test_stage2_step_is_sync_free_and_eval_stays_out_of_the_window(shapes_shards, tiny_autoencoder, tmp_path,
                                                                  monkeypatch):
    """Stage 2 (text conditioning with CFG dropout, EMA, 2 accumulation micro-steps): no host sync outside
    log steps. An evaluation that takes 1000 s on the meter's clock does not lower img/s."""
    from ldm.tasks import latent_diffusion
    from ldm.training import loop, step

    devices = []
    real_mask = latent_diffusion.sample_drop_mask
    monkeypatch.setattr(latent_diffusion, "sample_drop_mask",
                        lambda *a, **k: devices.append(str(k.get("device"))) or real_mask(*a, **k))
    lag = [0.0]  # the meter's clock: real time plus 1000 s per evaluation
    monkeypatch.setattr(step, "ThroughputMeter",
                        functools.partial(ThroughputMeter, clock=lambda: time.perf_counter() + lag[0]))
    real_evaluate = loop.evaluate

    def slow_evaluate(*args, **kwargs):
        lag[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    cfg = compose_cfg(shapes_shards, tmp_path / "ldm", *ldm(tiny_autoencoder), "trainer.max_steps=4",
                      "trainer.batch_size=4", "trainer.micro_batch_size=2", "trainer.log_every=3",
                      "trainer.eval_every=1", "trainer.ckpt_every=100")
    # evaluation runs between steps and reads its metrics on the host: its reads are not the step's
    events = run_recording_syncs(cfg, monkeypatch, also_allowed={("ldm/training/loop.py", "evaluate")})
    assert_syncs_only_at_log_steps(events, cfg)
    assert set(devices) == {"cpu"}  # the drop mask read in _captions_with_nulls is a host tensor on GPUs too
    series = metrics(tmp_path / "ldm")
    assert "train/mfu" not in series  # no peak on CPU
    img_per_s = [v for _, v in series["train/img_per_s"]]
    assert len(img_per_s) == 2 and min(img_per_s) > 4 * 3 / 100  # with the evaluations inside: < 4·3/3000


# ------------------------------------------------------------------------------------------- NaN guard
@pytest.mark.slow
def test_guard_masks_optimizer_and_ema_on_the_device(shapes_shards, tiny_autoencoder, tmp_path, monkeypatch):
    """Steps 2 and 3 of 5 get a NaN loss: the fused AdamW's step count and the EMA's update count say 3
    (the masked steps left them untouched), the weights stay finite, two skips are logged. The stop check
    runs at log steps only (log_every=100: at the end), and 2 < max_bad_steps=3 lets the run finish."""
    from safetensors.torch import load_file

    from ldm.tasks.latent_diffusion import LatentDiffusionTask

    from ldm.training.loop import train

    real_forward = LatentDiffusionTask.forward

    def nan_at(bad_steps):  # step indices (0-based) whose loss is NaN
        def forward(self, batch, step):
            loss, logs = real_forward(self, batch, step)
            return (loss * float("nan"), logs) if step in bad_steps else (loss, logs)
        return forward

    monkeypatch.setattr(LatentDiffusionTask, "forward", nan_at({1, 2}))
    run_dir = tmp_path / "ldm"

    train(compose_cfg(shapes_shards, run_dir, *ldm(tiny_autoencoder), "trainer.max_steps=5", "trainer.log_every=100",
                      "trainer.ckpt_every=100", "trainer.max_bad_steps=3"))
    last = run_dir / "checkpoints/step_00000005"
    optim = torch.load(last / "training.pt", weights_only=True)["optimizers"]["unet"]["state"]
    assert {float(s["step"]) for s in optim.values()} == {3.0}
    ema = load_file(last / "ema.safetensors")
    assert int(ema["num_updates"]) == 3 and all(torch.isfinite(v).all() for v in ema.values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in load_file(last / "model.safetensors").values() if v.is_floating_point())
    assert metrics(run_dir)["train/skipped_steps"] == [(5, 2.0)]

    monkeypatch.setattr(LatentDiffusionTask, "forward", nan_at({0, 1, 2}))
    with pytest.raises(NonFiniteError, match="stopping at step 4: 3 steps in a row"):  # found at the next check
        train(compose_cfg(shapes_shards, tmp_path / "stop", *ldm(tiny_autoencoder), "trainer.max_steps=5",
                          "trainer.log_every=4", "trainer.ckpt_every=100", "trainer.max_bad_steps=3"))
    assert not (tmp_path / "stop/checkpoints").exists()  # stopped at step 4, before any checkpoint


def test_optimizer_benchmark_runs():
    """The BENCHMARKS.md command (fewer steps): fused, foreach and the for-loop side by side."""
    command = [sys.executable, "benchmarks/bench_optimizer.py", "--model", "ldm_txt2img_demo", "--steps", "2",
               "--rounds", "1"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio fused / foreach = " in proc.stdout and "max |fused - foreach| weight difference" in proc.stdout
