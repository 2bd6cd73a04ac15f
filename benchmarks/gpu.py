"""Training speed on a CUDA machine, ours against diffusers side by side in ONE process.
Prints one table last: img/s, TFLOP/s, MFU, peak memory and a ratio per row.

    python benchmarks/gpu.py                        # on a GPU: unet, ae, loop (estimated 7-9 min on an H200)
    python benchmarks/gpu.py --only unet --steps 20 --variants eager,compile,diffusers
    python benchmarks/gpu.py --tiny                 # the same code paths at tiny sizes on CPU (a test runs it)

Parts (--only):
  unet  SD-v1 UNet training step (859,520,964 parameters; fwd + bwd + AdamW step, bf16 autocast) at 256 px
        (32x32 latents, batch 64) and 512 px (64x64, batch 32): ours eager, channels_last, activation
        checkpointing full/selective and regional compile (ldm.training.blocks) against diffusers'
        UNet2DConditionModel built from the same config (eager, and with its gradient checkpointing).
        ratio = img/s / diffusers eager at the same size.
  ae    KL-f8 autoencoder (83,653,863 parameters) fwd + bwd + AdamW with an L1 + KL loss, 256 px, batch 32,
        against diffusers' AutoencoderKL with SD's VAE config. ratio = img/s / diffusers.
  loop  the real stage-2 loop: train/main.py model=sd_v1 in a subprocess on synthetic JPEG shards, with a
        random-init KL-f8 first stage and a random-init CLIP ViT-L/14-sized text encoder, reading
        train/img_per_s (and train/mfu, train/data_wait where the meter logs them) from metrics.csv; with
        online encoding and, where train/cache_latents.py exists, from the latent cache.
        ratio = loop img/s / the bare UNet step with the same settings (target: >= 0.85).

Weights are random (nothing is downloaded). FLOPs per image are counted once per model and size with
torch's FlopCounterMode at batch 1 (attention counted through the math SDPA kernel); MFU = TFLOP/s over
--peak-tflops (989: H100/H200 dense bf16). Compile rows run last, so --budget cuts them first.
The in-process parts need torch (+ diffusers for its rows); the loop needs the project's dependencies
(hydra-core, omegaconf, webdataset). docs/gpu.md says how to carry them to a GPU box.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.convert.arch import SD_SCALE_FACTOR, diffusers_unet_config, diffusers_vae_config  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

SD_UNET_PARAMS, KL_F8_PARAMS = 859_520_964, 83_653_863  # the paper's SD-v1 UNet and KL-f8 autoencoder
TOKENS = 77  # CLIP's context length: the UNet attends to (B, 77, context_dim)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)  # SD-v1's
# --tiny: the same presets shrunk to run in seconds on a CPU (every code path, no speed meaning).
TINY_UNET = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2], num_heads=2)
TINY_AE = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Setup:
    """One way of running a UNet step. ckpt: none | full | selective (ldm.training.blocks); for diffusers,
    full = its enable_gradient_checkpointing()."""
    impl: str = "ours"
    channels_last: bool = False
    ckpt: str = "none"
    compile: bool = False

    def label(self) -> str:
        parts = [self.impl] + ["channels_last"] * self.channels_last + [f"ckpt {self.ckpt}"] * (self.ckpt != "none")
        parts += ["compile"] * self.compile
        return " + ".join(parts) if len(parts) > 1 else f"{self.impl} eager"


UNET_VARIANTS = {
    "eager": Setup(),
    "channels_last": Setup(channels_last=True),
    "ckpt_full": Setup(channels_last=True, ckpt="full"),
    "ckpt_selective": Setup(channels_last=True, ckpt="selective"),
    "compile": Setup(channels_last=True, compile=True),
    "compile_selective": Setup(channels_last=True, ckpt="selective", compile=True),
    "diffusers": Setup("diffusers"),
    "diffusers_ckpt": Setup("diffusers", ckpt="full"),
}
DEFAULT_VARIANTS = "eager,channels_last,ckpt_full,ckpt_selective,compile,diffusers,diffusers_ckpt"


class Skipped(Exception):
    """A row that cannot run here (a missing module or package); the table says why."""


@dataclass
class Row:
    part: str
    setting: str
    px: int
    batch: int
    img_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    ratio: float | None = None
    note: str = ""
    key: tuple = ()  # (Setup, px, batch) of a UNet row, to find it again as a reference


# ------------------------------------------------------------------------------------ models and steps
def preset(name: str, node: str) -> dict:
    """Constructor arguments of `task.<node>` in conf/model/<name>.yaml (read as plain YAML: no Hydra; a
    `# @package _global_` preset holds them under `model:`)."""
    doc = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    config = doc.get("model", doc)["task"][node]
    return {k: v for k, v in config.items() if not k.startswith("_")}


def unet_arch(tiny: bool) -> dict:
    arch = preset("sd_v1", "unet")
    arch.update(in_channels=4, out_channels=4, context_dim=(TINY_TEXT if tiny else CLIP_L_TEXT)["hidden_size"])
    return {**arch, **(TINY_UNET if tiny else {})}


def ae_arch(tiny: bool) -> dict:
    return {**preset("autoencoder_kl_f8", "autoencoder"), **(TINY_AE if tiny else {})}


def diffusers_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def blocks():
    try:
        import ldm.training.blocks as module
    except ImportError as error:
        missing = getattr(error, "name", None)
        extra = "" if missing in ("ldm.training.blocks", None) else f" ({error})"
        raise Skipped(f"ldm.training.blocks not available{extra}") from None
    return module


def diffusers_module():
    try:
        import diffusers
    except ImportError as error:
        raise Skipped(f"diffusers not importable ({error}); carry its wheel: docs/gpu.md") from None
    return diffusers


def build_unet(setup: Setup, arch: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # random init straight on the GPU: seconds, not a minute on the host
        if setup.impl == "diffusers":
            model = diffusers_module().UNet2DConditionModel(**diffusers_kwargs(diffusers_unet_config(arch)))
            if setup.ckpt == "full":
                model.enable_gradient_checkpointing()
        else:
            model = UNetModel(**arch)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if setup.impl == "ours" and setup.ckpt in ("full", "selective"):
        blocks().apply_activation_checkpointing(model, setup.ckpt)
    if setup.compile:
        blocks().compile_blocks(model)
    return model.train()


def adamw(model: torch.nn.Module, setup_impl: str, device: torch.device) -> torch.optim.Optimizer:
    """Ours: fused AdamW on CUDA; diffusers: torch's default, as its training scripts do."""
    fused = setup_impl == "ours" and device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if fused else {}))


