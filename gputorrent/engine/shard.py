"""The shard engine: blocks [first, end) of a model on llama.cpp, one KV window per session.

A requester drives a chain of shards step by step. A step is a run of positions of one
session: token ids for the first shard, the residual stream (f32, ``n_embd`` values per
position) for the others. A shard that is not last answers with the residual entering block
``end`` (llama.cpp's layer-input staging API, read with ctypes); the last applies the final
norm and head and samples with the session's own sampler, so logits never cross the wire.

As in the whole-model engine, the shapes of the computation never depend on what else runs:
single-position steps of every session share one decode (each its own row), a longer step
(a prompt chunk) gets a decode of its own, and the requester cuts prompts into the same
512-position chunks the whole-model engine uses. So a chain computes exactly what one whole
peer computes (tests check greedy tokens and logits), and a replacement shard replayed the
session's recorded steps holds exactly the KV cache the lost one held.
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..wire import Params
from .base import EngineError, Failed, Load
from .llama import N_BATCH, LlamaRuntime, match_stops

# Seconds a session may sit without a step before its slot is taken back (the requester
# vanished without closing, or froze).
IDLE_S = 30.0


@dataclass(frozen=True, slots=True)
class StepResult:
    hidden: bytes = b""  # not last: the residual entering block ``end`` at each position, f32
    token: int = -1  # last, when sampling: the token sampled (or the one forced)
    text: str = ""  # last: the text this token decided (held back while a stop might start)
    finish: str = ""  # last: "eog" (end of generation, not part of the answer), "stop" (a stop
    # sequence), "length" (max_tokens reached), or ""
    compute_s: float = 0.0  # the decode this step was part of, as this process timed it


@dataclass(eq=False, slots=True)
class Session:
    seq_id: int
    params: Params | None  # on the last shard
    sampler: Any = None
    pos: int = 0
    generated: int = 0
    held_text: str = ""
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    last_used: float = field(default_factory=time.monotonic)
    open: bool = True


@dataclass(eq=False, slots=True)
class StepJob:
    session: Session
    n: int
    tokens: list[int]
    hidden: bytes
    sample: bool  # the last position's logits are sampled (the prompt's end, or a decode step)
    forced: int  # on a replay: the token the chain used, accepted instead of the one drawn
    emit: Callable[[StepResult | Failed], None]


def _layer_input_api(lib):
    """llama.cpp's staging API for block inputs. libllama exports it only with C++ names."""
    try:
        set_inp = lib._Z30llama_set_embeddings_layer_inpP13llama_contextjb
        get_inp = lib._Z30llama_get_embeddings_layer_inpP13llama_contextj
    except AttributeError as exc:
        raise EngineError("this llama-cpp-python build has no layer-input API; install the version "
                          "gputorrent pins to serve shards") from exc
    set_inp.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool]
    set_inp.restype = None
    get_inp.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    get_inp.restype = ctypes.c_void_p
    return set_inp, get_inp


