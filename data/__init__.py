"""Dataset tools: demo sets written as WebDataset shards, and image folders turned into shards."""
import argparse


def generator_main(argv, description: str, write, train: int, val: int) -> None:
    """The command line the generated sets share: `--out DIR --train N --val N --size PX --seed S --max-count N`,
    passed to `write(out, train, val, size, seed, max_count)`; prints the shard pattern of each split."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--val", type=int, default=val)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (splits get >= 8 shards)")
    args = parser.parse_args(argv)
    print(write(args.out, args.train, args.val, args.size, args.seed, args.max_count))
