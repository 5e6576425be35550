"""Text generation for the fitness: the batched Hugging Face loop (`hf_loop`) and the
slot-scheduled engine for CUDA (`engine/`).

`greedy_generate`, `answer_logprobs` and `truncate_at_stop` are the public entry points and stay
importable from `evomerge_core.generation`.
"""

from evomerge_core.generation.hf_loop import answer_logprobs, greedy_generate, truncate_at_stop

__all__ = ["answer_logprobs", "greedy_generate", "truncate_at_stop"]
