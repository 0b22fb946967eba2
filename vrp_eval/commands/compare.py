"""`vrp-eval compare RUN ...`: the comparison table of several runs (Markdown on stdout; with
--output, compare.md, compare.csv and compare.png)."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from vrp_eval.compare import DEFAULT_SORT

    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders written by `vrp-eval run --output DIR`, or results.json files")
    parser.add_argument("--sort", default=DEFAULT_SORT, metavar="METRIC",
                        help="sort best first by this metric (its direction from the metric table; "
                             "default: %(default)s)")
    parser.add_argument("--task", action="append", default=None,
                        help="only this task (repeat for several; default: every task of every run)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="also write DIR/compare.md, DIR/compare.csv and DIR/compare.png")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.compare import comparison_table, load_run

    table = comparison_table([load_run(path) for path in args.runs], sort=args.sort, tasks=args.task)
    print(table.to_markdown())
    if args.output:
        written = table.write(args.output)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
