"""`vrp-eval push RESULTS --repo ORG/NAME`: commit a results file to a Hub results dataset."""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results.json written by `vrp-eval run`, or an lmms-eval results file of a "
                                        "`--model vrp` run (its --log_samples file beside it)")
    parser.add_argument("--lmms-task", default=None, help="for an lmms-eval file with several vrp_* tasks: which one")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="the results dataset repo (created if needed)")
    parser.add_argument("--dry-run", action="store_true", help="validate and show what would be written; upload nothing")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--token-env", default=None, metavar="VAR",
                        help="read the token from this environment variable (default: HF_TOKEN, then the stored login)")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.hub import PushError, load_publishable, push_results, token_from_env
    from vrp_eval.results import ResultsError

    try:
        results = load_publishable(args.results, args.lmms_task)  # validate before anything else, token included
        token = None
        if args.token_env and not args.dry_run:
            token = token_from_env(args.token_env)
            if token is None:
                raise PushError(f"environment variable {args.token_env} is not set or empty")
        report = push_results(results, args.repo, token=token, endpoint=args.endpoint, dry_run=args.dry_run)
    except (ResultsError, PushError, ValueError, OSError) as error:
        print(f"vrp-eval push: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
