"""The llama.cpp engine: one model, N slots, continuous batching on llama-cpp-python's
low-level API.

One thread owns the llama context. Each step it decodes the next token of every running
sequence in one batch, then each waiting prompt's next chunk on its own, and samples each
sequence with its own sampler chain. A request that arrives mid-answer joins at the next step;
a cancelled one leaves at the next step and its KV cells are freed. Each slot has its own
context window (``n_ctx`` tokens), so one long answer never squeezes another.

Failover resumes are token-identical by construction: the shapes of the computation never
depend on what else is running or what is cached (a prompt is cut on the same borders,
``wire.chunk_end``, whatever else waits and whatever prefix a slot still holds from an earlier
answer; every answer token is its own row of a decode step), and a resumed request
replays the tokens it was handed as forced samples, one decode step each, exactly as the
first peer computed them. Its sampler still draws at every step, so a seeded sampler's state
matches too.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire import ChatMessage, chunk_end, reusable_prefix
from .admission import Admission
from .base import EngineError, Failed, Finished, Job, Load, Tokens
from .threads import ThreadTuner

N_BATCH = 512


def default_threads() -> int:
    """Decode threads: every core we may use (measured: 2 threads ~1.4x one on 2 cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def match_stops(text: str, stops: Sequence[str]) -> tuple[int, bool]:
    """Where the first stop sequence starts in ``text`` (-1: none), and whether ``text`` ends
    with the start of one, so it must be held back until the next token decides."""
    if not stops:
        return -1, False
    hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return hit, hit < 0 and any(text.endswith(s[:k]) for s in stops for k in range(1, len(s)))


@dataclass(eq=False, slots=True)
class _Seq:
    job: Job
    seq_id: int
    sampler: Any  # _Sampler (llama.cpp's chain)
    feed: list[int]
    stops: tuple[str, ...]
    t_submit: float
    pos: int = 0
    generated: int = 0
    n_out: int = 0  # answer tokens so far (forced ones included, end of generation not)
    forced: list[int] = field(default_factory=list)  # replayed instead of sampled, not emitted
    t_first: float = 0.0
    held_ids: list[int] = field(default_factory=list)
    held_text: str = ""
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


# How attention runs (see LlamaRuntime): "rows", the engine's; "split", llama.cpp's default;
# "plain", without flash attention. The last two are there to be compared with the first.
ATTENTION = ("rows", "split", "plain")
GGML_TYPE_BF16 = 30  # ggml.h's number; llama_cpp's module does not name it


class LlamaRuntime:
    """A GGUF loaded into one llama.cpp context with ``slots`` sequences, and its vocabulary:
    what the whole-model engine and the shard engine share."""

    def __init__(
        self,
        path: Path,
        *,
        slots: int = 4,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        progress: Callable[[float], None] | None = None,
        verbose: bool = False,
        n_threads_batch: int | None = None,
        attention: str = "rows",
    ) -> None:
        from llama_cpp import _internals, _logger

        from .native import load_llama

        llama_cpp = load_llama()

        _logger.set_verbose(verbose)
        llama_cpp.llama_backend_init()
        self._ll = llama_cpp
        self.slots = slots
        self.n_threads = n_threads or default_threads()

        # A CPU-only build ignores n_gpu_layers; say so rather than pretend to offload.
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        self.n_gpu_layers = n_gpu_layers
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        if progress is not None:
            # Keep a reference: llama.cpp holds the raw function pointer during the load.
            self._progress_cb = llama_cpp.llama_progress_callback(lambda p, _ud: bool(progress(p)) or True)
            mparams.progress_callback = self._progress_cb
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=verbose)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}") from exc
        layers = int(llama_cpp.llama_model_n_layer(self._model.model)) + 1  # the blocks and the output layer
        # What really runs on the GPU: nothing on a CPU-only build, whatever was asked.
        self.offloaded_layers = (min(layers, n_gpu_layers if n_gpu_layers >= 0 else layers)
                                 if self.gpu_offload else 0)
        self.n_ctx_train = self._model.n_ctx_train()
        self.n_ctx = min(n_ctx, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx
        self.n_embd = int(self._model.n_embd())

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * slots
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = slots
        cparams.kv_unified = False  # a fixed window per slot
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = n_threads_batch or self.n_threads  # prompt chunks (and batched steps)
        self._n_threads_batch = cparams.n_threads_batch
        cparams.no_perf = True
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}")
        if self.offloaded_layers == 0 and attention != "split":
            # On the CPU, flash attention's one-token path cuts a context of 512 cells or more
            # into one piece per thread when K and V share a type, and sums the pieces: a row's
            # logits then depended on the thread count and on whether another answer shared the
            # step (measured: up to 1.03 apart; a chain's answer left the whole peer's). With V
            # in bf16 against K in f16 that path is not taken, and every row is computed whole
            # on one thread: the same on every CPU peer whatever its cores, its tuner or its
            # neighbours, which failover and spot checks rest on (tests/test_engine.py). Same
            # size and, measured, the same speed; flash attention off ("plain") cost 7-17 %
            # below 512 positions (benchmarks/attention.py compares all three).
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cparams.type_v = GGML_TYPE_BF16
        if attention == "plain":
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_v = llama_cpp.GGML_TYPE_F16
        self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=verbose)
        self._batch = _internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1, verbose=verbose)
        self._new_sampler = _internals.LlamaSampler
        self._vocab = self._model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._pieces: dict[int, bytes] = {}
        self._chat = self._chat_formatter()

    # --- prompts -------------------------------------------------------------------------

    def _chat_formatter(self):
        from llama_cpp import llama_chat_format

        template = self._model.metadata().get("tokenizer.chat_template")
        if not template:
            return None
        eos, bos = self._model.token_eos(), self._model.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=self._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's own chat template."""
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if self._chat is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
            return self.encode_prompt(text)
        rendered = self._chat(messages=msgs)
        return self._model.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

    def encode_prompt(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode(), add_bos=self._model.add_bos_token(), special=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids)).decode("utf-8", "replace")

    def _piece(self, tok: int) -> bytes:
        """The bytes of one token (cached: this runs once per generated token)."""
        piece = self._pieces.get(tok)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._ll.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
            piece = self._pieces[tok] = buf.raw[: max(n, 0)]
        return piece

    def _is_eog(self, tok: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, tok))

    def check_grammar(self, grammar: str) -> None:
        """``EngineError`` for a grammar llama.cpp cannot parse: refused before it takes a slot
        (its sampler init returns NULL, which a sampler chain must never be given)."""
        if not grammar:
            return
        sampler = self._ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise EngineError("the grammar does not parse (llama.cpp GBNF, with a 'root' rule)")
        self._ll.llama_sampler_free(sampler)

    def _sampler(self, params):
        s = self._new_sampler()
        if getattr(params, "grammar", ""):  # first in the chain: the others only see allowed tokens
            grammar = self._ll.llama_sampler_init_grammar(self._vocab, params.grammar.encode(), b"root")
            if not grammar:  # checked at admission; a request must never crash the engine
                raise EngineError("the grammar does not parse")
            self._ll.llama_sampler_chain_add(s.sampler, grammar)
        if params.temperature <= 0.0:
            s.add_greedy()
        else:
            if params.top_k > 0:
                s.add_top_k(params.top_k)
            s.add_top_p(params.top_p, 1)
            s.add_temp(params.temperature)
            s.add_dist(params.seed if params.seed >= 0 else random.getrandbits(32))
        return s


