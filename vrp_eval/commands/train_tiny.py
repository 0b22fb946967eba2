"""`vrp-eval train-tiny --family llava`: rebuild a zoo model from scratch, reproducibly."""
from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", required=True, choices=["llava", "paligemma", "qwen2vl"])
    parser.add_argument("--output", default=None, help="folder to save to (default: the zoo folder in the package)")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-train", type=int, default=40000)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--image-size", type=int, default=48, help="model input resolution (multiple of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop training after this long (still saves)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the shipped zoo was trained on one GPU)")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.zoo.build import TinySpec
    from vrp_eval.zoo.train import train_tiny

    report = train_tiny(args.family, args.output, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        n_train=args.n_train, seed=args.seed, spec=TinySpec(num_layers=args.layers, image_size=args.image_size),
                        threads=args.threads, device=args.device,
                        max_seconds=args.max_seconds)
    print(json.dumps(report, indent=2))
    return 0
