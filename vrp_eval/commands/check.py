"""`vrp-eval check RESULTS`: gate a run on a policy's bounds and/or against a baseline run.

Exit 0 when everything holds, 1 when a bound fails or a gated metric got detectably worse than the
baseline, 2 for a policy or results file that cannot be used (docs/ci.md).
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from vrp_eval.gate import DEFAULT_GATE_METRICS
    from vrp_eval.statistics import DEFAULT_N_BOOTSTRAP

    parser.add_argument("results", help="run folder written by `vrp-eval run --output DIR`, or its results.json")
    parser.add_argument("--policy", default=None, metavar="POLICY.yaml",
                        help="bounds on the reported metrics (docs/ci.md; example: docs/ci/policy.yaml)")
    parser.add_argument("--baseline", default=None, metavar="BASELINE",
                        help="run folder (or results.json with samples.jsonl beside it) to compare against: "
                             "paired bootstrap CIs of run - baseline when both scored the same samples")
    parser.add_argument("--regression-metrics", default=",".join(DEFAULT_GATE_METRICS), metavar="M1,M2",
                        help="with --baseline: the metrics whose detectable worsening fails the gate "
                             "(default: %(default)s)")
    parser.add_argument("--summary", default=None, metavar="PATH",
                        help="write the Markdown summary here (it is also appended to $GITHUB_STEP_SUMMARY "
                             "when that is set)")
    parser.add_argument("--junit", default=None, metavar="PATH",
                        help="write a JUnit XML report here: one testcase per bound and gated metric")
    parser.add_argument("--n-bootstrap", type=int, default=DEFAULT_N_BOOTSTRAP,
                        help="bootstrap resamples of the baseline comparison (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the baseline comparison's bootstrap")


def main(args: argparse.Namespace) -> int:
    from vrp_eval.gate import check

    metrics = [m.strip() for m in args.regression_metrics.split(",") if m.strip()]
    report = check(args.results, args.policy, baseline=args.baseline, gate_metrics=metrics,
                   n_bootstrap=args.n_bootstrap, seed=args.seed)
    report.write(summary=args.summary, junit=args.junit)
    print(report.to_markdown())
    for failure in report.failures:
        print(f"vrp-eval check: FAILED {failure}")
    return 0 if report.passed else 1