def autocast(device: torch.device):
    # bf16 on CUDA; on CPU the step stays fp32 (bf16 autocast made small models slower there: BENCHMARKS.md)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def unet_batch(arch: dict, px: int, batch: int, device: torch.device, channels_last: bool) -> dict:
    g = torch.Generator(device).manual_seed(0)
    side = px // 8  # KL-f8 latents
    x = torch.randn(batch, arch["in_channels"], side, side, device=device, generator=g)
    return {"x": x.to(memory_format=torch.channels_last) if channels_last else x,
            "t": torch.randint(0, 1000, (batch,), device=device, generator=g),
            "context": torch.randn(batch, TOKENS, arch["context_dim"], device=device, generator=g),
            "target": torch.randn(batch, arch["out_channels"], side, side, device=device, generator=g)}


def unet_loss(model, setup: Setup, b: dict, device) -> torch.Tensor:
    with autocast(device):
        if setup.impl == "diffusers":
            out = model(b["x"], b["t"], encoder_hidden_states=b["context"], return_dict=False)[0]
        else:
            out = model(b["x"], b["t"], context=b["context"])
    return F.mse_loss(out.float(), b["target"])


def build_ae(impl: str, arch: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        if impl == "diffusers":
            return diffusers_module().AutoencoderKL(**diffusers_kwargs(diffusers_vae_config(arch, SD_SCALE_FACTOR)))
        return AutoencoderKL(**arch)


def ae_loss(model, impl: str, b: dict, device) -> torch.Tensor:
    """L1 reconstruction + 1e-6 x KL (the paper's kl_weight) through a posterior sample: the encoder and the
    decoder both train, as in stage 1 without LPIPS and the discriminator."""
    with autocast(device):
        if impl == "diffusers":
            posterior = model.encode(b["x"]).latent_dist
            reconstruction = model.decode(posterior.sample()).sample
        else:
            reconstruction, posterior = model(b["x"])
    return (reconstruction.float() - b["x"]).abs().mean() + 1e-6 * posterior.kl().float().mean()


def train_step(model, optimizer, loss_fn):
    def step():
        loss_fn(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no .item(): nothing syncs the host inside the step
    return step


# ------------------------------------------------------------------------------------ measuring
def count_parameters(build) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in build().parameters())


def flops_per_image(loss_fn) -> float:
    """FLOPs of one forward + backward at batch 1 (loss_fn builds its own batch-1 inputs). SDPA runs its
    math kernel here so attention is counted on every device (the CPU flash kernel has no FLOP formula);
    the optimizer step is not counted (elementwise, no matmul)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def timed(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step over `steps` steps after `warmup` untimed ones, seconds of the first step).
    On CUDA the window is bracketed by events, and the queue drained before it starts."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        step()
    sync()
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000 / steps, first
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, first


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def throughput(seconds: float, batch: int, flops: float | None, peak_tflops: float) -> dict:
    img_s = batch / seconds
    tflops = img_s * flops / 1e12 if flops else None
    return {"img_s": img_s, "tflops": tflops, "mfu": tflops / peak_tflops if tflops else None}


class Bench:
    """Runs rows, keeps them, and writes them after each one (a killed run still leaves its numbers)."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.start = args, device, time.perf_counter()
        self.rows: list[Row] = []
        self.flops: dict[tuple, float] = {}
        self.checks: dict[str, object] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def row(self, part: str, setting: str, px: int, batch: int, measure, key: tuple = ()) -> Row:
        row = Row(part, setting, px, batch, key=key)
        if self.args.budget and self.elapsed() > self.args.budget:
            row.note = f"skipped: over --budget {self.args.budget:.0f} s"
        else:
            try:
                for name, value in measure().items():
                    setattr(row, name, value)
            except Skipped as reason:
                row.note = f"skipped: {reason}"
            except Exception as error:  # noqa: BLE001 - an OOM or a compile failure costs one row, not the run
                traceback.print_exc()
                row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            free(self.device)
        self.rows.append(row)
        print(f"[gpu.py] {part:5} {setting:40} {px:4} px x{batch:<3} " + (
            f"{row.img_s:9.2f} img/s" if row.img_s else "") + (f"  peak {row.peak_gib:.1f} GiB" if row.peak_gib else "")
            + (f"  {row.note}" if row.note else ""), flush=True)
        self.write()
        return row

    def find(self, key: tuple) -> Row | None:
        return next((r for r in self.rows if r.key == key and r.img_s), None)

    def write(self) -> None:
        if not self.args.out:
            return
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in dataclasses.asdict(r).items() if k != "key"} for r in self.rows]
        (out / "results.json").write_text(json.dumps({"meta": self.meta(), "checks": self.checks, "rows": rows},
                                                     indent=1, default=str))
        (out / "results.md").write_text(self.markdown())

    def meta(self) -> dict:
        device = torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu"
        return {"device": device, "torch": torch.__version__, "command": " ".join(sys.argv),
                "date": time.strftime("%Y-%m-%d %H:%M"), "tiny": self.args.tiny, "peak_tflops": self.args.peak_tflops,
                "steps": self.args.steps, "warmup": self.args.warmup, "elapsed_s": round(self.elapsed(), 1),
                "flops_per_image": {f"{part}@{px}": f for (part, px), f in self.flops.items()}}

    def table(self, markdown: bool = False) -> str:
        head = ["part", "setting", "px", "batch", "img/s", "TFLOP/s", "MFU", "peak GiB", "ratio", "note"]

        def fmt(value, spec):
            return "–" if value is None else format(value, spec)

        cells = [[r.part, r.setting, str(r.px), str(r.batch), fmt(r.img_s, ".1f"), fmt(r.tflops, ".1f"),
                  fmt(r.mfu and 100 * r.mfu, ".1f") + ("%" if r.mfu else ""), fmt(r.peak_gib, ".1f"),
                  fmt(r.ratio, ".2f") + ("x" if r.ratio else ""), r.note] for r in self.rows]
        if markdown:
            return "\n".join("| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head), *cells])
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
        return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in [head, *cells])

    def markdown(self) -> str:
        meta = self.meta()
        lines = [f"# benchmarks/gpu.py, {meta['date']}", "", f"- device: {meta['device']}, torch {meta['torch']}",
                 f"- command: `{meta['command']}`", f"- checks: {json.dumps(self.checks, default=str)}",
                 f"- FLOPs per image (fwd+bwd): {json.dumps(meta['flops_per_image'])}", "",
                 *targets(self.rows), "", self.table(markdown=True), ""]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ parts
