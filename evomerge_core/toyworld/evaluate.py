"""Exact-match evaluation of a model on toy-world rows, via `evomerge_core.generation.hf_loop`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge_core.generation.hf_loop import greedy_generate

PROMPT_TEMPLATE = "{prompt}"
STOP_STRINGS = ["\n"]
MAX_NEW_TOKENS = 8


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide transformers' per-file progress bars (noise for models this small)."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def load_model(model_dir: str | Path) -> torch.nn.Module:
    """Load a saved toy-world model (float32, eval mode)."""
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def save_model(model, tokenizer, model_dir: Path) -> None:
    """Save a toy model and its tokenizer as a Hugging Face model directory (quietly)."""
    with quiet_progress():
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)


def load_tokenizer(model_dir: str | Path):
    """Load the tokenizer saved next to a toy-world model."""
    return AutoTokenizer.from_pretrained(str(model_dir))


def generate_answers(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 64,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy continuations (cut at the stop string, stripped) for each row's prompt."""
    prompts = [PROMPT_TEMPLATE.format(prompt=r["prompt"]) for r in rows]
    outs = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=STOP_STRINGS, batch_size=batch_size
    )
    return [o.strip() for o in outs]


def evaluate_exact_match(
    model_dir_or_model, tokenizer=None, rows: Sequence[dict] = (), *, batch_size: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> float:
    """Fraction of rows whose greedy answer equals `row["answer"]` after stripping.

    `model_dir_or_model` is a saved model directory or a loaded model; `tokenizer` defaults to
    the one saved in that directory.
    """
    if not rows:
        raise ValueError("evaluate_exact_match needs at least one row")
    if isinstance(model_dir_or_model, (str, Path)):
        model = load_model(model_dir_or_model)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir_or_model)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise ValueError("pass the tokenizer when evaluating an in-memory model")
    answers = generate_answers(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sum(a == r["answer"].strip() for a, r in zip(answers, rows)) / len(rows)
