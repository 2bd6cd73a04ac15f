"""AdamW step on the demo LDM's trainable parameters: ours (fused=True, what build_optimizers uses) vs
foreach=True (what it used before) vs PyTorch's CPU default (the per-tensor for-loop), side by side in
one run, same gradients, the three interleaved in `--rounds` rounds so that load changes hit all alike.

    python benchmarks/bench_optimizer.py --model ldm_txt2img_demo --steps 30

Prints the median step time of each, the ratios, and how far the fused weights drift from foreach's
after the same steps (rounding only); BENCHMARKS.md has the results.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
KINDS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def params_of(model: str) -> list[torch.nn.Parameter]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    torch.manual_seed(0)
    text = instantiate(cfg.model.task.conditioner)
    unet = instantiate(cfg.model.task.unet)(in_channels=4, out_channels=4, context_dim=text.context_dim)
    params = list(unet.parameters()) + list(text.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def step_times(source, steps: int, **kind) -> tuple[list[float], list[torch.Tensor]]:
    """Step times of a fresh AdamW over copies of `source` (same gradients), and the weights it ends with."""
    params = [p.detach().clone().requires_grad_() for p in source]
    for p, s in zip(params, source):
        p.grad = s.grad
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kind)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        opt.step()
        if i >= 3:  # the first steps allocate the moment buffers
            times.append(time.perf_counter() - start)
    return times, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ldm_txt2img_demo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    params = params_of(args.model)
    times, weights = {k: [] for k in KINDS}, {}
    for _ in range(args.rounds):
        for name, kind in KINDS.items():
            t, weights[name] = step_times(params, args.steps, **kind)
            times[name] += t
    median = {k: statistics.median(v) for k, v in times.items()}
    drift = max(float((a - b).abs().max()) for a, b in zip(weights["fused"], weights["foreach"]))
    print(f"{args.model}: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors, "
          f"{torch.get_num_threads()} threads")
    print("AdamW step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in median.items())
          + f"; ratio fused / foreach = {median['fused'] / median['foreach']:.3f}, "
            f"fused / for-loop = {median['fused'] / median['for-loop']:.3f}")
    print(f"after {args.steps + 3} steps, max |fused - foreach| weight difference = {drift:.3g}")


if __name__ == "__main__":
    main()
