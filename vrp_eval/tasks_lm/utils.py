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

# One aggregation per reliability metric (names as in lm.RELIABILITY_METRICS).
n_samples = lm.reliability_aggregation("n_samples")
n_probed = lm.reliability_aggregation("n_probed")
mean_confidence = lm.reliability_aggregation("mean_confidence")
ece = lm.reliability_aggregation("ece")
ece_ci_low = lm.reliability_aggregation("ece_ci_low")
ece_ci_high = lm.reliability_aggregation("ece_ci_high")
mce = lm.reliability_aggregation("mce")
ace = lm.reliability_aggregation("ace")
brier = lm.reliability_aggregation("brier")
attn_conf_r = lm.reliability_aggregation("attn_conf_r")
attn_conf_r_ci_low = lm.reliability_aggregation("attn_conf_r_ci_low")
attn_conf_r_ci_high = lm.reliability_aggregation("attn_conf_r_ci_high")
attn_conf_r_p = lm.reliability_aggregation("attn_conf_r_p")
attn_conf_r_rho = lm.reliability_aggregation("attn_conf_r_rho")
attn_acc_r = lm.reliability_aggregation("attn_acc_r")
attn_acc_r_ci_low = lm.reliability_aggregation("attn_acc_r_ci_low")
attn_acc_r_ci_high = lm.reliability_aggregation("attn_acc_r_ci_high")
attn_acc_r_p = lm.reliability_aggregation("attn_acc_r_p")
attn_acc_r_rho = lm.reliability_aggregation("attn_acc_r_rho")
attn_overconf_r = lm.reliability_aggregation("attn_overconf_r")
attn_overconf_r_ci_low = lm.reliability_aggregation("attn_overconf_r_ci_low")
attn_overconf_r_ci_high = lm.reliability_aggregation("attn_overconf_r_ci_high")
attn_overconf_r_p = lm.reliability_aggregation("attn_overconf_r_p")
attn_overconf_r_rho = lm.reliability_aggregation("attn_overconf_r_rho")
mean_sharpness = lm.reliability_aggregation("mean_sharpness")
mean_image_attention_mass = lm.reliability_aggregation("mean_image_attention_mass")
causal_acc_drop = lm.reliability_aggregation("causal_acc_drop")
causal_acc_drop_ci_low = lm.reliability_aggregation("causal_acc_drop_ci_low")
causal_acc_drop_ci_high = lm.reliability_aggregation("causal_acc_drop_ci_high")
control_acc_drop = lm.reliability_aggregation("control_acc_drop")
control_acc_drop_ci_low = lm.reliability_aggregation("control_acc_drop_ci_low")
control_acc_drop_ci_high = lm.reliability_aggregation("control_acc_drop_ci_high")
clean_accuracy = lm.reliability_aggregation("clean_accuracy")
corrupted_accuracy = lm.reliability_aggregation("corrupted_accuracy")
n_heldout = lm.reliability_aggregation("n_heldout")
circuit_layers = lm.reliability_aggregation("circuit_layers")
control_layers = lm.reliability_aggregation("control_layers")
integration_layer = lm.reliability_aggregation("integration_layer")
