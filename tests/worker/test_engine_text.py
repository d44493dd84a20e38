"""Incremental decoding and stop strings, property-tested on the byte-level CJK tokenizer."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubevram.worker.engine import Engine, RequestHandle, SamplingParams, _Row

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def feed(engine: Engine, tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], _Row, str | None]:
    """Push ``tokens`` through the engine's per-row text path; return the pieces sent to the client."""
    loop = asyncio.new_event_loop()
    try:
        handle = RequestHandle([1], SamplingParams(max_tokens=len(tokens) + 1, stop=stop), loop)
        row = _Row(handle, None)
        alive = True
        for token in tokens:
            alive = engine._append(row, token, eos=False)
            if not alive:
                break
        loop.run_until_complete(asyncio.sleep(0))  # deliver the call_soon_threadsafe puts
        pieces, reason = [], None
        while not handle.queue.empty():
            output = handle.queue.get_nowait()
            pieces.append(output.text)
            reason = output.finish_reason or reason
        return pieces, row, reason
    finally:
        loop.close()


@given(data=st.data())
@SETTINGS
def test_increments_add_up_to_the_whole_text(loaded, data):
    engine = Engine(loaded.model, loaded.tokenizer)
    special = set(loaded.tokenizer.all_special_ids)
    vocab = [i for i in range(len(loaded.tokenizer)) if i not in special]
    tokens = data.draw(st.lists(st.sampled_from(vocab), min_size=1, max_size=30))
    pieces, row, _ = feed(engine, tokens)
    whole = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    streamed = "".join(pieces)
    assert streamed == row.text
    # Everything decoded is sent, except a tail that is still an incomplete UTF-8 sequence.
    assert whole.startswith(streamed)
    assert "\ufffd" in whole[len(streamed) :] or streamed == whole


@given(data=st.data())
@SETTINGS
def test_stop_strings_never_leak(loaded, data):
    engine = Engine(loaded.model, loaded.tokenizer)
    special = set(loaded.tokenizer.all_special_ids)
    vocab = [i for i in range(len(loaded.tokenizer)) if i not in special]
    tokens = data.draw(st.lists(st.sampled_from(vocab), min_size=2, max_size=30))
    whole = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    start = data.draw(st.integers(0, max(0, len(whole) - 1)))
    stop = whole[start : start + data.draw(st.integers(1, 3))]
    if not stop:
        return
    pieces, row, reason = feed(engine, tokens, stop=(stop,))
    streamed = "".join(pieces)
    assert stop not in streamed
    if reason == "stop":
        assert streamed == row.text == whole[: whole.index(stop)]
