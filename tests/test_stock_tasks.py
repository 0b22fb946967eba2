"""`--model vrp` is an ordinary lmms-eval backend to every task: a stock task definition scores its
answers exactly as it scores lmms-eval's own `llava_hf` on the same model, also in one run together
with a `vrp_*` task, whose records still reach its reliability metrics.

The stock task is lmms-eval 0.7.3's `vqav2_val` (tasks/vqav2/vqav2_val.yaml with its
_default_template_vqav2_yaml) copied unchanged but for the data: vrp-synth validation from the
parquet file vrp-eval ships (no network).
"""
import json
import math
import os
import subprocess

import pytest
from test_lmms import LMMS_EVAL, SYNTH, _offline_env

LIMIT = 24

STOCK_VQAV2 = """\
# lmms-eval 0.7.3 tasks/vqav2/vqav2_val.yaml + _default_template_vqav2_yaml, data replaced by vrp-synth
task: "stock_vqav2_synth"
dataset_path: parquet
dataset_kwargs:
  data_files:
    validation: {data}
output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.vqav2.utils.vqav2_doc_to_visual
doc_to_text: !function lmms_eval.tasks.vqav2.utils.vqav2_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 16
metadata:
  - version: 0.0
test_split: validation
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
process_results: !function lmms_eval.tasks.vqav2.utils.vqav2_process_results_val
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""


def _response(sample):
    """A logged sample's response (lmms-eval 0.7.3 logs the one response of a document unwrapped)."""
    response = sample["filtered_resps"]
    return response if isinstance(response, str) else response[0]


def _zoo_llava():
    from vrp_eval.zoo import zoo_path

    path = zoo_path("tiny-llava")
    if not (path / "config.json").exists():
        pytest.skip("the zoo weights of tiny-llava are not built in this checkout")
    return path


#: lmms-eval's `llava_hf` module imports decord (a video reader) at import time, even for images. The
#: decord 0.6.0 wheel on PyPI declares itself cp36-only in its metadata, so `pip check` (run by
#: `make setup`) rejects it, and it is not a dependency of vrp-eval. For the `llava_hf` run only, this
#: stand-in satisfies the import; it fails loudly if a video were ever read (none is: these are images).
DECORD_STAND_IN = """\
def _no_video(*args, **kwargs):
    raise RuntimeError("decord stand-in from tests/test_stock_tasks.py: no video reading in these tests")


VideoReader = cpu = gpu = _no_video
"""


def _run(args, out, tasks_dir, extra_path=None):
    env = _offline_env()
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    run = subprocess.run([str(LMMS_EVAL), *args, "--include_path", str(tasks_dir), "--limit", str(LIMIT),
                          "--log_samples", "--output_path", str(out), "--verbosity", "WARNING"],
                         capture_output=True, text=True, env=env, cwd=out.parent, timeout=900, check=False)
    assert run.returncode == 0 and "Error during evaluation" not in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    (results,) = out.glob("**/*_results.json")
    samples = {path.name.split("_samples_")[1].removesuffix(".jsonl"): [json.loads(line) for line in path.read_text().splitlines()]
               for path in out.glob("**/*_samples_*.jsonl")}
    return json.loads(results.read_text())["results"], samples


@pytest.mark.slow
def test_a_stock_task_scores_vrp_as_it_scores_llava_hf(tmp_path):
    model = _zoo_llava()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "stock_vqav2_synth.yaml").write_text(STOCK_VQAV2.format(data=SYNTH))

    # lmms-eval's own LLaVA backend (on the CPU it needs device_map=cpu, --device cpu and batch size 1)
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    (stand_in / "decord.py").write_text(DECORD_STAND_IN)
    hf, hf_samples = _run(["--model", "llava_hf", "--model_args", f"pretrained={model},device_map=cpu",
                           "--batch_size", "1", "--device", "cpu", "--tasks", "stock_vqav2_synth"], tmp_path / "hf", tasks,
                          extra_path=stand_in)
    # vrp on the stock task and a vrp_* task in one run, every signal on (small settings)
    vrp, vrp_samples = _run(["--model", "vrp", "--model_args",
                             "pretrained=tiny-llava,device=cpu,n_bootstrap=100,n_noise=2,n_calibration=8",
                             "--batch_size", "8", "--tasks", "stock_vqav2_synth,vrp_synth"], tmp_path / "vrp", tasks)

    # The same answers, word for word, so the same score: a 5 KB record in the response (what
    # `vrp` once returned) scored 0 here.
    answers = {s["doc_id"]: _response(s) for s in hf_samples["stock_vqav2_synth"]}
    ours = {s["doc_id"]: _response(s) for s in vrp_samples["stock_vqav2_synth"]}
    assert ours == answers and len(answers) == LIMIT
    assert len(set(answers.values())) > 3  # whole answers of several kinds, not one character or one word
    assert vrp["stock_vqav2_synth"]["exact_match,none"] == hf["stock_vqav2_synth"]["exact_match,none"]
    # a model that answers: equal zeros would prove nothing
    assert hf["stock_vqav2_synth"]["exact_match,none"] > 0.5
    # the stock task reports only its own metric
    assert all(key == "alias" or key.startswith("exact_match") for key in vrp["stock_vqav2_synth"])

    # ... while the vrp_* task of the same run got every record
    task = vrp["vrp_synth"]
    assert task["n_samples,none"] == task["n_probed,none"] == LIMIT
    for name in ("ece", "attn_conf_r", "causal_acc_drop"):
        assert math.isfinite(task[f"{name},none"]), name
    records = [json.loads(s["n_probed"])["record"] for s in vrp_samples["vrp_synth"]]
    assert [r["answer"] for r in records] == [_response(s) for s in vrp_samples["vrp_synth"]]
    # vrp_synth and the stock copy ask the same prompt of the same rows: the same answers
    assert [r["answer"] for r in records] == [ours[i] for i in range(LIMIT)]


