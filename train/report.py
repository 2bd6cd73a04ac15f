"""One self-contained HTML page for a run: open it in any browser, no server, no W&B account.

    python train/report.py runs/ldm_txt2img_demo-shapes          # writes runs/ldm_txt2img_demo-shapes/report.html

It shows curves of every series in metrics.csv (loss, learning rate, img/s, every validation metric,
gradient norms) plotted with matplotlib, the latest image grids, the final metrics (final_metrics.json,
eval.json, the demo's alignment.json), the checkpoints and the resolved config. Images are inlined as
base64 PNG, so the one file can be copied off an air-gapped cluster on its own. It works on a run that is
still training: it shows what is there so far.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import io
import json
import math
import re
from pathlib import Path

# Curves in this order (first match wins), then the rest alphabetically.
PLOT_ORDER = ("train/loss", "lr/", "train/img_per_s", "val/", "train/", "grad_norm/", "data/")
GRID_NAME = re.compile(r"^(?P<name>.+)_(?P<step>\d{8})\.png$")  # run_dir/images/<name>_<step>.png (tracking.py)
RESULT_FILES = ("final_metrics.json", "eval.json", "demo/alignment.json")


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.csv (long format: step,name,value) -> {name: (steps, values)}. A row cut short by a crash
    or a concurrent write is skipped, not fatal: the report of a live run must still render."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    if not path.is_file():
        return series
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (TypeError, ValueError, KeyError):
                continue
            steps, values = series.setdefault(row["name"], ([], []))
            steps.append(step)
            values.append(value)
    return series


def plot_order(names) -> list[str]:
    def key(name):
        rank = next((i for i, p in enumerate(PLOT_ORDER) if name == p or (p.endswith("/") and name.startswith(p))),
                    len(PLOT_ORDER))
        return rank, name

    return sorted(names, key=key)


def plot_png(name: str, steps: list[int], values: list[float]) -> bytes:
    """One small line chart as PNG bytes. Losses spanning decades get a log axis."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    values = [v if math.isfinite(v) else float("nan") for v in values]
    fig, ax = plt.subplots(figsize=(3.9, 2.6), dpi=100)  # 390 px: three across a laptop screen
    smooth = len(steps) >= 50  # noisy training curves: a running mean over ~5% of the points on top
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, linewidth=1.2, color="#1f77b4",
            alpha=0.6 if smooth else 1.0)
    if smooth:
        k = max(2, len(values) // 20)
        smooth = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, linewidth=1.8, color="#d62728")
    finite = [v for v in values if v == v]
    if "loss" in name and finite and min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def latest_grids(run_dir: Path) -> list[tuple[str, Path]]:
    """(title, path) of the newest grid of each name in run_dir/images, then any grid.png one folder
    down (the demo's run_dir/demo/grid.png, train/sample.py's run_dir/samples/grid.png)."""
    newest: dict[str, tuple[int, Path]] = {}
    for path in sorted((run_dir / "images").glob("*.png")):
        m = GRID_NAME.match(path.name)
        if m and int(m["step"]) >= newest.get(m["name"], (-1, None))[0]:
            newest[m["name"]] = (int(m["step"]), path)
    first = ("samples", "reconstructions")  # what the model made before the references it is compared with
    order = sorted(newest, key=lambda n: (n not in first, first.index(n) if n in first else 0, n))
    grids = [(f"{name} at step {newest[name][0]}", newest[name][1]) for name in order]
    grids += [(f"{path.parent.name}/grid.png", path) for path in sorted(run_dir.glob("*/grid.png"))]
    return grids


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoints(run_dir: Path) -> list[tuple[str, str, str]]:
    """(name, MB, modified) for each checkpoint directory and the stage-1 autoencoder file."""
    rows = []
    paths = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    paths += [p for p in [run_dir / "autoencoder.safetensors"] if p.is_file()]
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files) / 2**20
        when = datetime.datetime.fromtimestamp(p.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        rows.append((p.name + ("" if p.is_file() or (p / "state.json").is_file() else " (incomplete)"),
                     f"{size:.1f}", when))
    return rows


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h3{font-size:14px;margin:10px 0 2px 0}
h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:28px}
.meta{color:#666;font-size:13px} .curves{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0 0 14px 0} figcaption{font-size:13px;color:#555} .grid img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left} th{background:#f5f5f5}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:600px}
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write run_dir/report.html (or `out`) and return its path."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a run directory written by train/main.py")
    config_text = config_path.read_text()
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(config_path))
    except Exception:  # noqa: BLE001 - a damaged config still gets shown as text below
        cfg = {}

    def setting(group: str, key: str):
        section = cfg.get(group) if isinstance(cfg, dict) else None
        return section.get(key, "?") if isinstance(section, dict) else "?"

    series = read_metrics(run_dir / "metrics.csv")
    last_step = max((max(s) for s, _ in series.values() if s), default=0)
    title = f"{setting('model', 'name')} on {setting('data', 'name')}"

    parts = [f"<h1>{html.escape(run_dir.name)}</h1>",
             f'<div class="meta">{html.escape(title)} · step {last_step} of '
             f"{setting('trainer', 'max_steps')} · report written "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M} · {html.escape(str(run_dir.resolve()))}</div>"]

    parts.append("<h2>Curves</h2>")
    names = [n for n in plot_order(series) if not (n.startswith("data/") and not any(series[n][1]))]
    if names:
        parts.append('<div class="curves">' + "".join(_img(plot_png(n, *series[n]), n) for n in names) + "</div>")
    else:
        parts.append("<p>No metrics.csv rows yet.</p>")

    parts.append("<h2>Latest grids</h2>")
    grids = latest_grids(run_dir)
    parts += [f'<figure class="grid">{_img(p.read_bytes(), t)}<figcaption>{html.escape(t)}</figcaption></figure>'
              for t, p in grids] or ["<p>No grids yet (they are written at each evaluation).</p>"]

    parts.append("<h2>Final metrics</h2>")
    found = False
    for name in RESULT_FILES:
        path = run_dir / name
        if path.is_file():
            found = True
            try:
                table = _table(flatten(json.loads(path.read_text())).items(), ["metric", "value"])
            except (json.JSONDecodeError, AttributeError) as e:  # cut short while being written
                table = f"<p>unreadable: {html.escape(str(e))}</p>"
            parts.append(f"<h3>{html.escape(name)}</h3>" + table)
    if not found:
        parts.append("<p>None yet (final_metrics.json is written when training ends).</p>")

    parts.append("<h2>Checkpoints</h2>")
    ckpts = checkpoints(run_dir)
    parts.append(_table(ckpts, ["checkpoint", "MB", "modified"]) if ckpts else "<p>None yet.</p>")

    parts.append(f"<h2>Config</h2><pre>{html.escape(config_text)}</pre>")

    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)} · ldm report'
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    out = Path(out) if out else run_dir / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(out)  # a reader never sees half a page
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by train/main.py")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default RUN_DIR/report.html)")
    args = parser.parse_args()
    if not args.run_dir.is_dir():
        parser.error(f"run_dir {args.run_dir} is not a directory")
    try:
        print(f"[ldm] report: {write_report(args.run_dir, args.out)}")
    except FileNotFoundError as e:  # not a run directory: one line, no traceback
        raise SystemExit(f"[ldm] {e}") from None


if __name__ == "__main__":
    main()
