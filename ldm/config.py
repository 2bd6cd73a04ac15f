"""Structured configs: the schema every composed config is checked against before any compute.

Hydra merges `conf/train.yaml` and its groups onto `TrainConfig`, so an unknown key or a wrong type in
`data/`, `trainer/` or `logger/` fails at composition, naming the key. The model tree is data for
`hydra.utils.instantiate` (`_target_` nodes); `check_targets` validates each node against the signature
of the class it names, so `model.task.autoencoder.chh: 64` fails the same way.
"""
from __future__ import annotations

import collections.abc
import inspect
import os
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class CheckpointFormat(str, Enum):
    full = "full"
    sharded = "sharded"


class ActivationCheckpointing(str, Enum):
    none = "none"
    full = "full"
    selective = "selective"


class LRSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class LoggerKind(str, Enum):
    wandb = "wandb"
    tensorboard = "tensorboard"
    none = "none"


class Crop(str, Enum):
    center = "center"
    random = "random"
    random_resized = "random_resized"


@dataclass
class AugmentConfig:
    # Random training transforms, drawn per sample from (trainer.seed, epoch, sample key): a resumed run
    # draws the same ones. Held-out metrics, grids and latent statistics always use the centre crop.
    flip: float = 0.0  # probability of a horizontal flip; 0 because it breaks captions that say left/right
    crop: Crop = Crop.center  # center | random (random square along the longer side) | random_resized (stage 1)
    scale: List[float] = field(default_factory=lambda: [0.5, 1.0])  # random_resized: area fraction range
    ratio: List[float] = field(default_factory=lambda: [0.75, 4 / 3])  # random_resized: aspect-ratio range


@dataclass
class DataConfig:
    name: str = MISSING
    shards: str = MISSING  # training shards: brace pattern, glob or comma-separated list
    val_shards: Optional[str] = None  # held-out shards for metrics / sample prompts
    image_size: int = 64  # pixels; images are resized (shorter side) and centre-cropped
    # Training reads one global sample order, the same for any number of processes and loader workers
    # (ldm/data/order.py): the shards of each epoch are dealt to `lanes` streams, and each global batch takes
    # its samples from every lane. None: min(global batch, number of shards), so each position of a batch
    # comes from its own shard. A checkpoint resumes on another process count only with the same lanes.
    lanes: Optional[int] = None
    shuffle_buffer: int = 100  # samples held for shuffling in EACH lane (memory: lanes per process x this)
    resample: bool = False  # draw shards with replacement (infinite stream, no epochs)
    # Remote shards (http(s)://, pipe:) are read through ldm/data/remote.py:
    retries: int = 3  # re-tries (exponential backoff) of a shard whose source answers with an error; then skipped
    timeout: float = 30.0  # seconds without a byte before a connection counts as stalled and is re-opened
    max_wait: float = 600.0  # seconds with nothing readable (server gone) before the run checkpoints and stops
    # "txt" reads KEY.txt; "json:<field>" reads a field of KEY.json; null: no captions (stage 1, unconditional
    # and class models train from image-only shards; with "txt", samples without a caption are skipped)
    caption_field: Optional[str] = "txt"
    label_field: Optional[str] = None  # a KEY.json field giving an integer class label
    num_workers: int = 2  # DataLoader workers per rank
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training-stream crop/flip (docs/training.md)
    # Aspect-ratio buckets for the training stream (ldm/data/buckets.py, docs/training.md): null/false: square
    # crops; true: shapes of about image_size**2 pixels, sides multiples of bucket_step, aspect ratios within
    # 1:bucket_max_ratio..bucket_max_ratio:1; or a list of [height, width] pairs. Each image goes whole (but
    # for the overflow) into the bucket nearest its aspect ratio; every micro-batch holds one bucket.
    buckets: Any = None
    bucket_step: int = 64  # pixels; a multiple of 8 that divides image_size (and suits the model's downsampling)
    bucket_max_ratio: float = 2.0
    # stage 2: train from this latent cache (`python train/cache_latents.py`) instead of decoding and encoding
    # data.shards; checked against the first stage, transform and conditioner at start (docs/training.md)
    latents: Optional[str] = None


