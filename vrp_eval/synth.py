"""`vrp-synth`: a deterministic synthetic VQA dataset rendered with PIL.

Each record is one 64x64 RGB image of a few coloured shapes and one question about it, in the
VQAv2 layout of `lmms-lab/VQAv2` (10 human-style `answers` as dicts, `multiple_choice_answer`,
`answer_type`, `question_type`), so lmms-eval's own vqav2 utils read it. The `mc` flavour holds
the same images and questions in the ScienceQA layout (`choices`, `answer` index, `hint`,
`subject`, `lecture`) for option-letter confidence.

    from vrp_eval import synth
    records = synth.generate("validation", n=100)          # list of dicts, PIL images
    ds = synth.load_synth("validation", flavour="mc")       # datasets.Dataset
    synth.export("test", "out/vrp-synth")                   # out/vrp-synth/test.parquet

Question types (balanced, one fifth each): colour, shape, counting (0-4), existence (yes/no),
spatial (relation yes/no or left/right side). About 17.5% of items are deliberately hard
(`difficulty="hard"`, `hard_reason` one of `HARD_REASONS`): small objects, partial occlusion,
a near colour (an orange-ish red is still "red", but some annotators say "orange"), a crowded
scene (5+ objects) or low contrast. Hard items also get more annotator disagreement, so VQA soft
accuracy is fractional for the minority answers.

Every item is generated from its own RNG keyed by (split, seed, index), so `generate(split, n)`
is a prefix of any larger `n`, and splits never share an item. Nothing is cached: everything is
rendered in memory (the 20000-item train split takes about 12 s on one core). The scene behind each item
is kept as JSON in the `scene` field (object shape, colour name, rendered RGB, centre, size).
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "validation", "test")
FLAVOURS = ("vqa", "mc")
FORMATS = ("parquet", "disk")
DEFAULT_SIZES = {"train": 20000, "validation": 1000, "test": 1000}
SPLIT_SEEDS = {"train": 1001, "validation": 2002, "test": 3003}
# question_id = image_id * 1000 (the VQAv2 convention); image ids are disjoint across splits.
_IMAGE_ID_BASE = {"train": 100_000_000, "validation": 200_000_000, "test": 300_000_000}

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges
HARD_FRACTION = 0.175
HARD_REASONS = ("small", "occluded", "near_colour", "crowded", "low_contrast")

SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOURS = {  # canonical name -> RGB
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
}
# Hard items only: a shade between the colour and a neighbour, still answered with the base name
# by most annotators; the rest say the neighbour's name or an "-ish" word.
NEAR_COLOURS = {
    "red": ((235, 115, 40), ("orange", "reddish")),
    "green": ((50, 165, 150), ("teal", "blue", "greenish")),
    "blue": ((110, 70, 205), ("purple", "bluish")),
    "yellow": ((190, 210, 60), ("green", "yellowish")),
}
NUMBERS = ("0", "1", "2", "3", "4")
NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four"}
ANSWER_SET: tuple[str, ...] = tuple(sorted([*COLOURS, *SHAPES, *NUMBERS, "yes", "no", "left", "right"]))

# kind -> (question_type as in VQAv2, answer_type)
QUESTION_KINDS = {
    "colour": ("what color is the", "other"),
    "shape": ("what shape is the", "other"),
    "count": ("how many", "number"),
    "exist": ("is there a", "yes/no"),
    "relation": ("is the", "yes/no"),
    "side": ("which side is the", "other"),
}
# The five question families of the brief, equally likely; "spatial" splits into relation / side.
_FAMILIES = ("colour", "shape", "count", "exist", "spatial")
_HARD_REASONS_BY_KIND = {
    "colour": HARD_REASONS,
    "shape": HARD_REASONS,
    "count": ("small", "occluded", "crowded", "low_contrast"),  # near colour only for colour counts
    "exist": HARD_REASONS,
    "relation": HARD_REASONS,
    "side": HARD_REASONS,
}

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words with each punctuation mark a token of its own (what `vocabulary` counts)."""
    return _TOKEN.findall(text.lower())


