"""Stage-2 training step with cached latents (`data.latents`: the batch holds the first stage's posterior
moments) vs online encoding (the batch holds images, encoded in the step), side by side in one run.

    python benchmarks/bench_cache.py                      # the demo: ldm_txt2img_demo over autoencoder_kl_shapes, 32 px
    python benchmarks/bench_cache.py --ldm ldm_txt2img_tiny --ae autoencoder_kl_tiny --size 64

A step is what the loop does per batch: forward, backward, AdamW step. The two are interleaved (one online
step, one cached step, ...) so a change of machine load hits both; the medians and their ratio are
printed. Same weights, same images (the demo's coloured shapes), same seed per step.

`--loop N` also runs the real loop (train/main.py's `train`, data loader workers included) for N steps on
generated shapes shards, from the images and from a cache built by train/cache_latents.py, alternating twice,
and compares the `train/img_per_s` of the last half of each run. BENCHMARKS.md has the results.
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldm.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(ldm: str, ae: str, size: int, batch: int):
    """(task, optimizer, online batch, cached batch) with random weights and real shapes images."""
    from data.shapes import caption_for, generate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ae_cfg = compose("train", overrides=[f"model={ae}"])
        ldm_cfg = compose("train", overrides=[f"model={ldm}", "model.first_stage.ckpt=unused"])
    torch.manual_seed(0)
    first_stage = instantiate(ae_cfg.model.task.autoencoder).eval()
    first_stage.sample_posterior = False  # the demo's (autoencoder_kl_shapes decodes the mean)
    task = instantiate(ldm_cfg.model.task, first_stage=first_stage).train()
    pairs = list(generate(max(batch, 256), size, seed=0))
    if hasattr(task.conditioner, "fit_tokenizer"):
        task.conditioner.fit_tokenizer([caption_for(attrs) for _, attrs in pairs])
    images = torch.from_numpy(np.stack([np.asarray(img) for img, _ in pairs[:batch]])).permute(0, 3, 1, 2)
    images = images.float().div(127.5).sub(1).contiguous()
    captions = [caption_for(attrs) for _, attrs in pairs[:batch]]
    with torch.no_grad():
        posterior = first_stage.posterior(images)
    common = {"caption": captions, "key": [str(i) for i in range(batch)], "meta": [{} for _ in range(batch)]}
    online = {"image": images, **common}
    cached = {"latent_mean": posterior.mean.contiguous(), "latent_logvar": posterior.logvar.contiguous(), **common}
    optimizer = torch.optim.AdamW([p for ps in task.param_groups().values() for p in ps], lr=1e-4, foreach=True)
    return task, optimizer, online, cached


def step(task, optimizer, batch, seed: int) -> float:
    torch.manual_seed(seed)
    start = time.perf_counter()
    loss, _ = task(batch, 0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def loop_img_per_s(args, workdir: Path) -> dict[str, float]:
    """img/s of the real training loop over images vs over their latent cache (median of 2 runs each)."""
    from data.shapes import write_shapes
    from ldm.models.autoencoder import save_autoencoder
    from ldm.training.cache_latents import build_cache
    from ldm.training.loop import train
    from train.cache_latents import compose_train_config

    shards = write_shapes(str(workdir / "shapes"), n_train=max(512, 4 * args.batch), n_val=32, size=args.size, seed=0)
    ae_cfg = compose_train_config([f"model={args.ae}"]).model.task
    torch.manual_seed(0)
    save_autoencoder(instantiate(ae_cfg.autoencoder), workdir / "ae.safetensors", ae_cfg.autoencoder,
                     sample_posterior=ae_cfg.get("sample_posterior", True))
    base = [f"model={args.ldm}", "data=shapes", f"data.shards='{shards['train']}'",
            f"data.val_shards='{shards['val']}'", f"data.image_size={args.size}",
            f"model.first_stage.ckpt={workdir / 'ae.safetensors'}", "trainer=cpu", f"trainer.batch_size={args.batch}",
            f"trainer.max_steps={args.loop}", f"trainer.log_every={args.loop // 2}", "trainer.eval_every=0",
            "trainer.eval_batches=1", f"trainer.ckpt_every={args.loop}", "trainer.progress=false",
            f"trainer.threads={args.threads}", "logger=none"]
    build_cache(compose_train_config(base), workdir / "latents")
    rates = {"online": [], "cached": []}
    for attempt in range(2):
        for name, extra in (("online", []), ("cached", [f"data.latents={workdir / 'latents'}"])):
            run_dir = workdir / f"{name}{attempt}"
            train(compose_train_config(base + extra + [f"run_dir={run_dir}"]))
            rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
            rates[name].append([float(v) for s, k, v in rows if k == "train/img_per_s" and int(s) == args.loop][0])
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default="ldm_txt2img_demo")
    p.add_argument("--ae", default="autoencoder_kl_shapes")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 wins on a shared CPU)")
    p.add_argument("--loop", type=int, default=0, help="also time N steps of the real loop each way (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task, optimizer, online, cached = build(args.ldm, args.ae, args.size, args.batch)
    times = {"online": [], "cached": []}
    for i in range(args.steps + 2):  # 2 warm-up steps each, interleaved
        for name, batch in (("online", online), ("cached", cached)):
            seconds = step(task, optimizer, batch, seed=i)
            if i >= 2:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:>7}: {t * 1000:8.1f} ms/step  {args.batch / t:7.1f} img/s")
    latent = tuple(cached["latent_mean"].shape[1:])
    print(f"  ratio: online / cached = {median['online'] / median['cached']:.2f}x faster with the cache "
          f"({args.ldm} over {args.ae}, {args.size} px -> latents {latent}, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, {args.steps} steps each)")
    if args.loop:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rates = loop_img_per_s(args, Path(tmp))
        print(f"   loop: online {rates['online']:.1f} img/s, cached {rates['cached']:.1f} img/s: "
              f"{rates['cached'] / rates['online']:.2f}x ({args.loop} steps each, last {args.loop // 2}, 2 runs each)")


if __name__ == "__main__":
    main()