@dataclass
class SpikeConfig:
    """Loss / gradient-norm spike guard (ldm/training/guard.py): a step whose loss or global gradient norm
    exceeds `factor` x its running median is skipped like a non-finite one; `max_in_row` bad steps in a row
    (spikes or non-finite) rewind to the newest healthy checkpoint; the run stops after `max_rewinds`."""
    enabled: bool = True  # off: only non-finite steps are skipped (and no rewinds)
    factor: float = 10.0  # a spike is > factor x the running median (finite blow-ups are 1e3-1e12 x)
    window: int = 100  # accepted steps in the running median; also the "recent" window of a healthy checkpoint
    max_in_row: int = 3  # bad steps in a row before rewinding (a single noisy batch is only skipped)
    max_rewinds: int = 3  # rewinds in one process before the run stops, naming the healthy checkpoint
    # A checkpoint is healthy only if its weight norm is within (1 + max_weight_change)x of the previous
    # checkpoint's (or the initial weights'), both ways: a finite blow-up multiplies it by 1e3 or more.
    max_weight_change: float = 1.0


@dataclass
class ValidationConfig:
    """Validation prompts (ldm/training/validation.py): the EMA weights sample these prompts every `every`
    steps and at the end, from the same starting noise each time, so the grids compare across steps.
    Off while `prompts` is empty. Stage 2 only (a stage-1 autoencoder has no prompts to sample)."""
    prompts: Any = field(default_factory=list)  # a list of prompts, or a text file with one prompt per line
    every: int = 500  # steps between validation grids (0 = only at the end)
    seed: int = 0  # prompt i starts from noise seeded by seed + i, drawn on the CPU (as train/sample.py does)
    steps: Optional[int] = None  # sampler steps (None: the model's sample_steps)
    guidance: Optional[float] = None  # classifier-free guidance scale (None: the model's guidance_scale)
    negative_prompts: Any = field(default_factory=list)  # none, one for every prompt, or one per prompt


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # GLOBAL batch: micro_batch x processes x accumulation (no hidden scaling)
    micro_batch_size: Optional[int] = None  # per-process forward batch; None = batch_size / processes
    mixed_precision: Precision = Precision.no  # no | bf16 | fp16 (fp16 autocast is a no-op on CPU)
    strategy: Strategy = Strategy.ddp  # ddp (whole model per rank) | fsdp (sharded, ldm/training/parallel.py)
    lr_warmup_steps: int = 0  # linear warm-up from 0
    lr_schedule: LRSchedule = LRSchedule.constant  # constant | cosine (after warm-up)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    log_every: int = 10  # steps between scalar logs (>= 1; the last step is always logged)
    eval_every: int = 500  # steps between held-out metrics / image grids (0 = only at the end)
    eval_batches: int = 4  # batches of the held-out set per evaluation
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept on disk (0 keeps all)
    # full: rank 0 writes whole safetensors files | sharded: every rank writes its shards in parallel
    # (torch.distributed.checkpoint; ldm/training/checkpoint_sharded.py); train/consolidate.py joins them
    checkpoint_format: CheckpointFormat = CheckpointFormat.full
    checkpoint_async: bool = False  # sharded only: scheduled saves write in the background while training goes on
    resume: str = "latest"  # latest | never | PATH to a checkpoint directory
    seed: int = 0
    latent_stat_batches: int = 8  # stage 1: batches used to measure latent mean/std at the end
    channels_last: bool = False  # memory format for conv-heavy models
    # Recompute block activations in backward (ldm/training/blocks.py): none | full (store each block's
    # inputs only: least memory, ~1/3 more compute) | selective (also keep matmul/conv/attention outputs,
    # recompute norms and activations). The SD-size presets set full; docs/training.md has the trade-off.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    compile: bool = False  # torch.compile each block separately (training steps only; a failing block runs eagerly)
    threads: Optional[int] = None  # torch CPU threads per process (None: torch's default); 1 wins on busy CPUs
    progress: bool = True  # tqdm progress bar on the main process
    trace: bool = False  # write run_dir/trace_rank<r>.txt: sample keys read + final weight checksum
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint and stop
    requeue: bool = True  # under SLURM, a signal-stopped job that SLURM still runs requeues itself
    max_bad_steps: int = 20  # consecutive steps with a non-finite loss/grad (each skipped) before the run stops
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # your own prompts, sampled in training
    # Peak dense TFLOP/s of one device, the denominator of train/mfu (ldm/training/meter.py). None: on CUDA
    # the H100/H200 SXM figure, 989 (bf16/fp16) or 494.5 (fp32, run as TF32); on CPU no MFU is logged.
    peak_tflops: Optional[float] = None


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb  # wandb | tensorboard | none
    project: str = "ldm"
    entity: Optional[str] = None
    mode: Optional[str] = None  # online | offline | disabled; None = online with an API key, else offline
    tags: List[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = MISSING  # absolute learning rate: never rescaled by GPU count
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True  # decay ramps as min(decay, (1 + step) / (10 + step))


@dataclass
class FirstStageConfig:
    # autoencoder.safetensors written at the end of stage 1, or a pretrained KL VAE: an SD/CompVis file
    # (.safetensors/.ckpt) or a diffusers folder (ldm/convert, docs/convert.md)
    ckpt: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    task: Any = MISSING  # `_target_` tree, instantiated by train/main.py
    optim: Dict[str, OptimConfig] = field(default_factory=dict)  # one AdamW per task param group
    ema: Optional[EMAConfig] = None
    first_stage: Optional[FirstStageConfig] = None
    init_from: Optional[str] = None  # stage 2: start the UNet (and EMA) from an SD/CompVis file or diffusers folder


@dataclass
class PathsConfig:
    data: str = "shards"  # where demo / converted shards live
    runs: str = "runs"  # where run directories are created


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_dir: str = MISSING  # same on every rank: built from config values, never from ${now:}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


class ConfigError(ValueError):
    pass


def _type_ok(value: Any, annotation: Any) -> bool:
    """A small runtime check for the annotation shapes used by our constructors."""
    if annotation in (inspect.Parameter.empty, Any) or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    sequences = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)
    if origin in sequences or annotation in sequences or annotation in (typing.Sequence, typing.Iterable):
        # (typing.Sequence[int] has origin collections.abc.Sequence: `ch_mult: 5` must not pass as one)
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        return len(args) != 1 or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, (dict, DictConfig))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (bool, str):
        return isinstance(value, annotation)
    return True  # classes, modules, callables: instantiate decides


