"""Encode stage 2's training shards once into a latent cache (ldm/training/cache_latents.py; docs/training.md):

    python train/cache_latents.py <the train/main.py overrides> --out DIR
    torchrun --nproc_per_node 2 train/cache_latents.py <overrides> --out DIR    # per rank (RANK, WORLD_SIZE)
    python train/cache_latents.py <overrides> --out DIR --rank 1 --world 4     # or by hand, on any machine
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_train_config(overrides: list[str]):
    """conf/train.yaml with `overrides`, validated as train/main.py does."""
    from hydra import compose, initialize_config_dir

    from ldm.config import check_targets, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    check_targets(cfg.model.task, "model.task")
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train/main.py")
    parser.add_argument("--out", help="cache directory (default: data.latents)")
    parser.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    parser.add_argument("--world", type=int, help="number of processes sharing the work (default: $WORLD_SIZE or 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per encoder forward")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --out
    from ldm.config import ConfigError
    from ldm.errors import CacheError

    try:
        cfg = compose_train_config(args.overrides)
        from ldm.training.cache_latents import build_cache

        build_cache(cfg, args.out, args.rank, args.world, args.batch_size)
    except (ConfigError, CacheError, FileNotFoundError) as e:
        raise SystemExit(f"[ldm] {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
