"""lm-eval glue: the `vrp-lm` model (text-only causal LMs) and the functions behind the `vrp_text_*` tasks.

    python -m vrp_eval.lm --model vrp-lm --model_args pretrained=tiny-text-llama \\
        --tasks vrp_text_synth,vrp_text_synth_mc --output_path results/

lm-eval 0.4.13 has no plugin entry point for models, so `python -m vrp_eval.lm` imports this module
(which registers `vrp-lm` with `@register_model`) and then runs lm-eval's own CLI with the same
arguments; it adds `--include_path <vrp_eval/tasks_lm>` when none is given. Every model of lm-eval's
runs through it too (`--model hf ...`). Plain `lm_eval` cannot reach `vrp-lm`: it builds the model
before it imports any task code, so only lm-eval's own models run the `vrp_text_*` tasks there
(`lm_eval --model hf ... --include_path <vrp_eval/tasks_lm>`).

Short answer (`generate_until`, task `vrp_text_synth`). As the lmms-eval backend does
(vrp_eval/lmms.py), `VRPLM.generate_until` runs the very `probe.run_probe` that the Python API runs,
once per task, on a `TextAdapter` (vrp_eval/textlm.py: the subject sentence plays the image), answers
with the plain answer (what any lm-eval model returns, so every task scores it with its own code) and
leaves each sample's record in `harness.RECORDS`. `process_results` scores the plain answer and takes
the record from there; the aggregations rebuild the records and call `aggregation.aggregate`: calibration,
attention sharpness, causal trace, knockout circuit and causal drop, under the SPEC names.

Multiple choice (`loglikelihood`, task `vrp_text_synth_mc`). `loglikelihood` returns lm-eval's own
(log-probability, is-greedy) tuples, so any multiple-choice task scores as with `--model hf`. The
task's `process_results` makes each sample's record from those tuples (the prediction is lm-eval's,
the argmax of the choices' log-likelihoods; confidence = softmax over the choices) and the
aggregations call `aggregation.aggregate`: accuracy and calibration. No causal trace there: a
loglikelihood response has no room for one.
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m vrp_eval.lm`: run the importable module (it registers `vrp-lm` once)
    import sys

    from vrp_eval.lm import main

    sys.exit(main())

import dataclasses
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from vrp_eval import harness, metric_table
from vrp_eval.harness import PAYLOAD_VERSION, RECORDS

PAYLOAD_FORMAT = "vrp-eval/lm-record"

#: The short-answer task's metrics beside `accuracy`, from the metric table (for a text model "image"
#: reads "subject": `mean_image_attention_mass` is the attention mass on the subject sentence).
RELIABILITY_METRICS: tuple[str, ...] = metric_table.columns("lm", metric_table.SUMMARY)
#: The multiple-choice task's metrics beside `accuracy`, from the metric table.
CALIBRATION_METRICS: tuple[str, ...] = metric_table.columns("lm_mc", metric_table.SUMMARY)
_LOAD_OPTIONS = ("device", "dtype", "revision", "trust_remote_code", "subject_end")


def tasks_dir() -> Path:
    """The folder of the `vrp_text_*` lm-eval task YAMLs (inside the installed package)."""
    return Path(__file__).resolve().parent / "tasks_lm"


# --------------------------------------------------------------------------------------------
# The payload: a record inside the response string
# --------------------------------------------------------------------------------------------

def decode_response(text: str) -> tuple[str, dict[str, Any] | None]:
    """(plain answer, payload or None) of a response; the payload only in a response of an earlier
    vrp-eval, which appended the record to the answer (`harness.encode_response`)."""
    return harness.decode_response(text, PAYLOAD_FORMAT)


# --------------------------------------------------------------------------------------------
# Model arguments
# --------------------------------------------------------------------------------------------

def parse_model_args(args: dict[str, Any]) -> tuple[str, Any, dict[str, Any], str]:
    """(model id, ProbeSettings, load_text_model keywords, answer field) from `--model_args` plus
    lm-eval's batch_size / device (`harness.parse_probe_args`; the text signals are the default)."""
    from vrp_eval.textlm import TEXT_SIGNALS, TINY_TEXT_LLAMA

    args = dict(args)
    model_id = str(args.pop("pretrained", None) or TINY_TEXT_LLAMA.name)
    answer_field = str(args.pop("answer_field", None) or "answer")
    load_kwargs, settings = harness.parse_probe_args(
        args, backend="vrp-lm", harness_name="lm-eval", load_options=_LOAD_OPTIONS,
        model_hint="pretrained=<folder | tiny-text-llama | Hub id>, answer_field", defaults={"signals": TEXT_SIGNALS})
    if str(load_kwargs.get("device", "")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # lm-eval's CLI asks for cuda by default
            load_kwargs["device"] = "cpu"
    if "dtype" in load_kwargs:
        load_kwargs["dtype"] = str(load_kwargs["dtype"])
    return model_id, settings, load_kwargs, answer_field


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

@register_model("vrp-lm")
class VRPLM(harness.ProbeBackend, TemplateLM):
    """lm-eval model `vrp-lm`: a text-only causal LM behind vrp-eval's probe engine.

    `--model_args pretrained=<save_pretrained folder | tiny-text-llama | Hub id>,<option>=<value>,...`
    with loading options (device, dtype, revision, trust_remote_code, subject_end: the text that ends
    the subject sentence, default "."), `answer_field` (the doc field holding the reference answer,
    default "answer"; it scores the knockout and corrupted runs of the circuit) and `ProbeSettings`'
    fields (signals, layers, window, noise, noise_scale, n_noise, n_calibration, seed, n_bins,
    n_bootstrap, ...; lists as `a;b;c`). `batch_size` is the probe's and the scoring batch size.
    """

    payload_format = PAYLOAD_FORMAT

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from vrp_eval.textlm import load_text_model

        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        self.explicit = set(kwargs)
        model_id, self.settings, load_kwargs, self.answer_field = parse_model_args(kwargs)
        self.loaded = load_text_model(model_id, **load_kwargs)
        self.tokenizer = self.loaded.processor
        self._device = self.loaded.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens
                              )["input_ids"]

    # ---- multiple choice ------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives it), in
        batches of right-padded (context + continuation)[:-1]."""
        import torch

        model = self.loaded.model
        pad = self.tokenizer.pad_token_id
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            sequences = [(context + continuation)[:-1] for _, context, continuation in chunk]
            length = max(len(s) for s in sequences)
            ids = torch.full((len(chunk), length), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, sequence in enumerate(sequences):
                ids[row, :len(sequence)] = torch.tensor(sequence)
                mask[row, :len(sequence)] = 1
            with torch.no_grad():
                logprobs = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                                 ).logits.float().log_softmax(-1).cpu()
            for row, (_, context, continuation) in enumerate(chunk):
                positions = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
                targets = torch.tensor(continuation)
                rows = logprobs[row, positions]
                out.append((float(rows[torch.arange(len(continuation)), targets].sum()),
                            bool((rows.argmax(-1) == targets).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("vrp-lm scores multiple-choice (loglikelihood) and short-answer "
                                  "(generate_until) tasks; perplexity tasks carry no answer to probe")

    # ---- short answer ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Probe every request (one `run_probe` per task, in document order), answer with the plain
        answer and leave each sample's record in `harness.RECORDS` (module docstring)."""
        from vrp_eval.textlm import text_example

        by_task = harness.group_requests(requests, lambda r: (r.task_name, r.doc_id))
        responses: list[str | None] = [None] * len(requests)
        RECORDS.clear()
        for task, positions_of in by_task.items():
            doc_ids = sorted(positions_of)
            firsts = [requests[positions_of[doc_id][0]] for doc_id in doc_ids]
            examples = [text_example(doc_id, request.args[0], _answer_of(request.doc, self.answer_field))
                        for doc_id, request in zip(doc_ids, firsts)]
            settings = self.settings_for(task, firsts[0].args[1])
            if any(not example.answers for example in examples) and "circuit" in settings.signals:
                # The circuit scores knockout answers against the reference: without one, leave it out.
                settings = dataclasses.replace(settings, signals=tuple(s for s in settings.signals if s != "circuit"))
            until = {doc_id: request.args[1].get("until") for doc_id, request in zip(doc_ids, firsts)}
            harness.spread(self.probe_task(task, doc_ids, examples, [r.doc for r in firsts], settings,
                                           answer=lambda record, doc_id, until=until: _cut(record.answer, until[doc_id]),
                                           progress=not disable_tqdm), positions_of, responses)
        return responses  # type: ignore[return-value]


