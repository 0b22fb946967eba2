"""lm-eval 0.4.13: the `vrp-lm` model on the vrp_text_* tasks, through the real CLI, offline.

The results lm-eval writes must equal what vrp-eval's Python API computes on the same samples:
`probe.run_probe` on a `TextAdapter` for the short-answer task, and an independent forward pass of
the model (log-likelihood of each option, softmax, `calibration_summary`) for multiple choice.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vrp_eval import lm, synth_text
from vrp_eval.textlm import TEXT_SIGNALS, TINY_TEXT_LLAMA, load_text_model, text_example

LIMIT = 40
N_BOOTSTRAP = 200
BATCH_SIZE = 16


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """One `python -m vrp_eval.lm` run on both tasks: (results, {task: logged samples})."""
    out = tmp_path_factory.mktemp("lm-eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "vrp_eval.lm", "--model", "vrp-lm",
               "--model_args", f"pretrained={TINY_TEXT_LLAMA},n_bootstrap={N_BOOTSTRAP}",
               "--tasks", "vrp_text_synth,vrp_text_synth_mc", "--include_path", str(lm.tasks_dir()),
               "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--output_path", str(out),
               "--limit", str(LIMIT), "--log_samples"]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [results_file] = out.glob("*/results_*.json")
    samples = {}
    for task in ("vrp_text_synth", "vrp_text_synth_mc"):
        [path] = out.glob(f"*/samples_{task}_2*.jsonl")  # date-stamped; the mc log also starts with the name
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text()), samples


def _same(ours, theirs, name, tol):
    if isinstance(ours, (list, tuple)) or ours is None:
        assert (list(ours) if ours is not None else None) == theirs, name
    elif isinstance(ours, float) and math.isnan(ours):
        assert theirs is None or (isinstance(theirs, float) and math.isnan(theirs)) or theirs == "NaN", name
    else:
        assert theirs == pytest.approx(ours, abs=tol, rel=0), name


@pytest.fixture(scope="module")
def text_model():
    torch.set_num_threads(1)
    return load_text_model(TINY_TEXT_LLAMA, device="cpu")


@pytest.mark.slow
def test_short_answer_metrics_equal_run_probe(lm_eval_run, text_model):
    from vrp_eval.probe import ProbeSettings, run_probe

    results, samples = lm_eval_run
    logged = samples["vrp_text_synth"]
    assert len(logged) == LIMIT
    rows = [s["doc"] for s in logged]
    contexts = [s["arguments"]["gen_args_0"]["arg_0"] for s in logged]
    assert contexts == [synth_text.prompt(r["context"], r["question"]) for r in rows]

    settings = ProbeSettings(dataset="vrp_text_synth", signals=TEXT_SIGNALS, n_bootstrap=N_BOOTSTRAP,
                             batch_size=BATCH_SIZE, max_new_tokens=8)
    examples = [text_example(s["doc_id"], context, row["answer"]) for s, context, row in zip(logged, contexts, rows)]
    report = run_probe(text_model, settings, examples=examples, progress=False)

    task = results["results"]["vrp_text_synth"]
    # Exact by construction: vrp-lm runs this very run_probe on the same examples in document order,
    # so the same batches through the same kernels; JSON keeps every float's repr (measured identical).
    for name in ("accuracy", *lm.RELIABILITY_METRICS):
        assert f"{name},none" in task, name
        if name != "n_probed":  # the harness's count of samples that carry a record
            _same(report.metrics.get(name, math.nan), task[f"{name},none"], name, tol=0)
    assert task["n_probed,none"] == LIMIT
    # The causal part is really there: a trace, a circuit window and a held-out drop.
    assert task["n_heldout,none"] > 0 and len(task["circuit_layers,none"]) == 2
    assert not math.isnan(task["causal_acc_drop,none"]) and not math.isnan(task["ece,none"])
    # Per sample: the response is the plain answer (what any lm-eval model returns), lm-eval's
    # accuracy is the record's score, and the samples log holds the record as n_probed's value.
    for sample, record in zip(logged, report.records):
        response = sample["filtered_resps"]
        assert (response if isinstance(response, str) else response[0]) == record.answer
        payload = json.loads(sample["n_probed"])
        assert payload["record"]["confidence"] == record.confidence  # exact, as above
        assert sample["accuracy"] == record.score


def _option_loglikelihoods(loaded, prompt: str, choices: list[str]) -> list[float]:
    """Sum of the option's token log-probabilities after the prompt: one plain forward per option."""
    tokenizer, model = loaded.processor, loaded.model
    context = tokenizer(prompt)["input_ids"]
    out = []
    for choice in choices:
        ids = tokenizer(f"{prompt} {choice}")["input_ids"]
        assert ids[:len(context)] == context
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        out.append(float(sum(logprobs[t - 1, ids[t]] for t in range(len(context), len(ids)))))
    return out


