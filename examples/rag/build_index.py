"""Build the retrieval example's corpus and BM25 index once (``examples/rag/index/``, about a minute here).

    .venv/bin/python examples/rag/build_index.py                 # 100,000 documents, seed 7
    .venv/bin/python examples/rag/build_index.py --docs 2000 --out /tmp/small-index
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_data import DOCS, SEED  # noqa: E402
from retriever import DEFAULT_INDEX, Retriever, build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=DOCS)
    parser.add_argument("--seed", type=int, default=SEED, help="the world's seed (make_data.py's questions use 7)")
    parser.add_argument("--out", type=Path, default=DEFAULT_INDEX)
    args = parser.parse_args()
    built = build(args.out, docs=args.docs, seed=args.seed)
    retriever = Retriever(args.out)
    titles = retriever.titles()
    queries = titles[:: max(1, len(titles) // 200)]
    latencies = []
    for query in queries:
        started = time.perf_counter()
        retriever.search(query, 3)
        latencies.append((time.perf_counter() - started) * 1000)
    print(f"{built['docs']} documents generated in {built['generate_s']:.1f} s and indexed in {built['index_s']:.1f} s "
          f"into {args.out}; a search took {statistics.median(latencies):.1f} ms (median of {len(queries)})")


if __name__ == "__main__":
    main()
