"""Write a stage-2 run as a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads.

    python train/export.py RUN_DIR OUT_DIR [--checkpoint PATH] [--raw-weights]
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python train/export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory written by train/main.py (stage 2)")
    parser.add_argument("out_dir", help="new folder to write (must not exist)")
    parser.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    parser.add_argument("--raw-weights", action="store_true", help="export the raw UNet weights instead of the EMA")
    args = parser.parse_args(argv)

    from ldm.errors import RunError
    from ldm.training.export import export_run  # after parsing: `--help` stays instant

    try:
        export_run(args.run_dir, args.out_dir, args.checkpoint, use_ema=not args.raw_weights)
    except (FileNotFoundError, FileExistsError, ValueError, RunError) as error:
        raise SystemExit(f"[ldm] {error}") from None


if __name__ == "__main__":
    main()
