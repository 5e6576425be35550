"""Stop detection on the device: EOS, one-token stops and multi-token stop strings, as table
lookups per decode step (no host sync).

Each stop string is a KMP automaton over characters, lifted to tokens: for every (state, token)
the table holds the state after reading the token's text and whether the string completed inside
it. A row's state is a small integer per stop string, so a step is one gather per string. The
token texts are the tokenizer's per-token decodings, which can differ from the decoding of a whole
row (byte-fallback pieces, leading-space clean-up). The device flag is therefore only a candidate:
the runner confirms every flagged row on its whole decoded text (`confirm`) and resumes a row whose
flag was false. A missed flag costs decode steps, never a different output, because the final text
is always cut at the first stop string.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

class PerTokenizer:
    """One dict per tokenizer, weakly held (a new tokenizer never sees another's entries): what a
    search builds once from a tokenizer and reuses for every candidate."""

    def __init__(self) -> None:
        self._dicts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, tokenizer) -> dict:
        try:
            return self._dicts.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable: no caching
            return {}


# Per tokenizer: per-token texts and built tables, so each candidate reuses them.
_per_tokenizer = PerTokenizer()


def token_texts(tokenizer, vocab: int) -> list[str]:
    """Each token id's own decoded text ("" past the tokenizer's vocabulary)."""
    cache = _per_tokenizer(tokenizer)
    texts = cache.get(("texts", vocab))
    if texts is None:
        known = min(vocab, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True) + [""] * (vocab - known)
        cache[("texts", vocab)] = texts
    return texts


def _automaton(stop: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next_state[state, token], hit[state, token]) of `stop`'s KMP automaton over token texts.

    State j means the text so far ends with ``stop[:j]`` (j < len(stop), the longest such j).
    Reading a token's text from state j: the string completes if ``stop`` occurs in
    ``stop[:j] + text``, and the new state is the longest proper prefix of ``stop`` that ends it.
    """
    n, vocab = len(stop), len(texts)
    chars = set(stop)
    nxt = [[0] * vocab for _ in range(n)]
    hit = [[False] * vocab for _ in range(n)]
    for v, text in enumerate(texts):
        if not text or chars.isdisjoint(text):
            continue  # the automaton returns to state 0 and nothing completes
        for state in range(n):
            joined = stop[:state] + text
            hit[state][v] = stop in joined
            for j in range(min(n - 1, len(joined)), 0, -1):
                if joined.endswith(stop[:j]):
                    nxt[state][v] = j
                    break
    return torch.tensor(nxt, dtype=torch.int32), torch.tensor(hit, dtype=torch.bool)


class StopDetector:
    """Device-side stop flags for one tokenizer, vocabulary size and set of stop strings."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], vocab: int, eos_ids: Sequence[int],
                 device: torch.device) -> None:
        self.stops = tuple(s for s in stop_strings if s)
        cache = _per_tokenizer(tokenizer)
        texts = token_texts(tokenizer, vocab) if self.stops else []
        self.eos = torch.tensor(sorted(set(eos_ids)) or [-1], dtype=torch.long, device=device)
        tables = []
        for stop in self.stops:
            key = ("kmp", stop, vocab)
            if key not in cache:
                cache[key] = _automaton(stop, texts)
            nxt, hit = cache[key]
            tables.append((nxt.to(device), hit.to(device)))
        # All automata stacked, so a step is one gather: next[k, state, token], hit[k, state, token].
        width = max((len(s) for s in self.stops), default=1)
        self.next = torch.zeros((len(tables), width, vocab), dtype=torch.int32, device=device)
        self.hit = torch.zeros((len(tables), width, vocab), dtype=torch.bool, device=device)
        for k, (nxt, hit) in enumerate(tables):
            self.next[k, : nxt.shape[0]] = nxt
            self.hit[k, : hit.shape[0]] = hit
        self._k = torch.arange(len(tables), device=device)

    def initial_state(self, rows: int, device: torch.device) -> torch.Tensor:
        """Automaton states of rows that generated nothing yet: [rows, stop strings]."""
        return torch.zeros((rows, len(self.stops)), dtype=torch.int32, device=device)

    def step(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed one token per row: (is EOS, a stop string may have completed, new states)."""
        is_eos = (tokens[:, None] == self.eos[None, :]).any(-1)
        if not self.stops:
            return is_eos, torch.zeros_like(is_eos), state
        k, s, t = self._k[None, :], state.long(), tokens[:, None]
        flagged = self.hit[k, s, t].any(-1)
        return is_eos, flagged, self.next[k, s, t]

    def confirm(self, text: str) -> bool:
        """Host check of a flagged row: its whole text holds a stop string."""
        return any(s in text for s in self.stops)
