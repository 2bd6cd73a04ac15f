"""Checkpoint bytes and write time at paper scale, full vs sharded: arithmetic from stated assumptions, no
measurement (the measured 2-process numbers are benchmarks/checkpoint_save.py's).

    python benchmarks/scale_model.py [--node-gbps 1 2] [--gpus-per-node 8] [--aggregate-gbps 100]

Per trainable parameter a checkpoint holds fp32 weights (4 B), the fp32 EMA (4 B) and AdamW's two fp32
moments (8 B): 16 B. The frozen VAE and text encoder are not saved (`task.frozen_prefixes`: rebuilt from
their own files), so only the UNet counts. Full: rank 0 gathers and writes everything, through one node's
bandwidth. Sharded: every rank writes total/ranks (under DDP too: DCP gives each replicated tensor to one
rank), so each node writes total/nodes, all nodes at once, up to the filesystem's aggregate bandwidth.
"""
from __future__ import annotations

import argparse

MODELS = {"SD-v1 UNet (860M)": 860e6, "2.6B UNet": 2.6e9}
BYTES_PER_PARAM = {"weights fp32": 4, "EMA fp32": 4, "AdamW moments fp32": 8}
RANKS = (8, 64, 256)
SIGNAL_LEAD_S = (60, 300)  # typical `#SBATCH --signal=B:USR1@60` .. `@300`


def rows(node_gbps: float, gpus_per_node: int, aggregate_gbps: float) -> list[dict]:
    out = []
    per_param = sum(BYTES_PER_PARAM.values())
    for name, params in MODELS.items():
        total = params * per_param
        for ranks in RANKS:
            nodes = max(1, ranks // gpus_per_node)
            full_s = total / (node_gbps * 1e9)
            sharded_s = total / min(nodes * node_gbps * 1e9, aggregate_gbps * 1e9)
            out.append({"model": name, "total_GB": total / 1e9, "ranks": ranks, "nodes": nodes,
                        "full_rank0_GB": total / 1e9, "sharded_rank_GB": total / ranks / 1e9,
                        "full_s": full_s, "sharded_s": sharded_s})
    return out


def fits(seconds: float) -> str:
    return "/".join("yes" if seconds <= lead else "no" for lead in SIGNAL_LEAD_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node-gbps", type=float, nargs="+", default=[1.0, 2.0],
                        help="write bandwidth of one node to the parallel filesystem, GB/s")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--aggregate-gbps", type=float, default=100.0, help="the filesystem's total, GB/s")
    args = parser.parse_args()
    per_param = " + ".join(f"{v} B {k}" for k, v in BYTES_PER_PARAM.items())
    print(f"bytes per trainable parameter: {per_param} = {sum(BYTES_PER_PARAM.values())} B; "
          f"{args.gpus_per_node} GPUs per node; filesystem aggregate {args.aggregate_gbps:g} GB/s")
    for gbps in args.node_gbps:
        print(f"\nper-node write bandwidth {gbps:g} GB/s; 'fits' = save time within a --signal lead of "
              f"{' / '.join(f'{s} s' for s in SIGNAL_LEAD_S)}")
        print("| model | checkpoint | ranks (nodes) | full: rank 0 writes | sharded: each rank writes | full time "
              "| fits | sharded time | fits |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows(gbps, args.gpus_per_node, args.aggregate_gbps):
            print(f"| {r['model']} | {r['total_GB']:.1f} GB | {r['ranks']} ({r['nodes']}) "
                  f"| {r['full_rank0_GB']:.1f} GB "
                  f"| {r['sharded_rank_GB'] * 1e3:.0f} MB | {r['full_s']:.1f} s | {fits(r['full_s'])} "
                  f"| {r['sharded_s']:.1f} s | {fits(r['sharded_s'])} |")


if __name__ == "__main__":
    main()