def check_parameters(bench: Bench, tiny: bool) -> None:
    """Before timing: the two UNets (and the two autoencoders) must be the same architecture."""
    arch, ae = unet_arch(tiny), ae_arch(tiny)
    checks = {"unet_ours": count_parameters(lambda: UNetModel(**arch)),
              "ae_ours": count_parameters(lambda: AutoencoderKL(**ae))}
    try:
        d = diffusers_module()
        checks["unet_diffusers"] = count_parameters(
            lambda: d.UNet2DConditionModel(**diffusers_kwargs(diffusers_unet_config(arch))))
        checks["ae_diffusers"] = count_parameters(
            lambda: d.AutoencoderKL(**diffusers_kwargs(diffusers_vae_config(ae, SD_SCALE_FACTOR))))
    except Skipped as reason:
        print(f"[gpu.py] {reason}")
    for name, anchor in (("unet", SD_UNET_PARAMS), ("ae", KL_F8_PARAMS)):
        ours, theirs = checks[f"{name}_ours"], checks.get(f"{name}_diffusers")
        verdict = ("not compared" if theirs is None else "match" if ours == theirs
                   else "MISMATCH: the ratios compare different models")
        anchor_note = "" if tiny else f", reference {anchor:,}" + ("" if ours == anchor else " MISMATCH")
        checks[f"{name}_match"] = theirs is not None and ours == theirs
        print(f"[gpu.py] {name} parameters: ours {ours:,}, diffusers "
              f"{'–' if theirs is None else f'{theirs:,}'} ({verdict}{anchor_note})")
    bench.checks.update(checks)