@pytest.mark.slow
def test_multiple_choice_metrics_equal_direct_computation(lm_eval_run, text_model):
    from vrp_eval.calibration import calibration_summary
    from vrp_eval.probe import ProbeSettings

    results, samples = lm_eval_run
    logged = samples["vrp_text_synth_mc"]
    assert len(logged) == LIMIT
    confidences, scores = [], []
    for sample in logged:
        doc = sample["doc"]
        lls = _option_loglikelihoods(text_model, synth_text.prompt(doc["context"], doc["question"]), doc["choices"])
        # lm-eval kept the (log-likelihood, is_greedy) tuples: they are the model's. Logged as the
        # float's full repr; float32 round-off only, as lm-eval scores options in padded batches of 16
        # and this oracle one option at a time: ~1 ulp of |ll| <= 9 measured (1.2e-6), 1e-5 is ~10 ulp.
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(lls, abs=1e-5)
        probs = np.exp(np.array(lls) - max(lls))
        probs /= probs.sum()
        pred = int(np.argmax(lls))
        confidences.append(float(probs[pred]))
        scores.append(float(pred == doc["label"]))
        assert sample["accuracy"] == scores[-1]
    # Any lm-eval model can run this task, so its aggregation uses the default settings (1000
    # bootstrap resamples, seed 0), not the vrp-lm model_args.
    defaults = ProbeSettings()
    expected = calibration_summary(confidences, scores, n_bins=defaults.n_bins, n_bootstrap=defaults.n_bootstrap,
                                   seed=defaults.seed)
    expected.update(accuracy=float(np.mean(scores)), mean_confidence=float(np.mean(confidences)))
    task = results["results"]["vrp_text_synth_mc"]
    # The log-likelihood round-off above moves confidences by ~5e-8 and the metrics, averages of them,
    # by as much (measured <= 5.2e-8): no argmax or ECE bin flips on these 40 fixed samples.
    for name in ("accuracy", *lm.CALIBRATION_METRICS):
        _same(expected[name], task[f"{name},none"], name, tol=1e-6)
    assert 0 < task["accuracy,none"] < 1  # a model that is sometimes wrong: calibration is not trivial


def test_subject_is_the_first_sentence(text_model):
    adapter = text_model.adapter
    prompt = synth_text.prompt("A red circle is left of a blue square.", "What color is the circle?")
    batch = adapter.encode([None, None], [prompt, "There is a green triangle. Is there a red square?"])
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    tokens = adapter.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][groups["subject"][0]].tolist())
    assert tokens == ["a", "red", "circle", "is", "left", "of", "a", "blue", "square", "."]
    assert int(groups["subject"][1].sum()) == len(["there", "is", "a", "green", "triangle", "."])
    assert not (groups["subject"] & groups["text"]).any() and groups["last"].sum() == 2


