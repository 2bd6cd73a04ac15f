"""The training loop: one function that trains either stage through the task contract
(docs/architecture.md). Rerunning the same command in the same run directory resumes."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.diffusion.draws import per_sample, sample_seed
from ldm.errors import DataUnavailable
from ldm.training.checkpoint import config_fingerprint, load_checkpoint, resolve_resume, save_checkpoint
from ldm.data.latent_cache import check_cache
from ldm.training.ema import EMA
from ldm.tasks.base import RunContext
from ldm.training.blocks import apply_activation_checkpointing, compile_blocks
from ldm.training.build import (build_accelerator, build_eval_loader, build_optimizers, build_scheduler,
                                build_task, build_train_loader, save_config)
from ldm.training.guard import StepGuard
from ldm.training.meter import ThroughputMeter, count_step_flops, default_peak_tflops
from ldm.training.parallel import parallelize, whole
from ldm.training.preemption import StopRequest, requeue_slurm_job
from ldm.training.tracking import CSVLog, init_tracking, log_images


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
@torch.random.fork_rng()  # evaluation must not shift the training RNG stream (bit-identical resume)
def evaluate(task, cfg, accelerator, step: int, run_dir: Path, ema=None) -> dict[str, float]:
    """Held-out metrics + image grids over `trainer.eval_batches` batches, with the EMA weights when the
    model keeps an EMA (they sample better than the raw ones). Every rank runs it on the same batches
    (an FSDP forward is a collective); the main process writes the grids."""
    if ema is not None:
        with ema.swapped_into(task.ema_target()):
            return evaluate(task, cfg, accelerator, step, run_dir)
    was_training = task.training
    task.eval()
    totals, count, images = {}, 0, {}
    loader = build_eval_loader(cfg, batch_size=min(16, cfg.trainer.batch_size))
    for i, batch in enumerate(loader):
        if i >= cfg.trainer.eval_batches:
            break
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            metrics = task.evaluate(batch)
            if i == 0:
                images = task.visualize(batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += 1
    task.train(was_training)
    log_images(accelerator, step, images, run_dir)
    return {f"val/{k}": v / max(count, 1) for k, v in totals.items()}


def train(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    accelerator, micro, accum = build_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    stop = StopRequest(list(cfg.trainer.stop_signals)).install()  # before anything slow: a signal is never lost
    loader = build_train_loader(cfg, micro, rank, world)  # missing shards fail here, before any model is built
    set_seed(cfg.trainer.seed)  # identical initial weights on every rank
    task = build_task(cfg)
    if cfg.data.get("latents"):  # a stale latent cache is refused before any step
        check_cache(cfg, task)
    run = RunContext(
        run_dir=run_dir, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
        device=accelerator.device, data=cfg.data,
        task_config=OmegaConf.to_container(cfg.model.task, resolve=True),
        statistics_batches=lambda: (to_device(b, accelerator.device) for b, _ in zip(
            build_eval_loader(cfg, micro, shards=cfg.data.shards), range(cfg.trainer.latent_stat_batches))))
    task.on_train_start(run)
    if cfg.trainer.channels_last:
        task = task.to(memory_format=torch.channels_last)
    # torchtitan's order: checkpointing, then compile (the compiled blocks hold the recomputation), then
    # parallelism. Both act on task.blocks() in place: parameter names and state-dict keys are unchanged.
    recompute = cfg.trainer.activation_checkpointing.value
    blocks = apply_activation_checkpointing(task, recompute)
    if cfg.trainer.compile:
        blocks = compile_blocks(task)
    if recompute != "none" or cfg.trainer.compile:
        accelerator.print(f"[ldm] activation checkpointing {recompute}, compile {'on' if cfg.trainer.compile else 'off'}: "
                          f"{blocks} blocks of {type(task).__name__}")
    # Parallelism next, then everything that holds parameters: FSDP replaces them with shards, and the
    # optimizers and the EMA must hold those.
    model = parallelize(task, cfg.trainer.strategy.value, accelerator)
    optimizers = build_optimizers(cfg, task)
    schedulers = {k: build_scheduler(cfg.trainer, o) for k, o in optimizers.items()}
    ema_target = task.ema_target()
    ema = EMA(ema_target, **cfg.model.ema) if cfg.model.ema is not None and ema_target is not None else None
    if ema is not None and hasattr(task, "pretrained_ema"):  # model.init_from brought EMA weights (ldm/convert)
        ema.load_shadow(task.__dict__.pop("pretrained_ema"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    meta = {"model": cfg.model.name, "fingerprint": config_fingerprint(model_cfg),
            "strategy": cfg.trainer.strategy.value}

    step = 0
    resume_from = resolve_resume(cfg.trainer.resume, run_dir)
    if resume_from is not None:
        step = load_checkpoint(resume_from, task=task, optimizers=optimizers, schedulers=schedulers, ema=ema,
                               loader=loader, meta=meta, rank=rank, world_size=world)
    else:
        set_seed(cfg.trainer.seed + rank)  # different noise / dropout draws on each rank
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        print(f"[ldm] {cfg.model.name} on {cfg.data.name}: {world} process(es) ({cfg.trainer.strategy.value}), "
              f"global batch {cfg.trainer.batch_size} = {micro} x {world} x {accum} accumulation, run dir {run_dir}"
              + (f", resuming {resume_from.name}" if resume_from else ""))
    accelerator.wait_for_everyone()
    init_tracking(accelerator, cfg, run_dir)
    csv_log = CSVLog(run_dir, accelerator.is_main_process)
    if ema is not None:
        ema.to(accelerator.device)
    opts = {k: accelerator.prepare(o) for k, o in optimizers.items()}
    groups = task.param_groups()
    checkpoint_kwargs = dict(task=task, optimizers=optimizers, schedulers=schedulers, ema=ema, loader=loader,
                             meta=meta, rank=rank, world_size=world, barrier=accelerator.wait_for_everyone,
                             keep_last=cfg.trainer.keep_last)

    def checkpoint(reason: str) -> Path:
        guard.check(step)  # a diverged run stops here instead of saving (its weights are the last finite ones)
        with meter.excluded():
            start = time.perf_counter()
            path = save_checkpoint(run_dir, step, **checkpoint_kwargs)
            seconds = time.perf_counter() - start  # size the SLURM --signal lead time from this (README)
        accelerator.print(f"[ldm] saved {path} ({reason}) in {seconds:.1f} s")
        accelerator.log({"checkpoint/save_seconds": seconds}, step=step)
        csv_log.write(step, {"checkpoint/save_seconds": seconds})
        return path

    trace = (run_dir / f"trace_rank{rank}.txt").open("a") if cfg.trainer.trace else None
    fault_group = _cpu_group()
    data = iter(loader)
    bar = tqdm(total=cfg.trainer.max_steps, initial=step, disable=not (cfg.trainer.progress and
                                                                       accelerator.is_main_process), dynamic_ncols=True)
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
    guard = StepGuard(cfg.trainer.max_bad_steps, lambda t: accelerator.reduce(t, "sum"), accelerator.is_main_process,
                      task, accelerator.device)
    peak = cfg.trainer.peak_tflops or default_peak_tflops(accelerator.device.type, cfg.trainer.mixed_precision.value)
    meter = ThroughputMeter(world, peak, synchronize=torch.cuda.synchronize if torch.cuda.is_available() else None)
    flops_per_image = {}  # by task.step_phase(step): counted on the first micro-batch of each phase
    # No host sync inside the step (a .item() or float() of a device tensor waits for the GPU queue to drain):
    # the NaN guard's decision stays on the device, and values are read only at log steps.
    # The stop decision is all-reduced after every step, so all ranks leave the loop at the same step.
    data_fault, data_gone = None, False  # DataUnavailable: no byte of data readable for data.max_wait seconds
    global_batch = cfg.trainer.batch_size
    while step < cfg.trainer.max_steps:
        # The step's micro-batches are fetched BEFORE the all-reduced stop decision: a rank whose data source
        # is gone then stops with all the others at this step (the position goes back to `mark`) instead of
        # leaving them waiting in the backward all-reduce.
        mark = loader.state_dict()
        with meter.waiting():
            try:
                batches = [next(data) for _ in range(accum)]
            except DataUnavailable as e:
                data_fault = e
        data_gone = _any_rank(data_fault is not None, fault_group)
        if stop.agreed() | data_gone:
            loader.load_state_dict(mark)  # the step not trained is the first one after the resume
            break
        skip = None
        for micro_step, batch in enumerate(batches):
            # The random draws of each micro-batch (noise, timesteps, condition dropout) come from seeds of
            # (seed, each sample's index in the global sample stream: ldm/diffusion/draws.py), and anything else
            # from the micro-batch's index: a run's randomness does not depend on how many processes share the
            # global batch, so 1, 2 or 4 processes train the same model.
            torch.manual_seed(micro_batch_seed(cfg.trainer.seed, (step * accum + micro_step) * world + rank))
            first = step * global_batch + (micro_step * world + rank) * micro
            seeds = [sample_seed(cfg.trainer.seed, first + j) for j in range(len(batch["key"]))]
            batch = to_device(batch, accelerator.device)
            images, phase = len(batch["key"]), task.step_phase(step)
            if phase not in flops_per_image:
                with meter.excluded():
                    flops_per_image[phase] = count_step_flops(task, batch, step, accelerator.autocast) / images
                accelerator.print(meter.describe(flops_per_image[phase], step))
            with accelerator.accumulate(model), accelerator.autocast(), per_sample(seeds):
                loss, logs = model(batch, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()
                    norms = {k: torch.nn.utils.clip_grad_norm_(ps, clip) for k, ps in groups.items()}
                    norms = {k: whole(n) for k, n in norms.items()}  # FSDP: DTensor -> tensor
                    skip = guard.update(loss, norms)  # NaN/Inf: a device flag, the same on every rank
                    if accelerator.scaler is None:  # (fp16: the GradScaler sets found_inf from its own check)
                        for opt in optimizers.values():
                            opt.found_inf = skip  # fused AdamW: 1 leaves weights, moments and step count as they are
                for opt in opts.values():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            meter.add(images, flops_per_image[phase] * images)
            if trace:
                trace.write("".join(f"{step} {k}\n" for k in batch["key"]))
                trace.flush()
        for s in schedulers.values():
            s.step()
        if ema is not None:
            ema.update(ema_target, skip)
        step += 1
        bar.update(1)

        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:  # the host reads values here only
            values = {f"train/{k}": _scalar(v) for k, v in logs.items()}
            values.update({f"grad_norm/{k}": _scalar(v) for k, v in norms.items()})
            values.update({f"lr/{k}": s.get_last_lr()[0] for k, s in schedulers.items()})
            values["train/skipped_steps"] = guard.check(step)  # NonFiniteError after max_bad_steps in a row
            values.update(meter.read())  # img_per_s, tflops, mfu, data_wait
            values.update({f"data/skipped_{k}": v for k, v in loader.skipped.items()})
            bar.set_postfix(_progress(values))
            accelerator.log(values, step=step)
            csv_log.write(step, values)
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
            with meter.excluded():
                metrics = evaluate(task, cfg, accelerator, step, run_dir, ema)
            accelerator.log(metrics, step=step)
            csv_log.write(step, metrics)
        if step % cfg.trainer.ckpt_every == 0 and step < cfg.trainer.max_steps:
            checkpoint("scheduled")
    bar.close()
    data.close()  # shut the loader workers down now (they ignore SIGTERM: see ignore_stop_signals)
    if trace:
        checksum = sum(float(whole(p).detach().double().sum()) for p in task.parameters())
        trace.write(f"checksum {checksum!r}\n")
        if ema is not None:  # the EMA must be the same on every rank (a known fault elsewhere)
            trace.write(f"ema_checksum {sum(float(v.double().sum()) for v in ema.state_dict().values())!r}\n")
        trace.close()

    if data_gone and stop.received is None:
        path = checkpoint(f"data unavailable at step {step}")
        accelerator.end_training()
        if data_fault is not None:
            raise DataUnavailable(f"{data_fault}; checkpoint {path.name} saved: rerun the same command to resume")
        sys.exit(1)  # another rank's data source is gone: it says which
    if stop.received is not None and step < cfg.trainer.max_steps:
        path = checkpoint(f"{stop.received.name} at step {step}")
        accelerator.print(f"[ldm] stopped by {stop.received.name}; rerun the same command to resume from {path.name}")
        accelerator.end_training()
        if accelerator.is_main_process and cfg.trainer.requeue:
            requeue_slurm_job()
        sys.exit(stop.exit_code)  # not a completed run: under SLURM the job must not end COMPLETED
    task.on_train_end(run)
    checkpoint("final")
    metrics = evaluate(task, cfg, accelerator, step, run_dir, ema)
    if accelerator.is_main_process:
        accelerator.log(metrics, step=step)
        csv_log.write(step, metrics)
        print("[ldm] final " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        (run_dir / "final_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        print(f"[ldm] images in {run_dir / 'images'}, checkpoints in {run_dir / 'checkpoints'}")
    accelerator.end_training()
    return run_dir


def _cpu_group():
    """A gloo group for the per-step data-fault vote (a host flag: no GPU sync), None for one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _any_rank(flag: bool, group) -> bool:
    if group is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def micro_batch_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little") >> 1


def _progress(values: dict) -> dict[str, str]:
    shown = {"loss": ("train/loss", ".4f"), "img_s": ("train/img_per_s", ".1f"), "mfu": ("train/mfu", ".1%"),
             "tflops": ("train/tflops", ".3g"), "wait": ("train/data_wait", ".0%")}
    return {k: format(values[key], spec) for k, (key, spec) in shown.items() if key in values}


def _scalar(v) -> float:
    return float(whole(v).detach()) if torch.is_tensor(v) else float(v)
