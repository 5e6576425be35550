"""The toy world's character-level tokenizer, built offline with `tokenizers`.

Every character is one token, so the vocabulary is small (< 200) and fixed by code: two
"languages" with disjoint scripts (EN: ASCII digits and lowercase words; JA: full-width digits
and hiragana) plus a few operators. Saved with `save_pretrained`, it loads back with
`AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

EN_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-=:>"
FULLWIDTH_DIGITS = "".join(chr(c) for c in range(0xFF10, 0xFF1A))  # ０..９
JA_SYMBOLS = "＋－＝：＞　"
HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3097)) + "ー"
VOCAB_CHARS = EN_CHARS + "\n" + FULLWIDTH_DIGITS + JA_SYMBOLS + HIRAGANA


def vocabulary() -> dict[str, int]:
    """Token -> id, specials first; identical on every call (the build depends on it)."""
    tokens = SPECIAL_TOKENS + list(VOCAB_CHARS)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate characters in the toy vocabulary")
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character-level tokenizer (pad, bos, eos, unk set; no special tokens added
    on encode, so a prompt's ids are exactly its characters)."""
    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tok.padding_side = "left"
    return tok


def encode(text: str, vocab: dict[str, int]) -> list[int]:
    """Fast char -> id encoding for training (same ids as the tokenizer; tested)."""
    try:
        return [vocab[c] for c in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the toy vocabulary") from None