# --------------------------------------------------------------------------------------------
# scenes


class _Retry(Exception):
    """The layout sampler ran out of tries, or a spatial question came out too close to call."""


def _place(rng: random.Random, radii: list[float], fixed: list[dict]) -> list[tuple[float, float]]:
    """Centres for objects of half-extents `radii`, inside the image and apart from each other."""
    placed = [(o["x"], o["y"], o["size"]) for o in fixed]
    centres = []
    for r in radii:
        margin = 1.25 * r + 1.5  # triangles reach 1.2 r above the centre
        for _ in range(200):
            x, y = rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)
            if all(math.hypot(x - px, y - py) >= 1.25 * (r + pr) + 2 for px, py, pr in placed):
                break
        else:
            raise _Retry
        placed.append((x, y, r))
        centres.append((x, y))
    return centres


def _random_other(rng: random.Random, ok: Callable[[str, str], bool]) -> tuple[str, str]:
    pairs = [(s, c) for s in SHAPES for c in COLOURS if ok(s, c)]
    return rng.choice(pairs)


def _question(kind: str, rng: random.Random) -> dict[str, Any]:
    """The question, its canonical answer, the target objects and which distractors are allowed."""
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if kind == "colour":
        return {"text": f"What color is the {shape}?", "answer": colour, "targets": [(shape, colour)],
                "ok": lambda s, c: s != shape}
    if kind == "shape":
        return {"text": f"What shape is the {colour} object?", "answer": shape, "targets": [(shape, colour)],
                "ok": lambda s, c: c != colour}
    if kind == "count":
        count = rng.randrange(5)
        if rng.random() < 0.7:
            targets = [(shape, rng.choice(list(COLOURS))) for _ in range(count)]
            return {"text": f"How many {PLURAL[shape]} are there?", "answer": str(count), "targets": targets,
                    "ok": lambda s, c: s != shape, "by_colour": False}
        targets = [(rng.choice(SHAPES), colour) for _ in range(count)]
        return {"text": f"How many {colour} objects are there?", "answer": str(count), "targets": targets,
                "ok": lambda s, c: c != colour, "by_colour": True}
    if kind == "exist":
        present = rng.random() < 0.5
        near_miss = []
        if not present and rng.random() < 0.8:  # same shape or same colour: needs binding
            near_miss = [(shape, rng.choice([c for c in COLOURS if c != colour])) if rng.random() < 0.5
                         else (rng.choice([s for s in SHAPES if s != shape]), colour)]
        return {"text": f"Is there a {colour} {shape}?", "answer": "yes" if present else "no",
                "targets": [(shape, colour)] if present else [], "extra": near_miss,
                "ok": lambda s, c: (s, c) != (shape, colour)}
    if kind == "relation":
        other = _random_other(rng, lambda s, c: (s, c) != (shape, colour))
        direction = rng.choice(("left", "right"))
        pair = {(shape, colour), other}
        return {"text": f"Is the {colour} {shape} to the {direction} of the {other[1]} {other[0]}?",
                "answer": rng.choice(("yes", "no")), "targets": [(shape, colour), other],
                "direction": direction, "ok": lambda s, c: (s, c) not in pair}
    if kind == "side":
        return {"text": f"Which side is the {shape} on?", "answer": rng.choice(("left", "right")),
                "targets": [(shape, colour)], "ok": lambda s, c: s != shape}
    raise AssertionError(kind)


def _spatial_fact(q: dict, objects: list[dict]) -> str | None:
    """The answer the layout gives a spatial question, or None when it is too close to call."""
    first = objects[0]
    if q["kind"] == "side":
        if abs(first["x"] - IMAGE_SIZE / 2) < 6:
            return None
        return "left" if first["x"] < IMAGE_SIZE / 2 else "right"
    dx = objects[1]["x"] - first["x"]  # > 0: the first object is left of the second
    if abs(dx) < 14:
        return None
    return "yes" if (dx > 0) == (q["direction"] == "left") else "no"


