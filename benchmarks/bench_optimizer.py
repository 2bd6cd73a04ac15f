"""AdamW step on the demo LDM's trainable parameters: ours (foreach=True, what build_optimizers uses) vs
PyTorch's CPU default (the per-tensor for-loop), side by side in one run, same gradients.

    python benchmarks/bench_optimizer.py --model ldm_txt2img_demo --steps 30

Prints the median step time of each and their ratio; BENCHMARKS.md has the results.
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


def median_step(params, foreach: bool, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        opt.step()
        if i >= 3:  # the first steps allocate the moment buffers
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ldm_txt2img_demo")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    params = params_of(args.model)
    loop = median_step(params, foreach=False, steps=args.steps)
    ours = median_step(params, foreach=True, steps=args.steps)
    print(f"{args.model}: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors, "
          f"{torch.get_num_threads()} threads")
    print(f"AdamW step: ours (foreach) {ours * 1e3:.1f} ms, for-loop {loop * 1e3:.1f} ms, "
          f"ratio ours / for-loop = {ours / loop:.3f}")


if __name__ == "__main__":
    main()
