"""What vLLM shows of sampled token ids, and what the gateway recorded of them."""

from __future__ import annotations


def shown_text(tokenizer, ids: list[int]) -> str:
    """The text vLLM returns for sampled ``ids``: their decoding, less an incomplete UTF-8 character at the end,
    which vLLM's incremental detokenizer holds back until the next token completes it (a tiny random model
    samples byte tokens mid-character; decoding them alone gives U+FFFD)."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def gateway_tokens(config, run_id: str) -> dict[str, tuple[list[int], list[int]]]:
    """The (prompt, response) token ids the gateway recorded per response id in ``run_id`` (the spans view's typed columns)."""
    from lightning_core.store.catalog import Catalog

    with Catalog.from_config(config).read() as con:
        rows = con.execute(
            "SELECT response_id, prompt_token_ids, response_token_ids FROM spans "
            "WHERE run_id = ? AND span_kind = 'llm' AND response_token_ids IS NOT NULL", [run_id]).fetchall()
    return {rid: (prompt, response) for rid, prompt, response in rows}
