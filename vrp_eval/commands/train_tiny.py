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
    parser.add_argument("--train-start", type=int, default=0,
                        help="train-split index of the first training item (default 0); a further stage gives the "
                             "end of the earlier stages' range to train on unseen items (--seed does not change the items)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--image-size", type=int, default=48, help="model input resolution (multiple of 8)")
    parser.add_argument("--hidden-size", type=int, default=64, help="decoder width")
    parser.add_argument("--intermediate-size", type=int, default=256, help="decoder MLP width")
    parser.add_argument("--heads", type=int, default=4, help="decoder attention heads")
    parser.add_argument("--vision-layers", type=int, default=3)
    parser.add_argument("--vision-hidden", type=int, default=128, help="vision tower width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop training after this long (still saves)")
    parser.add_argument("--init-from", default=None,
                        help="continue from this zoo name or train-tiny folder (a further training stage)")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="score on 200 validation items and save a checkpoint every N steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the shipped zoo was trained on one GPU)")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.zoo.build import TinySpec
    from vrp_eval.zoo.train import train_tiny

    report = train_tiny(args.family, args.output, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        n_train=args.n_train, train_start=args.train_start, seed=args.seed, spec=TinySpec(num_layers=args.layers, image_size=args.image_size, hidden_size=args.hidden_size,
                                                               intermediate_size=args.intermediate_size, num_heads=args.heads,
                                                               vision_layers=args.vision_layers, vision_hidden=args.vision_hidden),
                        threads=args.threads, device=args.device,
                        max_seconds=args.max_seconds, init_from=args.init_from, eval_every=args.eval_every)
    print(json.dumps(report, indent=2))
    return 0
