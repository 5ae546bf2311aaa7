"""Fallback for calls recorded without token ids: tokenize their messages with the base tokenizer.

Retokenized ids may differ from what the model sampled (that drift is why the gateway records
ids), so such rows carry the flag ``retokenized`` instead of ``missing_token_ids`` and have no
logprobs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pyarrow as pa


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """Load (once) the tokenizer of a local model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def chat_messages(prompt_messages: str | None) -> list[dict[str, str]] | None:
    """Return role/content messages from any recorded prompt shape (OpenAI, GenAI ``parts``)."""
    if not prompt_messages:
        return None
    try:
        data = json.loads(prompt_messages)
    except ValueError:
        return None
    if isinstance(data, str):
        return [{"role": "user", "content": data}]
    if not isinstance(data, list):
        return None
    messages = []
    for item in data:
        if not isinstance(item, dict):
            return None
        content: Any = item.get("content")
        if content is None and isinstance(item.get("parts"), list):
            content = "".join(str(p.get("content", "")) for p in item["parts"] if isinstance(p, dict))
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        messages.append({"role": str(item.get("role", "user")), "content": "" if content is None else str(content)})
    return messages


def retokenize_missing(table: pa.Table, *, tokenizer_path: Path) -> tuple[pa.Table, int]:
    """Fill token ids of rows flagged ``missing_token_ids``; return the table and how many were filled."""
    flagged = [("missing_token_ids" in (f or [])) for f in table.column("flags").to_pylist()]
    if not any(flagged):
        return table, 0
    tokenizer = load_tokenizer(str(tokenizer_path))
    rows = table.to_pylist()
    filled = 0
    for row, missing in zip(rows, flagged):
        if not missing:
            continue
        messages = chat_messages(row["prompt_messages"])
        if messages is None or row["response_text"] is None:
            continue
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        row["prompt_token_ids"] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        row["response_token_ids"] = tokenizer.encode(row["response_text"], add_special_tokens=False)
        row["response_logprobs"] = None
        row["flags"] = [f for f in row["flags"] if f != "missing_token_ids"] + ["retokenized"]
        filled += 1
    return pa.Table.from_pylist(rows, schema=table.schema), filled