def test_embedding_corruption_reaches_a_text_model(text_model):
    """The text adapter's embedding hook (on the input-embedding module's output, inside a scope)
    changes nothing by itself, and makes the engine's subject corruption act (a VLM gets embeddings
    from its outer model; a causal LM must be given them)."""
    from transformers import AutoModelForCausalLM

    from vrp_eval.intervention import EmbeddingCorruption

    adapter = text_model.adapter
    batch = adapter.encode([None], [synth_text.prompt("There is a red circle.", "What color is the circle?")])
    plain = AutoModelForCausalLM.from_pretrained(TINY_TEXT_LLAMA).eval()
    with torch.no_grad():
        clean = text_model.model(**batch).logits[0, -1]
        # exact: the same checkpoint, float32 and SDPA, and the embedding hook passes embeddings through as is
        assert torch.equal(clean, plain(**batch).logits[0, -1])
        subject = adapter.position_groups(batch["input_ids"], batch["attention_mask"])["subject"]
        with EmbeddingCorruption(adapter, subject, sigma=1.0, scale=3.0) as corruption:
            noised = text_model.model(**batch).logits[0, -1]
    # The noise moves logits by O(1) (measured 4.5), far beyond any round-off
    assert corruption.calls == 1 and not torch.allclose(clean, noised, atol=1e-3)


def test_build_text_llama_trains_and_loads(tmp_path):
    from vrp_eval.zoo.build_text import build_text_llama, train_text_llama

    model, tokenizer = build_text_llama()
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    row = synth_text.generate("validation", 1)[0]
    ids = tokenizer(synth_text.prompt(row["context"], row["question"]) + " " + row["answer"])["input_ids"]
    assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.bos_token_id
    report = train_text_llama(tmp_path, steps=3, n_train=64, n_eval=8)
    assert report["steps"] == 3 and (tmp_path / "training_report.json").exists()
    assert load_text_model(tmp_path, device="cpu").adapter.num_layers == 4


@pytest.mark.slow
def test_lm_eval_models_run_through_the_entry_point(lm_eval_run, tmp_path):
    """`python -m vrp_eval.lm` passes lm-eval's own models through (`--model hf` once failed with
    "Supported model names: vrp-lm"), and on the multiple-choice task `hf` scores as `vrp-lm` does:
    both sum the options' token log-probabilities of the same tokens (lm-eval's TemplateLM encoding)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "vrp_eval.lm", "--model", "hf", "--model_args", f"pretrained={TINY_TEXT_LLAMA}",
               "--tasks", "vrp_text_synth_mc", "--device", "cpu", "--output_path", str(tmp_path),
               "--limit", str(LIMIT), "--log_samples"]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [results_file] = tmp_path.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "hf"
    [path] = tmp_path.glob("*/samples_vrp_text_synth_mc_2*.jsonl")
    theirs = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    vrp_results, samples = lm_eval_run
    ours = samples["vrp_text_synth_mc"]
    assert [s["doc_id"] for s in theirs] == [s["doc_id"] for s in ours] and len(ours) == LIMIT
    for hf_sample, vrp_sample in zip(theirs, ours):
        # hf scores one request at a time, vrp-lm in right-padded batches of 16: float32 round-off only,
        # 1.2e-6 (1 ulp of |ll| <= 9) measured on these 40 documents; 1e-5 is ~10 ulp. The smallest gap
        # between an option and the best one there is 1.2e-3, so no argmax can flip: accuracy is exact.
        assert [float(r[0][0]) for r in hf_sample["resps"]] == pytest.approx(
            [float(r[0][0]) for r in vrp_sample["resps"]], abs=1e-5)
        assert hf_sample["accuracy"] == vrp_sample["accuracy"]
    task, vrp_task = results["results"]["vrp_text_synth_mc"], vrp_results["results"]["vrp_text_synth_mc"]
    # The same aggregation (default settings whatever the model) of confidences that differ by the
    # round-off above: the metrics differ by at most 4e-8 (measured), no ECE bin changes.
    for name in ("accuracy", *lm.CALIBRATION_METRICS):
        _same(vrp_task[f"{name},none"], task[f"{name},none"], name, tol=1e-6)
    assert 0 < task["accuracy,none"] < 1
