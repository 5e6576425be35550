"""Which prompt takes the next free slot: longest expected first.

A search scores the same prompts for every candidate, and merged candidates answer at similar
lengths, so the output length seen for a prompt in earlier candidates predicts the next one.
Starting the long ones first keeps the slots full to the end instead of leaving a few long rows
running alone. Prompts never seen yet go first (their length is unknown, so they are treated as
long), longer prompts before shorter ones.
"""

from __future__ import annotations

from collections.abc import Sequence


class LengthHistory:
    """Output tokens seen per prompt text (the most recent candidate's count)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[str, int] = {}
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._seen)

    def expected(self, prompt: str) -> int | None:
        """Tokens the prompt's answer took last time, or None when never seen."""
        return self._seen.get(prompt)

    def record(self, prompt: str, tokens: int) -> None:
        """Remember how many tokens a prompt's answer took."""
        if prompt not in self._seen and len(self._seen) >= self._max:
            self._seen.pop(next(iter(self._seen)))  # oldest first
        self._seen[prompt] = int(tokens)

    def order(self, prompts: Sequence[str], prompt_lengths: Sequence[int], caps: Sequence[int]) -> list[int]:
        """Indices of `prompts` in admission order: unseen first, then by expected output length
        (capped by the prompt's own cap), longest first; ties by prompt length, then index."""
        def key(i: int) -> tuple[int, int, int, int]:
            seen = self.expected(prompts[i])
            if seen is None:
                return (0, 0, -prompt_lengths[i], i)
            return (1, -min(seen, caps[i]), -prompt_lengths[i], i)
        return sorted(range(len(prompts)), key=key)