def _answer_of(doc: dict[str, Any], field: str) -> str | None:
    value = doc.get(field)
    return None if value is None or isinstance(value, (list, dict)) else str(value)


def _cut(answer: str, until: Any) -> str:
    for stop in ([until] if isinstance(until, str) else list(until or [])):
        if stop:
            answer = answer.split(stop)[0]
    return answer


# --------------------------------------------------------------------------------------------
# Task side: per-sample values and the aggregations
# --------------------------------------------------------------------------------------------

RecordSample = harness.RecordSample


def generate_process_results(doc: dict[str, Any], results: list[str], *, answer_field: str = "answer",
                             task: str | None = None) -> dict[str, Any]:
    """Short answer: `accuracy` = exact match of the plain answer (vrp-eval's scorer, as the record's
    `score`), and the sample's record for every reliability metric."""
    from vrp_eval import vqa

    answer, payload = decode_response(results[0])
    if payload is None:
        payload = RECORDS.get(doc, answer, task)
    if payload is not None and payload.get("format") != PAYLOAD_FORMAT:
        payload = None
    score = float(vqa.exact_match(answer, [str(doc[answer_field])]))
    sample = RecordSample(payload["doc_id"] if payload else None, score, payload)
    return {"accuracy": score, **harness.sample_values(sample, RELIABILITY_METRICS)}


