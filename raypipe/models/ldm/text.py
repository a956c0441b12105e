"""Prompts and their encoding for the Diff-X LDMs.

Prompts (thesis, Methods 7): "An image of {age} years old {sex}", optionally followed by the clinical
attributes the thesis paired with each image (BMI, prevalent vertebral fracture, glucocorticoid use,
prior clinical fracture, rheumatoid arthritis, secondary osteoporosis).

Encoding: a pretrained CLIP text encoder + tokenizer when a local folder is configured (never
downloaded), else a small ``CLIPTextModel(CLIPTextConfig(...))`` trained with the UNets and
`WordTokenizer`, a word-level tokenizer built offline from the prompt vocabulary. Numbers are split
into digits so every age (also ages never seen in training, e.g. baseline + 10 years) has tokens.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # transformers is imported when an encoder is built
    from transformers import CLIPTextModel

__all__ = [
    "PROMPT_VOCABULARY",
    "WordTokenizer",
    "build_prompt",
    "build_text_encoder",
    "encode_prompts",
    "load_tokenizer",
]

PROMPT_VOCABULARY: tuple[str, ...] = (
    "an", "image", "of", "years", "old", "male", "female", "bmi", "with", "vertebral", "fracture",
    "glucocorticoid", "use", "prior", "clinical", "rheumatoid", "arthritis", "secondary", "osteoporosis",
    "and", "without", "kg", "m",
    *[str(d) for d in range(10)], ",", ".", "/",
)
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<unk>", "<eos>")
_WORD = re.compile(r"[a-z]+|\d|[^\sa-z\d]")
_SEX = {"F": "female", "FEMALE": "female", "M": "male", "MALE": "male"}


def _truthy(v: Any) -> bool:
    """A clinical flag as bool (missing and NaN are False)."""
    if v is None:
        return False
    if isinstance(v, float) and math.isnan(v):
        return False
    if isinstance(v, str):
        return v.strip().lower() in ("1", "1.0", "true", "yes", "y")
    return bool(v)


def build_prompt(
    age: float,
    sex: str,
    *,
    bmi: float | None = None,
    prevalent_fracture: Any = None,
    glucocorticoid: Any = None,
    prior_fracture: Any = None,
    rheumatoid_arthritis: Any = None,
    secondary_osteoporosis: Any = None,
) -> str:
    """The thesis's prompt for one image; attributes are appended only when given and present."""
    key = str(sex).strip().upper()
    if key not in _SEX:
        raise ValueError(f"sex must be F/M (or female/male), got {sex!r}")
    if not math.isfinite(float(age)):
        raise ValueError(f"age must be finite, got {age!r}")
    text = f"An image of {int(round(float(age)))} years old {_SEX[key]}"
    extras = []
    if bmi is not None and math.isfinite(float(bmi)):
        extras.append(f"BMI {float(bmi):.1f}")
    for flag, words in (
        (prevalent_fracture, "vertebral fracture"),
        (glucocorticoid, "glucocorticoid use"),
        (prior_fracture, "prior clinical fracture"),
        (rheumatoid_arthritis, "rheumatoid arthritis"),
        (secondary_osteoporosis, "secondary osteoporosis"),
    ):
        if _truthy(flag):
            extras.append(f"with {words}")
    return ", ".join([text, *extras])


class WordTokenizer:
    """Word-level tokenizer over `PROMPT_VOCABULARY`, called like a Hugging Face tokenizer."""

    def __init__(self, vocabulary: Sequence[str] = PROMPT_VOCABULARY, model_max_length: int = 32) -> None:
        self.vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *vocabulary))}
        self.model_max_length = int(model_max_length)
        self.pad_token_id, self.bos_token_id = self.vocab["<pad>"], self.vocab["<bos>"]
        self.unk_token_id, self.eos_token_id = self.vocab["<unk>"], self.vocab["<eos>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Lower-case words, single digits and punctuation marks."""
        return _WORD.findall(text.lower())

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`<bos> tokens <eos>` truncated to `max_length` (the `<eos>` is kept)."""
        n = max_length or self.model_max_length
        ids = [self.vocab.get(t, self.unk_token_id) for t in self.tokenize(text)][: n - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: str = "max_length",
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, Tensor]:
        """`input_ids` and `attention_mask` (B, max_length), padded with `<pad>`."""
        if isinstance(texts, str):
            texts = [texts]
        n = max_length or self.model_max_length
        rows = [self.encode(t, n) for t in texts]
        ids = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(path: str | None = None, max_length: int = 32) -> Any:
    """The CLIP tokenizer in a local folder (offline), else the built-in `WordTokenizer`."""
    if path:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return WordTokenizer(model_max_length=max_length)


def build_text_encoder(
    *,
    path: str | None = None,
    vocab_size: int | None = None,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    intermediate_size: int | None = None,
    max_length: int = 32,
) -> "CLIPTextModel":
    """Pretrained CLIP text encoder from a local folder, or a small randomly initialised one."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if path:
        return CLIPTextModel.from_pretrained(path, local_files_only=True)
    tok = WordTokenizer(model_max_length=max_length)
    config = CLIPTextConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return CLIPTextModel(config)


def encode_prompts(text_encoder: "CLIPTextModel", tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """Per-token embeddings (B, L, D) that the UNets cross-attend to."""
    length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    tok = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = text_encoder.device
    out = text_encoder(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
    return out.last_hidden_state
