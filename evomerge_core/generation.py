"""Batched greedy generation with stop strings, and teacher-forced answer log-likelihoods.

Both work on any causal LM with a Hugging Face tokenizer. Prompts are sorted by length and
left-padded so a batch wastes little compute; results come back in the caller's order.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch


def _ensure_pad(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set one to batch prompts")
        return int(tokenizer.eos_token_id)
    return int(tokenizer.pad_token_id)


def _cache_argument(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache`; support both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 32,
) -> list[str]:
    """Greedy-decode each prompt; return the generated continuations, cut at stop strings.

    Uses the KV cache, left padding and stops a batch early once every sequence has produced
    a stop string or the EOS token.
    """
    pad_id = _ensure_pad(tokenizer)
    eos_id = tokenizer.eos_token_id
    cache_arg = _cache_argument(model)
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        encoded = [[bos] + ids for ids in encoded]
    outputs: list[str] = [""] * len(prompts)
    for batch in _length_sorted_batches([len(e) for e in encoded], batch_size):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        generated = torch.zeros((len(batch), 0), dtype=torch.long, device=device)
        finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
        cache = None
        step_ids, step_pos = input_ids, position_ids
        for _ in range(max_new_tokens):
            kwargs = {cache_arg: cache} if cache is not None else {}
            out = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_pos,
                use_cache=True,
                **kwargs,
            )
            cache = out.get(cache_arg)
            next_tok = out.logits[:, -1, :].argmax(-1)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)
            generated = torch.cat([generated, next_tok[:, None]], dim=1)
            if eos_id is not None:
                finished |= next_tok == eos_id
            if stop_strings and not bool(finished.all()):
                for row in range(len(batch)):
                    if not finished[row]:
                        text = tokenizer.decode(generated[row], skip_special_tokens=True)
                        if any(s and s in text for s in stop_strings):
                            finished[row] = True
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            step_ids = next_tok[:, None]
            step_pos = step_pos[:, -1:] + 1
        for row, i in enumerate(batch):
            toks = [t for t in generated[row].tolist() if t != pad_id and t != eos_id]
            outputs[i] = truncate_at_stop(tokenizer.decode(toks, skip_special_tokens=True), stop_strings)
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
    one forward pass per batch, no generation)."""
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
        for row, i in enumerate(batch):
            results[i] = float(per_row[row])
    return results