class LlamaEngine(LlamaRuntime):
    """A loaded GGUF model serving up to ``slots`` generations at once."""

    def __init__(self, path: Path, **kw) -> None:
        super().__init__(path, **kw)
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: dict[int, _Seq] = {}
        self._free = list(range(self.slots - 1, -1, -1))
        # Per slot, the prompt whose chunks are in its KV cells (kept after the answer): a new
        # prompt sharing a prefix with it skips those chunks (a shared system prompt, or a
        # failover resume's prompt on the peer that served it before).
        self._cached: dict[int, list[int]] = {}
        self.reused_tokens = 0  # prompt positions taken from the cache (metrics, tests)
        self.admission = Admission()  # who gets a free slot first (engine/admission.py)
        self.tuner = ThreadTuner(self.n_threads)  # decode threads by measured speed (engine/threads.py)
        self._threads_set: tuple[int, int] = (self.n_threads, self._n_threads_batch)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llama-decode", daemon=True)
        self._thread.start()

    # --- requests ------------------------------------------------------------------------

    def make_job(self, prompt_ids: list[int], params, emit: Callable, forced: Sequence[int] = ()) -> Job:
        """Check a request against the vocabulary and the context window and build its job (no
        compute). Anything llama.cpp would fail on is refused here, before it takes a slot:
        one bad request must never fail the others sharing its decode steps."""
        if not prompt_ids:
            raise EngineError("the prompt is empty after tokenizing; send some text")
        bad = next((t for t in (*prompt_ids, *forced) if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise EngineError(f"token id {bad} is outside this model's vocabulary (0..{self.n_vocab - 1})")
        room = self.n_ctx - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"prompt is {len(prompt_ids)} tokens but this peer's context is {self.n_ctx}; "
                "shorten the prompt or ask a peer with a longer context"
            )
        max_new = min(params.max_tokens, room)
        self.check_grammar(getattr(params, "grammar", ""))
        if len(forced) >= max_new:
            raise EngineError(f"{len(forced)} tokens were already received of at most {max_new}: nothing to add")
        return Job(prompt_ids=list(prompt_ids), params=params, emit=emit, max_new=max_new, forced=list(forced))

    def queue_position(self, job: Job) -> int:
        """1 for the next job to get a slot, 2 for the one after...; 0 once it runs."""
        if job.admitted:
            return 0
        with self._cond:
            for i, j in enumerate(self._pending):
                if j is job:
                    return i + 1
        return 0

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise EngineError("engine is shutting down")
            self._pending.append(job)
            self._cond.notify()

    def load(self) -> Load:
        return Load(active=len(self._active), queued=len(self._pending), slots=self.slots)

    def kv_usage(self) -> float:
        """Share of the KV cache the answers in progress hold (0 to 1)."""
        return sum(seq.pos for seq in list(self._active.values())) / max(1, self.slots * self.n_ctx)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for seq in list(self._active.values()):
            seq.job.emit(Failed("peer is shutting down"))
        while self._pending:
            self._pending.popleft().emit(Failed("peer is shutting down"))

    # --- the decode thread ----------------------------------------------------------------

    def _admit(self) -> None:
        while self._pending and self._free:
            i = self.admission.pick([j.credit for j in self._pending])
            job = self._pending[i]
            del self._pending[i]
            if job.cancelled:
                job.emit(Finished("cancelled", len(job.prompt_ids), 0, 0.0, 0.0))
                continue
            # The free slot whose cache gives the longest prefix; else the lowest (see _release).
            reuse, seq_id = max((reusable_prefix(self._cached.get(s, []), job.prompt_ids), -s) for s in self._free)
            seq_id = -seq_id
            self._free.remove(seq_id)
            self._ctx.kv_cache_seq_rm(seq_id, reuse, -1)
            self.reused_tokens += reuse
            job.admitted = True
            self._active[seq_id] = _Seq(
                job=job, seq_id=seq_id, sampler=self._sampler(job.params), feed=list(job.prompt_ids[reuse:]),
                stops=tuple(job.params.stop), t_submit=time.perf_counter(), forced=list(job.forced), pos=reuse,
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._pending and not self._active:
                    self._cond.wait()
                if self._closing:
                    return
                self._admit()
            for seq in [s for s in self._active.values() if s.job.cancelled]:
                self._finish(seq, "cancelled")
            if self._active:
                self._step()

    def _step(self) -> None:
        """One decode of every running sequence's next token, then the waiting prompts, one
        sequence per decode.

        Feeding each prompt alone lets the first arrivals stream while later prompts are still
        prefilling; on a CPU a prompt costs about as much per token as decoding, so mixing
        them made every arrival wait for all of them. Measured, 8 requests at once on the demo
        model: first tokens at 90 to 600 ms instead of all at ~660 ms, the same throughput.
        """
        running = [s for s in self._active.values() if s.pos >= len(s.job.prompt_ids)]
        if running:
            n = self.tuner.choose(len(running))
            self._use_threads(n, n)  # a step of several rows runs on the batch threads: both
            t = time.perf_counter()
            self._decode_safely(running, 1)
            self.tuner.record(n, time.perf_counter() - t, len(running))
        if any(s.pos < len(s.job.prompt_ids) for s in self._active.values()):
            n = self.tuner.best_for(1)  # all cores, unless decoding found other work on them
            self._use_threads(min(n, self.n_threads), n if n < self.n_threads else self._n_threads_batch)
        # A prompt's chunks end on wire.chunk_end's borders, never on what else waits or what
        # was cached: a resumed or cached prompt is computed as the first was.
        budget = N_BATCH
        for seq in sorted(self._active.values(), key=lambda s: s.seq_id):
            while seq.pos < len(seq.job.prompt_ids) and budget > 0 and seq.seq_id in self._active:
                fed = self._decode_safely([seq], chunk_end(seq.pos, len(seq.job.prompt_ids)) - seq.pos)
                if fed == 0:
                    break
                budget -= fed

    def _use_threads(self, n: int, n_batch: int) -> None:
        if self._threads_set != (n, n_batch):
            self._ll.llama_set_n_threads(self._ctx.ctx, n, n_batch)
            self._threads_set = (n, n_batch)

    def _decode_safely(self, seqs: list[_Seq], limit: int) -> int:
        """``_decode``, and when llama.cpp fails, fail only the sequence that caused it: the
        others are put back as they were and decoded again without it."""
        saved = [(s, s.pos, list(s.feed)) for s in seqs]
        try:
            return self._decode(seqs, limit)
        except Exception as exc:  # noqa: BLE001 (llama.cpp errors come as any type; the batch is rolled back and reported)
            for s, pos, feed in saved:
                s.pos, s.feed = pos, feed
                self._ctx.kv_cache_seq_rm(s.seq_id, pos, -1)
            if len(seqs) == 1:
                self._release(seqs[0], keep=False)
                seqs[0].job.emit(Failed(f"decode failed: {exc}"))
                return 0
            return sum(self._decode_safely([s], limit) for s in seqs)

    def _decode(self, seqs: list[_Seq], limit: int) -> int:
        """Feed up to ``limit`` tokens of each of ``seqs`` in slot order (see _release) and
        sample those whose feed ran out; returns the tokens fed."""
        b = self._batch.batch
        n = 0
        rows: list[tuple[int, _Seq]] = []
        for seq in sorted(seqs, key=lambda s: s.seq_id):
            take = seq.feed[: min(limit, N_BATCH - n)]
            for j, tok in enumerate(take):
                b.token[n] = tok
                b.pos[n] = seq.pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq.seq_id
                b.logits[n] = False
                n += 1
            seq.pos += len(take)
            del seq.feed[: len(take)]
            if not seq.feed:
                b.logits[n - 1] = True
                rows.append((n - 1, seq))
        b.n_tokens = n
        if n == 0:
            return 0
        self._ctx.decode(self._batch)
        sample = self._ll.llama_sampler_sample
        for idx, seq in rows:
            tok = sample(seq.sampler.sampler, self._ctx.ctx, idx)  # drawn even when forced: same RNG state
            self._accept(seq, seq.forced.pop(0) if seq.forced else tok)
        return n

    def _accept(self, seq: _Seq, tok: int) -> None:
        if seq.generated == 0:
            seq.t_first = time.perf_counter()
        seq.generated += 1
        if self._is_eog(tok):
            self._flush(seq)
            self._finish(seq, "stop")
            return
        seq.held_ids.append(tok)
        seq.n_out += 1
        seq.held_text += seq.utf8.decode(self._piece(tok))
        hit, hold = match_stops(seq.held_text, seq.stops)
        if hit >= 0:
            seq.held_text = seq.held_text[:hit]
            self._flush(seq)
            self._finish(seq, "stop")
            return
        if not hold:
            self._flush(seq)
        if seq.generated >= seq.job.max_new:
            self._flush(seq)
            self._finish(seq, "length")
            return
        seq.feed.append(tok)

    def _flush(self, seq: _Seq) -> None:
        if not seq.held_ids:
            return
        ids, text = seq.held_ids, seq.held_text
        seq.held_ids, seq.held_text = [], ""
        # Tokens replayed from a failover were sent by the first peer already: not again. The
        # first peer flushed exactly where the requester's copy ends, and so do we.
        skip = len(seq.job.forced) - (seq.n_out - len(ids))
        if skip > 0:
            if skip >= len(ids):
                return
            ids = ids[skip:]
            text = self.detokenize(ids)
        seq.job.emit(Tokens(ids, text))

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._release(seq)
        now = time.perf_counter()
        first = seq.t_first or now
        seq.job.emit(Finished(
            reason=reason,
            prompt_tokens=len(seq.job.prompt_ids),
            completion_tokens=seq.generated,
            ttft_ms=(first - seq.t_submit) * 1000 if seq.generated else 0.0,
            decode_ms=(now - first) * 1000,
            queue_ms=max(0.0, seq.t_submit - seq.job.created) * 1000,
        ))

    def _release(self, seq: _Seq, keep: bool = True) -> None:
        """Free the slot. Its KV cells stay (``keep``) for a later prompt with the same prefix:
        only the prompt's chunks computed in full count (``_cached``), and the next admission
        cuts the cells after what it reuses."""
        self._active.pop(seq.seq_id, None)
        if keep:
            self._cached[seq.seq_id] = list(seq.job.prompt_ids[:seq.pos])
        else:
            self._cached.pop(seq.seq_id, None)
            self._ctx.kv_cache_seq_rm(seq.seq_id, -1, -1)
        seq.sampler.close()
        with self._cond:
            # Lowest free slot first, and batches in slot order. Measured with one KV stream
            # per slot: when slots were reused in release order, every other wave of 8 streams
            # decoded at ~60% speed (likely split into smaller micro-batches); in order, steady.
            self._free.append(seq.seq_id)
            self._free.sort(reverse=True)