def _build_scene(rng: random.Random, kind: str, q: dict, reason: str, shrink: float = 1.0) -> dict[str, Any]:
    if reason == "small":
        size_range = (3.0, 4.5)
    elif reason == "crowded":
        size_range = (4.0, 6.0)
    else:
        size_range = (6.0, 9.5)
    specs = [(s, c, "target") for s, c in q["targets"]] + [(s, c, "distractor") for s, c in q.get("extra", [])]
    if reason == "crowded":
        n_total = rng.randint(max(5, len(specs) + 1), 7)
    else:
        n_total = rng.randint(max(1, len(specs)), max(len(specs), min(4, len(specs) + 2)))
    while len(specs) < n_total:
        s, c = _random_other(rng, q["ok"])
        specs.append((s, c, "distractor"))
    radii = [shrink * rng.uniform(*size_range) for _ in specs]
    centres = _place(rng, radii, [])
    objects = [{"shape": s, "color": c, "x": x, "y": y, "size": r, "role": role, "occluded": False}
               for (s, c, role), r, (x, y) in zip(specs, radii, centres)]
    if kind in ("relation", "side"):
        fact = _spatial_fact(q, objects)
        if fact is None:
            raise _Retry
        if fact != q["answer"]:  # mirror the layout: every relation flips, nothing else changes
            for o in objects:
                o["x"] = IMAGE_SIZE - o["x"]
    if reason == "occluded":
        victims = [o for o in objects if o["role"] == "target"] or objects
        victim = rng.choice(victims)
        s, c = _random_other(rng, lambda s, c: q["ok"](s, c) and c != victim["color"])
        r = victim["size"] * rng.uniform(0.8, 1.0)
        for _ in range(100):
            angle = rng.uniform(0, 2 * math.pi)
            dist = (victim["size"] + r) * rng.uniform(0.55, 0.7)
            x, y = victim["x"] + dist * math.cos(angle), victim["y"] + dist * math.sin(angle)
            margin = 1.25 * r + 1
            if not (margin <= x <= IMAGE_SIZE - margin and margin <= y <= IMAGE_SIZE - margin):
                continue
            if kind in ("relation", "side") and abs(x - victim["x"]) > 0.5 * victim["size"]:
                continue  # keep the occluded object's left/right position unambiguous
            if all(math.hypot(x - o["x"], y - o["y"]) >= 1.25 * (r + o["size"]) + 2
                   for o in objects if o is not victim):
                break
        else:
            raise _Retry
        victim["occluded"] = True
        objects.append({"shape": s, "color": c, "x": x, "y": y, "size": r, "role": "occluder", "occluded": False})
    return {"objects": objects}


def _background(rng: random.Random, low_contrast: bool) -> tuple[int, int, int]:
    if low_contrast:
        grey = rng.randint(135, 165)
        return tuple(min(255, max(0, grey + rng.randint(-10, 10))) for _ in range(3))
    grey = rng.randint(228, 250)
    return tuple(min(255, grey + rng.randint(-6, 5)) for _ in range(3))


def _colourise(rng: random.Random, scene: dict, reason: str) -> None:
    """Rendered RGB per object: jittered base colour, a near shade or a blend into the background."""
    near_victim = None
    if reason == "near_colour":
        candidates = [o for o in scene["objects"] if o["role"] == "target"] or scene["objects"]
        near_victim = rng.choice(candidates)
    bg = scene["background"]
    for o in scene["objects"]:
        base = NEAR_COLOURS[o["color"]][0] if o is near_victim else COLOURS[o["color"]]
        rgb = [min(255, max(0, v + rng.randint(-12, 12))) for v in base]
        if reason == "low_contrast":
            rgb = [round(0.5 * v + 0.5 * b) for v, b in zip(rgb, bg)]
        o["rgb"] = rgb
        o["near_colour"] = o is near_victim


