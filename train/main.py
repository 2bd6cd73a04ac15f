"""Train a stage of a latent diffusion model.

    python train/main.py model=autoencoder_kl_demo data=photos
    accelerate launch train/main.py model=ldm_txt2img model.first_stage.ckpt=runs/…/autoencoder.safetensors
    python train/main.py --multirun trainer.max_steps=100 model.optim.autoencoder.lr=1e-4,3e-4

Rerunning the same command resumes from the newest checkpoint in the run directory.
"""
import os
import time
from contextlib import nullcontext

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ldm.config import ConfigError, check_targets, check_trainer, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:  # a wrong model key / type / value fails here, before any data or weights are touched
        check_trainer(cfg)
        check_targets(cfg.model.task, "model.task")
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) != 0:  # the same config on every rank: rank 0 says it, once
            time.sleep(10)  # (the launcher stops the others when the first rank exits: let rank 0 be first)
            raise SystemExit(1)
        raise SystemExit(f"[ldm] config error: {e}") from None
    from ldm.errors import RunError
    from ldm.training.lock import RunLock
    from ldm.training.loop import train  # imported here so `--cfg job` / `--help` stay instant

    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        with open_dict(cfg):  # each sweep job trains in its own (deterministic) sweep sub-directory
            cfg.run_dir = hc.runtime.output_dir
    # One live run per run directory. Only the launcher's rank 0 holds the lock: the ranks of one job
    # must not refuse each other (RANK is set by accelerate launch / torchrun, absent for one process).
    lock = RunLock(cfg.run_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    try:
        with lock:
            train(cfg)
    except (FileNotFoundError, RunError) as e:  # missing/bad files, divergence, data, lock: one line, no traceback
        raise SystemExit(f"[ldm] {e}") from None


if __name__ == "__main__":
    main()
