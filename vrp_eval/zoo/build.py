"""Build the tiny zoo models from scratch: tokenizer, processor and a random-init model per family.

The tiny models use the very transformers classes the big ones use (LLaVA = CLIP + Llama,
PaliGemma = SigLIP + Gemma, Qwen2-VL), so every code path in vrp-eval that serves
`llava-hf/llava-1.5-7b-hf` serves `tiny-llava` too. Nothing here touches the network: the
tokenizer is a word-level vocabulary built from a fixed word list (the synthetic data's
vocabulary plus the prompt words of the families' templates and of lmms-eval's VQA prompts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

FAMILIES = ("llava", "paligemma", "qwen2vl")

IMAGE_SIZE = 48
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

# Words from the families' prompt templates and from lmms-eval's VQA / ScienceQA prompts, so that
# the prompts those harnesses build tokenize without unknown words.
PROMPT_WORDS = (
    "user assistant system answer en the question using a single word or phrase with option's "
    "letter from given choices directly options context you are helpful image picture a b c d e"
).split()
PUNCTUATION = list(".,:;?!'\"()-/")

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
}
LLAVA_IMAGE_TOKEN = "<image>"
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>")

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinySpec:
    """Sizes of a tiny model; the defaults are what the shipped zoo uses."""

    num_layers: int = 8
    hidden_size: int = 64
    intermediate_size: int = 256
    num_heads: int = 4
    vision_layers: int = 3
    vision_hidden: int = 128
    patch_size: int = 8  # LLaVA / PaliGemma: (48 / 8)^2 = 36 image tokens
    qwen_patch_size: int = 4  # Qwen2-VL merges 2x2 patches: (48 / 4 / 2)^2 = 36 image tokens
    image_size: int = IMAGE_SIZE
    extra: dict = field(default_factory=dict)


def build_tokenizer(words: list[str], family: str):
    """A word-level fast tokenizer over `words` (lower-cased), with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab_words = sorted({w.lower() for w in list(words) + PROMPT_WORDS} - set(PUNCTUATION) - {""})
    vocab: dict[str, int] = {}
    for token in specials + PUNCTUATION + vocab_words:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    extra = [LLAVA_IMAGE_TOKEN] if family in ("llava", "paligemma") else list(QWEN_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=512,
    )
    if family == "llava":
        tokenizer.add_bos_token = True
    return tokenizer


def _set_post_processor_bos(tokenizer) -> None:
    """LLaVA / Llama prompts start with BOS: make the fast tokenizer add it like Llama's does."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )


def build_processor(words: list[str], family: str, spec: TinySpec | None = None):
    """The family's real processor class around a word-level tokenizer and a tiny image processor."""
    spec = spec or TinySpec()
    tokenizer = build_tokenizer(words, family)
    size = spec.image_size
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        _set_post_processor_bos(tokenizer)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    if family == "paligemma":
        from transformers import PaliGemmaProcessor, SiglipImageProcessor

        image_processor = SiglipImageProcessor(
            size={"height": size, "width": size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        )
        image_processor.image_seq_length = (size // spec.patch_size) ** 2
        return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if family == "qwen2vl":
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        image_processor = Qwen2VLImageProcessor(
            patch_size=spec.qwen_patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=size * size, max_pixels=size * size,
            image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
        )
        video_processor = Qwen2VLVideoProcessor(
            patch_size=spec.qwen_patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=size * size, max_pixels=size * size,
        )
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_config(family: str, tokenizer, spec: TinySpec | None = None):
    """A tiny config of the family's real config class, sized by `spec`."""
    spec = spec or TinySpec()
    vocab_size = len(tokenizer)
    text = dict(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
            image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            vision_feature_select_strategy="default", vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if family == "paligemma":
        from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

        text["head_dim"] = spec.hidden_size // spec.num_heads
        return PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**vision), text_config=GemmaConfig(**text),
            image_token_id=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            projection_dim=spec.hidden_size, tie_word_embeddings=False,
        )
    if family == "qwen2vl":
        from transformers import Qwen2VLConfig

        head_dim = spec.hidden_size // spec.num_heads
        # Qwen2-VL-7B splits its 64 rotary frequencies as [16, 24, 24] (t, h, w): keep the ratio.
        section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        section[0] += head_dim // 2 - sum(section)
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": section})
        vision_config = dict(
            depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.hidden_size,
            num_heads=4, patch_size=spec.qwen_patch_size, spatial_merge_size=2, temporal_patch_size=2,
            mlp_ratio=2,
        )
        ids = tokenizer.convert_tokens_to_ids
        return Qwen2VLConfig(
            text_config=text, vision_config=vision_config,
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny(family: str, words: list[str], spec: TinySpec | None = None, seed: int = 0):
    """(model, processor) for a random-init tiny model of `family`."""
    from transformers import AutoModelForImageTextToText

    processor = build_processor(words, family, spec)
    config = build_config(family, processor.tokenizer, spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor
