"""The retrieval example's search engine: BM25 (the ``bm25s`` library) over the generated encyclopedia.

``build(folder, docs=..., seed=...)`` generates the corpus (``make_data.make_world``) and writes it with its index
to ``folder``; ``Retriever(folder)`` loads both (the index memory-mapped) and answers ``search(query, k)`` in
milliseconds. No Arclight import: the agent that uses it is plain Agents SDK code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

HERE = Path(__file__).resolve().parent
DEFAULT_INDEX = HERE / "index"
DOCS = "docs.arrow"


@dataclass(frozen=True)
class Hit:
    doc_id: str
    title: str
    text: str
    score: float


def build(folder: Path, *, docs: int, seed: int) -> dict:
    """Generate the corpus of ``docs`` documents and index it under ``folder``; return what was built and how long
    it took."""
    from make_data import make_world

    started = time.perf_counter()
    world = make_world(seed, docs)
    rows = [{"id": doc_id, "title": title, "text": text} for doc_id, title, text in world.documents()]
    generated = time.perf_counter()
    tokens = bm25s.tokenize([f"{r['title']}. {r['text']}" for r in rows], stopwords="en", show_progress=False)
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    index.save(folder, show_progress=False)
    # Arrow IPC, uncompressed: every rollout process maps the same pages, zero-copy, rather than holding a copy
    # (64 processes that each parsed a JSONL copy held 85 MB apiece, and a run beside a test suite was
    # OOM-killed; a memory-mapped Parquet file still decodes into 88 MB of private memory)
    feather.write_feather(pa.Table.from_pylist(rows), str(folder / DOCS), compression="uncompressed")
    (folder / "built.json").write_text(json.dumps({"docs": len(rows), "seed": seed}))
    return {"docs": len(rows), "generate_s": generated - started, "index_s": time.perf_counter() - generated}


def is_built(folder: Path) -> bool:
    """Whether ``folder`` holds an index of this version (the corpus as Arrow IPC, written before ``built.json``)."""
    return (Path(folder) / "built.json").is_file() and (Path(folder) / DOCS).is_file()


class Retriever:
    """BM25 search over an index made by ``build``."""

    def __init__(self, folder: Path = DEFAULT_INDEX):
        folder = Path(folder)
        if not is_built(folder):
            raise FileNotFoundError(f"no search index in {folder}: build it once with "
                                    f"`.venv/bin/python examples/rag/build_index.py` (about a minute)")
        self.index = bm25s.BM25.load(folder, mmap=True, show_progress=False, verbosity=0)
        self.docs = pa.ipc.open_file(pa.memory_map(str(folder / DOCS))).read_all()
        self._ids, self._titles, self._texts = (self.docs.column(name) for name in ("id", "title", "text"))

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` best documents for ``query`` (fewer when fewer share a word with it; none for no word)."""
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        known = [[t for t in tokens[0] if t in self.index.vocab_dict]]
        if not known[0]:
            return []
        ids, scores = self.index.retrieve(known, k=min(k, self.docs.num_rows), show_progress=False, n_threads=0)
        return [Hit(self._ids[i].as_py(), self._titles[i].as_py(), self._texts[i].as_py(), float(s))
                for i, s in zip(np.asarray(ids[0]).tolist(), np.asarray(scores[0]).tolist()) if s > 0]

    def titles(self) -> list[str]:
        """Every document's title, in index order."""
        return self._titles.to_pylist()
