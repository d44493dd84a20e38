"""Logits processors, tested like transformers' own: a vocabulary of tens, hand-checked values."""

from __future__ import annotations

import math

import pytest
import torch

from kubevram.worker.logits import (
    ChineseLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressLeadingPunctuationLogitsProcessor,
    TemperatureLogitsWarper,
    TokenClasses,
    TopPLogitsWarper,
    classify_text,
    parse_ranges,
)

VOCAB = 20
CJK = [3, 4, 5, 6]
PUNCT = [7, 8]
EOS = [2]


@pytest.fixture
def classes():
    return TokenClasses.from_ids(VOCAB, CJK, PUNCT, EOS)


def test_token_classes_from_ids(classes):
    assert classes.cjk.nonzero().flatten().tolist() == CJK
    assert classes.boosted.nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 20\)"):
        TokenClasses.from_ids(VOCAB, [20], [], [])


@pytest.mark.parametrize(
    ("text", "cjk", "punct"),
    [
        ("你", True, False),
        (" 你好", True, False),
        ("你好，", True, False),
        ("，", False, True),
        ("?", False, True),
        ("“", False, True),
        ("hello", False, False),
        ("你a", False, False),
        ("\ufffd", False, False),
        (" ", False, False),
        ("ぁ", False, False),
    ],
)
def test_classify_text(text, cjk, punct):
    assert classify_text(text) == (cjk, punct)


def test_classify_text_custom_ranges():
    assert classify_text("ぁ", parse_ranges(["3040-309F"])) == (True, False)
    with pytest.raises(ValueError, match="'XYZ' is not a range"):
        parse_ranges(["XYZ"])


def test_chinese_adds_log_alpha_per_row_without_touching_the_input(classes):
    scores = torch.randn(3, VOCAB)
    scores[0, 3] = -2.0  # a negative logit must become MORE likely, not less (the seed's defect)
    original = scores.clone()
    alpha = torch.tensor([[5.0], [1.0], [100.0]])
    out = ChineseLogitsProcessor(classes.boosted, alpha)(torch.zeros(3, 4, dtype=torch.long), scores)
    assert torch.equal(scores, original)
    assert out is not scores
    boosted = classes.boosted
    torch.testing.assert_close(out[0, boosted], original[0, boosted] + math.log(5.0))
    torch.testing.assert_close(out[0, ~boosted], original[0, ~boosted])
    torch.testing.assert_close(out[1], original[1])  # alpha 1: row unchanged
    torch.testing.assert_close(out[2, boosted], original[2, boosted] + math.log(100.0))
    assert out[0, 3] > original[0, 3]
    # EOS and punctuation are boosted, so a steered row can still end.
    for token in EOS + PUNCT:
        assert out[0, token] == pytest.approx(original[0, token] + math.log(5.0))
    # Probabilities of boosted tokens are multiplied by alpha relative to the others.
    p0, p1 = original[0].softmax(-1), out[0].softmax(-1)
    ratio = (p1[3] / p1[10]) / (p0[3] / p0[10])
    assert ratio.item() == pytest.approx(5.0, rel=1e-4)


def test_chinese_keeps_minus_inf(classes):
    scores = torch.zeros(1, VOCAB)
    scores[0, 4] = -math.inf
    out = ChineseLogitsProcessor(classes.boosted, 5.0)(torch.zeros(1, 1, dtype=torch.long), scores)
    assert out[0, 4] == -math.inf


def test_chinese_validates_arguments(classes):
    with pytest.raises(ValueError, match=r"`alpha` must be > 0, got \[0.0\]"):
        ChineseLogitsProcessor(classes.boosted, 0.0)
    with pytest.raises(ValueError, match="1-D bool mask"):
        ChineseLogitsProcessor(classes.boosted.float(), 5.0)
    with pytest.raises(ValueError, match=r"\(batch, 1\) tensor"):
        ChineseLogitsProcessor(classes.boosted, torch.ones(3))


