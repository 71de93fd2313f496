"""Hold out documents of each embedded provider as valuation queries (run after build_embedded_corpus.py).

For each provider, `PER_PROVIDER` documents (seeded choice among those of at least `MIN_CHARS` characters)
are REMOVED from ``embedded_corpus/<provider>.jsonl`` and become query lines of ``embedded_queries.jsonl``:
prompt = the first ~`PROMPT_CHARS` characters (cut at a space, about 16 tokens of the embedded tokenizer),
completion = the next ~`COMPLETION_CHARS` characters (the measured text), group = the provider. Provider
values then answer "how much does each provider's data lower the loss of held-out text of each provider",
and a held-out document's own provider should come first (provider identification).

    .venv/bin/python data/build_embedded_corpus.py && .venv/bin/python data/hold_out_queries.py

Deterministic: the same corpus files give the same queries. Running it twice holds out more documents;
rebuild the corpus first.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CORPUS = DATA_DIR / "embedded_corpus"
QUERIES = DATA_DIR / "embedded_queries.jsonl"
PER_PROVIDER = 2
MIN_CHARS = 600
PROMPT_CHARS = 64
COMPLETION_CHARS = 280
SEED = 11


def cut(text: str, start: int, length: int) -> tuple[str, int]:
    """text[start:end] with end the last space at or before start + length (or start + length); and end."""
    end = text.rfind(" ", start + 1, start + length + 1)
    end = end if end > start else start + length
    return text[start:end], end


def main() -> None:
    rng = random.Random(SEED)
    queries = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        eligible = [i for i, r in enumerate(records) if len(r["text"]) >= MIN_CHARS]
        held = sorted(rng.sample(eligible, PER_PROVIDER))
        for n, i in enumerate(held):
            text = records[i]["text"]
            prompt, end = cut(text, 0, PROMPT_CHARS)
            completion, _ = cut(text, end, COMPLETION_CHARS)
            queries.append(
                {
                    "query_id": f"{records[i]['provider_id']}-{n}",
                    "prompt": prompt,
                    "completion": completion,
                    "group": records[i]["provider_id"],
                    "doc_id": records[i]["doc_id"],
                }
            )
        kept = [r for i, r in enumerate(records) if i not in held]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    QUERIES.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries), encoding="utf-8")
    print(f"held out {len(queries)} documents as queries into {QUERIES}")


if __name__ == "__main__":
    main()
