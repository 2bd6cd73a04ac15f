"""Activation checkpointing (none | full | selective) on a UNet training step: step time and peak
activation memory, side by side in ONE process on ONE model (the modes are switched in place and their
steps interleaved, so load on a shared machine hits them alike).

    python benchmarks/bench_checkpointing.py --model sd_v1 --sizes 32 64 --batch 1 --steps 3

`--model` names a conf/model preset; its UNet is built with 4 latent channels and the context width of
its conditioner (768 for sd_v1's CLIP-L). Memory is the process's peak RSS during fwd+bwd minus its RSS
before (weights and gradients already allocated): the activations and temporaries of the step. glibc is
told to mmap every allocation above 64 KiB, so freed activations leave the RSS at once (the script
re-executes itself with MALLOC_MMAP_THRESHOLD_ set). On CUDA the same numbers come from
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import register_configs
from ldm.training.blocks import MODES, apply_activation_checkpointing

CONF = Path(__file__).resolve().parents[1] / "conf"
CONTEXT = {"sd_v1": 768, "sd_v2": 1024, "ldm_txt2img": 1280}


def build_unet(model: str, context_dim: int | None):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    if context_dim is None:
        context_dim = CONTEXT.get(model, cfg.model.task.conditioner.get("dim"))
    torch.manual_seed(0)
    return instantiate(cfg.model.task.unet)(in_channels=4, out_channels=4, context_dim=context_dim), context_dim


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def step(model, x, t, context) -> tuple[float, float, int]:
    """One fwd+bwd: (wall seconds, process CPU seconds, activation bytes at the peak). On a shared CPU the
    CPU time moves much less with the load than the wall time does."""
    cuda = x.is_cuda
    if cuda:
        torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() if cuda else rss()
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    model(x, t, context=context).float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return seconds, cpu, peak - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd_v1")
    p.add_argument("--context-dim", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[32], help="latent sizes (32 = 256 px with f=8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up step each")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, context_dim = build_unet(args.model, args.context_dim)
    model.to(device)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model} UNet: {n:,} parameters, batch {args.batch}, {torch.get_num_threads()} threads, {device}, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 4, size, size, generator=g).to(device)
        context = torch.randn(args.batch, 77, context_dim, generator=g).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
        samples = {m: ([], [], []) for m in args.modes}  # wall, cpu, activation bytes
        for i in range(args.steps + 1):  # round-robin: step i of every mode, then step i + 1
            for mode in args.modes:
                apply_activation_checkpointing(model, mode)
                seconds, cpu, activations = step(model, x, t, context)
                print(f"  {size}x{size} {mode:>9} step {i}: wall {seconds:7.2f} s, cpu {cpu:7.2f} s, activations "
                      f"{activations / 2**30:6.2f} GiB{' (warm-up)' if i == 0 else ''}", flush=True)
                if i:
                    for series, value in zip(samples[mode], (seconds, cpu, activations)):
                        series.append(value)
        for mode in args.modes:
            wall, cpu, activations = samples[mode]
            rows.append((size, mode, statistics.median(wall), statistics.median(cpu), max(activations)))
    print(f"\nlatents  mode       wall s  vs {args.modes[0]}   cpu s  vs {args.modes[0]}  activations GiB  vs {args.modes[0]}"
          f"   (load {os.getloadavg()[0]:.2f})")
    for size, mode, wall, cpu, activations in rows:
        base = next(r for r in rows if r[0] == size and r[1] == args.modes[0])
        print(f"{size:>3}x{size:<3}  {mode:<9} {wall:7.2f}  {wall / base[2]:6.2f}x  {cpu:7.2f}  {cpu / base[3]:6.2f}x  "
              f"{activations / 2**30:13.2f}  {activations / base[4]:6.2f}x")


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    main()