def choice_record(question_id: Any, question: str, choices: list[str], gold: int, loglikelihoods: list[float]):
    """The `SampleRecord` of a multiple-choice answer: the prediction is the choice with the largest
    log-likelihood (lm-eval's `acc`), confidence its softmax probability over the choices."""
    import numpy as np

    from vrp_eval import statistics
    from vrp_eval.records import SampleRecord

    lls = np.asarray(loglikelihoods, dtype=float)
    probs = np.exp(lls - lls.max())
    probs /= probs.sum()
    pred = int(np.argmax(lls))
    score = float(pred == gold)
    confidence = float(probs[pred])
    return SampleRecord(
        question_id=question_id, question=question, answer=choices[pred], score=score, confidence=confidence,
        confidence_product=confidence, confidence_first_token=confidence, confidence_length_norm=confidence,
        token_probs=[], reference=choices[gold], kind="mc",
        option_probs={str(c): float(p) for c, p in zip(choices, probs)},
        reliability=float(statistics.reliability([confidence], [score])[0]),
        overconfidence=float(statistics.overconfidence([confidence], [score])[0]),
    )


def choice_process_results(doc: dict[str, Any], results: list[tuple[float, bool]], *,
                           choices_field: str = "choices", label_field: str = "label",
                           question_field: str = "question") -> dict[str, Any]:
    """Multiple choice: `accuracy` as lm-eval's `acc`, and the record for every calibration metric."""
    record = choice_record(doc.get("question_id"), str(doc.get(question_field, "")), list(doc[choices_field]),
                           int(doc[label_field]), [float(ll) for ll, _ in results])
    sample = RecordSample(None, record.score, {"format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION,
                                               "record": dataclasses.asdict(record)})
    return {"accuracy": record.score, **{name: sample for name in CALIBRATION_METRICS}}


records_from_payloads = harness.records_from_payloads


def _warn_no_record() -> None:
    import logging

    logging.getLogger(__name__).warning(
        "vrp-eval: the responses carry no vrp-eval record, so the reliability metrics are NaN; run with "
        "`python -m vrp_eval.lm --model vrp-lm --model_args pretrained=...` to compute them")


#: `aggregation.aggregate` of one task's samples, computed once and shared by every metric.
summarise = harness.Summaries(lambda samples: harness.aggregate_probed(samples, _warn_no_record))
reliability_aggregation = summarise.aggregation


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m vrp_eval.lm <lm-eval arguments>`: lm-eval's CLI with `vrp-lm` registered beside
    every model lm-eval has, and the `vrp_text_*` tasks on the include path."""
    import sys

    # lm-eval fills its model registry with its own models (lazy `module:class` entries) only when
    # the registry is still empty at the first lookup; registering `vrp-lm` first would hide them all.
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(tasks_dir())]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()
    return 0
