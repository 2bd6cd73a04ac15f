"""Cost of the step guard's `update()` per optimizer step: the non-finite check alone (trainer.spike.enabled
=false) vs with the spike guard (running median over `trainer.spike.window` steps), on this device, with
the norms of two parameter groups (stage 1). Both run interleaved in `--rounds` rounds so that load
changes hit both alike; a GPU run synchronises before reading the clock.

    python benchmarks/bench_guard.py --steps 2000 --window 100

Prints the median time per update of each and the difference; BENCHMARKS.md has the results.
"""
import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from ldm.config import SpikeConfig
from ldm.training.guard import StepGuard


def time_updates(guard: StepGuard, steps: int, device: str) -> float:
    loss, norms = torch.tensor(0.5, device=device), {"a": torch.tensor(1.0, device=device),
                                                      "b": torch.tensor(2.0, device=device)}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        guard.update(loss, norms, 0)
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    spike = OmegaConf.structured(SpikeConfig(window=args.window))
    guards = {"non-finite only": StepGuard(20, lambda t: t, device=args.device),
              "with spike guard": StepGuard(20, lambda t: t, device=args.device, spike=spike)}
    times = {k: [] for k in guards}
    for _ in range(args.rounds):
        for name, guard in guards.items():
            times[name].append(time_updates(guard, args.steps, args.device))
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, t in medians.items():
        print(f"{name:>18}: {t * 1e6:8.1f} us per step ({args.device}, window {args.window})")
    added = medians["with spike guard"] - medians["non-finite only"]
    print(f"{'spike guard adds':>18}: {added * 1e6:8.1f} us per step")


if __name__ == "__main__":
    main()
