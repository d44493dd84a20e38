"""Logits processors: Chinese steering, leading-punctuation suppression and per-row sampling.

Written like ``transformers.generation.logits_process``: each processor is called as
``processor(input_ids, scores) -> scores`` with ``input_ids`` of shape ``(batch, seq)`` and ``scores``
of shape ``(batch, vocab)``, does one vectorised operation (no Python loop over tokens or rows) and
returns a NEW tensor. Per-row parameters are ``(batch, 1)`` tensors, as text-generation-inference does,
so one batch can mix requests with steering on and off, different temperatures and different prompts.

The token sets are computed once per tokenizer (:func:`token_classes`) as boolean masks over the
vocabulary; the processors only ever add or mask with them.

Why not the seed article's code: it looped over ~150k token ids in Python on every step (~144 ms per
step, about 2,500x a vectorised add) and *multiplied* logits by alpha, which makes negative logits less
likely, not more. Multiplying a probability by ``alpha`` is adding ``log(alpha)`` to its logit, which is
what :class:`ChineseLogitsProcessor` does. Its first-token processor read an undefined global
``current_token_len``; :class:`SuppressLeadingPunctuationLogitsProcessor` is given the prompt lengths.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: The default CJK range: CJK Unified Ideographs.
DEFAULT_CJK_RANGES: tuple[tuple[int, int], ...] = ((0x4E00, 0x9FFF),)

#: Chinese (full-width) punctuation counted as punctuation besides every Unicode ``P*`` character.
CHINESE_PUNCTUATION = "，。？！：；、“”‘’（）《》【】…—～·「」『』"
ASCII_PUNCTUATION = string.punctuation


def parse_ranges(ranges: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """``["4E00-9FFF", "3400-4DBF"]`` -> ``((0x4E00, 0x9FFF), (0x3400, 0x4DBF))`` (inclusive bounds)."""
    out = []
    for item in ranges:
        lo, sep, hi = item.partition("-")
        try:
            pair = (int(lo, 16), int(hi, 16))
        except ValueError:
            pair = (-1, -1)
        if not sep or not 0 <= pair[0] <= pair[1] <= 0x10FFFF:
            raise ValueError(f"ranges: {item!r} is not a range of hex code points such as 4E00-9FFF")
        out.append(pair)
    return tuple(out)


def is_punctuation(char: str) -> bool:
    """ASCII punctuation, Chinese punctuation and every Unicode punctuation (``P*``) character."""
    if char in ASCII_PUNCTUATION or char in CHINESE_PUNCTUATION:
        return True
    return unicodedata.category(char).startswith("P")


def classify_text(text: str, ranges: Sequence[tuple[int, int]] = DEFAULT_CJK_RANGES) -> tuple[bool, bool]:
    """Whether a token's text is CJK and whether it is punctuation.

    CJK: at least one character in ``ranges`` and nothing but such characters, punctuation and
    whitespace. Punctuation: at least one punctuation character and nothing else but whitespace.
    Text with U+FFFD (a partial UTF-8 sequence of a byte-level vocabulary) is neither.
    """
    chars = [c for c in text if not c.isspace()]
    if not chars or "\ufffd" in chars:
        return False, False
    in_range = [any(lo <= ord(c) <= hi for lo, hi in ranges) for c in chars]
    punct = [is_punctuation(c) for c in chars]
    cjk = any(in_range) and all(r or p for r, p in zip(in_range, punct, strict=True))
    return cjk, all(punct)


@dataclass(frozen=True)
class TokenClasses:
    """Boolean masks over the vocabulary, each of shape ``(vocab,)``: computed once per tokenizer."""

    cjk: torch.Tensor
    punctuation: torch.Tensor
    eos: torch.Tensor

    @property
    def boosted(self) -> torch.Tensor:
        """What Chinese steering boosts: CJK, punctuation and EOS (else generation never ends)."""
        return self.cjk | self.punctuation | self.eos

    def to(self, device: torch.device | str) -> TokenClasses:
        return TokenClasses(self.cjk.to(device), self.punctuation.to(device), self.eos.to(device))

    @classmethod
    def from_ids(
        cls, vocab_size: int, cjk: Iterable[int], punctuation: Iterable[int], eos: Iterable[int]
    ) -> TokenClasses:
        """Masks from token-id sets (for synthetic vocabularies and tests)."""

        def mask(ids: Iterable[int]) -> torch.Tensor:
            out = torch.zeros(vocab_size, dtype=torch.bool)
            index = torch.tensor(sorted(set(ids)), dtype=torch.long)
            if index.numel() and (index.min() < 0 or index.max() >= vocab_size):
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {index.min()}..{index.max()}")
            out[index] = True
            return out

        return cls(mask(cjk), mask(punctuation), mask(eos))


def token_classes(
    tokenizer: Any,
    vocab_size: int,
    eos_token_ids: Iterable[int],
    ranges: Sequence[tuple[int, int]] = DEFAULT_CJK_RANGES,
) -> TokenClasses:
    """Classify every token of ``tokenizer`` by the text it decodes to (once; ~1 s for 150k tokens).

    ``vocab_size`` is the model's output size (often padded past the tokenizer's length): ids the
    tokenizer does not know are in no class. Special tokens are in no class except the EOS ids.
    """
    known = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    cjk, punct = [], []
    for token_id, text in enumerate(texts):
        if token_id in special:
            continue
        is_cjk, is_punct = classify_text(text, ranges)
        if is_cjk:
            cjk.append(token_id)
        if is_punct:
            punct.append(token_id)
    return TokenClasses.from_ids(vocab_size, cjk, punct, [i for i in eos_token_ids if 0 <= i < vocab_size])


def _per_row(value: torch.Tensor | float, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.dim() == 0:
        tensor = tensor.reshape(1, 1)
    if tensor.dim() != 2 or tensor.shape[1] != 1:
        raise ValueError(f"`{name}` must be a float or a (batch, 1) tensor, got shape {tuple(tensor.shape)}")
    return tensor


class ChineseLogitsProcessor:
    r"""Multiply the probability of every CJK token, punctuation and EOS by ``alpha``, per row.

    Adding ``log(alpha)`` to a logit multiplies that token's unnormalised probability by ``alpha``
    whatever the logit's sign. A row with ``alpha == 1`` is left unchanged, so steering can be on for
    some rows of a batch and off for others.

    Args:
        boosted (`torch.Tensor` of shape `(vocab,)`, bool): the tokens to boost (``TokenClasses.boosted``).
        alpha (`float` or `torch.Tensor` of shape `(batch, 1)`): the factor, > 0.

    Returns a new `torch.FloatTensor` of shape `(batch, vocab)`.
    """

    def __init__(self, boosted: torch.Tensor, alpha: torch.Tensor | float) -> None:
        if boosted.dim() != 1 or boosted.dtype != torch.bool:
            raise ValueError(
                f"`boosted` must be a 1-D bool mask over the vocabulary, got {boosted.dtype} "
                f"of shape {tuple(boosted.shape)}"
            )
        alpha = _per_row(alpha, "alpha")
        if not bool((alpha > 0).all()):
            raise ValueError(f"`alpha` must be > 0, got {alpha.flatten().tolist()}")
        self.boosted = boosted
        self.log_alpha = alpha.log()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] != self.boosted.shape[0]:
            raise ValueError(f"scores have {scores.shape[-1]} logits, the mask {self.boosted.shape[0]}")
        log_alpha = self.log_alpha.to(device=scores.device, dtype=scores.dtype)
        boost = self.boosted.to(device=scores.device, dtype=scores.dtype)
        return torch.addcmul(scores, log_alpha, boost)


class SuppressLeadingPunctuationLogitsProcessor:
    r"""Forbid punctuation as the first generated token of each row.

    A row is at its first step when ``input_ids.shape[-1]`` equals its prompt length; rows with a
    longer (or, when disabled, ``-1``) prompt length are untouched. No global state: the prompt
    lengths are given.

    Args:
        punctuation (`torch.Tensor` of shape `(vocab,)`, bool): the tokens to forbid.
        prompt_lengths (`torch.Tensor` of shape `(batch,)` or `(batch, 1)`, int): each row's prompt
            length as it appears in ``input_ids`` (padding included); ``-1`` disables a row.

    Returns a new `torch.FloatTensor` of shape `(batch, vocab)` with forbidden tokens at ``-inf``.
    """

    def __init__(self, punctuation: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int]) -> None:
        if punctuation.dim() != 1 or punctuation.dtype != torch.bool:
            raise ValueError(
                f"`punctuation` must be a 1-D bool mask, got {punctuation.dtype} "
                f"of shape {tuple(punctuation.shape)}"
            )
        self.punctuation = punctuation
        self.prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).reshape(-1, 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        first = self.prompt_lengths.to(scores.device) == input_ids.shape[-1]  # (batch, 1)
        forbid = first & self.punctuation.to(scores.device)  # (batch, vocab)
        return scores.masked_fill(forbid, -math.inf)


class RepetitionPenaltyLogitsProcessor:
    r"""CTRL's repetition penalty with a penalty per row: seen tokens' logits divided (if > 0) or
    multiplied (if < 0) by ``penalty``; ``1.0`` leaves a row unchanged.

    Args:
        penalty (`torch.Tensor` of shape `(batch, 1)` or `float`): > 0.
        seen_mask (`torch.Tensor` of shape `(batch, seq)`, bool, optional): which positions of
            ``input_ids`` count (False for padding).
    """

    def __init__(self, penalty: torch.Tensor | float, seen_mask: torch.Tensor | None = None) -> None:
        self.penalty = _per_row(penalty, "penalty")
        if not bool((self.penalty > 0).all()):
            raise ValueError(f"`penalty` must be > 0, got {self.penalty.flatten().tolist()}")
        self.seen_mask = seen_mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = input_ids
        if self.seen_mask is not None:
            # Padding positions repeat the row's last token, which is penalised anyway.
            ids = torch.where(self.seen_mask.to(ids.device), ids, ids[:, -1:])
        penalty = self.penalty.to(device=scores.device, dtype=scores.dtype)
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        return scores.scatter(1, ids, picked)


class TemperatureLogitsWarper:
    r"""Divide each row by its temperature (``(batch, 1)``, > 0; greedy rows are handled by the sampler)."""

    def __init__(self, temperature: torch.Tensor | float) -> None:
        self.temperature = _per_row(temperature, "temperature")
        if not bool((self.temperature > 0).all()):
            raise ValueError(f"`temperature` must be > 0, got {self.temperature.flatten().tolist()}")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature.to(device=scores.device, dtype=scores.dtype)


class TopPLogitsWarper:
    r"""Nucleus sampling per row: keep the smallest set of tokens whose probability reaches ``top_p``.

    Args:
        top_p (`torch.Tensor` of shape `(batch, 1)` or `float`): in (0, 1]; 1 keeps every token.
    """

    def __init__(self, top_p: torch.Tensor | float, min_tokens_to_keep: int = 1) -> None:
        self.top_p = _per_row(top_p, "top_p")
        if not bool(((self.top_p > 0) & (self.top_p <= 1)).all()):
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p.flatten().tolist()}")
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        top_p = self.top_p.to(device=scores.device, dtype=cumulative.dtype)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -self.min_tokens_to_keep :] = False
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        return scores.masked_fill(remove, -math.inf)
