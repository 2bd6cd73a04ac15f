"""The main job on the embedded demo data: the whole paper, end to end, on a CPU.

    python -m train.demo            (what `make demo` runs, from the repository root)

1. writes the `shapes` WebDataset shards (coloured shapes with exact captions),
2. trains the demo autoencoder on them (stage 1: KL-regularised, L2; see docs/demo.md for why),
3. encodes the training shards once into a latent cache (python train/cache_latents.py), and trains the
   demo text-to-image latent diffusion model from it (stage 2),
4. samples a grid for 16 prompts (each printed under its image), and scores prompt alignment on fresh
   prompts and seeds with the analyzer in data/shapes.py (colour, shape and position read back from each
   generated image): 256 samples under each of 4 sampling seeds, and the score is their mean,
5. writes report.html for each stage (train/report.py) and prints its path next to that stage's score.

Every phase is an ordinary command (printed as it runs); rerunning resumes finished phases instantly.
Extra Hydra overrides for both training phases can follow `--`, e.g. `-- trainer.max_steps=10`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from train.report import write_report

ROOT = Path(__file__).resolve().parents[1]
PROMPTS_16 = [  # the fixed grid: every colour, shape, position and background appears
    ("red", "circle", "center", "white"), ("green", "square", "left", "black"),
    ("blue", "triangle", "right", "gray"), ("yellow", "circle", "top", "black"),
    ("cyan", "square", "bottom", "white"), ("magenta", "triangle", "center", "gray"),
    ("red", "square", "top", "gray"), ("green", "triangle", "bottom", "white"),
    ("blue", "circle", "left", "white"), ("yellow", "triangle", "right", "black"),
    ("cyan", "circle", "center", "black"), ("magenta", "square", "left", "white"),
    ("red", "triangle", "right", "black"), ("green", "circle", "top", "gray"),
    ("blue", "square", "bottom", "black"), ("yellow", "square", "center", "gray"),
]


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def attrs_of(colour, shape, position, background) -> dict:
    return {"colour": colour, "shape": shape, "position": position, "background": background}


SEED_STRIDE = 10_000  # sampling seeds seed, seed + 10000, ...: their noise seeds (seed + 1000 + i) never overlap
KEYS = ("all_three", "colour", "shape", "position", "background", "all")


@torch.no_grad()
def score_alignment(run_dir: Path, n: int, seed: int, out: Path, seeds: int = 1, **sample_opts) -> dict:
    """Generate n images for random attribute combinations under each of `seeds` fresh sampling seeds
    (seed, seed + SEED_STRIDE, ...) and read them back. The top-level scores are the mean over the seeds;
    `per_seed` keeps each one. The 16-prompt grid uses the first seed."""
    from data.shapes import caption_for, sample_attributes
    from ldm.metrics.shapes import score
    from ldm.training.runs import load_run
    from ldm.visualize import captioned_grid
    from ldm.inference import generate

    if seeds < 1:
        raise ValueError(f"score_alignment: seeds={seeds}, need >= 1")
    cfg, task, _ = load_run(run_dir)
    latent = (cfg.data.image_size // task.first_stage.downsample_factor,) * 2
    grid_attrs = [attrs_of(*p) for p in PROMPTS_16]
    grid = generate(task, [{"caption": caption_for(a)} for a in grid_attrs], latent_size=latent, batch_size=16,
                    seed=seed, **sample_opts)
    out.mkdir(parents=True, exist_ok=True)
    captioned_grid(grid, [caption_for(a) for a in grid_attrs], nrow=4).save(out / "grid.png")  # prompt under each
    (out / "grid_prompts.txt").write_text("\n".join(caption_for(a) for a in grid_attrs) + "\n")
    per_seed = []
    for s in (seed + SEED_STRIDE * k for k in range(seeds)):
        rng = np.random.default_rng(s + 1)
        attrs = [sample_attributes(rng) for _ in range(n)]
        images = generate(task, [{"caption": caption_for(a)} for a in attrs], latent_size=latent, batch_size=64,
                          seed=s + 1000, **sample_opts)
        per_seed.append({"seed": s, **score(list(images), attrs)})
    result = {k: float(np.mean([r[k] for r in per_seed])) for k in KEYS}
    result.update(per_seed=per_seed, grid_score=score(list(grid), grid_attrs), samples=n, seeds=seeds,
                  **sample_opts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="generated images scored per sampling seed")
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds scored; the score is their mean")
    parser.add_argument("--seed", type=int, default=1234, help="first sampling seed (fresh: not used in training)")
    parser.add_argument("--train", type=int, default=20000, help="training images generated")
    parser.add_argument("--data", default="shards", help="where shards go (paths.data)")
    parser.add_argument("--runs", default="runs", help="where runs go (paths.runs)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both training phases (after --)")
    args = parser.parse_args()
    py = sys.executable
    paths = [f"paths.data={args.data}", f"paths.runs={args.runs}"]
    times = {}

    shards = Path(args.data) / "shapes"
    start = time.perf_counter()
    if not list(shards.glob("train-*.tar")):
        run([py, "-m", "data.shapes", "--out", str(shards), "--train", str(args.train), "--val", "512",
             "--size", "32"])
    times["data"] = time.perf_counter() - start
    times["autoencoder"] = run([py, "train/main.py", "experiment=demo_autoencoder", *paths, *args.overrides])
    ae = Path(args.runs) / "autoencoder_kl_shapes-shapes"
    stage2 = ["experiment=demo_ldm", *paths, f"model.first_stage.ckpt={ae / 'autoencoder.safetensors'}", *args.overrides]
    # Encode the training shards once (posterior mean and log-variance): stage 2 then skips the frozen
    # encoder in every step. The cache is keyed by the autoencoder's weights, so a retrained one re-encodes.
    latents = Path(args.data) / "shapes_latents"
    times["latent_cache"] = run([py, "train/cache_latents.py", *stage2, "--out", str(latents)])
    times["diffusion"] = run([py, "train/main.py", *stage2, f"data.latents={latents}"])
    ldm_run = Path(args.runs) / "ldm_txt2img_demo-shapes"
    start = time.perf_counter()
    result = score_alignment(ldm_run, args.samples, args.seed, ldm_run / "demo", seeds=args.seeds)
    times["sample_and_score"] = time.perf_counter() - start
    result["seconds"] = {k: round(v, 1) for k, v in times.items()}
    result["seconds"]["total"] = round(sum(times.values()), 1)
    (ldm_run / "demo" / "alignment.json").write_text(json.dumps(result, indent=1))
    ae_eval = json.loads((ae / "final_metrics.json").read_text())
    ae_report, ldm_report = write_report(ae), write_report(ldm_run)  # curves, grids, metrics: one HTML page each
    print("\n[ldm] demo finished in {total:.0f} s  (data {data:.0f} s, autoencoder {autoencoder:.0f} s, "
          "latent cache {latent_cache:.0f} s, diffusion {diffusion:.0f} s, sampling+scoring {sample_and_score:.0f} s)".format(**result["seconds"]))
    print(f"[ldm] autoencoder on held-out shapes: PSNR {ae_eval['val/psnr']:.2f} dB, SSIM {ae_eval['val/ssim']:.3f}"
          f"   report: {ae_report}")
    print("[ldm] prompt alignment on {seeds} x {samples} fresh samples: {all_three:.1%} all right, mean of {seeds} "
          "seeds  (colour {colour:.1%}, shape {shape:.1%}, position {position:.1%})".format(**result)
          + f"   report: {ldm_report}")
    print("[ldm] all right per seed: " + ", ".join(f"{r['all_three']:.1%} (seed {r['seed']})"
                                                   for r in result["per_seed"]))
    print(f"[ldm] sample grid for 16 prompts, each under its image: {ldm_run / 'demo' / 'grid.png'}")


if __name__ == "__main__":
    main()