def unet_flops(bench: Bench, arch: dict, px: int) -> float:
    """FLOPs per image of a UNet training step at `px`, counted once (ours, eager: the model's FLOPs, not
    the recomputation that checkpointing adds)."""
    if ("unet", px) not in bench.flops:
        model, one = build_unet(Setup(), arch, bench.device), unet_batch(arch, px, 1, bench.device, False)
        bench.flops[("unet", px)] = flops_per_image(lambda: unet_loss(model, Setup(), one, bench.device))
        del model, one
        free(bench.device)
        print(f"[gpu.py] unet FLOPs per image at {px} px: {bench.flops[('unet', px)] / 1e9:,.1f} GFLOP")
    return bench.flops[("unet", px)]


def unet_rows(bench: Bench, settings, variants: list[str], arch: dict) -> None:
    for px, batch in settings:
        unet_flops(bench, arch, px)
        for name in variants:
            unet_row(bench, UNET_VARIANTS[name], arch, px, batch)


def unet_row(bench: Bench, setup: Setup, arch: dict, px: int, batch: int, part: str = "unet") -> Row:
    args, device = bench.args, bench.device
    flops = unet_flops(bench, arch, px)

    def measure():
        model = build_unet(setup, arch, device)
        optimizer = adamw(model, setup.impl, device)
        b = unet_batch(arch, px, batch, device, setup.channels_last)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, first = timed(train_step(model, optimizer, lambda m: unet_loss(m, setup, b, device)),
                               args.warmup, args.steps, device)
        result = throughput(seconds, batch, flops, args.peak_tflops)
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if setup.compile:
            result["note"] = f"first step {first:.0f} s (compile)"
        return result

    setting = setup.label() if part == "unet" else f"unet step: {setup.label()}"
    return bench.row(part, setting, px, batch, measure, key=(setup, px, batch))


