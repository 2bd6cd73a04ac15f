"""Train a stage of a latent diffusion model.

    python train/main.py model=autoencoder_kl_demo data=photos
    accelerate launch train/main.py model=ldm_txt2img model.first_stage.ckpt=runs/…/autoencoder.safetensors
    python train/main.py --multirun trainer.max_steps=100 model.optim.autoencoder.lr=1e-4,3e-4

Rerunning the same command resumes from the newest checkpoint in the run directory.
"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ldm.config import ConfigError, check_targets, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:  # a wrong model key / type fails here, before any data or weights are touched
        check_targets(cfg.model.task, "model.task")
    except ConfigError as e:
        raise SystemExit(f"[ldm] config error: {e}") from None
    from ldm.training.loop import train  # imported here so `--cfg job` / `--help` stay instant

    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        with open_dict(cfg):  # each sweep job trains in its own (deterministic) sweep sub-directory
            cfg.run_dir = hc.runtime.output_dir
    try:
        train(cfg)
    except FileNotFoundError as e:  # missing shards / checkpoint / first stage: say what, no traceback
        raise SystemExit(f"[ldm] {e}") from None


if __name__ == "__main__":
    main()
