"""Train a stage of a latent diffusion model.

    python train/main.py model=autoencoder_kl_demo data=photos
    accelerate launch train/main.py experiment=ldm_txt2img model.first_stage.ckpt=runs/…/autoencoder.safetensors
    python train/main.py --multirun trainer.max_steps=100 model.optim.autoencoder.lr=1e-4,3e-4

Rerunning the same command resumes from the newest checkpoint in the run directory.
"""
import os
import sys
from contextlib import nullcontext

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, open_dict

from ldm.config import ConfigError, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ldm.training.preflight import preflight, refuse

    hc = HydraConfig.get()
    # A wrong key / type / value, a missing first stage, a batch the processes do not divide: one line,
    # before any data or weights are touched. (Single runs were checked already, before Hydra made the run
    # directory: ldm.training.preflight.Preflight in conf/train.yaml; sweeps are checked here, per job.)
    try:
        preflight(cfg, trainer_choice=hc.runtime.choices.get("trainer"), overrides=list(hc.overrides.task))
    except ConfigError as e:
        refuse(e)
    from ldm.errors import RunError
    from ldm.training.lock import RunLock
    from ldm.training.loop import train  # imported here so `--cfg job` / `--help` stay instant

    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        with open_dict(cfg):  # each sweep job trains in its own (deterministic) sweep sub-directory
            cfg.run_dir = hc.runtime.output_dir
    # One live run per run directory. Only the launcher's rank 0 holds the lock: the ranks of one job
    # must not refuse each other (RANK is set by accelerate launch / torchrun, absent for one process).
    lock = RunLock(cfg.run_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    try:
        with lock:
            train(cfg)
    except Exception as e:  # missing/bad/unsafe files, divergence, data, lock: one line, no traceback
        cause = e.__cause__ if isinstance(e, InstantiationException) else e  # raised inside a model's __init__
        if isinstance(cause, (OSError, ValueError, RunError)):
            from ldm.training.exits import exit_with_error

            exit_with_error(f"[ldm] {cause}")
        raise


def relaunch_if_alone() -> None:
    """`accelerate launch --num_processes 2 train/main.py` without `--multi_gpu` on a host with fewer than 2
    GPUs runs this script ONCE (Accelerate's one-process launcher; it only turns on --multi_gpu itself when it
    counts 2+ GPUs). Asked for several processes, ldm replaces itself with the launch that starts them: the
    same options plus --multi_gpu. A refusal cannot be one line here: that launcher prints a traceback for
    any non-zero exit of its child."""
    if "ACCELERATE_MIXED_PRECISION" not in os.environ or "WORLD_SIZE" in os.environ:
        return  # not started by `accelerate launch`, or started as one of several processes
    try:  # the launcher's command line: ... launch [OPTIONS] train/main.py ARGS
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode().split("\0")[:-1]
        start = next(i for i, a in enumerate(argv) if a in ("launch", "accelerate.commands.launch")) + 1
        end = argv.index(sys.argv[0], start)
    except (OSError, StopIteration, ValueError):
        return
    from accelerate.commands.launch import launch_command_parser

    options = argv[start:end]
    asked, _ = launch_command_parser().parse_known_args(options + [sys.argv[0]])
    if (asked.num_processes or 1) < 2 and (asked.num_machines or 1) < 2:
        return
    options = [o for o in options if o != "--cpu"]  # (--cpu and --multi_gpu exclude each other; ldm picks CPU itself)
    print(f"[ldm] accelerate launch --num_processes {asked.num_processes} --num_machines {asked.num_machines or 1} "
          "without --multi_gpu starts one process here: relaunching with --multi_gpu", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", *options,
                              *sys.argv])


if __name__ == "__main__":
    relaunch_if_alone()
    main()
