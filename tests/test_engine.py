"""The llama.cpp engine in-process, on the real demo model."""

import pytest
import trio

from gputorrent.engine import EngineError, Finished, Tokens
from gputorrent.engine.streaming import EventChannel
from gputorrent.wire import ChatMessage, Params

from .conftest import QUESTION


@pytest.fixture(scope="module")
def engine(model_path):
    from gputorrent.engine.llama import LlamaEngine

    eng = LlamaEngine(model_path, slots=2, n_ctx=256)
    yield eng
    eng.close()


async def _run(engine, ids, **params):
    events = EventChannel()
    job = engine.make_job(ids, Params(**params), events.emit)
    engine.submit(job)
    out_ids, text, fin = [], "", None
    async for ev in events:
        if isinstance(ev, Tokens):
            out_ids += ev.ids
            text += ev.text
        elif isinstance(ev, Finished):
            fin = ev
    return out_ids, text, fin


def _chat(engine, q=QUESTION):
    return engine.encode_chat([ChatMessage("user", q)])


async def test_greedy_answer_is_paris(engine):
    ids, text, fin = await _run(engine, _chat(engine), max_tokens=32, temperature=0.0)
    assert "Paris" in text and fin.reason == "stop"
    assert engine.detokenize(ids) == text


async def test_stop_sequence_ends_before_it_and_is_not_shown(engine):
    _, full, _ = await _run(engine, _chat(engine), max_tokens=32, temperature=0.0)
    assert " is " in full
    _, text, fin = await _run(engine, _chat(engine), max_tokens=32, temperature=0.0, stop=[" is"])
    assert fin.reason == "stop" and text == full[: full.index(" is")]


async def test_max_tokens_ends_with_length(engine):
    ids, _, fin = await _run(engine, _chat(engine, "Tell me a long story."), max_tokens=5, temperature=0.0)
    assert fin.reason == "length" and fin.completion_tokens == 5 and len(ids) == 5


async def test_resume_from_received_ids_continues_identically(engine):
    prompt = _chat(engine, "Name three colors.")
    full, _, _ = await _run(engine, prompt, max_tokens=20, temperature=0.0)
    rest, _, _ = await _run(engine, prompt + full[:5], max_tokens=15, temperature=0.0)
    assert full[:5] + rest == full


async def test_prompt_longer_than_context_is_refused_before_compute(engine):
    with pytest.raises(EngineError, match="context is 256"):
        engine.make_job(list(range(300)), Params(), lambda ev: None)


async def test_cancel_frees_the_slot_for_the_next_request(engine):
    events = EventChannel()
    job = engine.make_job(_chat(engine, "Write a long essay about the sea."), Params(max_tokens=200), events.emit)
    engine.submit(job)
    async for ev in events:
        if isinstance(ev, Tokens):
            job.cancel()
        if isinstance(ev, Finished):
            assert ev.reason == "cancelled" and ev.completion_tokens < 200
    assert engine.load().active == 0
    _, text, _ = await _run(engine, _chat(engine), max_tokens=16, temperature=0.0)
    assert "Paris" in text


async def test_concurrent_jobs_share_the_batch_and_keep_their_own_answers(engine):
    alone = (await _run(engine, _chat(engine), max_tokens=16, temperature=0.0))[1]
    results = {}

    async def one(name, q):
        results[name] = (await _run(engine, _chat(engine, q), max_tokens=16, temperature=0.0))[1]

    async with trio.open_nursery() as n:
        n.start_soon(one, "a", QUESTION)
        n.start_soon(one, "b", "Count from one to five.")
    assert results["a"] == alone
    assert results["b"] and results["b"] != alone
