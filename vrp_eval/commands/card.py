"""`vrp-eval card RESULTS`: the model-index metadata for a model card (huggingface_hub EvalResult).

Prints the YAML, writes/updates a README with `--output`, or opens a pull request on the model repo
with `--push --repo MODEL_REPO`.
"""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results.json written by `vrp-eval run`, or an lmms-eval results file of a "
                                        "`--model vrp` run (its --log_samples file beside it): what `push` takes")
    parser.add_argument("--lmms-task", default=None, help="for an lmms-eval file with several vrp_* tasks: which one")
    parser.add_argument("--output", default=None, metavar="README.md",
                        help="write (or update the model-index of) this card file instead of printing the YAML")
    parser.add_argument("--push", action="store_true", help="open a pull request with the card on --repo")
    parser.add_argument("--repo", default=None, metavar="MODEL_REPO",
                        help="model repo for --push (default: the results' config.model_name)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--token-env", default=None, metavar="VAR",
                        help="read the token from this environment variable (default: HF_TOKEN, then the stored login)")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.hub import (
        PushError,
        card_metadata,
        load_publishable,
        push_card,
        token_from_env,
        write_card,
    )
    from vrp_eval.results import ResultsError, model_slug

    try:
        results = load_publishable(args.results, args.lmms_task)  # the files `vrp-eval push` takes
        if args.output:
            print(f"wrote {write_card(results, args.output)}")
        elif not args.push:
            print(card_metadata(results))
        if args.push:
            repo = args.repo
            if repo is None and model_slug(results["config"]) == results["config"]["model_name"]:
                repo = results["config"]["model_name"]
            if repo is None:
                print("vrp-eval card: --push needs --repo MODEL_REPO (the results' model_name is not a Hub id)",
                      file=sys.stderr)
                return 2
            token = token_from_env(args.token_env) if args.token_env else None
            print(f"opened a pull request: {push_card(results, repo, token=token, endpoint=args.endpoint)}")
    except (ResultsError, PushError, ValueError, OSError) as error:
        print(f"vrp-eval card: {error}", file=sys.stderr)
        return 2
    return 0
