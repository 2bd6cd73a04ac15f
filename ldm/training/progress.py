"""Where a run's numbers go: the trackers (W&B / TensorBoard), `metrics.csv`, and the console.

On a terminal (and with `trainer.progress`) the console shows a tqdm bar; anywhere else (SLURM, nohup,
tests: stdout is a file or a pipe) a bar writes carriage-return redraws that read as noise, so the run
prints one plain line per `trainer.log_every` steps instead:

    [ldm] step 40/2000  loss 0.1234  img/s 52.1  data wait 3%  ETA 0:12:34

Only the job's main process (global rank 0) writes to the console, so every line appears once per job.
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ldm.training.tracking import CSVLog, init_tracking

SHOWN = {"loss": ("train/loss", ".4f"), "img/s": ("train/img_per_s", ".1f"), "mfu": ("train/mfu", ".1%"),
         "tflops": ("train/tflops", ".3g"), "data wait": ("train/data_wait", ".0%")}


class RunLog:
    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator, self.main = cfg, accelerator, accelerator.is_main_process
        self.max_steps = cfg.trainer.max_steps
        self.bar = self.csv = None
        self.lines = self.main and not (cfg.trainer.progress and sys.stdout.isatty())
        self.buckets_said = False

    def start(self, step: int) -> None:
        """After the run directory exists: trackers, metrics.csv, the bar or the clock of the ETA."""
        init_tracking(self.accelerator, self.cfg, Path(self.cfg.run_dir))
        self.csv = CSVLog(Path(self.cfg.run_dir), self.main)
        self.bar = tqdm(total=self.max_steps, initial=step, dynamic_ncols=True,
                        disable=not (self.main and not self.lines and self.cfg.trainer.progress))
        self.restart_clock(step)

    def restart_clock(self, step: int) -> None:
        """The ETA counts from here (the start, or a rewind)."""
        self.since_step, self.since = step, time.monotonic()
        self.bar.n = step
        self.bar.refresh()

    def write(self, step: int, values: dict) -> None:
        self.accelerator.log(values, step=step)
        self.csv.write(step, values)

    def step(self, step: int, values: dict | None = None) -> None:
        """One optimizer step done; `values` at log steps go to the trackers, metrics.csv and the console."""
        self.bar.update(step - self.bar.n)
        if values is None:
            return
        self.write(step, values)
        shown = {k: format(values[key], spec) for k, (key, spec) in SHOWN.items() if key in values}
        self.bar.set_postfix({k.replace(" ", "_").replace("/", "_"): v for k, v in shown.items()})
        if self.lines:
            print(f"[ldm] step {step}/{self.max_steps}  " + "  ".join(f"{k} {v}" for k, v in shown.items())
                  + f"  ETA {self._eta(step)}", flush=True)

    def buckets(self, step: int, counts: dict) -> None:
        """data.buckets: samples per bucket shape (height, width) handed to this process since it started,
        to the trackers at every log step, and as a console line at the first log step and the last."""
        if not counts or not self.main:
            return
        self.write(step, {f"data/bucket_{h}x{w}": n for (h, w), n in counts.items()})
        if self.buckets_said and step != self.max_steps:
            return
        self.buckets_said, total = True, sum(counts.values())
        shapes = sorted(counts, key=lambda s: s[1] / s[0])  # tallest to widest
        line = ("[ldm] buckets (samples handed to this process so far): "
                + ", ".join(f"{h}x{w} {counts[h, w]} ({counts[h, w] / total:.0%})" for h, w in shapes))
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)  # above the bar, not through it

    def _eta(self, step: int) -> str:
        done = step - self.since_step
        if done <= 0:
            return "?"
        seconds = (time.monotonic() - self.since) / done * (self.max_steps - step)
        return str(datetime.timedelta(seconds=round(seconds)))

    def close(self) -> None:
        self.bar.close()


class Ticker:
    """Progress of a long loop outside training (evaluation, the latent cache) as plain `[ldm]` lines, at
    most one per `every` seconds: a tqdm bar would write carriage-return redraws into a log file, and a
    silent loop of minutes looks hung."""

    def __init__(self, what: str, unit: str, total: int | None = None, every: float = 10.0):
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.count, self.start = 0, time.monotonic()
        self.last = self.start

    def __call__(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"[ldm] {self.what}: {self._done(now)}", flush=True)

    def _done(self, now: float) -> str:
        of = f"/{self.total}" if self.total else ""
        rate = self.count / max(now - self.start, 1e-9)
        return f"{self.count}{of} {self.unit}, {rate:.1f}/s, {now - self.start:.0f} s"

    def close(self) -> None:
        """The closing line, always printed, so even a fast loop says what it did."""
        print(f"[ldm] {self.what}: done, {self._done(time.monotonic())}", flush=True)


def say(accelerator, message: str) -> None:
    """One `[ldm]` line per job (Accelerate's `print` prints once per node)."""
    if accelerator.is_main_process:
        print(message, flush=True)
