"""Stacked knockouts (`tracing.knockout_answers_per_window`): every window's knockout in one
generation, each block of rows knocked out in its own window only, must answer exactly as one
generation per window does; in all three families, greedy and option-scored, and on the planted
circuit, where each window's effect is known by construction.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import test_intervention
import torch
from tracing_models import one_thread  # noqa: F401 (an autouse fixture)

from vrp_eval.hooks import attention_hooks
from vrp_eval.intervention import AttentionKnockout, AttentionMixUniform
from vrp_eval.tracing import (
    choose_circuit,
    knockout_answers_per_window,
    knockout_hook,
    knockout_windows,
    window_width,
)

ASSETS = Path(__file__).parent / "assets"
# Overlapping windows, a one-layer window and one over every layer: some layers change one block of
# rows, some several, the last window every block.
WINDOWS = [(0, 1), (1, 2), (3, 3), (0, 3)]
TOLERANCE = 1e-5
CHOICES = [["red", "green", "blue"], ["yes", "no"], ["left", "right", "0"]]
# The intervention tests' module fixtures: a random tiny model per family and its encoded batch.
loaded, batch = test_intervention.loaded, test_intervention.batch


def fields(answers):
    return [[(a.text, a.token_ids) for a in block] for block in answers]


def probs(answers):
    """(windows, every probability of the block's answers): the options' or the answer tokens'."""
    return np.array([block_probs(block) for block in answers], dtype=float)


def block_probs(block):
    return [p for a in block for p in (a.token_probs if a.option_probs is None else a.option_probs.values())]


def assert_same_answers(stacked, one):
    """The same answers and, up to the round-off of a wider batch (CPU matmuls sum in another order
    for another row count), the same probabilities."""
    assert fields(stacked) == fields(one)
    for a, b in zip(stacked, one):
        np.testing.assert_allclose(block_probs(a), block_probs(b), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("choices", [None, CHOICES], ids=["greedy", "options"])
def test_stacked_knockouts_equal_one_window_at_a_time(loaded, batch, choices):
    one = knockout_answers_per_window(loaded, batch, WINDOWS, max_new_tokens=4, choices=choices, _one_at_a_time=True)
    stacked = knockout_answers_per_window(loaded, batch, WINDOWS, max_new_tokens=4, choices=choices)
    assert_same_answers(stacked, one)
    # The windows answer differently, so a block of rows knocked out in another block's window fails.
    assert min(np.abs(probs(one)[j] - probs(one)[0]).max() for j in range(1, len(WINDOWS))) > 100 * TOLERANCE
    swapped = knockout_answers_per_window(loaded, batch, WINDOWS[::-1], max_new_tokens=4, choices=choices)
    assert_same_answers(swapped, one[::-1])
    n = batch["input_ids"].shape[0]  # 3 windows in the first generation, the last one alone
    split = knockout_answers_per_window(loaded, batch, WINDOWS, max_new_tokens=4, choices=choices, max_rows=3 * n + 1)
    assert_same_answers(split, one)


def test_each_block_of_rows_gets_its_own_window(loaded, batch):
    """A model forward over the batch twice: block 0 knocked out in no layer gives the logits of a run
    without hooks, block 1 those of its window's knockout."""
    adapter, n = loaded.adapter, batch["input_ids"].shape[0]
    stacked = adapter.select_rows(batch, [*range(n), *range(n)])
    groups = adapter.position_groups(stacked["input_ids"], stacked["attention_mask"])
    row_layers = torch.zeros(2 * n, adapter.num_layers, dtype=torch.bool)
    row_layers[n:, 1:3] = True
    hook = AttentionKnockout(range(1, 3), groups["all"] & ~groups["image"], groups["image"], row_layers=row_layers)

    def logits(batch, *hooks):
        with torch.no_grad(), attention_hooks(adapter, *hooks):
            return loaded.model(**loaded.model_inputs(batch)).logits

    both = logits(stacked, hook)
    plain = logits(batch)
    knocked = logits(batch, knockout_hook(adapter, batch, (1, 2)))
    torch.testing.assert_close(both[:n], plain, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(both[n:], knocked, rtol=0, atol=TOLERANCE)
    assert (plain - knocked).abs().max() > 100 * TOLERANCE


def test_a_row_restricted_hook_does_not_share_a_layer_with_another_modifier(loaded, batch):
    adapter = loaded.adapter
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    rows = torch.ones(batch["input_ids"].shape[0], adapter.num_layers, dtype=torch.bool)
    knockout = AttentionKnockout([0], groups["all"] & ~groups["image"], groups["image"], row_layers=rows)
    with pytest.raises(ValueError, match="modified_rows"), torch.no_grad(), \
            attention_hooks(adapter, knockout, AttentionMixUniform([0], 0.5)):
        loaded.model(**loaded.model_inputs(batch))
    with pytest.raises(ValueError, match="row_layers"):
        AttentionKnockout([0], groups["all"], groups["image"], row_layers=rows[:1])


def test_stacked_knockouts_find_the_planted_circuit():
    sys.path.insert(0, str(ASSETS))
    import planted_circuit

    from vrp_eval.loading import load_model

    loaded = load_model(str(ASSETS / "planted-llava"), device="cpu")
    adapter = loaded.adapter
    data = planted_circuit.examples(24, seed=123)
    batch = adapter.encode([image for image, _ in data], [adapter.build_prompt(planted_circuit.QUESTION)] * len(data))
    gold = [c for _, c in data]
    windows = knockout_windows(adapter.num_layers, window_width(adapter.num_layers))
    stacked = knockout_answers_per_window(loaded, batch, windows, max_new_tokens=3)
    one = knockout_answers_per_window(loaded, batch, windows, max_new_tokens=3, _one_at_a_time=True)
    assert_same_answers(stacked, one)
    scores = np.array([[float(a.text == g) for a, g in zip(block, gold)] for block in stacked]).T
    assert choose_circuit(scores, windows) == planted_circuit.CIRCUIT
    circuit = windows.index(planted_circuit.CIRCUIT)
    assert scores[:, circuit].mean() <= 0.4  # chance is 0.25; every other window keeps the answer
    assert all(scores[:, j].mean() >= 0.9 for j in range(len(windows)) if j != circuit)


@pytest.mark.parametrize("kind", ["gaussian", "mean", "zero"])
@pytest.mark.parametrize("choices", [None, CHOICES], ids=["greedy", "options"])
def test_stacked_held_out_corruptions_equal_one_window_at_a_time(loaded, batch, kind, choices):
    """The held-out pass's circuit and control corruptions in one generation
    (`corrupted_answers_per_window`) answer as one generation per window does, and a sharpness recorder
    on the stacked batch reads the circuit block as a recorder on the circuit's own generation does.
    Each row draws its own noise, so the block's neighbours do not change it."""
    from vrp_eval.attention import SharpnessRecorder
    from vrp_eval.intervention import estimate_sigma
    from vrp_eval.tracing import corrupted_answers, corrupted_answers_per_window

    sigma = estimate_sigma(loaded, [batch]) if kind == "gaussian" else None
    scale = 3.0 if kind == "gaussian" else 0.0
    windows = [(1, 2), (3, 3)]  # a circuit and its control window
    recorders = {}

    def observers(key):
        def make(stacked):
            recorders.setdefault(key, []).append(SharpnessRecorder.for_batch(loaded.adapter, stacked))
            return recorders[key][-1:]
        return make

    # The reference: the held-out pass as it was, one `corrupted_answers` generation per window, the
    # recorder on the circuit's.
    one = [corrupted_answers(loaded, batch, window, kind, scale, sigma, seed=5, max_new_tokens=4, choices=choices,
                             extra_hooks=observers("one")(batch) if j == 0 else ())
           for j, window in enumerate(windows)]
    stacked = corrupted_answers_per_window(loaded, batch, windows, kind, scale, sigma, seed=5, max_new_tokens=4,
                                           choices=choices, observers=observers("stacked"))
    assert_same_answers(stacked, one)
    # The windows answer differently (a block corrupted in the other's window fails).
    assert fields(one)[0] != fields(one)[1] or \
        np.abs(np.subtract(block_probs(one[0]), block_probs(one[1]))).max() > 100 * TOLERANCE
    swapped = corrupted_answers_per_window(loaded, batch, windows[::-1], kind, scale, sigma, seed=5,
                                           max_new_tokens=4, choices=choices)
    assert_same_answers(swapped, one[::-1])
    n = batch["input_ids"].shape[0]
    split = corrupted_answers_per_window(loaded, batch, windows, kind, scale, sigma, seed=5, max_new_tokens=4,
                                         choices=choices, max_rows=2 * n - 1,  # one window per generation
                                         observers=observers("split"))
    assert_same_answers(split, one)
    assert len(recorders["split"]) == 1  # the circuit's generation only
    (circuit_alone,), (both,) = recorders["one"], recorders["stacked"]
    for a, b in zip(circuit_alone.signals(), both.signals()[:n]):
        assert a.sharpness == pytest.approx(b.sharpness, abs=TOLERANCE)
        np.testing.assert_allclose(a.sharpness_per_layer, b.sharpness_per_layer, rtol=0, atol=TOLERANCE)


def test_a_stacked_generation_holds_one_batch_on_an_accelerator():
    """On the CPU a run stacks up to KNOCKOUT_BATCHES batches' rows per generation (measured to pay);
    on an accelerator one batch, so that stacking never raises a run's peak memory above answering."""
    from vrp_eval.tracing import KNOCKOUT_BATCHES, stack_rows

    assert stack_rows("cpu", 16) == KNOCKOUT_BATCHES * 16 == 64
    assert stack_rows(torch.device("cuda", 0), 16) == stack_rows("mps", 16) == 16
