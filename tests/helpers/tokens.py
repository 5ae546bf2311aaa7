"""What vLLM shows of sampled token ids."""

from __future__ import annotations


def shown_text(tokenizer, ids: list[int]) -> str:
    """The text vLLM returns for sampled ``ids``: their decoding, less an incomplete UTF-8 character at the end,
    which vLLM's incremental detokenizer holds back until the next token completes it (a tiny random model
    samples byte tokens mid-character; decoding them alone gives U+FFFD)."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
