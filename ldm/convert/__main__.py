"""Command line: `python -m ldm.convert to-diffusers RUN_DIR OUT_DIR [--checkpoint PATH] [--raw-weights]`."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-diffusers", help="write a stage-2 run as a diffusers folder")
    export.add_argument("run_dir", help="run directory written by train/main.py (stage 2)")
    export.add_argument("out_dir", help="new folder to write (must not exist)")
    export.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    export.add_argument("--raw-weights", action="store_true", help="export the raw UNet weights instead of the EMA")
    args = parser.parse_args(argv)

    from ldm.convert.export import export_run

    try:
        export_run(args.run_dir, args.out_dir, args.checkpoint, use_ema=not args.raw_weights)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"[ldm] {error}") from None


if __name__ == "__main__":
    main()
