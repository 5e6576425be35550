"""Batched greedy generation with stop strings, and teacher-forced answer log-likelihoods.

Both work on any causal LM with a Hugging Face tokenizer. Prompts are sorted by length and
left-padded so a batch wastes little compute; results come back in the caller's order.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from evomerge_core.generation.engine import choose_backend
from evomerge_core.generation.model_api import cache_argument
from evomerge_core.generation.engine import engine_generate
from evomerge_core.generation.engine.stops import PerTokenizer


def _ensure_pad(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set one to batch prompts")
        return int(tokenizer.eos_token_id)
    return int(tokenizer.pad_token_id)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the first occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


# Per tokenizer (weakly held, so a new tokenizer never sees another's entries): the stop-token
# masks, and the token ids of the last prompt list (a search scores the same prompts for every
# candidate).
_tokenizer_cache = PerTokenizer()


def _stop_token_mask(tokenizer, chars: tuple[str, ...], vocab: int, device: torch.device) -> torch.Tensor:
    """Boolean over token ids: the token's text contains one of the one-character stop strings."""
    cache = _tokenizer_cache(tokenizer)
    key = ("stop", chars, vocab, str(device))
    mask = cache.get(key)
    if mask is None:
        known = min(vocab, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=True)
        flags = [any(c in t for c in chars) for t in texts] + [False] * (vocab - known)
        mask = cache[key] = torch.tensor(flags, dtype=torch.bool, device=device)
    return mask


