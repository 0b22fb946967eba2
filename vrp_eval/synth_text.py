"""`vrp-synth-text`: the vrp-synth scenes told in words, for text-only language models.

Each item is a vrp-synth item whose image is replaced by one sentence that describes the scene
(every object, left to right), followed by the item's own question:

    context   "A red circle is left of a blue square."
    question  "What color is the circle?"
    answer    "red"

The context sentence is the *subject* of the causal trace (ROME-style: corrupt its embeddings,
restore hidden states layer by layer), the text counterpart of the image tokens. Question kinds are
vrp-synth's colour, shape, count, existence and left/right relation; "which side" questions are
dropped (a relative description does not say where the image's middle is). The multiple-choice
fields (`choices`, `label`) are vrp-synth-mc's options for the same item.

    from vrp_eval import synth_text
    rows = synth_text.generate("validation", n=100)      # list of dicts
    synth_text.export("validation", "out/")              # out/validation.jsonl

Deterministic: item i of a split is derived from vrp-synth item i of that split (so it inherits
vrp-synth's per-item seeding), and `generate(split, n)` is a prefix of any larger n.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vrp_eval import synth

#: The lmms-eval-style instruction that ends every prompt (as the VQA tasks' post prompt).
POST_PROMPT = "\nAnswer the question using a single word or phrase."
KINDS = ("colour", "shape", "count", "exist", "relation")
DESCRIPTION_WORDS = "a there is are left of from to right and".split()
_KIND_OF_QUESTION_TYPE = {question_type: kind for kind, (question_type, _) in synth.QUESTION_KINDS.items()}


def describe(objects: list[dict[str, Any]]) -> str:
    """One sentence naming every object of a scene, left to right."""
    names = [f"a {o['color']} {o['shape']}" for o in sorted(objects, key=lambda o: o["x"])]
    if len(names) == 1:
        return f"There is {names[0]}."
    if len(names) == 2:
        return f"{names[0].capitalize()} is left of {names[1]}."
    return f"From left to right there are {', '.join(names[:-1])} and {names[-1]}."


def prompt(context: str, question: str) -> str:
    """What the model reads: the context sentence, the question and the answer instruction."""
    return f"{context} {question}{POST_PROMPT}"


def _row(vqa: dict[str, Any], mc: dict[str, Any]) -> dict[str, Any] | None:
    kind = _KIND_OF_QUESTION_TYPE[vqa["question_type"]]
    if kind not in KINDS:
        return None
    scene = json.loads(vqa["scene"])
    return {
        "question_id": int(vqa["question_id"]),
        "context": describe(scene["objects"]),
        "question": vqa["question"],
        "answer": vqa["multiple_choice_answer"],
        "choices": list(mc["choices"]),
        "label": int(mc["answer"]),
        "kind": kind,
    }


def generate(split: str, n: int) -> list[dict[str, Any]]:
    """The first `n` text items of `split` (derived from the first vrp-synth items of that split,
    skipping the kinds text cannot answer)."""
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of items, got {n!r}")
    rows: list[dict[str, Any]] = []
    taken = 0
    while len(rows) < n:
        # About 1 in 10 items is a "which side" question: ask for a few more than needed.
        want = taken + int((n - len(rows)) * 1.25) + 8
        vqa = synth.generate(split, n=want)[taken:]
        mc = synth.generate(split, n=want, flavour="mc")[taken:]
        rows += [r for r in (_row(v, m) for v, m in zip(vqa, mc)) if r is not None]
        taken = want
    return rows[:n]


def vocabulary() -> list[str]:
    """Every word of a context, question or answer (vrp-synth's words plus the descriptions')."""
    return sorted(set(synth.vocabulary()) | set(DESCRIPTION_WORDS))


def export(split: str, out_dir: str | Path, n: int) -> Path:
    """Write `out_dir/<split>.jsonl` (one item per line) for lm-eval's `dataset_path: json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in generate(split, n)))
    return path
