"""The training loop: one function that trains either stage through the task contract
(docs/architecture.md). Rerunning the same command in the same run directory resumes."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from ldm.checkpoint import config_fingerprint, load_checkpoint, resolve_resume, save_checkpoint
from ldm.ema import EMA
from ldm.training.build import (build_accelerator, build_eval_loader, build_optimizers, build_scheduler,
                                build_task, build_train_loader, fit_tokenizer, save_config)
from ldm.training.tracking import CSVLog, init_tracking, log_images


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
@torch.random.fork_rng()  # evaluation must not shift the training RNG stream (bit-identical resume)
def evaluate(task, cfg, accelerator, step: int, run_dir: Path, ema=None) -> dict[str, float]:
    """Held-out metrics + image grids, on the main process over `trainer.eval_batches` batches,
    with the EMA weights when the model keeps an EMA (they sample better than the raw ones)."""
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
    loader = build_train_loader(cfg, micro, rank, world)  # missing shards fail here, before any model is built
    set_seed(cfg.trainer.seed)  # identical initial weights on every rank
    task = build_task(cfg)
    fit_tokenizer(task, cfg, accelerator, run_dir)
    if cfg.trainer.channels_last:
        task = task.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(cfg, task)
    schedulers = {k: build_scheduler(cfg.trainer, o) for k, o in optimizers.items()}
    ema_target = task.ema_target()
    ema = EMA(ema_target, **cfg.model.ema) if cfg.model.ema is not None and ema_target is not None else None
    if ema is not None and hasattr(task, "pretrained_ema"):  # model.init_from brought EMA weights (ldm/convert)
        ema.shadow.load_state_dict(task.__dict__.pop("pretrained_ema"))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    meta = {"model": cfg.model.name, "fingerprint": config_fingerprint(model_cfg)}

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
        print(f"[ldm] {cfg.model.name} on {cfg.data.name}: {world} process(es), global batch "
              f"{cfg.trainer.batch_size} = {micro} x {world} x {accum} accumulation, run dir {run_dir}"
              + (f", resuming {resume_from.name}" if resume_from else ""))
    accelerator.wait_for_everyone()
    init_tracking(accelerator, cfg, run_dir)
    csv_log = CSVLog(run_dir, accelerator.is_main_process)
    if ema is not None:
        ema.to(accelerator.device)
    model = accelerator.prepare(task)
    opts = {k: accelerator.prepare(o) for k, o in optimizers.items()}
    groups = task.param_groups()
    checkpoint_kwargs = dict(task=task, optimizers=optimizers, schedulers=schedulers, ema=ema, loader=loader,
                             meta=meta, rank=rank, world_size=world, barrier=accelerator.wait_for_everyone,
                             keep_last=cfg.trainer.keep_last)

    # SIGTERM (SLURM preemption, `kill`): finish the current step, checkpoint, exit cleanly.
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    trace = (run_dir / f"trace_rank{rank}.txt").open("a") if cfg.trainer.trace else None
    data = iter(loader)
    bar = tqdm(total=cfg.trainer.max_steps, initial=step, disable=not (cfg.trainer.progress and
                                                                       accelerator.is_main_process), dynamic_ncols=True)
    clip = cfg.trainer.grad_clip if cfg.trainer.grad_clip > 0 else float("inf")
    tick, seen = time.perf_counter(), 0
    while step < cfg.trainer.max_steps and not stop["flag"]:
        for _ in range(accum):
            batch = to_device(next(data), accelerator.device)
            with accelerator.accumulate(model):
                loss, logs = model(batch, step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.unscale_gradients()
                    norms = {k: torch.nn.utils.clip_grad_norm_(ps, clip) for k, ps in groups.items()}
                for opt in opts.values():
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            seen += len(batch["image"])
            if trace:
                trace.write("".join(f"{step} {k}\n" for k in batch["key"]))
        for s in schedulers.values():
            s.step()
        if ema is not None:
            ema.update(ema_target)
        step += 1
        bar.update(1)

        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
            elapsed = time.perf_counter() - tick
            values = {f"train/{k}": float(v) for k, v in logs.items()}
            values.update({f"grad_norm/{k}": float(v) for k, v in norms.items()})
            values.update({f"lr/{k}": s.get_last_lr()[0] for k, s in schedulers.items()})
            values["train/img_per_s"] = seen * world / elapsed
            values.update({f"data/skipped_{k}": v for k, v in loader.skipped.items()})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{values['train/img_per_s']:.1f}")
            accelerator.log(values, step=step)
            csv_log.write(step, values)
            tick, seen = time.perf_counter(), 0
        if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < cfg.trainer.max_steps:
            if accelerator.is_main_process:
                metrics = evaluate(accelerator.unwrap_model(model), cfg, accelerator, step, run_dir, ema)
                accelerator.log(metrics, step=step)
                csv_log.write(step, metrics)
            accelerator.wait_for_everyone()
        if step % cfg.trainer.ckpt_every == 0 and step < cfg.trainer.max_steps:
            save_checkpoint(run_dir, step, **checkpoint_kwargs)
    bar.close()
    if trace:
        checksum = sum(float(p.detach().double().sum()) for p in task.parameters())
        trace.write(f"checksum {checksum!r}\n")
        trace.close()

    if stop["flag"]:
        path = save_checkpoint(run_dir, step, **checkpoint_kwargs)
        accelerator.print(f"[ldm] SIGTERM: saved {path}; rerun the same command to resume")
        accelerator.end_training()
        return run_dir
    task = accelerator.unwrap_model(model)
    if hasattr(task, "latent_statistics"):
        # Stage 1 ends by measuring latent statistics (scale_factor = 1/std) and writing the one file
        # stage 2 loads (`model.first_stage.ckpt`). Every rank reads the same batches (the sums are
        # all-reduced), so the statistics are identical everywhere.
        from ldm.models.autoencoder import save_autoencoder

        batches = (to_device(b, accelerator.device) for b, _ in
                   zip(build_eval_loader(cfg, micro, shards=cfg.data.shards), range(cfg.trainer.latent_stat_batches)))
        with torch.random.fork_rng():  # keep the RNG state the final checkpoint stores
            task.latent_statistics(batches)
        if accelerator.is_main_process:
            path = run_dir / "autoencoder.safetensors"
            save_autoencoder(task.autoencoder, path, OmegaConf.to_container(cfg.model.task.autoencoder, resolve=True),
                             sample_posterior=task.sample_posterior)
            print(f"[ldm] wrote {path} (scale_factor {float(task.autoencoder.scale_factor):.4f})")
    accelerator.wait_for_everyone()
    save_checkpoint(run_dir, step, **checkpoint_kwargs)
    if accelerator.is_main_process:
        metrics = evaluate(task, cfg, accelerator, step, run_dir, ema)
        accelerator.log(metrics, step=step)
        csv_log.write(step, metrics)
        print("[ldm] final " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        (run_dir / "final_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
        print(f"[ldm] images in {run_dir / 'images'}, checkpoints in {run_dir / 'checkpoints'}")
    accelerator.end_training()
    return run_dir
