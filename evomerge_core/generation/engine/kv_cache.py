"""A preallocated KV cache with one row ("slot") per sequence in flight.

Every attention layer of a transformers model calls ``cache.update(k, v, layer_idx)``; this
class answers that call for two kinds of forward passes:

- prefill (new prompts, left-padded to one width, into some slots): the keys/values are written
  at each token's position in its slot (padding goes to a sink column that is never attended),
  and the prompt attends to itself only, so the fresh tensors are returned as they are;
- decode (one token for every slot): each slot's token is written at that slot's own position,
  and a view of the first `width` positions of all slots is returned (no copy).

Buffers are allocated on the first prefill (their shapes come from the layer's own key states,
so any head count / head size works) and stay at the same addresses for the engine's life, which
is what captured CUDA graphs need. `reset` zeroes them: no keys of one candidate survive into the
next, and masked positions never hold NaN (a masked weight is 0, but 0 * NaN is NaN).
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys/values for `slots` sequences of up to `max_len` tokens each, per layer."""

    def __init__(self, slots: int, max_len: int, device: torch.device) -> None:
        self.slots, self.max_len, self.device = slots, max_len, device
        self.keys: dict[int, torch.Tensor] = {}  # layer -> [slots, kv_heads, max_len + 1, head_dim]
        self.values: dict[int, torch.Tensor] = {}
        self._mode = "idle"
        self._rows: torch.Tensor | None = None  # prefill: [n, width] slot of each token
        self._cols: torch.Tensor | None = None  # prefill: [n, width] position (sink for padding)
        self._width = 0
        self.slot_ids = torch.arange(slots, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # decode: where each slot writes

    @property
    def sink(self) -> int:
        """Column that padding keys are written to (never attended)."""
        return self.max_len

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(t.numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))

    def reset(self) -> None:
        """Forget every sequence: zero the buffers (they keep their addresses)."""
        for t in (*self.keys.values(), *self.values.values()):
            t.zero_()
        self.positions.zero_()
        self._mode = "idle"

    def begin_prefill(self, slots: torch.Tensor, lengths: torch.Tensor, width: int) -> None:
        """The next forward pass prefills `slots` with left-padded prompts of `lengths` tokens."""
        cols = torch.arange(width, device=self.device)[None, :] - (width - lengths[:, None])
        self._cols = torch.where(cols >= 0, cols, torch.full_like(cols, self.sink))
        self._rows = slots[:, None].expand(-1, width)
        self._mode = "prefill"

    def begin_decode(self, width: int) -> None:
        """The next forward passes decode one token per slot at `positions`, attending to the
        first `width` positions."""
        self._width = width
        self._mode = "decode"

    def _buffers(self, layer: int, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.slots, key.shape[1], self.max_len + 1, key.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=key.dtype, device=self.device)
            self.values[layer] = torch.zeros(shape, dtype=key.dtype, device=self.device)
        return self.keys[layer], self.values[layer]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this layer's new keys/values; return what the layer attends to."""
        k_buf, v_buf = self._buffers(layer_idx, key)
        if self._mode == "prefill":
            index = (self._rows, self._cols)
            k_buf.transpose(1, 2).index_put_(index, key.transpose(1, 2).to(k_buf.dtype))
            v_buf.transpose(1, 2).index_put_(index, value.transpose(1, 2).to(v_buf.dtype))
            return key, value
        if self._mode == "decode":
            index = (self.slot_ids, self.positions)
            k_buf.transpose(1, 2).index_put_(index, key[:, :, 0, :].to(k_buf.dtype))
            v_buf.transpose(1, 2).index_put_(index, value[:, :, 0, :].to(v_buf.dtype))
            return k_buf[:, :, : self._width], v_buf[:, :, : self._width]
        raise RuntimeError("SlotKVCache.update outside a prefill or decode pass")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Unused by the engine (it always passes position ids); present for the Cache interface."""
        return 0
