"""Evaluation data: the shipped synthetic sets, local files and Hub datasets, in one record shape.

Every example becomes an `Example`: question id, question, image, the task kind and what scores it
(10 human answers for VQA, an option index for multiple choice, one reference string otherwise).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vrp_eval.errors import VrpError

SYNTH_DATASETS = {"vrp-synth": "vqa", "vrp-synth-mc": "mc"}
OPTION_LETTERS = "ABCDEFGHIJ"
MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


class DataError(VrpError, ValueError):
    """Bad evaluation data, with what to do about it."""


@dataclass
class Example:
    question_id: Any
    question: str
    image: Any  # PIL image, decoded lazily by `load_image`
    kind: str  # "vqa" | "mc" | "exact"
    answers: list[str] = field(default_factory=list)  # VQA: the human answers; exact: [reference]
    choices: list[str] | None = None
    answer_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def option_letters(self) -> list[str] | None:
        return list(OPTION_LETTERS[: len(self.choices)]) if self.choices else None

    @property
    def reference(self) -> str:
        """The answer as the letter prompt asks for it (multiple choice: the option letter)."""
        if self.kind == "mc":
            return OPTION_LETTERS[self.answer_index]
        return self.answers[0] if self.answers else ""

    def reference_for(self, mc_scoring: str) -> str:
        """The reference answer as scored under `mc_scoring`: multiple choice by likelihood names the
        correct option's text, by letter its letter."""
        if self.kind == "mc" and mc_scoring == "likelihood":
            return self.choices[self.answer_index]
        return self.reference

    def prompt_text(self, post_prompt: str, mc_scoring: str = "likelihood") -> str:
        """The question as the model sees it (before the family's chat template). Multiple choice
        scored by letter lists the lettered options and asks for the letter; scored by likelihood it
        is asked like an open question, and each option's text is scored as the answer."""
        if self.kind == "mc" and mc_scoring == "letter":
            options = "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
            return f"{self.question}\n{options}{MC_POST_PROMPT}"
        return f"{self.question}{post_prompt}"


@dataclass
class PromptedExample(Example):
    """An `Example` whose prompt is given whole (a harness task's context string, a text model's
    prompt): it is what the model reads, whatever `post_prompt` and `mc_scoring` say."""

    prompt: str = ""

    def prompt_text(self, post_prompt: str, mc_scoring: str = "likelihood") -> str:
        return self.prompt


def with_prompt(example: Example, prompt: str) -> PromptedExample:
    """`example` asked with the given `prompt`."""
    from dataclasses import fields

    return PromptedExample(**{f.name: getattr(example, f.name) for f in fields(Example)}, prompt=prompt)


def load_image(example: Example) -> Image.Image:
    """The example's image as RGB; DataError naming the sample when it does not decode."""
    image = example.image
    try:
        if isinstance(image, dict):  # datasets' undecoded Image feature
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected an image, got {type(image).__name__}")
        image.load()
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types for corrupt data
        raise DataError(
            f"the image of sample {example.question_id!r} cannot be decoded ({error}); fix or drop "
            "that sample, or run with `--on-bad-image skip` to skip such samples"
        ) from None


def _answers_of(row: dict[str, Any]) -> list[str]:
    answers = row.get("answers")
    if answers is None:
        return []
    if isinstance(answers, dict) and "answer" in answers:  # columnar (datasets Sequence of dicts)
        return [str(a) for a in answers["answer"]]
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]


def to_example(row: dict[str, Any], index: int) -> Example:
    """One dataset row as an `Example`; DataError naming the missing field and the schemas accepted."""
    qid = row.get("question_id", row.get("id", index))
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"sample {qid!r} has no `question` text; every row needs `question` and `image`")
    if "image" not in row or row["image"] is None:
        raise DataError(f"sample {qid!r} has no `image` field; every row needs `question` and `image`")
    meta = {k: row[k] for k in ("answer_type", "question_type", "difficulty", "hard_reason") if k in row}
    if row.get("choices"):
        answer = row.get("answer")
        if not isinstance(answer, int) or not 0 <= answer < len(row["choices"]):
            raise DataError(f"multiple-choice sample {qid!r} needs `answer` as an index into `choices`")
        return Example(qid, question, row["image"], "mc", choices=[str(c) for c in row["choices"]],
                       answer_index=answer, meta=meta)
    answers = _answers_of(row)
    if answers:
        return Example(qid, question, row["image"], "vqa", answers=answers, meta=meta)
    for key in ("multiple_choice_answer", "answer", "label"):
        if row.get(key) not in (None, ""):
            return Example(qid, question, row["image"], "exact", answers=[str(row[key])], meta=meta)
    raise DataError(
        f"sample {qid!r} has no answer field: give `answers` (VQAv2: 10 human answers), "
        "`choices` + `answer` (multiple choice) or `multiple_choice_answer` / `answer`"
    )


