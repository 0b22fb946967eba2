"""The functions behind the vrp_text_* lm-eval task YAMLs (see vrp_eval/lm.py).

The data is vrp-synth-text's validation split (`vrp_eval.synth_text`), shipped beside this file as
JSON lines: no network. The prompt is `synth_text.prompt`, what the tiny text model was trained on.
"""
import json
from functools import partial
from pathlib import Path

from vrp_eval import lm, synth_text

DATA = Path(__file__).resolve().parent / "vrp_text_synth" / "validation.jsonl"


def load_validation(**metadata):
    """The shipped split as a DatasetDict (lm-eval's `custom_dataset`; `metadata` is unused)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def doc_to_text(doc):
    return synth_text.prompt(doc["context"], doc["question"])


generate_process_results = partial(lm.generate_process_results, answer_field="answer", task="vrp_text_synth")
choice_process_results = partial(lm.choice_process_results, choices_field="choices", label_field="label")

# One aggregation per metric of either task, named as the metric (lm.RELIABILITY_METRICS and
# lm.CALIBRATION_METRICS, from the metric table): what the YAMLs' `aggregation: !function utils.<name>` finds.
globals().update({name: lm.reliability_aggregation(name) for name in (*lm.RELIABILITY_METRICS, *lm.CALIBRATION_METRICS)})
