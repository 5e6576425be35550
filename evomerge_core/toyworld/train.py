"""Seeded, deterministic training of the toy world's tiny Llama models.

One *stage* trains a model on a weighted mixture of row kinds (see `tasks.ROW_MAKERS`). Each
example is one row (prompt, answer, newline) starting at position 0, exactly as greedy
generation sees it; the loss covers the answer and the newline only. Batches come from a
`random.Random` seeded by the stage, so the same stage on the same model gives bit-identical
weights (given the same torch thread count, which the zoo builder fixes).
"""

from __future__ import annotations

import dataclasses

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .tasks import World, sample_row
from .tokenizer import EOS, PAD, encode

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """Size of the tiny Llama (RoPE, SwiGLU, RMSNorm)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 64


@dataclass(frozen=True)
class Stage:
    """One training run: what to train on, how long, how fast."""

    mixture: tuple[tuple[str, float], ...]  # (row kind, weight)
    steps: int
    lr: float
    batch_size: int
    seed: int
    warmup: int = 50
    schedule: str = "cosine"  # "cosine" (to 10% of lr) or "constant" (after warm-up)
    weight_decay: float = 0.01


def new_model(shape: ModelShape, vocab: dict[str, int], newline_id: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama, seeded."""
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab[EOS],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Plain `model.generate` stops at the newline that ends every answer, as our rows do.
    model.generation_config = GenerationConfig(
        eos_token_id=[newline_id, vocab[EOS]], pad_token_id=vocab[PAD], bos_token_id=vocab["<s>"],
        do_sample=False, max_new_tokens=8,
    )
    return model


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fix the thread count and ask torch for deterministic kernels; restore on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _batch(rows: list[dict[str, str]], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    seqs, labels = [], []
    for row in rows:
        p = encode(row["prompt"], vocab)
        a = encode(row["answer"] + "\n", vocab)
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    width = max(len(s) for s in seqs)
    pad = vocab[PAD]
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(s)] = torch.tensor(s)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(s)] = 1
    return {"input_ids": input_ids, "labels": label_t, "attention_mask": mask}


def _lr_at(stage: Stage, step: int) -> float:
    if step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    if stage.schedule == "constant":
        return stage.lr
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_stage(
    model: LlamaForCausalLM,
    world: World,
    stage: Stage,
    vocab: dict[str, int],
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train `model` in place for `stage.steps` steps; return the mean loss of the last 10%."""
    run = StageRun(model, stage, vocab, lambda kind, rng: sample_row(world, kind, rng))
    return run.advance(stage.steps, on_step)


class StageRun:
    """One stage trained in pieces: successive `advance(n)` calls see exactly the batches and
    learning rates of one uninterrupted run, so a caller can measure checkpoints in between.
    `sample(kind, rng)` draws one train row of a row kind."""

    def __init__(self, model: LlamaForCausalLM, stage: Stage, vocab: dict[str, int],
                 sample: Callable[[str, random.Random], dict[str, str]]) -> None:
        self.model, self.stage, self.vocab, self.sample = model, stage, vocab, sample
        self.kinds = [k for k, _ in stage.mixture]
        self.weights = [w for _, w in stage.mixture]
        self.rng = random.Random(f"stage-{stage.seed}")
        torch.manual_seed(stage.seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay,
                                     betas=(0.9, 0.98))
        self.step = 0  # steps trained so far

    def _next_batch(self) -> dict[str, torch.Tensor]:
        kinds = self.rng.choices(self.kinds, self.weights, k=self.stage.batch_size)
        return _batch([self.sample(kind, self.rng) for kind in kinds], self.vocab)

    def advance(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> float:
        """Train the next `steps` steps (`on_step` gets the stage's step index); returns the mean
        loss of the last 10% of them."""
        start = self.step

        def report(step: int, loss: float) -> None:
            if on_step is not None:
                on_step(start + step, loss)

        loss = optimise(self.model, self.opt, steps, lambda step: _lr_at(self.stage, start + step),
                        self._next_batch, report)
        self.step += steps
        return loss


def optimise(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    lr_at: Callable[[int], float],
    next_batch: Callable[[], dict[str, torch.Tensor]],
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """The toy world's training loop (set lr, forward, clip at 1.0, step) for `steps` steps;
    returns the mean loss of the last 10% of steps and leaves the model in eval mode."""
    model.train()
    tail: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**next_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if on_step is not None:
            on_step(step, value)
    model.eval()
    return sum(tail) / len(tail)


def seeded_stage(stage: Stage, zoo_seed: int) -> Stage:
    """The stage of a zoo rebuilt with `zoo_seed`: every zoo seed shifts the stage's seed."""
    return dataclasses.replace(stage, seed=stage.seed + 1000 * zoo_seed)
