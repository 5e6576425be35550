"""The toy world: an offline, seeded model zoo and tasks for the demo, the docs and the tests.

    from evomerge_core.toyworld import build_zoo
    zoo = build_zoo("micro")          # or "demo"; cached under ~/.cache/evomerge/toyworld/
    zoo.models["skill_a"], zoo.tasks["union"]["train"]

See docs/toyworld.md for the design and measured numbers.
"""

from .evaluate import evaluate_exact_match, generate_answers, load_model, load_tokenizer
from .recipes import CODE_VERSION, MODEL_NAMES, RECIPES, Recipe
from .scripts import in_script
from .tasks import fullwidth
from .zoo import TASK_NAMES, Zoo, build_zoo, default_cache_dir, load_zoo, read_rows, zoo_dir

__all__ = [
    "CODE_VERSION",
    "MODEL_NAMES",
    "RECIPES",
    "TASK_NAMES",
    "Recipe",
    "Zoo",
    "build_zoo",
    "default_cache_dir",
    "evaluate_exact_match",
    "fullwidth",
    "generate_answers",
    "in_script",
    "load_model",
    "load_tokenizer",
    "load_zoo",
    "read_rows",
    "zoo_dir",
]
