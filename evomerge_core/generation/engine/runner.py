"""The generation engine: continuous batching over a fixed set of slots, on a transformers model.

One `generate` call:

1. order the prompts longest-expected-first (`scheduler.LengthHistory`);
2. fill free slots with the next prompts: one prefill pass for the admitted prompts (left-padded,
   logits of the last position only) writes their keys into their slots (`kv_cache.SlotKVCache`);
3. run `chunk` decode steps over all slots with no host sync: each step feeds every slot's last
   token at its own position, takes the argmax, and updates per-slot state on the device
   (position, token count, stop automata, done flags: `stops.StopDetector`); finished rows stay
   frozen (they re-write the same key and discard their output);
4. read the done flags once (the only sync per chunk), confirm flagged stop strings on the whole
   text, hand finished slots their next prompt (back to 2) until every prompt is done.

On CUDA the decode step of each attention width is captured once as a CUDA graph and replayed:
the graph reads the model's weights and the cache buffers by address, and merging a candidate in
place writes into those same addresses, so graphs stay valid from one candidate to the next.

Exactness: a row's computation is that of greedy decoding it alone (masking hides other slots
and padding; positions are the row's own), so outputs match `generate` token for token up to
float rounding of differently shaped matmuls. Each row's text is cut at its first stop string
exactly as the reference loop does.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from evomerge_core.generation.engine.kv_cache import SlotKVCache
from evomerge_core.generation.engine.masks import attention_kind, decode_mask, prefill_mask, window_layout
from evomerge_core.generation.engine.scheduler import LengthHistory
from evomerge_core.generation.engine.stops import StopDetector
from evomerge_core.generation.model_api import cache_argument

WIDTH_STEP = 128  # attention widths are rounded up to this (one CUDA graph per width)
PREFILL_TOKENS = 16_384  # at most this many (padded) prompt tokens per prefill pass


class GenerationEngine:
    """Preallocated slots, a length history and (on CUDA) decode graphs for one model.

    `use_graphs`: capture decode steps as CUDA graphs (default: on for CUDA, off elsewhere; the
    environment variable ``EVOMERGE_ENGINE_GRAPHS=0`` turns them off). `chunk`: decode steps
    between two reads of the done flags (default 16 on CUDA, 4 elsewhere).
    """

    def __init__(self, model, *, use_graphs: bool | None = None, chunk: int | None = None) -> None:
        self.device = next(model.parameters()).device
        self.impl = attention_kind(model.config)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layout, self.window = window_layout(cfg)
        self.cache_arg = cache_argument(model)
        cuda = self.device.type == "cuda"
        if use_graphs is None:
            use_graphs = cuda and os.environ.get("EVOMERGE_ENGINE_GRAPHS", "1") != "0"
        if use_graphs and not cuda:
            raise ValueError("CUDA graphs need a CUDA model; pass use_graphs=False on this device")
        self.use_graphs = use_graphs
        self.chunk = chunk or (16 if cuda else 4)
        self.history = LengthHistory()
        self.cache: SlotKVCache | None = None
        self._state: dict[str, torch.Tensor] = {}
        self._graphs: dict[int, Any] = {}
        self._graph_pool = None
        self.dtype = next(model.parameters()).dtype
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ buffers
    def _ensure_buffers(self, slots: int, max_len: int, gen_len: int, stops: int) -> None:
        """(Re)allocate the cache and slot state when a call needs more room than they have."""
        c = self.cache
        fits = (c is not None and c.slots == slots and c.max_len >= max_len
                and self._state["gen"].shape[1] >= gen_len and self._state["stop_state"].shape[1] == stops)
        if fits:
            return
        self._graphs.clear()
        self.cache = None
        self._state = {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        max_len = WIDTH_STEP * math.ceil(max_len / WIDTH_STEP)
        self.cache = SlotKVCache(slots, max_len, self.device)
        dev = self.device
        self._state = {
            "cur": torch.zeros(slots, dtype=torch.long, device=dev),  # next input token per slot
            "n_gen": torch.zeros(slots, dtype=torch.long, device=dev),
            "cap": torch.zeros(slots, dtype=torch.long, device=dev),
            "done": torch.ones(slots, dtype=torch.bool, device=dev),
            "flag_only": torch.zeros(slots, dtype=torch.bool, device=dev),  # ended by a stop flag alone
            "stop_state": torch.zeros((slots, stops), dtype=torch.int32, device=dev),
            "gen": torch.zeros((slots, max(1, gen_len)), dtype=torch.long, device=dev),
        }

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget every sequence (between candidates; graphs and buffers keep their addresses)."""
        if self.cache is not None:
            self.cache.reset()
        for name, t in self._state.items():
            t.fill_(True) if name == "done" else t.zero_()

    # ------------------------------------------------------------------ passes
    def _forward(self, model, ids: torch.Tensor, mask, positions: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1, :]

    def _prefill(self, model, detector: StopDetector, slots: list[int], rows: list[list[int]],
                 caps: list[int], pad_id: int) -> None:
        dev, st = self.device, self._state
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        ids = ids.to(dev)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=dev)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        positions = (torch.arange(width, device=dev)[None, :] - (width - lengths)[:, None]).clamp(min=0)
        mask = prefill_mask(lengths, width, layout=self.layout, window=self.window, impl=self.impl, dtype=self.dtype)
        self.cache.begin_prefill(slot_t, lengths, width)
        first = self._forward(model, ids, mask, positions).argmax(-1)
        cap_t = torch.tensor(caps, dtype=torch.long, device=dev)
        is_eos, flagged, state = detector.step(first, detector.initial_state(len(rows), dev))
        st["cur"][slot_t] = first
        st["gen"][slot_t, 0] = first
        st["n_gen"][slot_t] = 1
        st["cap"][slot_t] = cap_t
        st["stop_state"][slot_t] = state
        at_cap = cap_t <= 1
        st["done"][slot_t] = is_eos | flagged | at_cap
        st["flag_only"][slot_t] = flagged & ~is_eos & ~at_cap
        self.cache.positions[slot_t] = lengths

    def _decode_step(self, model, detector: StopDetector, width: int) -> None:
        """One token for every slot, state updated in place (capturable: no host reads)."""
        st, cache = self._state, self.cache
        pos = cache.positions
        cache.begin_decode(width)
        mask = decode_mask(pos, width, layout=self.layout, window=self.window, impl=self.impl, dtype=self.dtype)
        nxt = self._forward(model, st["cur"][:, None], mask, pos[:, None]).argmax(-1)
        active = ~st["done"]
        is_eos, flagged, state = detector.step(nxt, st["stop_state"])
        write_at = st["n_gen"].clamp(max=st["gen"].shape[1] - 1)
        old = st["gen"].gather(1, write_at[:, None])[:, 0]
        st["gen"].scatter_(1, write_at[:, None], torch.where(active, nxt, old)[:, None])
        st["n_gen"].add_(active.long())
        pos.add_(active.long())
        st["cur"].copy_(torch.where(active, nxt, st["cur"]))
        st["stop_state"].copy_(torch.where(active[:, None], state, st["stop_state"]))
        at_cap = st["n_gen"] >= st["cap"]
        ended = active & (is_eos | flagged | at_cap)
        st["flag_only"].logical_or_(ended & flagged & ~is_eos & ~at_cap)
        st["done"].logical_or_(ended)

    def _decode_chunk(self, model, detector: StopDetector, width: int, steps: int) -> None:
        if not self.use_graphs:
            for _ in range(steps):
                self._decode_step(model, detector, width)
            return
        graph = self._graphs.get(width)
        if graph is None:
            try:
                graph = self._graphs[width] = self._capture(model, detector, width)
            except RuntimeError as exc:  # said once, then the same steps run eagerly (same results)
                print(f"warning: CUDA graph capture failed, decoding without graphs: {exc}", file=sys.stderr)
                self.use_graphs = False
                return self._decode_chunk(model, detector, width, steps)
        for _ in range(steps):
            graph.replay()

    def _capture(self, model, detector: StopDetector, width: int):
        """A CUDA graph of one decode step at `width` (state saved around the warm-up runs)."""
        saved = {k: v.clone() for k, v in self._state.items()}
        saved_pos = self.cache.positions.clone()
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._decode_step(model, detector, width)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode_step(model, detector, width)
        finally:
            for k, v in saved.items():  # the warm-up steps advanced the state: undo them
                self._state[k].copy_(v)
            self.cache.positions.copy_(saved_pos)
        return graph

    # ------------------------------------------------------------------ one call
    @torch.inference_mode()
    def generate(self, model, tokenizer, prompts: Sequence[str], encoded: Sequence[Sequence[int]], *,
                 caps: Sequence[int], stop_strings: Sequence[str], slots: int, pad_id: int,
                 eos_id: int | None) -> tuple[list[list[int]], list[bool]]:
        """Generated token ids of every prompt (up to and including the token that ended it), and
        whether each row ended on a confirmed stop string. The caller turns ids into text."""
        n = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        todo = [i for i in range(n) if caps[i] > 0]
        if not todo:
            return tokens, stopped
        # On CUDA the slot count stays as asked, so buffers and graphs survive calls with fewer prompts
        # (minibatches, racing slices); elsewhere idle slots would only cost compute.
        slots = max(1, slots if self.device.type == "cuda" else min(slots, len(todo)))
        max_len = max(len(encoded[i]) + caps[i] for i in todo)
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
            else model.config.get_text_config().vocab_size
        detector = self._detector_for(tokenizer, stop_strings, vocab, eos_id)
        self._ensure_buffers(slots, max_len, max(caps[i] for i in todo), len(detector.stops))
        self.reset()  # nothing of an earlier call (an earlier candidate) survives
        order = [i for i in self.history.order(prompts, [len(e) for e in encoded], caps) if caps[i] > 0]
        queue = deque(order)
        owner = [-1] * slots
        reach = [0] * slots  # host bound on the last position a slot can write (prompt + cap)
        steps_since = [0] * slots
        decode_steps = prefills = 0
        text_of = _text_decoder(tokenizer, pad_id, eos_id)
        while True:
            free = [s for s in range(slots) if owner[s] < 0]
            while free and queue:
                batch_slots, batch_rows, batch_caps, width = [], [], [], 0
                while free and queue:
                    i = queue[0]
                    w = max(width, len(encoded[i]))
                    if batch_rows and w * (len(batch_rows) + 1) > PREFILL_TOKENS:
                        break
                    queue.popleft()
                    s = free.pop(0)
                    owner[s], reach[s], steps_since[s], width = i, len(encoded[i]) + caps[i], 0, w
                    batch_slots.append(s)
                    batch_rows.append(list(encoded[i]))
                    batch_caps.append(caps[i])
                self._prefill(model, detector, batch_slots, batch_rows, batch_caps, pad_id)
                prefills += 1
            if all(o < 0 for o in owner):
                break
            done, flag_only, n_gen = self._harvest_view()
            if all(done[s] or owner[s] < 0 for s in range(slots)):
                steps = 0  # every occupied slot already finished at its prefill
            else:
                steps = self.chunk
                bound = max(min(reach[s], len(encoded[owner[s]]) + steps_since[s] + steps + 1)
                             for s in range(slots) if owner[s] >= 0)
                width = min(self.cache.max_len, WIDTH_STEP * math.ceil(bound / WIDTH_STEP))
                self._decode_chunk(model, detector, width, steps)
                decode_steps += steps
                for s in range(slots):
                    steps_since[s] += steps
                done, flag_only, n_gen = self._harvest_view()
            resume = []
            for s in range(slots):
                i = owner[s]
                if i < 0 or not done[s]:
                    continue
                ids = self._state["gen"][s, : n_gen[s]].tolist()
                if flag_only[s] and not any(stop in text_of(ids) for stop in detector.stops):
                    resume.append(s)  # the per-token flag was wrong: this row goes on
                    continue
                tokens[i], stopped[i] = ids, bool(flag_only[s])
                self.history.record(prompts[i], len(ids))
                owner[s] = -1
            if resume:
                idx = torch.tensor(resume, dtype=torch.long, device=self.device)
                self._state["done"][idx] = False
                self._state["flag_only"][idx] = False
        self.last_stats = {"slots": slots, "decode_steps": decode_steps, "prefills": prefills,
                           "generated_tokens": sum(len(t) for t in tokens), "graphs": len(self._graphs),
                           "kv_bytes": self.cache.nbytes()}
        return tokens, stopped

    def _detector_for(self, tokenizer, stop_strings: Sequence[str], vocab: int, eos_id: int | None) -> StopDetector:
        """The stop detector of this call; the previous one when nothing changed, because captured
        graphs read its tables by address (a new detector drops the graphs)."""
        key = (id(tokenizer), tuple(s for s in stop_strings if s), vocab, eos_id)
        if getattr(self, "_detector_key", None) != key:
            self._graphs.clear()
            self._detector = StopDetector(tokenizer, stop_strings, vocab, [] if eos_id is None else [eos_id], self.device)
            self._detector_key = key
        return self._detector

    def _harvest_view(self) -> tuple[list[bool], list[bool], list[int]]:
        """Done flags, stop-only flags and token counts of every slot (one device-to-host copy)."""
        st = self._state
        packed = torch.stack([st["done"].long(), st["flag_only"].long(), st["n_gen"]]).cpu()
        done, flag_only, n_gen = packed.tolist()
        return [bool(x) for x in done], [bool(x) for x in flag_only], n_gen


def _text_decoder(tokenizer, pad_id: int, eos_id: int | None):
    def text_of(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t != pad_id and t != eos_id], skip_special_tokens=True)
    return text_of
