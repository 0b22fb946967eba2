"""`vrp-eval space`: the shipped `evaluate` metrics and the leaderboard as Hugging Face Spaces.

    vrp-eval space path vrp_ece                  # the folder to pass to evaluate.load (works from a wheel)
    vrp-eval space build leaderboard out/lb      # a slim, deployable Space folder
    vrp-eval space publish --org my-org          # the four metric Spaces: evaluate.load("my-org/vrp_ece")
"""
from __future__ import annotations

import argparse
import sys

from vrp_eval.spaces import METRIC_NAMES, SPACE_NAMES


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    path = sub.add_parser("path", help="print the installed folder of a Space (a metric: what evaluate.load takes)")
    path.add_argument("name", choices=SPACE_NAMES)
    build = sub.add_parser("build", help="write a slim, deployable Space folder")
    build.add_argument("name", choices=SPACE_NAMES)
    build.add_argument("output", help="a new or empty folder")
    publish = sub.add_parser("publish", help="build and upload Spaces as ORG/<name> (default: the four metrics)")
    publish.add_argument("names", nargs="*", metavar="NAME",
                         help=f"Spaces to publish (default: {' '.join(METRIC_NAMES)}; also: leaderboard)")
    publish.add_argument("--org", required=True, help="Hub user or organisation that will own the Spaces")
    publish.add_argument("--private", action="store_true", help="create the Spaces private")
    publish.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.hub import PushError
    from vrp_eval.spaces import SpaceError, build_space, publish_spaces, source_dir

    try:
        if args.action == "path":
            print(source_dir(args.name))
        elif args.action == "build":
            print(build_space(args.name, args.output))
        else:
            for repo_id in publish_spaces(args.names or METRIC_NAMES, args.org, endpoint=args.endpoint,
                                          private=args.private):
                print(f"published spaces/{repo_id}")
    except (SpaceError, PushError, OSError) as error:
        print(f"vrp-eval space: {error}", file=sys.stderr)
        return 2
    return 0
