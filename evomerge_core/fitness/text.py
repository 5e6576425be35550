"""Text checks used by scorers: the last number in a text, and which script a text is in.

- Numbers: NFKC normalisation first, so full-width digits, commas and minus signs
  (``１，２３４``, ``－５``) parse like ASCII ones; thousands separators (``1,000``) are
  understood (the paper's released extractor read "1,000" as 0).
- Scripts: ``latin``, ``japanese`` (hiragana, katakana, kanji) and ``fullwidth`` (full-width
  digits/letters, U+FF01..U+FF5E). A text is "in" a script when at least `min_fraction` of its
  letters (for ``fullwidth``: letters and digits) belong to that script, computed on the text
  as written (before normalisation).
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

SCRIPTS = ("latin", "japanese", "fullwidth")

# A minus sign counts only when it does not follow an ASCII letter, digit or '.': "3-5" is 3
# and 5, while "は-5" (after Japanese text) is -5.
_NUMBER_RE = re.compile(r"(?:(?<![0-9A-Za-z_.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalise_number_text(text: str) -> str:
    """NFKC-normalise (full-width -> ASCII) and map unicode minus signs to '-'."""
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u2212", "-").replace("\u2013", "-")


def parse_number(text: str) -> Decimal | None:
    """Parse one number written with optional sign, thousands separators and decimals."""
    cleaned = normalise_number_text(str(text)).strip().replace(",", "")
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: str) -> Decimal | None:
    """The last number in `text`, or None when it has none."""
    matches = _NUMBER_RE.findall(normalise_number_text(text))
    if not matches:
        return None
    return parse_number(matches[-1])


def answer_number(answer: object) -> Decimal | None:
    """The reference answer as a number: a number, or the last number of a text (GSM8K's
    ``... #### 18``)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return parse_number(repr(answer))
    text = str(answer)
    return parse_number(text) if parse_number(text) is not None else last_number(text)


def _char_script(ch: str) -> str | None:
    code = ord(ch)
    if 0xFF01 <= code <= 0xFF5E:
        return "fullwidth"
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:
        return "japanese"  # hiragana, katakana (+ extensions, half-width katakana)
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF or ch in "々〆":
        return "japanese"  # kanji
    if ch.isalpha():
        try:
            if unicodedata.name(ch).startswith("LATIN"):
                return "latin"
        except ValueError:
            return None
    return None


def script_fraction(text: str, script: str) -> float:
    """Fraction of the text's letters (letters and digits for 'fullwidth') in `script`."""
    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    considered = 0
    hits = 0
    for ch in text:
        is_candidate = ch.isalpha() or (script == "fullwidth" and ch.isdigit())
        if not is_candidate:
            continue
        considered += 1
        if _char_script(ch) == script:
            hits += 1
    return hits / considered if considered else 0.0


def in_script(text: str, script: str, min_fraction: float = 0.5) -> bool:
    """True when at least `min_fraction` (and at least one) of the text's letters are in `script`."""
    return script_fraction(text, script) >= min_fraction and script_fraction(text, script) > 0


def numbers_equal(a: Decimal | None, b: Decimal | None) -> bool:
    """Exact decimal equality (``18`` == ``18.0``); None never equals anything."""
    return a is not None and b is not None and a == b