def _load_local(path: Path, split: str):
    import datasets

    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        files = {}
        for ext, builder in (("parquet", "parquet"), ("jsonl", "json"), ("json", "json")):
            found = sorted(path.glob(f"*{split}*.{ext}")) or sorted(path.glob(f"{split}/*.{ext}"))
            if found:
                files = {"builder": builder, "files": [str(f) for f in found]}
                break
        if not files:
            raise DataError(f"{path} holds no `save_to_disk` dataset and no {split} parquet/json files")
        return datasets.load_dataset(files["builder"], data_files={split: files["files"]}, split=split)
    else:
        builder = {"parquet": "parquet", "json": "json", "jsonl": "json"}.get(path.suffix.lstrip("."))
        if builder is None:
            raise DataError(f"cannot read {path}: use a parquet / json(l) file or a `save_to_disk` folder")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not in {path}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def load_examples(dataset: str, split: str = "validation", limit: int | None = None) -> list[Example]:
    """Examples of a zoo dataset (`vrp-synth`, `vrp-synth-mc`), a local file/folder or a Hub dataset id."""
    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be a positive number of samples, got {limit}")
    if dataset in SYNTH_DATASETS:
        from vrp_eval import synth

        try:
            # The records themselves: the same examples and pixels as `synth.load_synth`'s Dataset,
            # without importing `datasets` and encoding every image to PNG (2-4 s of a default run).
            rows = synth.generate(split, n=limit, flavour=SYNTH_DATASETS[dataset])
        except ValueError as error:
            raise DataError(f"{dataset}: {error}") from None
    elif Path(dataset).expanduser().exists():
        try:
            rows = _load_local(Path(dataset).expanduser(), split)
        except DataError:
            raise
        except ValueError as error:
            if "corresponds to no data" in str(error):  # datasets' words for an empty file or split
                raise DataError(f"dataset {dataset!r} split {split!r} is empty: nothing to evaluate") from None
            raise DataError(f"cannot read dataset {dataset!r} (split {split!r}): {error}") from None
        except Exception as error:  # noqa: BLE001 - pyarrow / json parsers raise many types for a bad file
            raise DataError(f"cannot read dataset {dataset!r} (split {split!r}): {type(error).__name__}: {error}. "
                            "Use a parquet / json(l) file or a `save_to_disk` folder with `question`, `image` and "
                            "an answer field") from None
    else:
        import datasets

        try:
            rows = datasets.load_dataset(dataset, split=split)
        except ValueError as error:  # unknown split
            raise DataError(f"{dataset}: {error}") from None
        except Exception as error:
            raise DataError(
                f"cannot load dataset {dataset!r} (split {split!r}): {error.__class__.__name__}: {error}. "
                "Offline, use a zoo dataset (vrp-synth, vrp-synth-mc) or a local parquet / save_to_disk folder."
            ) from None
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    if len(rows) == 0:
        raise DataError(f"dataset {dataset!r} split {split!r} is empty: nothing to evaluate")
    examples = [to_example(dict(row), i) for i, row in enumerate(_iter_undecoded(rows))]
    check_unique_ids(examples, dataset)
    return examples


def check_unique_ids(examples: list[Example], dataset: str = "the dataset") -> None:
    """Records, resume files and the discovery / held-out split are keyed by question id: two samples
    with one id would silently overwrite each other, so duplicates are an error."""
    seen: dict[Any, int] = {}
    for example in examples:
        seen[example.question_id] = seen.get(example.question_id, 0) + 1
    repeated = {qid: n for qid, n in seen.items() if n > 1}
    if repeated:
        shown = ", ".join(f"{qid!r} x{n}" for qid, n in list(repeated.items())[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise DataError(f"{dataset}: question ids must be unique, but {len(repeated)} repeat ({shown}{more}); "
                        "give every row its own `question_id` (or drop the column to number rows by position)")


def _iter_undecoded(rows) -> Iterator[dict[str, Any]]:
    """Rows with images left undecoded, so one corrupt image fails its own sample only."""
    if hasattr(rows, "cast_column") and "image" in getattr(rows, "column_names", []):
        import datasets

        if isinstance(rows.features.get("image"), datasets.Image):
            rows = rows.cast_column("image", datasets.Image(decode=False))
    yield from rows
