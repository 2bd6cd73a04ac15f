"""Stage-1 training step: ours (ONE encode/decode feeds both the generator and the discriminator
losses, one backward) vs the CompVis/taming pattern (Lightning calls training_step once per optimizer,
so the autoencoder forward is recomputed for the discriminator step), side by side in one run.

    python benchmarks/bench_ae_step.py --model autoencoder_kl_demo --size 64 --batch 16 --steps 10

Prints the median step time of each and their ratio (and img/s); BENCHMARKS.md has the results.
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


def build(model: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "model.task.loss.disc_start=0"])
    torch.manual_seed(0)
    task = instantiate(cfg.model.task)
    groups = task.param_groups()
    opts = {k: torch.optim.AdamW(v, lr=1e-4, betas=(0.5, 0.9)) for k, v in groups.items()}
    return task, opts


def ours(task, opts, x, step):
    loss, _ = task({"image": x}, step)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts.values():
        o.step()


def recomputing(task, opts, x, step):
    """Reference: the taming/LDM schedule, one forward + backward per optimizer. The generator pass
    needs the discriminator's logits on the reconstruction; the discriminator pass re-runs encode/decode.
    (Each pass here evaluates both loss terms; the discriminator is small, so this slightly overstates
    the reference's cost compared with taming, which evaluates one term per pass.)"""
    for name in ("autoencoder", "discriminator"):
        loss, _ = task({"image": x}, step)  # full forward again, as Lightning's per-optimizer training_step
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()


def timeit(fn, task, opts, x, steps: int) -> float:
    fn(task, opts, x, 0)  # warm-up
    times = []
    for i in range(steps):
        start = time.perf_counter()
        fn(task, opts, x, i + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="autoencoder_kl_demo")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = p.parse_args()
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    results = {}
    for name, fn in (("ours", ours), ("recompute", recomputing)):
        task, opts = build(args.model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            results[name] = timeit(fn, task, opts, x, args.steps)
    for name, t in results.items():
        print(f"{name:>10}: {t * 1000:8.1f} ms/step  {args.batch / t:7.1f} img/s")
    print(f"     ratio: ours / recompute = {results['ours'] / results['recompute']:.3f} "
          f"({args.model}, {args.size}px, batch {args.batch}, threads {torch.get_num_threads()}, bf16 {args.bf16})")


if __name__ == "__main__":
    main()