def check_trainer(cfg: Any) -> None:
    """Values the schema's types allow but that make no sense (they used to crash after a step, exit 0
    doing nothing, or divide by zero). Raises ConfigError naming the key."""
    t = cfg.trainer
    positive = {"max_steps": t.max_steps, "batch_size": t.batch_size, "log_every": t.log_every,
                "ckpt_every": t.ckpt_every, "max_bad_steps": t.max_bad_steps, "eval_batches": t.eval_batches,
                "latent_stat_batches": t.latent_stat_batches, "spike.window": t.spike.window,
                "spike.max_in_row": t.spike.max_in_row}
    if t.micro_batch_size is not None:
        positive["micro_batch_size"] = t.micro_batch_size
    for key, value in positive.items():
        if value < 1:
            hint = {"log_every": " (logs are always written at the last step; a value >= max_steps logs only "
                                 "there)",
                    "ckpt_every": " (a checkpoint is always written at the end; a value >= max_steps saves only "
                                  "there)"}.get(key, "")
            raise ConfigError(f"trainer.{key}={value}: must be >= 1{hint}")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ConfigError(f"trainer.peak_tflops={t.peak_tflops}: must be > 0 (TFLOP/s of one device), or null "
                          f"for the default")
    for key, zero in (("eval_every", "only at the end"), ("keep_last", "keep all"), ("lr_warmup_steps", "none")):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]}: must be >= 0 (0 = {zero})")
    if t.spike.factor <= 1 or t.spike.max_weight_change <= 0 or t.spike.max_rewinds < 0:
        raise ConfigError(f"trainer.spike: factor={t.spike.factor} must be > 1, max_weight_change="
                          f"{t.spike.max_weight_change} > 0 and max_rewinds={t.spike.max_rewinds} >= 0")
    if t.checkpoint_async and t.checkpoint_format.value != "sharded":
        raise ConfigError("trainer.checkpoint_async=true needs trainer.checkpoint_format=sharded (a full checkpoint "
                          "is written by rank 0 alone, in the foreground)")
    if t.validation.every < 0 or (t.validation.steps is not None and t.validation.steps < 1):
        raise ConfigError(f"trainer.validation: every={t.validation.every} must be >= 0 (0 = only at the end) and "
                          f"steps={t.validation.steps} >= 1 (or null for the model's)")
    validation_prompts(cfg)
    # The launcher sets WORLD_SIZE: a batch the processes cannot share is refused here, on every rank alike,
    # before any process group exists (train/main.py prints it once, from rank 0).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = t.micro_batch_size or t.batch_size // world
    if micro < 1 or t.batch_size % (micro * world):
        raise ConfigError(f"trainer.batch_size={t.batch_size} cannot be shared by {world} processes"
                          + (f" with trainer.micro_batch_size={t.micro_batch_size}" if t.micro_batch_size else "")
                          + f": the global batch must be a multiple of micro-batch x processes (here e.g. "
                          f"{', '.join(str(n) for n in range(1, t.batch_size + 1) if t.batch_size % n == 0)} "
                          f"processes); a checkpoint resumes on any of those")
    d = cfg.data
    if d.get("lanes") is not None and not 1 <= d.lanes <= t.batch_size:
        raise ConfigError(f"data.lanes={d.lanes}: must be between 1 and trainer.batch_size ({t.batch_size}), or "
                          f"null for min(batch, shards)")
    if d.get("retries", 0) < 0 or d.get("timeout", 1) <= 0 or d.get("max_wait", 1) <= 0:
        raise ConfigError(f"data.retries={d.retries} must be >= 0, data.timeout={d.timeout} and "
                          f"data.max_wait={d.max_wait} > 0 (seconds)")
    if t.mixed_precision == Precision.fp16 and len(cfg.model.optim) > 1:
        raise ConfigError(f"trainer.mixed_precision=fp16 with {len(cfg.model.optim)} optimizers "
                          f"({', '.join(cfg.model.optim)}): Accelerate shares ONE GradScaler between them and updates "
                          f"its scale once per optimizer step, so the loss scale of each is wrong; use bf16 (no loss "
                          f"scaling needed) or no")


