"""MCDA scoring and the circuit breaker: examples and hypothesis properties."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gputorrent.scoring import Breaker, Candidate, Weights, choose, normalize, rank, score
from gputorrent.scoring.breaker import FIRST_COOLDOWN_S, MAX_COOLDOWN_S
from gputorrent.scoring.reputation import HALF_LIFE_S, ReputationStore

finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
candidates = st.lists(
    st.builds(Candidate, peer_id=st.text("abcdef", min_size=4, max_size=8), free_vram_mb=finite,
              free_slots=st.floats(-10, 64), rtt_ms=finite, tokens_per_s=finite,
              reputation=st.floats(0, 1)),
    min_size=1, max_size=8)


def test_default_weights_and_validation():
    assert Weights() == Weights(0.4, 0.3, 0.2, 0.1)
    with pytest.raises(ValueError, match="sum to 1"):
        Weights(0.5, 0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        Weights(1.2, -0.2, 0.0, 0.0)
    assert Weights.parse("vram=0.1,slots=0.1,rtt=0.7,speed=0.1").rtt == 0.7
    with pytest.raises(ValueError, match="e.g."):
        Weights.parse("vram=1")


@given(st.lists(finite, min_size=1, max_size=10), st.booleans())
def test_normalization_is_in_unit_range_and_keeps_order(values, higher):
    out = normalize(values, higher_is_better=higher)
    assert all(0.0 <= x <= 1.0 for x in out)
    for (a, x), (b, y) in zip(zip(values, out), zip(values[1:], out[1:])):
        if a < b:
            assert (x <= y) if higher else (x >= y)


@settings(max_examples=200)
@given(candidates)
def test_scores_are_bounded_and_scaled_by_reputation(cands):
    for s in score(cands):
        assert 0.0 <= s.base <= 1.0 + 1e-9
        assert s.score == pytest.approx(s.base * s.candidate.reputation)


@settings(max_examples=200)
@given(candidates, st.integers(0, 7), st.sampled_from(["free_vram_mb", "free_slots", "rtt_ms", "tokens_per_s"]),
       st.floats(1, 1000))
def test_improving_one_criterion_never_lowers_that_peer_score(cands, i, field, delta):
    i %= len(cands)
    value = getattr(cands[i], field) + (-delta if field == "rtt_ms" else delta)
    if value < 0:
        return
    improved = list(cands)
    improved[i] = dataclasses.replace(cands[i], **{field: value})
    assert score(improved)[i].score >= score(cands)[i].score - 1e-9


def test_choice_follows_the_weights():
    a = Candidate("a", free_vram_mb=8000, free_slots=0, rtt_ms=50, tokens_per_s=10)
    b = Candidate("b", free_vram_mb=1000, free_slots=4, rtt_ms=5, tokens_per_s=100)
    assert rank(score([a, b]))[0].candidate.peer_id == "b"  # slots+rtt+speed = 0.6 > vram 0.4
    assert rank(score([a, b], Weights(vram=0.7, slots=0.1, rtt=0.1, speed=0.1)))[0].candidate.peer_id == "a"


def test_one_peer_claiming_absurd_figures_cannot_rescale_the_honest_ones():
    honest = [Candidate(p, free_vram_mb=8000, free_slots=4, rtt_ms=5, tokens_per_s=50) for p in "abc"]
    liar = Candidate("liar", free_vram_mb=10**9, free_slots=10**6, rtt_ms=5, tokens_per_s=10**6)
    alone = {s.candidate.peer_id: s.score for s in score(honest)}
    crowded = {s.candidate.peer_id: s.score for s in score([*honest, liar])}
    for p in "abc":  # a ratio to the best would have put vram, slots and speed near 0: 0.2 in all
        assert alone[p] == pytest.approx(1.0) and crowded[p] >= 0.25 * 0.8 + 0.2 - 1e-9


def test_choice_is_seeded_and_spreads_over_the_top_candidates():
    cands = [Candidate(p, 1000, 4, 10, 50) for p in "abcde"]
    order = choose(score(cands), random.Random(7))
    assert order == choose(score(cands), random.Random(7))  # deterministic given the seed
    firsts = {choose(score(cands), random.Random(seed))[0].candidate.peer_id for seed in range(50)}
    assert firsts == {"a", "b", "c"}  # equal peers: requesters spread over the top three
    assert sorted(s.candidate.peer_id for s in order) == list("abcde")  # the rest follow for failover


def test_breaker_opens_after_five_failures_within_a_minute():
    b = Breaker()
    for t in range(4):
        b = b.failure(float(t))
    assert b.current(4.0) == "closed"
    assert b.failure(4.0).current(4.0) == "open"
    spread = Breaker()
    for t in range(5):
        spread = spread.failure(t * 20.0)  # never 5 within 60 s
    assert spread.current(100.0) == "closed"


def test_breaker_integrity_failure_opens_at_once_and_half_open_admits_one_trial():
    b = Breaker().failure(0.0, integrity=True)
    assert b.current(1.0) == "open" and not b.allows(1.0)
    assert b.current(FIRST_COOLDOWN_S) == "half-open" and b.allows(FIRST_COOLDOWN_S)
    trial = b.start_trial(FIRST_COOLDOWN_S)
    assert not trial.allows(FIRST_COOLDOWN_S)  # only one trial at a time
    reopened = trial.failure(FIRST_COOLDOWN_S + 1)
    assert reopened.current(FIRST_COOLDOWN_S + 2) == "open" and reopened.cooldown_s == 2 * FIRST_COOLDOWN_S
    healed = reopened.start_trial(100.0).success(100.0)
    assert healed.current(100.0) == "closed" and healed.cooldown_s == FIRST_COOLDOWN_S


def test_breaker_ban_and_reset():
    b = Breaker().ban()
    assert b.current(1e9) == "open" and not b.success(1.0).allows(1e9)
    assert b.reset().allows(0.0)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["fail", "integrity", "ok", "trial"]), st.floats(0, 30)), max_size=40))
def test_breaker_invariants_over_any_history(events):
    b, now = Breaker(), 0.0
    for kind, dt in events:
        now += dt
        before = b.current(now)
        if kind == "trial":
            b = b.start_trial(now)
        elif kind == "ok":
            b = b.success(now)
            assert before != "half-open" or b.current(now) == "closed"
        else:
            b = b.failure(now, integrity=kind == "integrity")
            if kind == "integrity" and before == "closed":
                assert b.current(now) == "open"
            if before == "half-open":
                assert b.current(now) == "open"
        assert FIRST_COOLDOWN_S <= b.cooldown_s <= MAX_COOLDOWN_S
        assert len(b.failures) < 5
        assert b.current(now) != "closed" or b.allows(now)


OUTCOMES = ["ok", "fail", "timeout", "integrity", "busy", "gone", "lost"]


@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from(OUTCOMES), st.floats(0, 200)), min_size=1, max_size=30))
def test_a_half_open_trial_always_resolves_whatever_happens_to_it(history):
    """Every trial ends: success closes, failure and timeout reopen, busy and a requester that
    gave up free the trial, and one whose requester died without a word ("lost") lapses. So a
    peer is never refused for good: some time after any history, a request may go to it."""
    from gputorrent.scoring.breaker import TRIAL_LAPSE_S

    b, now = Breaker().failure(0.0, integrity=True), 0.0
    for outcome, dt in history:
        now += dt
        if not b.allows(now):
            continue
        state = b.current(now)
        b = b.start_trial(now)
        if outcome == "ok":
            b = b.success(now)
            assert b.current(now) == "closed"
        elif outcome in ("fail", "timeout", "integrity"):
            b = b.failure(now, integrity=outcome == "integrity")
            assert state == "closed" or b.current(now) == "open"
        elif outcome in ("busy", "gone"):
            b = b.release(now)
            assert b.allows(now)  # the slot is free again at once
        # "lost": nothing more is ever heard of this trial
    assert b.allows(now + MAX_COOLDOWN_S + TRIAL_LAPSE_S)


def test_a_lost_trial_lapses_and_old_stored_breakers_still_load():
    from gputorrent.scoring.breaker import TRIAL_LAPSE_S

    b = Breaker().failure(0.0, integrity=True).start_trial(FIRST_COOLDOWN_S)
    assert not b.allows(FIRST_COOLDOWN_S + 1)
    assert b.allows(FIRST_COOLDOWN_S + TRIAL_LAPSE_S)
    old = Breaker.from_dict({"state": "open", "failures": [], "opened_at": 0.0, "cooldown_s": 15.0,
                             "trial_out": True, "banned": False})  # as session 2 stored it
    assert old.allows(FIRST_COOLDOWN_S)


def test_busy_lowers_a_score_for_a_short_while_without_touching_reputation(tmp_path):
    from gputorrent.scoring.reputation import BUSY_HALF_LIFE_S

    store = ReputationStore(tmp_path / "rep.sqlite")
    store.record("p", "busy", now=100.0)
    store.record("p", "busy", now=100.0)
    r = store.get("p", now=100.0)
    assert r.reputation == 1.0 and r.busy_factor(100.0) == pytest.approx(1 / 3)
    assert r.busy_factor(100.0 + 10 * BUSY_HALF_LIFE_S) > 0.99
    store.close()
    assert ReputationStore(tmp_path / "rep.sqlite").get("p", now=100.0).busy_factor(100.0) == pytest.approx(1 / 3)


# --- the reputation store -------------------------------------------------------------------




def test_reputation_counts_decay_and_persist(tmp_path):
    db = tmp_path / "rep.sqlite"
    store = ReputationStore(db)
    assert store.get("p", now=0).reputation == 1.0  # never seen: benefit of the doubt
    store.record("p", "ok", tokens_per_s=100, ttft_ms=50, now=0)
    store.record("p", "failed", now=0)
    r = store.get("p", now=0)
    assert r.successes == 1 and r.failures == 1 and r.reputation == pytest.approx(3 / 4)
    assert r.tokens_per_s == 100 and r.ttft_ms == 50
    store.close()
    later = ReputationStore(db).get("p", now=HALF_LIFE_S)  # reopened: persisted, and decayed
    assert later.successes == pytest.approx(0.5) and later.failures == pytest.approx(0.5)


def test_integrity_failure_costs_more_and_opens_the_persisted_breaker(tmp_path):
    store = ReputationStore(tmp_path / "rep.sqlite")
    store.record("honest", "failed", now=0)
    store.record("liar", "integrity", now=0)
    assert store.get("liar", now=1).reputation < store.get("honest", now=1).reputation
    store.flush()
    assert ReputationStore(tmp_path / "rep.sqlite").get("liar", now=1).breaker.current(1) == "open"


def test_several_processes_can_create_and_write_at_once(tmp_path):
    # Found in CI: switching a new file to WAL raced between processes ("database is locked").
    import multiprocessing as mp

    db = tmp_path / "rep.sqlite"
    procs = [mp.get_context("spawn").Process(target=_hammer, args=(db, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert ReputationStore(db).get("shared").successes == pytest.approx(100, rel=1e-3)


def _hammer(db, _i):
    store = ReputationStore(db)
    for _ in range(25):
        store.record("shared", "ok")
    store.close()


def test_ban_and_reset(tmp_path):
    store = ReputationStore(tmp_path / "rep.sqlite")
    assert not store.ban("p").breaker.allows(0)
    assert store.reset("p").breaker.allows(0)


def test_a_pong_cannot_add_slots_with_negative_counts():
    from gputorrent.asking.choose import MAX_SLOTS, free_slots
    from gputorrent.wire import Pong

    assert free_slots(Pong(active=-10**6, queued=-5, slots=4, free_memory_mb=0, tokens_per_s=0)) == 4
    assert free_slots(Pong(active=0, queued=0, slots=10**9, free_memory_mb=0, tokens_per_s=0)) == MAX_SLOTS
    assert free_slots(Pong(active=3, queued=2, slots=4, free_memory_mb=0, tokens_per_s=0)) == -1