def ae_rows(bench: Bench, px: int, batch: int, tiny: bool) -> None:
    args, device, arch = bench.args, bench.device, ae_arch(tiny)
    g = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch, 3, px, px, device=device, generator=g) * 2 - 1
    model = build_ae("ours", arch, device)
    bench.flops[("ae", px)] = flops_per_image(lambda: ae_loss(model, "ours", {"x": images[:1]}, device))
    del model
    free(device)
    print(f"[gpu.py] ae FLOPs per image at {px} px: {bench.flops[('ae', px)] / 1e9:,.1f} GFLOP")
    for impl, channels_last in (("ours", False), ("ours", True), ("diffusers", False)):
        def measure():
            model = build_ae(impl, arch, device)
            x = images.to(memory_format=torch.channels_last) if channels_last else images
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            optimizer = adamw(model, impl, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, _ = timed(train_step(model, optimizer, lambda m: ae_loss(m, impl, {"x": x}, device)),
                               args.warmup, args.steps, device)
            result = throughput(seconds, batch, bench.flops[("ae", px)], args.peak_tflops)
            if device.type == "cuda":
                result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            return result

        setting = f"{impl} + channels_last" if channels_last else f"{impl} eager"
        bench.row("ae", setting, px, batch, measure)


# ------------------------------------------------------------------------------------ the real loop
def write_loop_inputs(work: Path, px: int, images: int, tiny: bool) -> dict:
    """Synthetic JPEG shards at `px` (smooth random images, captions of random words), a random-init
    first stage (ours, KL-f8, SD's scale factor) and a random-init CLIP text encoder of SD-v1's size with
    a character-level tokenizer: everything `train/main.py model=sd_v1` reads, nothing downloaded."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    from ldm.data.shards import write_shards
    from ldm.models.autoencoder import save_autoencoder

    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "a", "cat", "dog", "house", "tree", "photo", "of", "large", "small", "the"]

    def samples():
        for i in range(images):
            low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth, JPEG-sized like a photo
            image = Image.fromarray(low).resize((px, px), Image.BICUBIC)
            yield {"key": f"{i:06d}", "image": image, "caption": " ".join(rng.choice(words, 8))}

    shards = write_shards(samples(), str(work / "shards"), max_count=max(1, images // 16), image_format="jpg")
    arch = ae_arch(tiny)
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**arch)
    autoencoder.scale_factor.fill_(SD_SCALE_FACTOR)
    save_autoencoder(autoencoder, work / "autoencoder.safetensors",
                     {"_target_": "ldm.models.autoencoder.AutoencoderKL", **arch})
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1,
             **{t: i + 2 for i, t in enumerate([*letters, *(c + "</w>" for c in letters)])}}
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=TOKENS, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, **(TINY_TEXT if tiny else CLIP_L_TEXT)))
    transformers_logging.disable_progress_bar()
    text.save_pretrained(work / "text_encoder")
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(work / "text_encoder")
    return {"shards": shards.pattern, "first_stage": str(work / "autoencoder.safetensors"),
            "text_encoder": str(work / "text_encoder")}


def loop_overrides(args, inputs: dict, px: int, batch: int, setup: Setup, tiny: bool, cuda: bool) -> list[str]:
    """Hydra overrides of train/main.py for `setup` (channels_last, checkpointing, compile), using the
    trainer keys trainer.activation_checkpointing, trainer.compile and trainer.peak_tflops."""
    flag = {True: "true", False: "false"}
    overrides = [
        "model=sd_v1", "data=webdataset", f"data.shards='{inputs['shards']}'", f"data.image_size={px}",
        f"data.num_workers={1 if tiny else 8}", "data.shuffle_buffer=1000", f"trainer.batch_size={batch}",
        f"trainer.max_steps={args.loop_steps}", f"trainer.log_every={max(1, args.loop_steps // 3)}",
        "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.ckpt_every=1000000", "trainer.lr_warmup_steps=0",
        f"trainer.mixed_precision={'bf16' if cuda else 'no'}", f"trainer.channels_last={flag[setup.channels_last]}",
        "trainer.progress=false", "logger=none", f"model.first_stage.ckpt={inputs['first_stage']}",
        f"model.task.conditioner.name_or_path={inputs['text_encoder']}", "model.task.sample_steps=2"]
    if tiny:
        overrides += ["trainer.threads=1"]
        overrides += [f"++model.task.unet.{k}={json.dumps(v).replace(' ', '')}" for k, v in TINY_UNET.items()]
    overrides += [f"trainer.activation_checkpointing={setup.ckpt}", f"trainer.compile={flag[setup.compile]}"]
    return overrides + [f"trainer.peak_tflops={args.peak_tflops}"]


def run_logged(command: list[str], log: Path, timeout: float) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail))
        raise RuntimeError(f"{' '.join(command[1:3])} exited {done.returncode}: {tail[-1] if tail else ''}")


def loop_metrics(run_dir: Path) -> dict[str, float]:
    """Mean of each train/ metric over the logged windows, the first (start-up, warm-up) left out."""
    series: dict[str, list[float]] = {}
    with (run_dir / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            series.setdefault(row["name"], []).append(float(row["value"]))
    return {name: sum(v[1:] or v) / len(v[1:] or v) for name, v in series.items() if name.startswith("train/")}


def loop_run(bench: Bench, inputs: dict, work: Path, px: int, batch: int, setup: Setup, cached: bool,
             reference: Row | None) -> dict:
    """One train/main.py run (after building the latent cache, if `cached`), measured from its metrics.csv."""
    args, tiny = bench.args, bench.args.tiny
    overrides = loop_overrides(args, inputs, px, batch, setup, tiny, bench.device.type == "cuda")
    if cached:
        cache = work / f"latents-{px}"
        run_logged([sys.executable, "train/cache_latents.py", *overrides, "--out", str(cache)],
                   work / f"cache-{px}.log", args.loop_timeout)
        overrides.append(f"data.latents={cache}")
    run_dir = work / f"run-{px}-{'cached' if cached else 'online'}"
    run_logged([sys.executable, "train/main.py", *overrides, f"run_dir={run_dir}"], work / f"{run_dir.name}.log",
               args.loop_timeout)
    metrics = loop_metrics(run_dir)
    shutil.rmtree(run_dir)  # an SD-v1 checkpoint (weights + EMA + Adam) is ~14 GB: keep the disk free
    result = throughput(batch / metrics["train/img_per_s"], batch, bench.flops.get(("unet", px)), args.peak_tflops)
    notes = [] if "train/mfu" not in metrics else ["MFU from train/mfu"]
    result["mfu"] = metrics.get("train/mfu", result["mfu"])
    if "train/data_wait" in metrics:
        notes.append(f"data_wait {100 * metrics['train/data_wait']:.0f}%")
    if reference is not None:
        result["ratio"] = result["img_s"] / reference.img_s
        notes.append(f"ratio = loop / unet step '{setup.label()}'")
    result["note"] = "; ".join(notes)
    return result


def loop_rows(bench: Bench, settings, arch: dict) -> None:
    setup = Setup(channels_last=True, ckpt=bench.args.loop_ckpt, compile=bench.args.loop_compile)
    missing = [m for m in ("hydra", "omegaconf", "webdataset") if importlib.util.find_spec(m) is None]
    work = Path(tempfile.mkdtemp(prefix="ldm-gpu-bench-"))
    try:
        inputs, problem = None, Skipped(f"needs {', '.join(missing)}: carry the wheels (docs/gpu.md)")
        if not missing:
            try:
                inputs = write_loop_inputs(work, max(px for px, _ in settings), bench.args.loop_images, bench.args.tiny)
            except Exception as error:  # noqa: BLE001 - say it in the loop rows; the other parts still run
                traceback.print_exc()
                problem = RuntimeError(f"writing the synthetic shards / first stage / text encoder: {error}")
        for px, batch in settings:
            reference = None  # the bare UNet step with the loop's settings: from the unet part, or measured now
            if inputs is not None:
                reference = bench.find((setup, px, batch)) or unet_row(bench, setup, arch, px, batch, part="loop")
                reference = reference if reference.img_s else None
            for cached in (False, True):
                def measure(cached=cached):
                    if inputs is None:
                        raise problem
                    return loop_run(bench, inputs, work, px, batch, setup, cached, reference)

                bench.row("loop", f"sd_v1 loop, {'cached latents' if cached else 'online encode'}", px, batch, measure)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ summary
def set_ratios(rows: list[Row]) -> None:
    """unet and ae rows: / diffusers eager of the same part and size (loop rows carry their own ratio)."""
    for row in rows:
        base = next((r for r in rows if (r.part, r.setting, r.px) == (row.part, "diffusers eager", row.px)
                     and r.img_s), None)
        if row.part in ("unet", "ae") and row.img_s and base:
            row.ratio = row.img_s / base.img_s


def targets(rows: list[Row]) -> list[str]:
    """The speed targets, read off the rows (ratios measured in this one run)."""
    lines = []
    for px in sorted({r.px for r in rows if r.part == "unet"}):
        ours = [r for r in rows if r.part == "unet" and r.px == px and r.setting.startswith("ours") and r.ratio]
        if ours:
            best = max(ours, key=lambda r: r.img_s)
            lines.append(f"- UNet @{px}: best ours '{best.setting}' {best.img_s:.1f} img/s = {best.ratio:.2f}x "
                         f"diffusers eager (target >= 1.35x)")
    ae = [r for r in rows if r.part == "ae" and r.setting.startswith("ours") and r.ratio]
    if ae:
        best = max(ae, key=lambda r: r.img_s)
        lines.append(f"- AE @{best.px}: best ours '{best.setting}' {best.ratio:.2f}x diffusers (target >= 1.0x)")
    lines += [f"- loop @{r.px} with cached latents: {r.ratio:.2f}x the UNet step (target >= 0.85x)"
              for r in rows if r.part == "loop" and r.ratio and "cached" in r.setting]
    return lines


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'256:64,512:32' -> [(256, 64), (512, 32)] (pixels, batch)."""
    try:
        return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"gpu.py: settings {text!r} must look like 256:64,512:32 (px:batch)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="unet,ae,loop", help="parts to run (comma list of unet, ae, loop)")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes on CPU: a code-path check")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 8; --tiny 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"UNet rows, of: {', '.join(UNET_VARIANTS)}")
    p.add_argument("--unet", default=None, help="UNet settings px:batch (default 256:64,512:32)")
    p.add_argument("--ae", default=None, help="autoencoder setting px:batch (default 256:32; --tiny 32:2)")
    p.add_argument("--loop", default=None, help="loop settings px:batch (default 256:64)")
    p.add_argument("--loop-ckpt", default="none", choices=["none", "full", "selective"],
                   help="activation checkpointing of the loop runs and their UNet reference")
    p.add_argument("--loop-compile", action="store_true", help="trainer.compile in the loop runs (and reference)")
    p.add_argument("--loop-steps", type=int, default=None, help="optimizer steps per loop run (default 30; --tiny 3)")
    p.add_argument("--loop-images", type=int, default=None, help="synthetic images (default 1024; --tiny 32)")
    p.add_argument("--loop-timeout", type=float, default=600, help="seconds per train/main.py subprocess")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100/H200 dense bf16: 989)")
    p.add_argument("--budget", type=float, default=480, help="seconds after which no new row starts (0: none)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json / results.md (default $OUT)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 8)
    args.loop_steps = args.loop_steps or (3 if tiny else 30)
    args.loop_images = args.loop_images or (32 if tiny else 1024)
    args.only, args.variants = args.only.split(","), args.variants.split(",")
    unknown = (set(args.only) - {"unet", "ae", "loop"}) | (set(args.variants) - set(UNET_VARIANTS))
    if unknown:
        raise SystemExit(f"gpu.py: unknown part or variant {sorted(unknown)}; parts: unet, ae, loop; "
                         f"variants: {', '.join(UNET_VARIANTS)}")
    args.unet = parse_settings(args.unet or ("64:2" if args.tiny else "256:64,512:32"))
    args.ae = parse_settings(args.ae or ("32:2" if args.tiny else "256:32"))[0]
    args.loop = parse_settings(args.loop or ("64:2" if args.tiny else "256:64"))
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    tiny, parts, variants = args.tiny, args.only, args.variants
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not tiny:
        raise SystemExit("gpu.py: no CUDA device; run with --tiny for the CPU code-path check")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls outside autocast
    unet_settings, ae_setting, loop_settings = args.unet, args.ae, args.loop

    bench = Bench(args, device)
    print(f"[gpu.py] {bench.meta()['device']}, torch {torch.__version__}, {'TINY (code-path check) ' if tiny else ''}"
          f"steps {args.steps} after {args.warmup} warm-up, budget {args.budget:.0f} s", flush=True)
    try:
        check_parameters(bench, tiny)
    except Exception:  # noqa: BLE001 - say it, and measure anyway
        traceback.print_exc()
        print("[gpu.py] the parameter check FAILED (traceback above)")
    arch = unet_arch(tiny)
    eager = [v for v in variants if not UNET_VARIANTS[v].compile]
    compiled = [v for v in variants if UNET_VARIANTS[v].compile]
    for part, run in (("unet", lambda: unet_rows(bench, unet_settings, eager, arch)),
                      ("ae", lambda: ae_rows(bench, *ae_setting, tiny)),
                      ("loop", lambda: loop_rows(bench, loop_settings, arch)),
                      # 512 px first: its target (>= 125 img/s on an H200) is the one --budget must not cut
                      ("unet", (lambda: unet_rows(bench, sorted(unet_settings, reverse=True), compiled, arch))
                       if compiled else None)):
        if part not in parts or run is None:
            continue
        start = time.perf_counter()
        try:
            run()
        except Exception:  # noqa: BLE001 - one broken part must not lose the others' numbers
            traceback.print_exc()
            print(f"[gpu.py] part {part} FAILED (traceback above)")
        free(device)
        print(f"[gpu.py] part {part} done in {time.perf_counter() - start:.0f} s (total {bench.elapsed():.0f} s)",
              flush=True)
    set_ratios(bench.rows)
    bench.write()
    print("\n".join(["", *targets(bench.rows)]))
    if args.out:
        print(f"[gpu.py] wrote {Path(args.out) / 'results.json'} and results.md")
    print("\n" + bench.table(), flush=True)  # the table comes last: the device tool returns the output's tail
    return bench.rows


if __name__ == "__main__":
    main()
