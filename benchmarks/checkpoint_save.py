"""Checkpoint save time and memory, full vs sharded (vs sharded + async), at 2 processes, side by side.

    python benchmarks/checkpoint_save.py --model ldm_txt2img --channels 128 --repeats 3

Launches `accelerate launch --num_processes 2` (gloo, CPU) once per format; each rank builds the preset's
UNet (`--channels` overrides model_channels to fit the machine), its EMA and AdamW with initialised moments,
wraps it in DDP and saves through the real Checkpointer (ldm/training/checkpoint*.py) `--repeats` times
into a scratch run directory. Per save: wall seconds until training could go on (for async: the copy to
memory; the write itself follows in the background), seconds until the checkpoint was complete, and per
rank the peak RSS during the save minus the RSS before it (Linux VmHWM after clear_refs; glibc mmaps
large allocations so freed buffers leave the RSS). Prints one table and the sharded/full ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("full", "sharded", "async")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_checkpointing import peak_rss, reset_peak, rss
    from ldm.training.checkpoint_sharded import ShardedCheckpointer
    from ldm.training.ema import EMA

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    unet = build_unet(args.model, args.channels)
    task = torch.nn.Module()
    task.unet = unet
    model = torch.nn.parallel.DistributedDataParallel(task)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    for p in task.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # the moments exist, as after any training step
    optimizer.zero_grad(set_to_none=True)
    ema = EMA(task.unet)
    guard = SimpleNamespace(state_dict=lambda: {}, recent_skips=lambda: False)
    loader = SimpleNamespace(state_dict=lambda: {"lanes": []})
    spike = SimpleNamespace(window=1, max_weight_change=1e9)
    ckpt = ShardedCheckpointer(args.run_dir, task=model, optimizers={"unet": optimizer}, schedulers={}, ema=ema,
                               loader=loader, guard=guard, meta={"model": "bench"}, rank=rank, world_size=world,
                               barrier=dist.barrier, keep_last=1, spike=spike,
                               checkpoint_format="full" if args.format == "full" else "sharded",
                               background_saves=args.format == "async")
    params = sum(p.numel() for p in task.parameters())
    rows = []
    for i in range(args.repeats):
        dist.barrier()
        before = rss()
        reset_peak()
        start = time.perf_counter()
        ckpt.save(i + 1, "benchmark", background=True)
        resumed = time.perf_counter() - start
        ckpt.wait()  # (a no-op unless the save went to the background)
        dist.barrier()
        complete = time.perf_counter() - start
        rows.append({"rank": rank, "resumed_s": resumed, "complete_s": complete, "peak_extra": peak_rss() - before})
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        directory = Path(args.run_dir) / "checkpoints" / f"step_{args.repeats:08d}"
        files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
        print("RESULT " + json.dumps({"format": args.format, "params": params, "rows": gathered, "files": files}))
    dist.destroy_process_group()


def build_unet(model: str, channels: int | None):
    """The preset's UNet (4 latent channels, its conditioner's context width), model_channels overridden."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from benchmarks.bench_checkpointing import CONF, CONTEXT
    from ldm.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"] + ([f"model.task.unet.model_channels={channels}"]
                                                                 if channels else []))
    torch.manual_seed(0)
    context = CONTEXT.get(model, cfg.model.task.conditioner.get("dim"))
    return instantiate(cfg.model.task.unet)(in_channels=4, out_channels=4, context_dim=context)


def launch(args, fmt: str, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(29500 + os.getpid() % 400), str(Path(__file__).resolve()), "--worker", "--format", fmt,
           "--run-dir", str(run_dir), "--model", args.model, "--repeats", str(args.repeats)]
    if args.channels is not None:
        cmd += ["--channels", str(args.channels)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"[ldm] the {fmt} run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summary(result: dict) -> dict:
    """Medians over the repeats (the first save included: it is what a run pays), per rank and overall."""
    import statistics

    rows = [r for rank_rows in result["rows"] for r in rank_rows]
    per_rank = {r: statistics.median(x["peak_extra"] for x in rows if x["rank"] == r) for r in (0, 1)}
    slowest = lambda key: statistics.median(max(x[key] for x in rr) for rr in zip(*result["rows"]))  # noqa: E731
    return {"params": result["params"], "resumed_s": slowest("resumed_s"), "complete_s": slowest("complete_s"),
            "peak_rank0_MB": per_rank[0] / 2**20, "peak_rank1_MB": per_rank[1] / 2**20,
            "written_MB": sum(result["files"].values()) / 2**20,
            "largest_file_MB": max(result["files"].values()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ldm_txt2img")
    parser.add_argument("--channels", type=int, default=128, help="UNet model_channels (None: the preset's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as scratch:
        for fmt in args.formats:
            results[fmt] = summary(launch(args, fmt, Path(scratch) / fmt))
    params = next(iter(results.values()))["params"]
    print(f"{args.model} UNet, model_channels {args.channels} ({params / 1e6:.1f}M parameters), 2 processes "
          f"(DDP, gloo), {args.repeats} saves each")
    print(f"{'format':8} {'until training goes on':>23} {'until complete':>15} {'peak extra RSS r0/r1 (MB)':>27} "
          f"{'written (MB)':>13} {'largest file (MB)':>18}")
    for fmt, s in results.items():
        print(f"{fmt:8} {s['resumed_s']:21.2f} s {s['complete_s']:13.2f} s {s['peak_rank0_MB']:12.0f} / "
              f"{s['peak_rank1_MB']:<12.0f} {s['written_MB']:13.0f} {s['largest_file_MB']:18.0f}")
    if "full" in results and "sharded" in results:
        f, s = results["full"], results["sharded"]
        print(f"sharded/full: save time {s['complete_s'] / f['complete_s']:.2f}x, peak extra RSS on rank 0 "
              f"{s['peak_rank0_MB'] / max(f['peak_rank0_MB'], 1e-9):.2f}x")
    if "async" in results and "full" in results:
        ratio = results["async"]["resumed_s"] / results["full"]["complete_s"]
        print(f"async/full: time until training goes on {ratio:.2f}x")


if __name__ == "__main__":
    main()
