"""The training loop: one function that trains either stage through the task contract
(docs/architecture.md). Rerunning the same command in the same run directory resumes."""
from __future__ import annotations

import json
import sys
from itertools import islice
from contextlib import closing
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf

from ldm.data.latent_cache import check_cache
from ldm.errors import DataUnavailable
from ldm.training.evaluation import held_out_means
from ldm.tasks.base import RunContext
from ldm.training.build import (BuiltTask, build_accelerator, build_eval_loader, build_task, build_train_loader,
                                save_config)
from ldm.training.checkpoint import Checkpointer, config_fingerprint
from ldm.training.checkpoint_sharded import ShardedCheckpointer
from ldm.training.guard import REWIND
from ldm.training.parallel import parallelize
from ldm.training.preemption import StopRequest, after_stop, report_outcome
from ldm.training.progress import RunLog, say
from ldm.training.step import TrainStep, to_device
from ldm.training.tracking import log_images
from ldm.training.validation import validate, validation_due


@torch.no_grad()
@torch.random.fork_rng()  # evaluation must not shift the training RNG stream (bit-identical resume)
def evaluate(task, cfg, accelerator, step: int, run_dir: Path, ema=None) -> dict[str, float]:
    """Held-out metrics (per-image means, ldm/training/evaluation.py) + image grids over
    `trainer.eval_batches` batches, with the EMA weights when the
    model keeps an EMA (they sample better than the raw ones). Every rank runs it on the same batches
    (an FSDP forward is a collective); the main process writes the grids."""
    if ema is not None:
        with ema.swapped_into(task.ema_target()):
            return evaluate(task, cfg, accelerator, step, run_dir)
    was_training = task.training
    task.eval()
    images = {}
    loader = build_eval_loader(cfg, batch_size=min(16, cfg.trainer.batch_size))
    batches = (to_device(b, accelerator.device) for b in islice(loader, cfg.trainer.eval_batches))
    means, _ = held_out_means(task, batches, autocast=accelerator.autocast,
                              each=lambda i, batch: images.update(task.visualize(batch)) if i == 0 else None)
    task.train(was_training)
    log_images(accelerator, step, images, run_dir)
    return {f"val/{k}": v for k, v in means.items()}


def train(cfg) -> Path:
    """Train `cfg.model` on `cfg.data` in `cfg.run_dir`, resuming from its newest checkpoint."""
    # Initialize the processes; from here on a stop signal is never lost.
    accelerator, micro, accum = _start(cfg)
    stop = StopRequest(list(cfg.trainer.stop_signals)).install()
    # (missing shards fail here, before any model is built)
    loader = build_train_loader(cfg, micro, accelerator.process_index, accelerator.num_processes)

    # Construct the task, parallelize it, then what holds its (possibly sharded) parameters.
    built, run = _build_task(cfg, accelerator, micro)
    steps = TrainStep(cfg, built, parallelize(built.task, cfg.trainer, accelerator), accelerator, accum)
    log = RunLog(cfg, accelerator)
    ckpt = _checkpointer(cfg, steps, loader, accelerator, log)

    # Load the latest checkpoint.
    step = _resume(cfg, ckpt, accelerator, micro, accum)
    log.start(step)
    steps.prepare()

    # Train until max_steps or a stop signal; all ranks agree on both at the same step.
    data = iter(loader)
    with ckpt.stops_name_healthy(), closing(data):  # (workers stop on every way out, errors included)
        while step < cfg.trainer.max_steps:
            # Fetch the step's micro-batches, then vote: a stop signal, or a rank whose data source is gone,
            # stops every rank here, and the position goes back to before this step.
            batches = steps.fetch(data, loader)
            if stop.agreed() or batches is None:
                steps.unfetch(loader)
                break

            # Evaluate loss and accumulate gradients; update weights, EMA and schedules.
            steps.run(step, batches)
            step += 1

            # Check the step guard at log and checkpoint steps (the host reads its counters only there).
            if _due(step, cfg.trainer) and steps.guard.check(step) == REWIND:
                step = ckpt.rewind(step)
                log.restart_clock(step)
                continue

            # Report status.
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                log.step(step, {**steps.values(), **{f"data/skipped_{k}": v for k, v in loader.skipped.items()}})
                log.buckets(step, loader.bucket_counts)  # (data.buckets only)
            else:
                log.step(step)

            # Evaluate held-out metrics and save a checkpoint.
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
                with steps.meter.excluded():
                    log.write(step, evaluate(built.task, cfg, accelerator, step, Path(cfg.run_dir), steps.ema))
            if validation_due(step, cfg.trainer):  # the user's prompts (trainer.validation), same noise each time
                with steps.meter.excluded():
                    validate(built.task, cfg, accelerator, step, Path(cfg.run_dir), steps.ema)
            if step % cfg.trainer.ckpt_every == 0 and step < cfg.trainer.max_steps:
                with steps.meter.excluded():
                    ckpt.save(step, "scheduled", background=True)  # (trainer.checkpoint_async)

        # Done: the loader's workers stop now (they ignore SIGTERM: see ignore_stop_signals).
        log.close()
        data.close()
        steps.close()
        if stop.received is not None and step < cfg.trainer.max_steps:
            _stop(cfg, ckpt, stop, step, accelerator)
        if steps.data_gone:
            _data_gone(ckpt, steps.data_fault, step, accelerator)
        _finish(cfg, built, run, ckpt, steps, log, step, accelerator)
        if stop.received is not None:  # it came during the final save or evaluation: nothing left to stop
            say(accelerator, f"[ldm] {stop.received.name} received after the last step: the run completed")
    return Path(cfg.run_dir)


