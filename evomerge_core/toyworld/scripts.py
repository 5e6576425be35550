"""Script checks for answers: is a text written in the target language's script?"""

from __future__ import annotations

_SCRIPTS = {
    # JA in the toy world: full-width forms (digits, operators) and kana.
    "fullwidth": lambda c: "\uff01" <= c <= "\uff5e" or "\u3040" <= c <= "\u30ff" or c == "\u3000",
    "ascii": lambda c: c.isascii(),
}


def script_names() -> list[str]:
    return sorted(_SCRIPTS)


def in_script(text: str, script: str) -> bool:
    """True when `text` has at least one non-space character and all of them belong to `script`
    ("fullwidth": full-width forms and kana; "ascii")."""
    if script not in _SCRIPTS:
        raise ValueError(f"unknown script {script!r}; use one of {script_names()}")
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and all(_SCRIPTS[script](c) for c in chars)