def test_suppress_leading_punctuation_only_on_each_rows_first_step(classes):
    # Row 0 has a prompt of 4 tokens: at seq 4 it is at its first step. Row 1 (prompt 3) is past it;
    # row 2 is disabled (-1).
    processor = SuppressLeadingPunctuationLogitsProcessor(classes.punctuation, torch.tensor([4, 3, -1]))
    scores = torch.randn(3, VOCAB)
    original = scores.clone()
    out = processor(torch.zeros(3, 4, dtype=torch.long), scores)
    assert torch.equal(scores, original)
    assert torch.isinf(out[0, PUNCT]).all() and (out[0, PUNCT] < 0).all()
    keep = [i for i in range(VOCAB) if i not in PUNCT]
    torch.testing.assert_close(out[0, keep], original[0, keep])
    torch.testing.assert_close(out[1], original[1])
    torch.testing.assert_close(out[2], original[2])
    # One step later no row is at its first step: nothing is suppressed.
    later = processor(torch.zeros(3, 5, dtype=torch.long), scores)
    torch.testing.assert_close(later, original)


def test_repetition_penalty_per_row_ignores_padding():
    scores = torch.tensor([[2.0, -2.0, 1.0, 1.0], [2.0, -2.0, 1.0, 1.0]])
    input_ids = torch.tensor([[3, 0, 1], [2, 2, 0]])
    seen = torch.tensor([[False, True, True], [True, True, True]])  # row 0: position 0 is padding
    out = RepetitionPenaltyLogitsProcessor(torch.tensor([[2.0], [1.0]]), seen)(input_ids, scores.clone())
    torch.testing.assert_close(out[0], torch.tensor([1.0, -4.0, 1.0, 1.0]))  # token 3 (padding) untouched
    torch.testing.assert_close(out[1], scores[1])


def test_temperature_and_top_p_per_row():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    original = scores.clone()
    out = TopPLogitsWarper(torch.tensor([[0.7], [1.0]]))(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(scores, original)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[1]).all()
    warm = TemperatureLogitsWarper(torch.tensor([[2.0], [0.5]]))(torch.zeros(2, 1, dtype=torch.long), scores)
    torch.testing.assert_close(warm, original / torch.tensor([[2.0], [0.5]]))
    with pytest.raises(ValueError, match=r"`top_p` must be in \(0, 1\]"):
        TopPLogitsWarper(1.5)


@pytest.mark.parametrize("which", ["chinese", "suppress", "penalty", "top_p", "temperature"])
def test_rows_are_independent(classes, which):
    """Processing a batch gives, row by row, what processing each row alone gives."""
    torch.manual_seed(0)
    scores = torch.randn(3, VOCAB)
    input_ids = torch.randint(0, VOCAB, (3, 5))
    per_row = torch.tensor([[2.0], [1.0], [7.0]])

    def make(rows: slice):
        if which == "chinese":
            return ChineseLogitsProcessor(classes.boosted, per_row[rows])
        if which == "suppress":
            lengths = torch.tensor([5, 4, 5])[rows]
            return SuppressLeadingPunctuationLogitsProcessor(classes.punctuation, lengths)
        if which == "penalty":
            return RepetitionPenaltyLogitsProcessor(per_row[rows])
        if which == "top_p":
            return TopPLogitsWarper(per_row[rows] / 8)
        return TemperatureLogitsWarper(per_row[rows])

    together = make(slice(None))(input_ids, scores)
    for i in range(3):
        alone = make(slice(i, i + 1))(input_ids[i : i + 1], scores[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone)


def test_token_classes_from_a_byte_level_tokenizer(cjk_tokenizer):
    from kubevram.worker.logits import token_classes

    tokenizer = cjk_tokenizer
    eos = tokenizer.eos_token_id
    classes = token_classes(tokenizer, len(tokenizer) + 10, [eos])  # the model's head may be wider
    assert classes.cjk.shape == (len(tokenizer) + 10,)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    (ni,) = ids("你")
    (comma,) = ids("，")
    (question,) = ids("?")
    assert classes.cjk[ni] and not classes.punctuation[ni]
    assert classes.punctuation[comma] and classes.punctuation[question] and not classes.cjk[comma]
    assert classes.eos.nonzero().flatten().tolist() == [eos]
    assert not classes.cjk[eos] and not classes.punctuation[eos]
    assert not classes.boosted[len(tokenizer) :].any()  # ids past the tokenizer are in no set
    for token in ids("hello world"):
        assert not classes.boosted[token]
    # Byte-level pieces of a character decode to U+FFFD and are in no set.
    partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert partial
    assert not classes.boosted[partial].any()