class ShardEngine(LlamaRuntime):
    """Blocks [first, end) of a ``total``-block model, serving up to ``slots`` sessions."""

    def __init__(self, path: Path, *, first: int, end: int, total: int, **kw) -> None:
        super().__init__(path, **kw)
        from llama_cpp import _internals
        from llama_cpp.llama_cpp import _lib

        self.first, self.end, self.total = first, end, total
        self.is_first, self.is_last = first == 0, end == total
        self.row_bytes = self.n_embd * 4
        if not self.is_first:
            self._batch = _internals.LlamaBatch(n_tokens=N_BATCH, embd=self.n_embd, n_seq_max=1, verbose=False)
        self._get_inp = None
        if not self.is_last:
            set_inp, self._get_inp = _layer_input_api(_lib)
            self._out_block = end - first  # the extra block's index inside the shard file
            set_inp(self._ctx.ctx, self._out_block, True)
        self._cond = threading.Condition()
        self._pending: list[StepJob] = []
        self._sessions: dict[int, Session] = {}
        self._closed: list[Session] = []
        self._unreleased = 0  # sessions closed whose slot the decode thread has not freed yet
        self._free = list(range(self.slots - 1, -1, -1))
        self._closing = False
        self._probe()
        self._thread = threading.Thread(target=self._run, name="shard-decode", daemon=True)
        self._thread.start()

    def _probe(self) -> None:
        """One position through the shard: llama.cpp records layer inputs only for some
        architectures, and an empty record must fail here, not in a requester's chain."""
        s = Session(0, None)
        job = StepJob(s, 1, [0], bytes(self.row_bytes), False, -1, lambda r: None)
        try:
            out = self._decode([job])[0]
        finally:
            self._ctx.kv_cache_seq_rm(0, -1, -1)
        if isinstance(out, Failed) or (not self.is_last and len(out.hidden) != self.row_bytes):
            arch = self._model.metadata().get("general.architecture", "this")
            raise EngineError(f"llama.cpp does not hand out block inputs for the {arch} architecture, so this "
                              "model cannot be served in shards; serve it whole (without --blocks)")

    # --- sessions --------------------------------------------------------------------------

    def open(self, params=None) -> Session | None:
        """A session in its own sequence slot, or None when every slot is taken. ``EngineError``
        for a grammar that does not parse, before any slot is taken."""
        if self.is_last and params is not None:
            self.check_grammar(getattr(params, "grammar", ""))
        with self._cond:
            self._reap_idle()
            # A session just closed frees its slot at the decode thread's next turn: wait for it.
            self._cond.wait_for(lambda: self._free or not self._unreleased or self._closing, timeout=1.0)
            if self._closing or not self._free:
                return None
            seq_id = self._free.pop()
            s = Session(seq_id, params)
            if self.is_last and params is not None:
                s.sampler = self._sampler(params)
            self._sessions[seq_id] = s
            return s

    def close_session(self, s: Session) -> None:
        """Free the session's slot and KV cells (at the decode thread's next turn)."""
        with self._cond:
            if s.open:
                s.open = False
                self._closed.append(s)
                self._unreleased += 1
                self._cond.notify()

    def _reap_idle(self) -> None:
        now = time.monotonic()
        busy = {j.session.seq_id for j in self._pending}
        for s in list(self._sessions.values()):
            if s.open and now - s.last_used > IDLE_S and s.seq_id not in busy:
                s.open = False
                self._closed.append(s)
                self._unreleased += 1

    def check(self, s: Session, pos: int, n: int, tokens: list[int], hidden: bytes) -> None:
        """Refuse a step llama.cpp would fail on, or that breaks the session's order."""
        if not s.open:
            raise EngineError("the session is closed")
        if not 1 <= n <= N_BATCH:
            raise EngineError(f"a step is 1 to {N_BATCH} positions, not {n}")
        if pos != s.pos:
            raise EngineError(f"step at position {pos}, but this session is at {s.pos}")
        if pos + n > self.n_ctx:
            raise EngineError(f"positions up to {pos + n} do not fit this peer's context of {self.n_ctx}")
        if self.is_first:
            if len(tokens) != n:
                raise EngineError(f"the first shard takes {n} token ids, got {len(tokens)}")
            bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
            if bad is not None:
                raise EngineError(f"token id {bad} is outside this model's vocabulary (0..{self.n_vocab - 1})")
        elif len(hidden) != n * self.row_bytes:
            raise EngineError(f"hidden states for {n} positions are {n * self.row_bytes} bytes, got {len(hidden)}")

    def submit(self, job: StepJob) -> None:
        with self._cond:
            if self._closing:
                raise EngineError("engine is shutting down")
            job.session.last_used = time.monotonic()
            self._pending.append(job)
            self._cond.notify()

    def load(self) -> Load:
        return Load(active=len(self._sessions), queued=0, slots=self.slots)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for job in self._pending:
            job.emit(Failed("peer is shutting down"))

    def measure(self, steps: int = 16) -> float:
        """Decode steps per second of one session (the shard's share of a token), before serving."""
        s = self.open(None)
        if s is None:
            return 0.0
        try:
            t0 = 0.0
            for i in range(steps + 1):
                if i == 1:
                    t0 = time.perf_counter()  # the first step warms the graph
                job = StepJob(s, 1, [0], bytes(self.row_bytes), False, -1, lambda r: None)
                if isinstance(self._decode([job])[0], Failed):
                    return 0.0
            return round(steps / (time.perf_counter() - t0), 1)
        finally:
            self._ctx.kv_cache_seq_rm(s.seq_id, -1, -1)
            with self._cond:
                self._sessions.pop(s.seq_id, None)
                self._free.append(s.seq_id)
                self._free.sort(reverse=True)

    # --- the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._pending and not self._closed:
                    self._cond.wait(timeout=IDLE_S)
                    self._reap_idle()
                if self._closing:
                    return
                jobs, self._pending = self._pending, []
                closed, self._closed = self._closed, []
            for s in closed:
                self._release(s)
            for job in [j for j in jobs if not j.session.open]:
                job.emit(Failed("the session is closed"))
            jobs = [j for j in jobs if j.session.open]
            # Decode steps of every session share one decode; prompt chunks get one each.
            single = sorted((j for j in jobs if j.n == 1), key=lambda j: j.session.seq_id)  # slot order
            for group in ([single] if single else []) + [[j] for j in jobs if j.n > 1]:
                for job, out in zip(group, self._decode(group), strict=False):
                    job.emit(out)

    def _release(self, s: Session) -> None:
        self._ctx.kv_cache_seq_rm(s.seq_id, -1, -1)
        if s.sampler is not None:
            s.sampler.close()
        with self._cond:
            self._sessions.pop(s.seq_id, None)
            self._free.append(s.seq_id)
            self._free.sort(reverse=True)  # lowest slot first, as the whole engine does
            self._unreleased -= 1
            self._cond.notify_all()

    def _decode(self, jobs: list[StepJob]) -> list[StepResult | Failed]:
        """One llama_decode of ``jobs`` (given in slot order); the result or failure of each, in order."""
        b = self._batch.batch
        embd = ctypes.cast(b.embd, ctypes.c_void_p).value if not self.is_first else None
        rows: list[int] = []
        n = 0
        for job in jobs:
            s = job.session
            rows.append(n)
            if embd is not None:
                ctypes.memmove(embd + n * self.row_bytes, job.hidden, job.n * self.row_bytes)
            for j in range(job.n):
                if embd is None:
                    b.token[n] = job.tokens[j]
                b.pos[n] = s.pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.seq_id
                b.logits[n] = False
                n += 1
            if self.is_last and job.sample:
                b.logits[n - 1] = True
        b.n_tokens = n
        t0 = time.perf_counter()
        try:
            self._ctx.decode(self._batch)
        except Exception as exc:  # noqa: BLE001 (llama.cpp errors come as any type; the jobs are failed and reported)
            for job in jobs:
                self._ctx.kv_cache_seq_rm(job.session.seq_id, job.session.pos, -1)
            return [Failed(f"decode failed: {exc}")] * len(jobs) if len(jobs) == 1 else self._one_by_one(jobs)
        out: list[StepResult | Failed] = []
        base = self._get_inp(self._ctx.ctx, self._out_block) if self._get_inp is not None else None
        for job, row in zip(jobs, rows, strict=False):
            job.session.pos += job.n
            if self._get_inp is not None:
                out.append(StepResult(hidden=ctypes.string_at(base + row * self.row_bytes, job.n * self.row_bytes))
                           if base else Failed("llama.cpp recorded no block input"))
            elif job.sample and job.session.sampler is not None:
                tok = self._ll.llama_sampler_sample(job.session.sampler.sampler, self._ctx.ctx, row + job.n - 1)
                out.append(self._accept(job.session, job.forced if job.forced >= 0 else tok))
            else:
                out.append(StepResult())
        took = time.perf_counter() - t0
        return [replace(r, compute_s=took) if isinstance(r, StepResult) else r for r in out]

    def _one_by_one(self, jobs: list[StepJob]) -> list[StepResult | Failed]:
        """After a failed shared decode: each job alone, so only the one that caused it fails."""
        return [self._decode([j])[0] for j in jobs]

    def _accept(self, s: Session, tok: int) -> StepResult:
        """A sampled token's text and whether the answer ends, as the whole engine decides."""
        s.generated += 1
        if self._is_eog(tok):
            text, s.held_text = s.held_text, ""
            return StepResult(token=tok, text=text, finish="eog")
        s.held_text += s.utf8.decode(self._piece(tok))
        hit, hold = match_stops(s.held_text, s.params.stop)  # type: ignore[union-attr]
        if hit >= 0:
            text, s.held_text = s.held_text[:hit], ""
            return StepResult(token=tok, text=text, finish="stop")
        if s.generated >= s.params.max_tokens:  # type: ignore[union-attr]
            text, s.held_text = s.held_text, ""
            return StepResult(token=tok, text=text, finish="length")
        if hold:
            return StepResult(token=tok)
        text, s.held_text = s.held_text, ""
        return StepResult(token=tok, text=text)
