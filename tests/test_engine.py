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


RESUME_PROMPTS = ["Describe a busy kitchen at dinner time.", "Tell me about breakfast.", "Explain gravity to a child.",
                  "Why is the sky blue?", "Give advice for a job interview.", "Describe your ideal morning."]


@pytest.fixture(scope="module")
def wide_engine(model_path):
    from gputorrent.engine.llama import LlamaEngine

    eng = LlamaEngine(model_path, slots=8, n_ctx=256)
    yield eng
    eng.close()


@pytest.mark.parametrize("question", RESUME_PROMPTS)
async def test_resume_is_token_identical_at_every_point_from_1_to_40(wide_engine, question):
    """A failover hands the next peer the tokens received so far; it replays them as its own
    samples, one decode step each, riding along with other sequences in the batch. Every
    resume point gives the uninterrupted answer (prefilling them in one batch differed at 46
    of 440 such points on this model)."""
    prompt = _chat(wide_engine, question)
    full, _, _ = await _run(wide_engine, prompt, max_tokens=41, temperature=0.0)
    assert len(full) > 20
    rests: dict[int, list[int]] = {}

    async def resume(k: int) -> None:
        events = EventChannel()
        job = wide_engine.make_job(prompt, Params(max_tokens=41, temperature=0.0), events.emit, forced=full[:k])
        wide_engine.submit(job)
        rests[k] = [i async for ev in events if isinstance(ev, Tokens) for i in ev.ids]

    async with trio.open_nursery() as n:  # eight at a time: the batch changes shape all along
        for k in range(1, min(41, len(full))):
            n.start_soon(resume, k)
    assert {k: full[:k] + rest for k, rest in rests.items()} == {k: full for k in rests}
    assert all(len(full[:k] + rest) <= 41 for k, rest in rests.items())  # never past max_tokens


async def test_seeded_sampling_resumes_identically_too(engine):
    prompt = _chat(engine, "Tell me a story.")
    full, _, _ = await _run(engine, prompt, max_tokens=24, temperature=0.8, seed=7)
    for k in (1, 9, 17):
        events = EventChannel()
        job = engine.make_job(prompt, Params(max_tokens=24, temperature=0.8, seed=7), events.emit, forced=full[:k])
        engine.submit(job)
        rest = [i async for ev in events if isinstance(ev, Tokens) for i in ev.ids]
        assert full[:k] + rest == full


async def test_jobs_the_model_would_fail_on_are_refused_before_they_take_a_slot(engine):
    with pytest.raises(EngineError, match="empty"):
        engine.make_job([], Params(), lambda ev: None)
    with pytest.raises(EngineError, match="outside this model's vocabulary"):
        engine.make_job([1, 2, engine.n_vocab], Params(), lambda ev: None)
    with pytest.raises(EngineError, match="outside"):
        engine.make_job([1, 2], Params(), lambda ev: None, forced=[49152])
    with pytest.raises(EngineError, match="nothing to add"):
        engine.make_job([1, 2], Params(max_tokens=3), lambda ev: None, forced=[5, 6, 7])
    assert engine.load().active == 0


async def test_a_failing_sequence_fails_alone(engine):
    """llama.cpp rejecting one sequence's tokens fails that sequence, not its batch mates."""
    victim_events, other_events = EventChannel(), EventChannel()
    other = engine.make_job(_chat(engine), Params(max_tokens=16, temperature=0.0), other_events.emit)
    victim = engine.make_job(_chat(engine, "Count to ten."), Params(max_tokens=40), victim_events.emit)
    victim.prompt_ids.append(engine.n_vocab + 5)  # slipped past the checks: llama_decode fails on it
    engine.submit(other)
    engine.submit(victim)
    from gputorrent.engine import Failed

    got = [ev async for ev in victim_events]
    assert isinstance(got[-1], Failed)
    text = "".join(ev.text for ev in [e async for e in other_events] if isinstance(ev, Tokens))
    assert "Paris" in text
    assert engine.load().active == 0


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


async def test_a_cached_prefix_is_reused_and_answers_exactly_as_a_fresh_prefill(model_path):
    """A second prompt sharing a long system prompt with the first skips its cached chunks,
    and its answer is token for token what a slot with nothing cached computes: chunks end on
    the same borders either way (wire.chunk_end)."""
    from gputorrent.engine.llama import LlamaEngine

    system = "You are a careful assistant who answers in full sentences. " * 12
    first = [ChatMessage("system", system), ChatMessage("user", "Name a colour.")]
    second = [ChatMessage("system", system), ChatMessage("user", "Name a large animal.")]
    warm = LlamaEngine(model_path, slots=1, n_ctx=512)
    cold = LlamaEngine(model_path, slots=1, n_ctx=512)
    try:
        await _run(warm, warm.encode_chat(first), max_tokens=4, temperature=0.0)
        assert warm.reused_tokens == 0
        ids = warm.encode_chat(second)
        reused_answer = (await _run(warm, ids, max_tokens=24, temperature=0.0))[:2]
        fresh_answer = (await _run(cold, ids, max_tokens=24, temperature=0.0))[:2]
        assert warm.reused_tokens >= 128 and cold.reused_tokens == 0
        assert reused_answer == fresh_answer and len(reused_answer[0]) > 4
        seeded = {"max_tokens": 24, "temperature": 0.9, "seed": 7}
        assert (await _run(warm, ids, **seeded))[:2] == (await _run(cold, cold.encode_chat(second), **seeded))[:2]
    finally:
        warm.close()
        cold.close()


def test_a_rows_logits_do_not_depend_on_threads_or_on_what_shares_its_step(model_path):
    """Failover, chains and spot checks compare answers across peers with other core counts,
    other tuners and other traffic: with a context past 512 cells, flash attention's CPU path
    split the keys by thread, and the same row came out up to 1.03 apart."""
    from gputorrent.engine.llama import LlamaRuntime
    from gputorrent.lab.logits import greedy_steps

    rt = LlamaRuntime(model_path, slots=2, n_ctx=1024, n_threads=2)
    long = rt.encode_chat([ChatMessage("user", "Here is a list of words: " + "apple pear plum " * 180)])
    other = rt.encode_chat([ChatMessage("user", "Count from one to five.")])
    assert len(long) > 512
    alone_1 = greedy_steps(rt, [long], threads=1)
    alone_2 = greedy_steps(rt, [long], threads=2)
    shared_2 = greedy_steps(rt, [long, other], threads=2)
    for a, b, c in zip(alone_1, alone_2, shared_2, strict=True):
        assert (a == b).all() and (a == c).all(), (abs(a - b).max(), abs(a - c).max())
