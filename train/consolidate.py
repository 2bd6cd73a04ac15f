"""Join a sharded checkpoint (`trainer.checkpoint_format=sharded`) into the single files a full checkpoint has.

    python train/consolidate.py RUN_DIR_OR_CHECKPOINT [--out DIR]

RUN_DIR: its latest checkpoint; a checkpoint directory: that one. Writes DIR (default
RUN_DIR/consolidated/step_XXXXXXXX) with model.safetensors and ema.safetensors, which train/sample.py,
train/evaluate.py and train/export.py take with `checkpoint=DIR` / `--checkpoint DIR`. They also read a
sharded checkpoint directly (consolidating it in memory each time); this writes it once.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python train/consolidate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run directory (its latest checkpoint) or a sharded checkpoint directory")
    parser.add_argument("--out", default=None, help="new folder to write (default RUN_DIR/consolidated/STEP)")
    args = parser.parse_args(argv)

    from ldm.errors import RunError
    from ldm.training.checkpoint_files import resolve_resume
    from ldm.training.consolidate import consolidate  # after parsing: `--help` stays instant

    source = Path(args.source)
    try:
        if (source / "state.json").is_file():
            checkpoint, run_dir = source, source.parent.parent
        else:
            checkpoint, run_dir = resolve_resume("latest", source), source
            if checkpoint is None:
                raise FileNotFoundError(f"no checkpoint in {source / 'checkpoints'}: is {source} a run directory?")
        out = Path(args.out) if args.out else run_dir / "consolidated" / checkpoint.name.removesuffix(".old")
        consolidate(checkpoint, out)
    except (FileNotFoundError, FileExistsError, ValueError, RunError) as error:
        raise SystemExit(f"[ldm] {error}") from None
    print(f"[ldm] consolidated {checkpoint} -> {out} (model.safetensors"
          + (", ema.safetensors)" if (out / "ema.safetensors").is_file() else ")")
          + f"; use it with checkpoint={out}")


if __name__ == "__main__":
    main()