def validation_prompts(cfg: Any) -> tuple[list[str], list[str] | None]:
    """`trainer.validation`'s prompts (read from the file when `prompts` is a path) and one negative prompt
    per prompt (None when there are none). Raises ConfigError naming the key for a missing or empty file, a
    wrong count of negative prompts, or prompts on a stage-1 model."""
    v = cfg.trainer.validation
    prompts = v.prompts
    if isinstance(prompts, str):
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"trainer.validation.prompts={prompts}: no such file (give a list of prompts, or a text "
                              f"file with one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"trainer.validation.prompts={v.prompts}: the file holds no prompts")
    prompts = [str(p) for p in (prompts or [])]
    negatives = v.negative_prompts
    negatives = [str(negatives)] if isinstance(negatives, str) else [str(n) for n in (negatives or [])]
    if not prompts:
        if negatives:
            raise ConfigError("trainer.validation.negative_prompts is set but trainer.validation.prompts is empty")
        return [], None
    if cfg.model.get("first_stage") is None:
        raise ConfigError(f"trainer.validation.prompts: {cfg.model.name} is a stage-1 autoencoder, which samples "
                          f"no prompts; set validation prompts on the stage-2 (diffusion) run")
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if negatives and len(negatives) != len(prompts):
        raise ConfigError(f"trainer.validation.negative_prompts: {len(negatives)} negative prompts for {len(prompts)} "
                          f"prompts; give one for all or one per prompt")
    return prompts, negatives or None


def check_targets(node: Any, path: str = "model") -> None:
    """Check every `_target_` node under `node` against its target's signature.

    Raises ConfigError naming the full key for an unknown argument or a value of the wrong type.
    """
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_targets(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            target = get_object(node._target_)
        except Exception as e:  # noqa: BLE001 - report any import problem with the key
            raise ConfigError(f"{path}._target_: cannot import '{node._target_}': {e}") from e
        fn = target.__init__ if inspect.isclass(target) else target
        params = inspect.signature(fn).parameters
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 - unresolvable annotations: skip type checks
            hints = {}
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in node:
            if str(key).startswith("_"):
                continue
            if key not in params and not takes_kwargs:
                valid = ", ".join(k for k in params if k not in ("self", "args", "kwargs"))
                raise ConfigError(f"{path}.{key}: unknown argument of {node._target_} (valid: {valid})")
            value = OmegaConf.to_container(node[key], resolve=True) if OmegaConf.is_config(node[key]) \
                else node[key]
            if isinstance(value, dict) and "_target_" in value:
                continue
            if key in hints and not _type_ok(value, hints[key]):
                raise ConfigError(f"{path}.{key}: expected {hints[key]}, got {type(value).__name__} {value!r}")
    for key in node:
        if not str(key).startswith("_"):
            check_targets(node[key], f"{path}.{key}")