def _start(cfg):
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    return build_accelerator(cfg)


def _build_task(cfg, accelerator, micro: int) -> tuple[BuiltTask, RunContext]:
    """The task with identical initial weights on every rank, checked against the latent cache, started."""
    set_seed(cfg.trainer.seed)
    built = build_task(cfg)
    if cfg.data.get("latents"):  # a stale latent cache is refused before any step
        check_cache(cfg, built.task)
    run = RunContext(
        run_dir=Path(cfg.run_dir), is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
        device=accelerator.device, data=cfg.data,
        task_config=OmegaConf.to_container(cfg.model.task, resolve=True),
        statistics_batches=lambda: (to_device(b, accelerator.device) for b, _ in zip(
            build_eval_loader(cfg, micro, shards=cfg.data.shards), range(cfg.trainer.latent_stat_batches))))
    built.task.on_train_start(run)
    return built, run


def _checkpointer(cfg, steps: TrainStep, loader, accelerator, log: RunLog) -> Checkpointer:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    meta = {"model": cfg.model.name, "fingerprint": config_fingerprint(model_cfg),
            "strategy": cfg.trainer.strategy.value}
    return ShardedCheckpointer(cfg.run_dir, task=steps.task, optimizers=steps.optimizers, schedulers=steps.schedulers,
                               ema=steps.ema, loader=loader, guard=steps.guard, meta=meta,
                               rank=accelerator.process_index, world_size=accelerator.num_processes,
                               barrier=accelerator.wait_for_everyone, keep_last=cfg.trainer.keep_last,
                               spike=cfg.trainer.spike, log=log.write,
                               checkpoint_format=cfg.trainer.checkpoint_format.value,
                               background_saves=cfg.trainer.checkpoint_async)


def _resume(cfg, ckpt: Checkpointer, accelerator, micro: int, accum: int) -> int:
    """The step to start from (the latest checkpoint's, or 0), announced in one line."""
    step, path = ckpt.load_latest(cfg.trainer.resume)
    if path is None:
        set_seed(cfg.trainer.seed + accelerator.process_index)  # different noise / dropout draws on each rank
    if accelerator.is_main_process:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.run_dir))
    say(accelerator, f"[ldm] {cfg.model.name} on {cfg.data.name}: {accelerator.num_processes} process(es) "
                     f"({cfg.trainer.strategy.value}), global batch {cfg.trainer.batch_size} = {micro} x "
                     f"{accelerator.num_processes} x {accum} accumulation, run dir {cfg.run_dir}"
                     + (f", resuming {path.name}" if path else ""))
    accelerator.wait_for_everyone()
    return step


def _due(step: int, trainer) -> bool:
    """A log or checkpoint step: the guard's counters are read (and acted on) before either."""
    return step % trainer.log_every == 0 or step == trainer.max_steps or \
        (step % trainer.ckpt_every == 0 and step < trainer.max_steps)


def _stop(cfg, ckpt: Checkpointer, stop: StopRequest, step: int, accelerator) -> None:
    """A stop signal: checkpoint, say where to resume from, requeue under SLURM, exit non-zero."""
    path = ckpt.save(step, f"{stop.received.name} at step {step}")
    say(accelerator, f"[ldm] stopped by {stop.received.name}; {ckpt.resume_hint(path)}")
    if accelerator.is_main_process:
        after_stop(cfg.trainer.requeue)  # requeue the SLURM job, or not: docs/RELIABILITY.md
    if accelerator.is_local_main_process:
        report_outcome(f"stopped {stop.exit_code}")
        stop.tell_launcher()  # before any rank exits: the launcher ends 128 + signal, not 1
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.exit(stop.exit_code)  # not a completed run: under SLURM the job must not end COMPLETED


def _data_gone(ckpt: Checkpointer, fault: Exception | None, step: int, accelerator) -> None:
    """No data could be read for data.max_wait seconds: checkpoint, then stop with the cause, non-zero."""
    path = ckpt.save(step, f"data unavailable at step {step}")
    accelerator.end_training()
    if fault is not None:
        raise DataUnavailable(f"{fault}; checkpoint {path.name} saved: rerun the same command to resume")
    sys.exit(1)  # another rank's data source is gone: that rank says which


def _finish(cfg, built: BuiltTask, run: RunContext, ckpt: Checkpointer, steps: TrainStep, log: RunLog, step: int,
            accelerator) -> None:
    """The task's end hook, the final checkpoint, the final held-out metrics."""
    built.task.on_train_end(run)
    ckpt.save(step, "final")
    metrics = evaluate(built.task, cfg, accelerator, step, Path(cfg.run_dir), steps.ema)
    validate(built.task, cfg, accelerator, step, Path(cfg.run_dir), steps.ema)
    if accelerator.is_main_process:
        log.write(step, metrics)
        print("[ldm] final " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        (Path(cfg.run_dir) / "final_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        print(f"[ldm] images in {Path(cfg.run_dir) / 'images'}, checkpoints in {Path(cfg.run_dir) / 'checkpoints'}")
    if accelerator.is_local_main_process:
        report_outcome("completed")  # even if a signal came after the last step: the run is complete
    accelerator.end_training()