_RAMP = np.linspace(-1.0, 1.0, IMAGE_SIZE, dtype=np.float32)


def _render(rng: random.Random, scene: dict) -> Image.Image:
    k = _SUPERSAMPLE
    bg = np.array(scene["background"], dtype=np.float32)
    nrng = np.random.default_rng(rng.getrandbits(64))
    texture = nrng.normal(0.0, scene["texture"], size=(IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    gx, gy = scene["gradient"]
    texture += gx * _RAMP[None, :, None] + gy * _RAMP[:, None, None]
    pixels = np.clip(np.rint(bg + texture), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels, "RGB").resize((IMAGE_SIZE * k, IMAGE_SIZE * k), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in sorted(scene["objects"], key=lambda o: o["role"] == "occluder"):
        x, y, r, fill = o["x"] * k, o["y"] * k, o["size"] * k, tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o["shape"] == "square":
            a = 0.886 * r  # same area as the circle
            draw.rectangle((x - a, y - a, x + a, y + a), fill=fill)
        else:
            big = 1.2 * r
            dx = big * math.sqrt(3) / 2
            draw.polygon([(x, y - big), (x + dx, y + big / 2), (x - dx, y + big / 2)], fill=fill)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


# --------------------------------------------------------------------------------------------
# annotators


def _wrong_answers(kind: str, answer: str, scene: dict) -> list[str]:
    """What a disagreeing annotator plausibly says instead of `answer`."""
    if answer in ("yes", "no"):
        return ["no" if answer == "yes" else "yes"]
    if kind == "side":
        return ["right" if answer == "left" else "left"]
    if kind == "count":
        n = int(answer)
        return [str(m) for m in (n - 1, n + 1) if 0 <= m <= 4]
    if kind == "colour":
        target = next(o for o in scene["objects"] if o["role"] == "target")
        if target["near_colour"]:
            return list(NEAR_COLOURS[answer][1])
        return [c for c in COLOURS if c != answer]
    return [s for s in SHAPES if s != answer]


def _surface(rng: random.Random, answer: str) -> str:
    """A spelling of `answer` that the official VQA normalisation maps back to it."""
    if answer in NUMBER_WORDS and rng.random() < 0.2:
        answer = NUMBER_WORDS[answer]
    elif answer in SHAPES and rng.random() < 0.04:
        answer = "a " + answer
    roll = rng.random()
    if roll < 0.06:
        answer = answer[0].upper() + answer[1:]
    elif roll < 0.08:
        answer = answer + "."
    return answer


def _annotate(rng: random.Random, kind: str, answer: str, scene: dict, reason: str) -> list[dict]:
    if reason:
        n_wrong = rng.choices((0, 1, 2, 3), weights=(0.15, 0.3, 0.35, 0.2))[0]
    else:
        n_wrong = 1 if rng.random() < 0.12 else 0
    wrong = _wrong_answers(kind, answer, scene)
    said = [rng.choice(wrong) for _ in range(n_wrong)] + [answer] * (10 - n_wrong)
    rng.shuffle(said)
    answers = []
    for i, a in enumerate(said, start=1):
        confidence = "yes" if a == answer else rng.choice(("maybe", "maybe", "yes", "no"))
        if a == answer and reason and rng.random() < 0.2:
            confidence = "maybe"
        answers.append({"answer": _surface(rng, a), "answer_confidence": confidence, "answer_id": i})
    return answers


def _choices(rng: random.Random, kind: str, answer: str) -> list[str]:
    if kind in ("exist", "relation"):
        pool = ["yes", "no"]
    elif kind == "side":
        pool = ["left", "right"]
    elif kind == "colour":
        pool = [answer] + rng.sample([c for c in COLOURS if c != answer], rng.choice((2, 3)))
    elif kind == "shape":
        pool = list(SHAPES)
    else:
        pool = [answer] + rng.sample([n for n in NUMBERS if n != answer], rng.choice((2, 3, 4)))
    rng.shuffle(pool)
    return pool


# --------------------------------------------------------------------------------------------
# records


def _item(split: str, seed: int, index: int) -> dict[str, Any]:
    """One VQA record plus the MC choices, from an RNG of its own (so prefixes are stable)."""
    rng = random.Random(f"vrp-synth/{split}/{seed}/{index}")
    family = _FAMILIES[rng.randrange(len(_FAMILIES))]
    kind = family if family != "spatial" else rng.choice(("relation", "side"))
    hard = rng.random() < HARD_FRACTION
    q = _question(kind, rng)
    q["kind"] = kind
    reasons = _HARD_REASONS_BY_KIND[kind] + (("near_colour",) if q.get("by_colour") else ())
    if not q["targets"] and not q.get("extra"):
        reasons = tuple(r for r in reasons if r != "near_colour")  # nothing asked about to carry a shade
    reason = rng.choice(reasons) if hard else ""
    for attempt in range(1000):
        try:
            # A crowded draw that does not fit gets slightly smaller objects on the next try.
            scene = _build_scene(rng, kind, q, reason, shrink=max(0.7, 1.0 - 0.01 * attempt))
            break
        except _Retry:
            continue
    else:
        raise RuntimeError(f"vrp-synth: no layout for {split} item {index}")  # not reached in practice
    scene["background"] = list(_background(rng, reason == "low_contrast"))
    scene["texture"] = 0.0 if rng.random() < 0.3 else round(rng.uniform(1.0, 3.0), 2)
    scene["gradient"] = [round(rng.uniform(-4, 4), 2), round(rng.uniform(-4, 4), 2)]
    _colourise(rng, scene, reason)
    image = _render(rng, scene)
    answers = _annotate(rng, kind, q["answer"], scene, reason)
    question_type, answer_type = QUESTION_KINDS[kind]
    image_id = _IMAGE_ID_BASE[split] + index
    for o in scene["objects"]:
        o["x"], o["y"], o["size"] = round(o["x"], 2), round(o["y"], 2), round(o["size"], 2)
    return {
        "question_id": image_id * 1000,
        "image_id": image_id,
        "question": q["text"],
        "image": image,
        "answers": answers,
        "multiple_choice_answer": q["answer"],
        "answer_type": answer_type,
        "question_type": question_type,
        "difficulty": "hard" if reason else "normal",
        "hard_reason": reason,
        "scene": json.dumps(scene, sort_keys=True),
        "_choices": _choices(random.Random(f"vrp-synth-mc/{split}/{seed}/{index}"), kind, q["answer"]),
    }


def _check_split(split: str, flavour: str = "vqa") -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; vrp-synth has {', '.join(SPLITS)}")
    _check_flavour(flavour)


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")


def check_start(start: Any, name: str = "start") -> None:
    """A ValueError unless `start` (called `name` in the message) is a record index >= 0."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"{name} must be a record index >= 0, got {start!r}")


def generate(split: str, n: int | None = None, seed: int | None = None, flavour: str = "vqa",
             start: int = 0) -> list[dict]:
    """The `n` records of `split` from index `start` on (default: the first `DEFAULT_SIZES[split]`),
    PIL images included.

    `seed` defaults to the split's own (`SPLIT_SEEDS`); the same (split, seed, start, n) gives
    identical records and byte-identical images, and each record depends on its index only, so
    `generate(split, n, start=k)` is `generate(split, k + n)[k:]`: ranges that do not overlap share no
    item (a further training stage draws unseen items that way). `flavour="mc"` gives the
    ScienceQA-style records.
    """
    _check_split(split, flavour)
    if n is None:
        n = DEFAULT_SIZES[split]
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive number of records, got {n!r}")
    check_start(start)
    seed = SPLIT_SEEDS[split] if seed is None else seed
    records = []
    for index in range(start, start + n):
        item = _item(split, seed, index)
        choices = item.pop("_choices")
        if flavour == "mc":
            item = {
                "question_id": item["question_id"], "image_id": item["image_id"], "question": item["question"],
                "image": item["image"], "choices": choices, "answer": choices.index(item["multiple_choice_answer"]),
                "hint": "", "subject": "", "lecture": "",
                **{k: item[k] for k in ("answer_type", "question_type", "difficulty", "hard_reason", "scene")},
            }
        records.append(item)
    return records


def features(flavour: str = "vqa"):
    """The `datasets.Features` of a flavour (the image is a `datasets.Image()` column)."""
    import datasets
    from datasets import Value

    _check_flavour(flavour)
    common = {
        "question_id": Value("int64"), "image_id": Value("int64"), "question": Value("string"),
        "image": datasets.Image(),
    }
    tail = {k: Value("string") for k in ("answer_type", "question_type", "difficulty", "hard_reason", "scene")}
    if flavour == "vqa":
        answers = datasets.List({"answer": Value("string"), "answer_confidence": Value("string"),
                                 "answer_id": Value("int64")})
        return datasets.Features({**common, "answers": answers, "multiple_choice_answer": Value("string"), **tail})
    return datasets.Features({**common, "choices": datasets.List(Value("string")), "answer": Value("int64"),
                              "hint": Value("string"), "subject": Value("string"), "lecture": Value("string"),
                              **tail})


def load_synth(split: str = "validation", flavour: str = "vqa", n: int | None = None):
    """`generate(split, n, flavour=flavour)` as an in-memory `datasets.Dataset` (no cache files)."""
    import datasets

    records = generate(split, n=n, flavour=flavour)
    return datasets.Dataset.from_list(records, features=features(flavour), split=datasets.Split(split))


def export(split: str, out_dir: str | Path, flavour: str = "vqa", format: str = "parquet",
           n: int | None = None) -> Path:
    """Write a split for lmms-eval / `datasets`: `out_dir/<split>.parquet` or `out_dir/<split>/` (save_to_disk).

    Use one `out_dir` per flavour. Read back with
    `datasets.load_dataset("parquet", data_files={split: str(path)})` or `datasets.load_from_disk(path)`.
    """
    _check_split(split, flavour)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_synth(split, flavour=flavour, n=n)
    if format == "parquet":
        path = out_dir / f"{split}.parquet"
        dataset.to_parquet(str(path))
    else:
        path = out_dir / split
        dataset.save_to_disk(str(path))
    return path


# --------------------------------------------------------------------------------------------
# vocabulary


def _all_questions() -> list[str]:
    colours = list(COLOURS)
    texts = [f"What color is the {s}?" for s in SHAPES]
    texts += [f"What shape is the {c} object?" for c in colours]
    texts += [f"How many {PLURAL[s]} are there?" for s in SHAPES]
    texts += [f"How many {c} objects are there?" for c in colours]
    texts += [f"Is there a {c} {s}?" for c in colours for s in SHAPES]
    texts += [f"Is the {c} {s} to the {d} of the {c} {s}?" for c in colours for s in SHAPES for d in ("left", "right")]
    texts += [f"Which side is the {s} on?" for s in SHAPES]
    return texts


def _all_answers() -> list[str]:
    said = list(ANSWER_SET) + [w for _, words in NEAR_COLOURS.values() for w in words]
    forms = said + list(NUMBER_WORDS.values()) + ["a " + s for s in SHAPES]
    return forms + [f + "." for f in forms]


def vocabulary() -> list[str]:
    """Every lower-case token (`tokenize`) of any question or answer `generate` can produce, sorted."""
    return sorted({t for text in _all_questions() + _all_answers() for t in tokenize(text)})

