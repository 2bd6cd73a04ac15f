"""Time attention backends and one UNet training step on this machine.

    python benchmarks/bench_attention.py                 # demo UNet (8×8×4 latents, batch 64) + backends
    python benchmarks/bench_attention.py --threads 1     # per-core numbers; stable on a shared machine

Reports wall time and process CPU time (the latter barely moves when other jobs share the cores, the
former does: on an oversubscribed 2-core machine two OpenMP threads can be 10× slower than one).
"""
from __future__ import annotations

import argparse
import time

import torch

from ldm.models.unet import UNetModel
from ldm.modules.attention import ATTENTION_BACKENDS

# The demo UNet: 3.2M parameters, attention at 8×8 and 4×4 (+ the 2×2 middle block). One wide head per
# 32 channels: at 64 tokens, 4 heads of 8 channels cost ~5× more than 1 head of 32 on CPU.
DEMO_UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                 attention_resolutions=(1, 2), num_head_channels=32, context_dim=128,
                 use_linear_in_transformer=True)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return sorted(walls)[repeats // 2], sorted(cpus)[repeats // 2]


def unet_step(kwargs: dict, batch: int, tokens: int, bf16: bool, channels_last: bool):
    torch.manual_seed(0)
    model = UNetModel(**kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, kwargs["in_channels"], 8, 8)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    context = torch.randn(batch, tokens, kwargs["context_dim"])
    t = torch.randint(0, 1000, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, context=context)
        loss = (out.float() - x).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16, help="context length M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}")

    for bf16 in (False, True):
        for channels_last in (False, True):
            model, step = unet_step(DEMO_UNET, args.batch, args.tokens, bf16, channels_last)
            wall, cpu = timed(step, args.repeats if not bf16 else 3)
            n = sum(p.numel() for p in model.parameters())
            print(f"demo UNet {n / 1e6:.2f}M fwd+bwd+AdamW batch {args.batch}: bf16={bf16!s:5} "
                  f"channels_last={channels_last!s:5} wall {wall * 1e3:6.0f} ms  cpu {cpu * 1e3:6.0f} ms")

    for length, heads, dim in ((64, 1, 32), (64, 4, 8), (1024, 8, 40), (4096, 8, 40)):
        batch = max(1, 4096 // length)
        for name, attend in ATTENTION_BACKENDS.items():
            q, k, v = (torch.randn(batch, length, heads, dim, requires_grad=True) for _ in range(3))
            try:
                wall, cpu = timed(lambda: attend(q, k, v).sum().backward(), args.repeats)
            except RuntimeError as error:  # xformers off CUDA
                print(f"attention {name:8} L={length}: {str(error).splitlines()[0][:70]}")
                continue
            print(f"attention {name:8} B={batch} L={length} H={heads} D={dim} fwd+bwd: wall {wall * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
