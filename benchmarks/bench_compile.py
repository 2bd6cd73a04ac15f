"""Regional compile (`compile_blocks`) vs eager on a UNet training step (fwd + bwd + AdamW), side by side
in ONE process: two copies of the same model, their steps interleaved so load on a shared machine hits
both alike.

    python benchmarks/bench_compile.py --model ldm_txt2img_demo --batch 32 --steps 10
    python benchmarks/bench_compile.py --model ldm_txt2img_tiny --batch 16 --steps 10

Reports the compile time (the first compiled step minus an eager step; inductor's on-disk cache is
pointed at a fresh directory, so it is a cold compile unless --cache-dir reuses one), the median step
time of each (wall and process CPU time) and their ratio. The first loss of both must agree.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(model: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    conditioner = cfg.model.task.conditioner
    torch.manual_seed(0)
    unet = instantiate(cfg.model.task.unet)(in_channels=4, out_channels=4, context_dim=conditioner.dim)
    return unet, conditioner.max_length, conditioner.dim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ldm_txt2img_demo")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=8, help="latent size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--mode", default="none", help="activation checkpointing of both copies")
    p.add_argument("--cache-dir", default=None, help="inductor cache (default: a fresh one: a cold compile)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    cached = bool(args.cache_dir) and Path(args.cache_dir).is_dir() and any(Path(args.cache_dir).iterdir())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ldm.training.blocks import apply_activation_checkpointing, compile_blocks

    models, opts = {}, {}
    for name in ("eager", "compiled"):
        models[name], tokens, dim = build(args.model)
        apply_activation_checkpointing(models[name], args.mode)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4, foreach=True)
    blocks = compile_blocks(models["compiled"])
    n = sum(q.numel() for q in models["eager"].parameters())
    print(f"{args.model} UNet: {n / 1e6:.2f}M parameters, {blocks} blocks compiled, batch {args.batch} of "
          f"{args.size}x{args.size}x4 latents, context {tokens}x{dim}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    context = torch.randn(args.batch, tokens, dim, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)

    def step(name):
        start, cpu = time.perf_counter(), time.process_time()
        loss = (models[name](x, t, context=context) - x).square().mean()
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu, float(loss.detach())

    eager_first = step("eager")
    compiled_first = step("compiled")
    print(f"first step: eager {eager_first[0]:.2f} s, compiled {compiled_first[0]:.2f} s (compiling); "
          f"loss {eager_first[2]:.6f} vs {compiled_first[2]:.6f}", flush=True)
    samples = {"eager": ([], []), "compiled": ([], [])}
    for _ in range(args.steps):
        for name in samples:
            wall, cpu, _ = step(name)
            samples[name][0].append(wall)
            samples[name][1].append(cpu)
    med = {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in samples.items()}
    print(f"\ncompile time {compiled_first[0] - med['eager'][0]:.1f} s (wall, {'warm' if cached else 'cold'} "
          f"inductor cache); load {os.getloadavg()[0]:.2f}")
    for name, (wall, cpu) in med.items():
        print(f"{name:>9}: {wall * 1e3:8.1f} ms/step wall  {cpu * 1e3:8.1f} ms/step cpu  "
              f"{args.batch / wall:7.1f} img/s")
    print(f"speed-up compiled vs eager: wall {med['eager'][0] / med['compiled'][0]:.2f}x, "
          f"cpu {med['eager'][1] / med['compiled'][1]:.2f}x")


if __name__ == "__main__":
    main()