def _encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of the prompts (no special tokens; BOS when the tokenizer adds one), reused
    while the same prompts come back."""
    cache = _tokenizer_cache(tokenizer)
    key = tuple(prompts)
    hit = cache.get("prompts")
    if hit is not None and hit[0] == key:
        return hit[1]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        encoded = [[bos] + ids for ids in encoded]
    cache["prompts"] = (key, encoded)
    return encoded


def _engine_outputs(model, tokenizer, prompts, encoded, caps, stops, batch_size, pad_id, eos_id, stats) -> list[str]:
    """`greedy_generate` on the generation engine (`batch_size` = its number of slots)."""
    tokens, _ = engine_generate(model, tokenizer, prompts, encoded, caps=caps, stop_strings=stops,
                                batch_size=batch_size, pad_id=pad_id, eos_id=eos_id)
    if stats is not None:
        stats["row_tokens"] = [len(t) for t in tokens]
        stats["generated_tokens"] = sum(stats["row_tokens"])
    return [truncate_at_stop(tokenizer.decode([t for t in ids if t != pad_id and t != eos_id], skip_special_tokens=True),
                             stops) for ids in tokens]


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int] = 32,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 32,
    stats: dict | None = None,
    backend: str | None = None,
) -> list[str]:
    """Greedy-decode each prompt; return the generated continuations, cut at stop strings.

    Length-sorted, left-padded batches with the KV cache; the prompt pass computes logits of
    the last position only. A row leaves the batch (and its KV cache) as soon as its text
    contains a stop string or it produced EOS, so finished rows cost nothing; the batch ends
    when every row has. Stop detection is cheap: one-character stop strings by a per-token
    lookup on the device, longer ones by decoding the last few tokens of each row; a hit is
    confirmed on the row's whole text, so the outputs are exactly those of decoding every row
    to `max_new_tokens` and cutting at the first stop string.

    `max_new_tokens` may also be one cap per prompt (a row stops at its own cap, exactly as if
    decoded alone with that cap). With a `stats` dict, ``stats["row_tokens"]`` gets the tokens
    each prompt generated (up to and including the one that ended it) and
    ``stats["generated_tokens"]`` their sum.

    `backend`: ``engine`` (`evomerge_core.generation.engine`: continuous batching, same outputs), ``hf``
    (this loop) or ``auto`` (engine on CUDA); None takes the surrounding
    `evomerge_core.generation.engine.generation_backend` (the evaluator sets it from ``runtime.generation``).
    """
    pad_id = _ensure_pad(tokenizer)
    eos_id = tokenizer.eos_token_id
    cache_arg = cache_argument(model)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    device = next(model.parameters()).device
    stops = tuple(s for s in stop_strings if s)
    chars = tuple(s for s in stops if len(s) == 1)
    longer = tuple(s for s in stops if len(s) > 1)
    lookback = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in longer), default=0) + 2
    encoded = _encode_prompts(tokenizer, prompts)
    outputs: list[str] = [""] * len(prompts)
    caps = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(c) for c in max_new_tokens]
    if len(caps) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(caps)} caps for {len(prompts)} prompts; give one per prompt")
    row_tokens = [0] * len(prompts)
    if choose_backend(backend, model) == "engine":
        return _engine_outputs(model, tokenizer, prompts, encoded, caps, stops, batch_size, pad_id, eos_id, stats)

    def text_of(tokens: list[int]) -> str:
        return tokenizer.decode([t for t in tokens if t != pad_id and t != eos_id], skip_special_tokens=True)

    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        batch_cap = max(caps[i] for i in batch)
        row_caps = torch.tensor([caps[i] for i in batch], dtype=torch.long, device=device)
        counts = torch.zeros(len(batch), dtype=torch.long, device=device)  # tokens each batch row generated
        generated = torch.full((len(batch), max(1, batch_cap)), pad_id, dtype=torch.long, device=device)
        active = torch.arange(len(batch), device=device)  # batch rows still generating
        finished = torch.zeros(len(batch), dtype=torch.bool, device=device)  # only without row dropping
        cache = None
        step_ids, step_pos = input_ids, (attention.cumsum(-1) - 1).clamp(min=0)
        for step in range(batch_cap):
            kwargs = {cache_arg: cache} if cache is not None else {}
            out = model(input_ids=step_ids, attention_mask=attention, position_ids=step_pos, use_cache=True,
                        **kwargs, **keep_last)
            cache = out.get(cache_arg)
            logits = out.logits[:, -1, :]
            next_tok = torch.where(finished, pad_id, logits.argmax(-1))
            generated[active, step] = next_tok
            counts[active] += (~finished).long()
            done = finished | (next_tok == eos_id) if eos_id is not None else finished.clone()
            done |= row_caps[active] <= step + 1  # a row at its own cap (per-prompt caps)
            if stops:
                flagged = torch.zeros_like(done)
                if chars:
                    flagged |= _stop_token_mask(tokenizer, chars, logits.shape[-1], device)[next_tok]
                if longer:
                    tails = tokenizer.batch_decode(generated[active, max(0, step + 1 - lookback) : step + 1],
                                                   skip_special_tokens=True)
                    flagged |= torch.tensor([any(s in t for s in longer) for t in tails], device=device)
                rows = (flagged & ~done).nonzero().squeeze(1).tolist()
                if rows:
                    texts = generated[active[rows], : step + 1].tolist()
                    for r, tokens in zip(rows, texts):
                        if any(s in text_of(tokens) for s in stops):
                            done[r] = True
            if bool(done.all()):
                break
            if bool(done.any()) and hasattr(cache, "batch_select_indices"):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, attention, next_tok, step_pos = active[keep], attention[keep], next_tok[keep], step_pos[keep]
                finished = finished[keep]
            else:  # a cache that cannot drop rows keeps them, emitting padding
                finished = done
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            step_ids = next_tok[:, None]
            step_pos = step_pos[:, -1:] + 1
        for row, i in enumerate(batch):
            outputs[i] = truncate_at_stop(text_of(generated[row, : caps[i]].tolist()), stop_strings)
            row_tokens[i] = int(counts[row])
    if stats is not None:
        stats["row_tokens"] = row_tokens
        stats["generated_tokens"] = sum(row_tokens)
    return outputs


@torch.inference_mode()
def answer_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
) -> list[float]:
    """Mean per-token log-probability of each answer given its prompt (teacher forcing,
    one forward pass per batch, no generation); ValueError when one is not finite (the
    model's logits hold NaN or inf)."""
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers must have the same length")
    pad_id = _ensure_pad(tokenizer)
    device = next(model.parameters()).device
    pairs = []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(a, add_special_tokens=False)["input_ids"]
        if not a_ids:
            raise ValueError(f"answer {a!r} tokenises to nothing")
        pairs.append((p_ids, a_ids))
    results: list[float] = [0.0] * len(pairs)
    for batch in _length_sorted_batches([len(p) + len(a) for p, a in pairs], batch_size):
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        answer_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            p_ids, a_ids = pairs[i]
            ids = p_ids + a_ids
            start = width - len(ids)
            input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
            attention[row, start:] = 1
            answer_mask[row, width - len(a_ids) :] = True
        input_ids, attention, answer_mask = input_ids.to(device), attention.to(device), answer_mask.to(device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits
        logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
        target = input_ids[:, 1:]
        token_lp = logp.gather(-1, target[..., None]).squeeze(-1)
        mask = answer_mask[:, 1:]
        per_row = (token_lp * mask).sum(-1) / mask.sum(-1)
        if not bool(torch.isfinite(per_row).all()):  # NaN or +inf in a row's logits, or -inf at its answer
            raise ValueError("the merged model produces NaN/inf logits")
        for row, i in enumerate(batch):
            results[i] = float(per_row[row])
    return results