MC_LOGLIKELIHOOD = """\
# An lmms-eval `multiple_choice` task (log-likelihood requests) on vrp-synth-mc, asked as vrp_synth_mc asks
task: "mc_loglikelihood_synth"
dataset_path: parquet
dataset_kwargs:
  data_files:
    validation: {data}
test_split: validation
output_type: multiple_choice
doc_to_visual: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_visual
doc_to_text: !function vrp_eval.tasks.utils.synth_mc_doc_to_text
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""


@pytest.mark.slow
def test_vrp_answers_log_likelihood_requests_as_its_option_scoring_does(tmp_path):
    """lmms-eval's `multiple_choice` output type sends log-likelihood requests; `vrp` answers them
    with (log-likelihood, is-greedy) pairs, the likelihoods its `mc_scoring=likelihood` probe scores
    options by. The requests are the real task's (lmms-eval's TaskManager and `build_all_requests`),
    the model is lmms-eval's registered `vrp`; the evaluator loop is left out because lmms-eval 0.7.3
    turns every log-likelihood response into a string (`api/instance.py: unwrap_generation_output`
    ends in `str(output)`), after which its own multiple-choice scoring fails for any backend."""
    import numpy as np
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    from vrp_eval.data import load_examples
    from vrp_eval.probe import ProbeSettings, run_probe

    _zoo_llava()
    data = SYNTH.parent.parent / "vrp_synth_mc" / "validation.parquet"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc_loglikelihood_synth.yaml").write_text(MC_LOGLIKELIHOOD.format(data=data))
    task = get_task_dict(["mc_loglikelihood_synth"], TaskManager(include_path=str(tasks)))["mc_loglikelihood_synth"]
    task.build_all_requests(limit=LIMIT, rank=0, world_size=1)
    model = get_model("vrp")(pretrained="tiny-llava", device="cpu", batch_size=8)
    model.task_dict = {"mc_loglikelihood_synth": task.dataset}
    requests = task.instances
    responses = model.loglikelihood(requests)
    assert all(isinstance(ll, float) and isinstance(greedy, bool) for ll, greedy in responses)

    report = run_probe(model.loaded, ProbeSettings(dataset=str(data), limit=LIMIT, signals=(), n_bootstrap=10),
                       examples=load_examples(str(data), limit=LIMIT), progress=False)
    by_doc: dict[int, list[float]] = {}
    for request, (ll, _) in zip(requests, responses):
        by_doc.setdefault(int(request.doc_id), []).append((request.idx, ll))
    assert sorted(by_doc) == list(range(LIMIT))
    right = []
    for doc_id, record in zip(sorted(by_doc), report.records):
        lls = np.array([ll for _, ll in sorted(by_doc[doc_id])])
        probs = np.exp(lls - lls.max())
        probs /= probs.sum()
        # float32 forwards of different batches (lmms-eval batches (document, option) requests, the
        # probe batches documents): logits differ by float32 round-off, ~1e-6 here (|logit| < 30),
        # which moves a softmax over 3-4 options by about as much; 1e-4 is two orders above that and
        # far below the gaps between options (> 1e-2 on the items that decide accuracy).
        assert list(record.option_probs.values()) == pytest.approx(list(probs), abs=1e-4), doc_id
        right.append(float(int(np.argmax(lls)) == task.dataset["validation"][doc_id]["answer"]))
    # lmms-eval's `acc` (argmax of the log-likelihoods) is the probe's likelihood-scored accuracy
    assert right == [r.score for r in report.records] and np.mean(right) > 0.6
