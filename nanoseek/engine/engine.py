"""The generation engine: continuous batching over one LatentCache.

A pool of `max_batch_size` slots (cache rows). A waiting sequence takes a free slot, is prefilled there
in expanded mode (in chunks of `prefill_chunk` tokens), and samples its first token from the prefill's
last logits; after that every live row decodes together in absorbed mode, one token per `step()`. A
finished sequence frees its slot at once, so the next waiting one joins the running batch.

Slot reuse doubles as prefix caching: a free slot keeps the tokens whose latents it holds, and a newcomer
takes the free slot sharing its longest prefix and prefills only the rest (a chat turn resubmitting the
conversation prefills only the new turn). The n samples of one prompt admitted together are prefilled once
and the cache row copied. Rows are independent: an idle row inside the batch is fed a dummy token at the
first position past its kept prefix, so it never touches a live row nor its own kept prefix.

Stops: `stop_token_ids` and the EOS ids end a sample with finish_reason "stop"; the stop token is KEPT in
token_ids but not in text. A stop string ends it when the decoded completion contains it; token_ids keep
every generated token, text is cut before the stop string (after it with include_stop_str_in_output). Before
min_tokens tokens, the end tokens cannot be sampled and stop strings do not count. max_tokens (or a full cache)
gives "length". Text is decoded with the request's skip_special_tokens.

Routing (return_routing): entry i holds the experts chosen at the position whose logits produced token i
(the last prompt token for i = 0), i.e. what a full forward over prompt + tokens[:-1] routes there;
`prompt_routing` holds the prefill's experts at every prompt position (so routing[0] == prompt_routing[-1]).
Together they cover every position the sampler routed, which V3.2's keep routing replays in training. A request
asking for routing prefills its whole prompt (no prefix reuse: a reused prefix's routing is not kept).

Threading: `add_request` may be called from any thread; one driver calls `step` (or runs `run_forever` in a
thread); `generate`/`stream` drive the batch themselves, so do not mix them with a running `run_forever`.
Host syncs: one per decode step (the sampled tokens), plus the cache's kv_len and the MoE's counts.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from ..model import DeepSeekModel
from .sampling import SampleStream, SamplingParams, derive_seed, make_generator, penalize, sample


FAST_DECODE_MAX_BYTES = 2 << 30  # auto fast decode only for models whose weights fit twice in memory comfortably


@dataclass
class Completion:
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None
    sampling_masks: torch.Tensor | None = None  # (len, V) bool on CPU: the support each token was drawn from
    routing: torch.Tensor | None = None  # (len, num_moe_layers, K) long on CPU (see the module docstring)
    prompt_routing: torch.Tensor | None = None  # (prompt_len, num_moe_layers, K) long on CPU, with return_routing
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the top-N (id, log-prob), best first


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    outputs: list[Completion]


@dataclass(frozen=True)
class StreamEvent:
    request_index: int  # index in the prompts list (stream/generate) or the handle's request_id (step)
    sample_index: int
    token_id: int
    text_delta: str  # "" without a tokenizer; held back while it may be a partial character or stop string
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # when params.top_logprobs: the top-N (id, log-prob)


class RequestHandle:
    """What `add_request` returns: `events` (a queue.Queue of StreamEvent when stream=True), `result()`."""

    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, stream: bool,
                 callback: Callable[[StreamEvent], None] | None):
        import queue

        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.events: queue.Queue | None = queue.Queue() if stream else None
        self.callback = callback
        # whether anyone reads the events' text deltas; without them (and without stop strings) the text is
        # decoded once, when a sample ends, instead of incrementally at every step
        self.text_deltas = True
        self.end_ids: set[int] = set()  # the tokens that end a sample (Engine._end_ids), set by add_request
        self.completions: list[Completion | None] = [None] * params.n
        self._done = threading.Event()
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to drop this request; its unfinished samples end with finish_reason "abort"."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        return RequestOutput(self.request_id, self.prompt_ids, list(self.completions))


@dataclass
class _Seq:
    handle: RequestHandle
    index: int  # sample index within the request
    generator: SampleStream | None
    tokens: list[int] = field(default_factory=list)  # generated so far
    logprobs: list[float] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    routing: list[torch.Tensor] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_routing: torch.Tensor | None = None  # (P, num_moe, K) on CPU, from the prefill
    slot: int | None = None
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    # incremental detokenisation: tokens[:dec_done] decode to dec_text and end on a whole character;
    # tokens[dec_ctx:dec_done] are decoded again with each new token as context (see Engine._decode_text)
    dec_text: str = ""
    dec_done: int = 0
    dec_ctx: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.handle.params


class Engine:
    def __init__(self, model: DeepSeekModel, tokenizer=None, max_batch_size: int = 16, max_len: int | None = None,
                 device=None, dtype: torch.dtype | None = None, prefill_chunk: int | None = 512,
                 eos_token_ids: int | Sequence[int] | None = None, fast_decode: bool | None = None,
                 compile: bool = False):
        """The model is used in place: moved to device/dtype when given and put in eval mode (a trainer sharing
        it calls model.train() again). eos_token_ids: ids ending a sample unless params.ignore_eos; None = the
        tokenizer's eos (eos_token_id or eos_id), else the model config's eos_token_id; [] = none. max_len:
        cache positions per slot, prompt + generated (default min(max_position_embeddings, 4096)).
        fast_decode: decode with `FastDecoder` (same maths, a third of the operator calls, one packed copy of the
        weights); None = on CPU when the model supports it and its weights take at most FAST_DECODE_MAX_BYTES
        (the copy doubles them), True = required (ValueError if unsupported). compile: run the fast decode step
        through `torch.compile` (`FastDecoder.compiled_run`: the first steps compile, 10-30 s on a CPU, then a
        step takes about half the time); implies fast_decode=True."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        cfg = model.config
        max_len = max_len if max_len is not None else min(cfg.max_position_embeddings, 4096)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype if dtype is not None else p.dtype
        # moved / cast only when asked and needed: a no-op .to() still walks every module (ms a GRPO rollout), and
        # without `dtype` a mixed model keeps its dtypes (bf16 training keeps the router weights fp32)
        tensors = list(itertools.chain(model.parameters(), model.buffers()))
        if any(t.device != self.device for t in tensors):
            model.to(device=self.device)
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in model.parameters()):
            model.to(dtype=dtype)
        self.model = model.eval()
        self.tokenizer, self.max_batch_size, self.max_len = tokenizer, max_batch_size, max_len
        self.prefill_chunk = prefill_chunk
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            if eos is None and tokenizer is not None:
                eos = getattr(tokenizer, "eos_id", None)
            eos_token_ids = eos if eos is not None else cfg.eos_token_id
        self.eos_token_ids = set([eos_token_ids] if isinstance(eos_token_ids, int) else (eos_token_ids or []))
        self.compile = compile
        small = sum(p.numel() * p.element_size() for p in self.model.parameters()) <= FAST_DECODE_MAX_BYTES
        from .fast_decode import select

        self.fast = select(self.model, fast_decode, compile, auto=self.device.type == "cpu" and small)
        self._waiting: deque[_Seq] = deque()
        self._inbox: deque[_Seq] = deque()
        self._inbox_lock = threading.Condition()
        self._step_lock = threading.Lock()
        self._next_id = 0
        self._new_cache()

    def _new_cache(self) -> None:
        cfg = self.model.config
        self.cache = self.model.new_cache(self.max_batch_size, self.max_len, self.dtype, self.device,
                                          num_layers=cfg.num_hidden_layers)
        self.slots: list[_Seq | None] = [None] * self.max_batch_size
        self.kept: list[list[int]] = [[] for _ in range(self.max_batch_size)]  # tokens whose latents each row holds
        self.num_forwards = 0  # model forwards run (prefill chunks + decode steps)
        self.num_prefill_tokens = 0  # prompt tokens actually prefilled (prefix reuse and row copies skip some)

    def reset(self, max_batch_size: int | None = None, max_len: int | None = None) -> None:
        """Start over as a new Engine on the same model would: a fresh cache (of a new size when given), no cached
        prefixes, zero counters, the model in eval mode; without the set-up's walks over every module (~0.5 ms at
        1M parameters). GRPO reuses one engine this way from rollout to rollout: the weights changed in between,
        so no prefix cached before may be reused."""
        with self._step_lock:
            if self.has_unfinished():
                raise RuntimeError("Engine.reset with requests in flight: finish or cancel them first")
            if max_batch_size is not None and max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
            if max_len is not None and max_len < 2:
                raise ValueError(f"max_len must be >= 2, got {max_len}")
            self.max_batch_size = max_batch_size or self.max_batch_size
            self.max_len = max_len or self.max_len
            if self.model.training:  # a trainer's model.train() between rollouts
                self.model.eval()
            self._new_cache()

    def release_cache(self) -> None:
        """Free the cache (and forget what it held) until `reset` makes a new one: a trainer's update then runs
        without the rollout's latents in memory."""
        with self._step_lock:
            if self.has_unfinished():
                raise RuntimeError("Engine.release_cache with requests in flight: finish or cancel them first")
            self.cache, self.slots, self.kept = None, [], []

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the engine has no tokenizer; pass token ids")
            prompt = list(self.tokenizer.encode(prompt))
        ids = [int(t) for t in prompt]
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError("prompt must hold at least one token, got an empty prompt")
        if not all(0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must be in [0, vocab_size={V}), got {ids}")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt length {len(ids)} leaves no room in max_len={self.max_len}")
        return ids

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, stream: bool = True,
                    callback: Callable[[StreamEvent], None] | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Its events go to handle.events (stream=True) and to `callback`.
        With params.seed, sample i draws from a generator seeded with derive_seed(seed, i, *prompt_ids): the n
        samples differ, different prompts never share a stream, and the same prompt with the same seed samples
        the same tokens alone or in any batch (the same prompt twice with one seed is the same request: ask n > 1,
        or give each copy its own seed, for different samples)."""
        params = params if params is not None else SamplingParams()
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError(f"SamplingParams.stop needs a tokenizer, got stop={params.stop!r} and no tokenizer")
        ids = self._encode(prompt)
        with self._inbox_lock:
            handle = RequestHandle(self._next_id, ids, params, stream, callback)
            handle.end_ids = self._end_ids(params)  # read at every sampled token: built once
            self._next_id += 1
            for i in range(params.n):
                gen = None if params.greedy else make_generator(
                    None if params.seed is None else derive_seed(params.seed, i, *ids), self.device)
                self._inbox.append(_Seq(handle, i, gen))
            self._inbox_lock.notify_all()
        return handle

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self._waiting or any(s is not None for s in self.slots))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[StreamEvent]:
        """Advance every running request by one token (absorbed decode), then admit waiting ones into the free
        slots (prefill + first token). Returns the events (request_index = the handle's request_id)."""
        with self._step_lock:
            with self._inbox_lock:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            events: list[StreamEvent] = []
            for s, seq in enumerate(self.slots):
                if seq is not None and seq.handle.cancelled:
                    events.append(self._finish(seq, "abort"))
            for seq in [q for q in self._waiting if q.handle.cancelled]:
                self._waiting.remove(seq)
                events.append(self._finish(seq, "abort"))
            running = [q for q in self.slots if q is not None]
            try:
                if running:  # decode first: slots it frees are refilled by this step's admissions
                    events += self._decode(running)
                events += self._admit()
            except BaseException:
                self._recover()
                raise
            return events

    def _recover(self) -> None:
        """After a step raised: leave the engine so that the next step redoes what this one did not finish (the
        caller may first cancel the request that made it fail). A running row keeps only the positions it had
        claimed (prompt + tokens[:-1]: a row that got no token this step gives back the step's position); a
        sequence that took a slot but got no token gives the slot back, its row forgotten (its prefill may have
        stopped half way), and goes back to the front of the queue."""
        stuck = []
        for s, q in enumerate(self.slots):
            if q is None:
                continue
            if q.tokens:
                del self.kept[s][len(q.handle.prompt_ids) + len(q.tokens) - 1:]
            else:
                stuck.append(q)
                self.slots[s], self.kept[s], q.slot = None, [], None
        self._waiting.extendleft(sorted(stuck, key=lambda q: (q.handle.request_id, q.index), reverse=True))

    def _slot_view(self, s: int):
        """A batch-1 cache aliasing row s of the shared cache (writes land in the shared tensors)."""
        return self.cache.row_view(s)

    def _copy_rows(self, copies: list[tuple[int, int, int]]) -> None:
        """(src, dst, n): row dst takes row src's first n positions (a prompt's other samples), in one copy."""
        if not copies:
            return
        src, dst, n = zip(*copies)
        self.cache.copy_rows(list(src), list(dst), max(n))  # past a row's n: positions no query reads
        for s, d, k in copies:
            self.kept[d] = list(self.kept[s][:k])

    def _pick_slot(self, ids: list[int]) -> tuple[int, int]:
        """The free slot sharing the longest prefix with ids (keeping >= 1 token to prefill); lowest on ties."""
        best, best_n = -1, -1
        for s, seq in enumerate(self.slots):
            if seq is not None:
                continue
            kept, n = self.kept[s], 0
            limit = min(len(kept), len(ids) - 1)
            while n < limit and kept[n] == ids[n]:
                n += 1
            if n > best_n:
                best, best_n = s, n
        return best, best_n

    def _admit(self) -> list[StreamEvent]:
        """Move waiting sequences into free slots: one prefill per prompt (its other samples waiting right behind
        copy the row), every prompt of this admission in one batched forward when none reuses a cached prefix
        or needs chunking (a rollout's 8 prompts: 1 forward instead of 8), then each group's first token."""
        groups = self._claim_slots()
        if not groups:
            return []
        whole = all(reuse == 0 and len(g[0].handle.prompt_ids) <= (self.prefill_chunk or math.inf)
                    for g, reuse in groups)
        if whole and len(groups) > 1:
            results = self._prefill_batch([g[0] for g, _ in groups])
        else:
            results = [self._prefill(g[0].slot, g[0].handle.prompt_ids, reuse, g[0].params.return_routing)
                       for g, reuse in groups]
        self._copy_rows([(g[0].slot, sib.slot, len(g[0].handle.prompt_ids)) for g, _ in groups for sib in g[1:]])
        seqs, logits, routing = [], [], []
        for (group, _), (lg, rt, prompt_routing) in zip(groups, results):
            for q in group:
                q.prompt_routing = prompt_routing
            seqs += group
            logits.append(lg.expand(len(group), -1))
            routing.append(rt.expand(len(group), -1, -1) if rt is not None else None)
        # every group's first token in one draw (each row keeps its own stream: the tokens are those of one
        # draw per group), so a rollout's admission costs one sampling call, not one per prompt
        both = all(r is not None for r in routing)
        return self._sample_and_append(seqs, torch.cat(logits), torch.cat(routing) if both else None)

    def _claim_slots(self) -> list[tuple[list[_Seq], int]]:
        """Waiting sequences into free slots, grouped by request (a prompt's samples waiting one behind the other
        share a group), each group with the prompt tokens its first slot already holds (0 with routing: the
        routing of a reused prefix is not kept, so the whole prompt is prefilled)."""
        groups = []
        while self._waiting and any(q is None for q in self.slots):
            seq = self._waiting.popleft()
            s, reuse = self._pick_slot(seq.handle.prompt_ids)
            seq.slot, self.slots[s] = s, seq
            group = [seq]
            while self._waiting and self._waiting[0].handle is seq.handle and any(q is None for q in self.slots):
                sib = self._waiting.popleft()
                d = next(i for i, q in enumerate(self.slots) if q is None)
                sib.slot, self.slots[d] = d, sib
                group.append(sib)
            groups.append((group, 0 if seq.params.return_routing else reuse))
        return groups

    def _prefill_batch(self, seqs: list[_Seq]) -> list[tuple]:
        """Prefill whole prompts of several slots in one forward (rows right-padded: a padded position's latents
        land past the row's prompt, where no query looks until decoding overwrites them). Returns _prefill's
        (logits (1, V), routing, prompt routing) for each."""
        P = [len(q.handle.prompt_ids) for q in seqs]
        x = torch.zeros(len(seqs), max(P), dtype=torch.long)
        for i, q in enumerate(seqs):
            x[i, :P[i]] = torch.tensor(q.handle.prompt_ids)
        x = x.to(self.device)
        pos = torch.arange(max(P), device=self.device).expand_as(x)
        cache = self.cache.rows_view([q.slot for q in seqs])
        last = torch.tensor(P, device=self.device) - 1
        rows = torch.arange(len(seqs), device=self.device)
        if self.fast is not None and not self.fast.int8:
            # the fast step takes T tokens a row too, in a third of the generic forward's operators. An int8 model
            # keeps the generic prefill: the step's int8 kernel rounds activations to bf16 around the absorbed
            # attention, and its greedy samples would differ from the generic forward's
            all_logits, _, expert_ids = self.fast.forward(x, pos, cache, kv_len=max(P), compiled=False)
            logits = all_logits[rows, last]
        else:
            out = self.model(x, positions=pos, cache=cache, absorb=False, logits_to_keep=1)
            logits = self.model.lm_head(out.hidden[rows, last])  # each row's last prompt position
            expert_ids = [r.expert_ids for r in out.router]
        self.num_forwards += 1
        self.num_prefill_tokens += sum(P)
        experts = torch.stack(expert_ids, dim=2) if expert_ids else None  # (B, T, moe, K)
        last_experts = experts[rows, last] if experts is not None else None  # (B, moe, K)
        results = []
        for i, q in enumerate(seqs):
            self.kept[q.slot] = list(q.handle.prompt_ids)
            routing = last_experts[i:i + 1] if experts is not None else None  # (1, moe, K)
            prompt = experts[i, :P[i]].cpu() if experts is not None and q.params.return_routing else None
            results.append((logits[i:i + 1], routing, prompt))
        return results

    def _prefill(self, s: int, ids: list[int], reuse: int, want_routing: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Fill row s with ids[reuse:] at positions reuse.. (expanded mode, chunked). Returns the last position's
        logits (1, V) and routing (1, num_moe, K), and with want_routing the routing of positions reuse..P-1,
        (P - reuse, num_moe, K) on CPU (None for a dense model)."""
        view = self._slot_view(s)
        x = torch.tensor(ids, device=self.device).unsqueeze(0)  # (1, P)
        P = len(ids)
        chunk = self.prefill_chunk or P
        out, chunks = None, []
        for a in range(reuse, P, chunk):
            b = min(P, a + chunk)
            pos = torch.arange(a, b, device=self.device).unsqueeze(0)
            out = self.model(x[:, a:b], positions=pos, cache=view, absorb=False, logits_to_keep=1)
            self.num_forwards += 1
            self.num_prefill_tokens += b - a
            if want_routing and out.router:
                chunks.append(torch.stack([r.expert_ids[0] for r in out.router], dim=1).cpu())  # (b - a, moe, K)
        self.kept[s] = list(ids)
        routing = torch.stack([r.expert_ids[:, -1] for r in out.router], dim=1) if out.router else None
        return out.logits[:, -1], routing, torch.cat(chunks) if chunks else None

    def _decode(self, running: list[_Seq]) -> list[StreamEvent]:
        """One absorbed-mode token for every running row. Rows 0..max slot form the batch while no row below the
        highest running one is idle; otherwise (finished samples leave holes) the batch is the running rows
        alone, through a rows_view of the cache: a step's cost grows with its rows, and late in a rollout a few
        long samples would otherwise pay for every finished one. The compiled step keeps rows 0..max slot."""
        nb = max(q.slot for q in running) + 1
        if len(running) < nb and not self.compile:
            ids = [q.tokens[-1] for q in running]
            pos = [len(self.kept[q.slot]) for q in running]
            cache, rows = self.cache.rows_view([q.slot for q in running]), None
        else:
            top = max(len(self.kept[q.slot]) for q in running)  # the furthest live position this step
            ids, pos = [0] * nb, [0] * nb
            for s in range(nb):
                kept = self.kept[s]
                if self.slots[s] is None:  # idle row: write just past its kept prefix (shortened so keys stay <= top)
                    del kept[top:]
                else:
                    ids[s] = self.slots[s].tokens[-1]
                pos[s] = len(kept)
            cache, rows = self.cache, torch.tensor([q.slot for q in running], device=self.device)
        x = torch.tensor(ids, device=self.device).unsqueeze(1)  # (n, 1)
        if self.fast is not None:
            logits, expert_ids = self.fast(x, pos, cache, compiled=self.compile)
        else:
            out = self.model(x, positions=torch.tensor(pos, device=self.device).unsqueeze(1), cache=cache,
                             absorb=True)
            logits, expert_ids = out.logits[:, -1], [r.expert_ids[:, -1] for r in out.router]
        self.num_forwards += 1
        for q in running:  # only now do these rows hold the token's latents (an interrupt above claims nothing)
            self.kept[q.slot].append(q.tokens[-1])
        routing = None
        if expert_ids and any(q.params.return_routing for q in running):
            routing = torch.stack(expert_ids, dim=1)  # (n, num_moe, K)
            routing = routing if rows is None else routing[rows]
        return self._sample_and_append(running, logits if rows is None else logits[rows], routing)

    def _sample_and_append(self, seqs: list[_Seq], logits: torch.Tensor, routing: torch.Tensor | None
                           ) -> list[StreamEvent]:
        want_mask = any(q.params.return_sampling_mask for q in seqs)
        top_n = max(q.params.top_logprobs for q in seqs)
        params = [q.params for q in seqs]
        if any(p.repetition_penalty != 1 or len(q.tokens) < p.min_tokens for p, q in zip(params, seqs)):
            logits = penalize(logits, params, [q.handle.prompt_ids + q.tokens if p.repetition_penalty != 1 else []
                                               for p, q in zip(params, seqs)],
                              [len(q.tokens) for q in seqs], [q.handle.end_ids for q in seqs])
        res = sample(logits, [q.params for q in seqs], [q.generator for q in seqs], return_support=want_mask,
                     top_n=top_n)
        tokens, lps = res.tokens.tolist(), res.logprobs.tolist()  # the step's host sync
        tops = list(zip(res.top_ids.tolist(), res.top_logprobs.tolist())) if top_n else None
        support = res.support.cpu() if want_mask else None
        routing = routing.cpu().unbind(0) if routing is not None and any(q.params.return_routing for q in seqs) \
            else None  # one view per row, made in one call
        events = []
        for i, seq in enumerate(seqs):
            seq.tokens.append(tokens[i])
            seq.logprobs.append(lps[i])
            if seq.params.return_sampling_mask:
                seq.masks.append(support[i])
            if seq.params.return_routing and routing is not None:
                seq.routing.append(routing[i])
            if seq.params.top_logprobs:
                ids, vals = tops[i]
                seq.tops.append(list(zip(ids, vals))[: seq.params.top_logprobs])
            events.append(self._check_stop(seq, lps[i]))
        return events

    # ------------------------------------------------------------------ stops, text, finishing
    def _end_ids(self, p: SamplingParams) -> set[int]:
        """The tokens that end a sample with these params: stop_token_ids and (unless ignore_eos) the EOS ids."""
        return set(p.stop_token_ids or []) | (set() if p.ignore_eos else self.eos_token_ids)

    def _check_stop(self, seq: _Seq, logprob: float) -> StreamEvent:
        p, tok = seq.params, seq.tokens[-1]
        reason = None
        if tok in seq.handle.end_ids:
            reason = "stop"
        elif len(seq.tokens) >= p.max_tokens or len(self.kept[seq.slot]) >= self.max_len:
            reason = "length"  # the next token would need a position beyond the cache
        delta = ""
        if self.tokenizer is not None and (reason or p.stop or seq.handle.text_deltas):
            n = len(seq.tokens) - 1 if reason == "stop" else len(seq.tokens)
            # finished: one full decode (the final text is exactly decode(tokens)); running: incremental
            text = (self.tokenizer.decode(seq.tokens[:n], skip_special_tokens=True) if p.skip_special_tokens
                    else self.tokenizer.decode(seq.tokens[:n])) if reason else self._decode_text(seq, n)
            hits = [(text.find(s), s) for s in (p.stop or []) if s in text] if len(seq.tokens) >= p.min_tokens else []
            if hits:
                at, s = min(hits, key=lambda h: h[0])
                text, reason = text[: at + len(s) if p.include_stop_str_in_output else at], "stop"
            seq.text = text
            safe = len(text) if reason else _stream_safe(text, p.stop or [])
            if safe > seq.emitted:
                delta, seq.emitted = text[seq.emitted:safe], safe
        top = tuple(seq.tops[-1]) if p.top_logprobs else None
        if reason:
            return self._finish(seq, reason, tok, delta, logprob, top)
        return self._emit(seq, StreamEvent(seq.handle.request_id, seq.index, tok, delta, False, None, logprob, top))

    def _decode_text(self, seq: _Seq, n: int) -> str:
        """decode(seq.tokens[:n]) without decoding the whole sequence at every step: only the tokens since the
        last point where the text ended on a whole character are decoded, after the tokens before that point
        as context (merges and leading-space rules then match the full decode)."""
        toks, ctx, done = seq.tokens, seq.dec_ctx, seq.dec_done
        skip = seq.handle is not None and seq.params.skip_special_tokens

        def decode(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True) if skip else self.tokenizer.decode(ids)

        head = decode(toks[ctx:done])
        tail = decode(toks[ctx:n])
        if not tail.startswith(head):  # a decoder whose output is not prefix-stable: decode everything
            return decode(toks[:n])
        text = seq.dec_text + tail[len(head):]
        if not tail.endswith("\ufffd"):  # ends on a whole character: a new stable point
            seq.dec_text, seq.dec_ctx, seq.dec_done = text, done, n
        return text

    def _finish(self, seq: _Seq, reason: str, tok: int = -1, delta: str = "", logprob: float | None = None,
                top: tuple | None = None) -> StreamEvent:
        if seq.slot is not None:
            self.slots[seq.slot] = None
        p, V = seq.params, self.model.config.vocab_size
        masks = torch.stack(seq.masks) if seq.masks else torch.zeros(0, V, dtype=torch.bool)
        seq.handle.completions[seq.index] = Completion(
            list(seq.tokens), seq.text if self.tokenizer is not None else None, reason,
            logprobs=list(seq.logprobs) if p.logprobs else None,
            sampling_masks=masks if p.return_sampling_mask else None,
            routing=(torch.stack(seq.routing) if seq.routing else None) if p.return_routing else None,
            prompt_routing=seq.prompt_routing if p.return_routing else None,
            top_logprobs=list(seq.tops) if p.top_logprobs else None)
        if all(c is not None for c in seq.handle.completions):
            seq.handle._done.set()  # before the final event, so a consumer reacting to it can take result()
        return self._emit(seq, StreamEvent(seq.handle.request_id, seq.index, tok, delta, True, reason, logprob, top))

    def _emit(self, seq: _Seq, ev: StreamEvent) -> StreamEvent:
        h = seq.handle
        if h.events is not None:
            h.events.put(ev)
        if h.callback is not None:
            h.callback(ev)
        return ev

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0
                        ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-prob of every prompt token given the ones before it under the model's raw distribution (None
        for the first), and its top_n alternatives: what `echo` with `logprobs` returns (lm-eval's
        loglikelihood). One full forward, no cache: safe to call while another thread drives step()."""
        ids = list(ids)
        if not ids:
            return [], []
        x = torch.tensor([ids], device=self.device)
        logp = self.model(x, mtp=False).logits[0, :-1].float().log_softmax(dim=-1)  # row i predicts token i+1
        lps = [None] + logp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1).tolist()
        if not top_n:
            return lps, [None] * len(ids)
        vals, idx = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
        return lps, [None] + [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]

    # ------------------------------------------------------------------ front ends
    def _submit(self, prompts, params, text_deltas: bool = True) -> list[RequestHandle]:
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (strings or token-id lists), got a single prompt")
        if isinstance(params, SamplingParams) or params is None:
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or one per prompt ({len(prompts)}), got {len(params)}")
        handles = [self.add_request(pr, pa, stream=False) for pr, pa in zip(prompts, params)]
        for h in handles:
            h.text_deltas = text_deltas
        return handles

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
                 callback: Callable[[StreamEvent], None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in prompt order. callback gets every event
        (request_index = index in prompts). Without a callback the texts are decoded once, at the end."""
        events = _Stream(self, self._submit(prompts, params, text_deltas=callback is not None))
        for ev in events:
            if callback is not None:
                callback(ev)
        return events.outputs  # type: ignore[attr-defined]

    def generate_greedy(self, prompts: Sequence[str | Sequence[int]], max_tokens: int, speculative: str = "auto",
                        stop_token_ids: Sequence[int] | None = None):
        """Greedy completions, decoded with MTP speculative decoding or plainly in batches: speculative "on",
        "off", or "auto" (time both on this model and batch, take the faster; same tokens either way). Returns
        (SpeculativeChoice, [SpeculativeOutput per prompt]); see `speculative.greedy_generate`."""
        from .speculative import greedy_generate

        return greedy_generate(self, prompts, max_tokens, speculative, stop_token_ids)

    def stream(self, prompts, params=None) -> "_Stream":
        """Iterate StreamEvents (request_index = index in prompts) while the batch runs; `.outputs` afterwards."""
        return _Stream(self, self._submit(prompts, params))

    def run_forever(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Serve loop for a background thread: step while there is work, sleep on the inbox otherwise."""
        while not stop.is_set():
            if self.has_unfinished():
                self.step()
            else:
                with self._inbox_lock:
                    if not self._inbox:
                        self._inbox_lock.wait(idle_wait)


class _Stream:
    def __init__(self, engine: Engine, handles: list[RequestHandle]):
        self.engine, self.handles = engine, handles
        self.index = {h.request_id: i for i, h in enumerate(handles)}

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while not all(h.done for h in self.handles):
                for ev in self.engine.step():
                    i = self.index.get(ev.request_index)
                    if i is not None:
                        yield StreamEvent(i, ev.sample_index, ev.token_id, ev.text_delta, ev.finished,
                                          ev.finish_reason, ev.logprob)
        finally:  # a consumer that stops early (break, Ctrl-C) cancels what is left
            for h in self.handles:
                if not h.done:
                    h.cancel()

    @property
    def outputs(self) -> list[RequestOutput]:
        return [h.result(timeout=0) for h in self.handles]


def _stream_safe(text: str, stops: list[str]) -> int:
    """How much of an unfinished text may be streamed: hold back a trailing partial UTF-8 character and any
    suffix that could still grow into a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold
