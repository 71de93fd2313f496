"""Build the embedded default training corpus shipped in ``data/embedded_corpus/``.

Provenance: every document is prose taken from a permissively licensed Python
package installed in the project virtualenv - the docstrings of one source file
(parsed with ``ast``, the package is never imported) or one ``.md``/``.rst``/``.txt``
file bundled in the package. One package is one data provider.

Rebuild (deterministic; same installed versions give byte-identical output)::

    .venv/bin/python data/build_embedded_corpus.py

Writes ``embedded_corpus/<provider_id>.jsonl`` (keys: provider_id, doc_id, text,
source_uri, license), ``embedded_corpus/PROVIDERS.md``,
``embedded_corpus/licenses/<provider_id>.txt`` and ``embedded_queries.jsonl``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import json
import re
import shutil
from pathlib import Path, PurePosixPath

DATA_DIR = Path(__file__).resolve().parent
OUT_DIR = DATA_DIR / "embedded_corpus"
QUERIES_PATH = DATA_DIR / "embedded_queries.jsonl"

# provider_id (= distribution name) -> SPDX id of the licence covering its Python source.
PROVIDERS = {
    "dagster": "Apache-2.0",
    "mlflow": "Apache-2.0",
    "networkx": "BSD-3-Clause",
    "numpy": "BSD-3-Clause",
    "pandas": "BSD-3-Clause",
    "polars": "MIT",
    "pyarrow": "Apache-2.0",
    "scipy": "BSD-3-Clause",
    "torch": "BSD-3-Clause",
    "transformers": "Apache-2.0",
}
# A phrase that must occur in the installed licence file for each SPDX id.
LICENSE_MARKERS = {
    "Apache-2.0": "Apache License",
    "BSD-3-Clause": "Redistribution and use in source and binary forms",
    "MIT": "Permission is hereby granted, free of charge",
}
# A word that must occur in the package metadata (License-Expression/License/classifiers).
METADATA_MARKERS = {"Apache-2.0": "Apache", "BSD-3-Clause": "BSD", "MIT": "MIT"}

MIN_DOC_CHARS = 200
MAX_DOC_CHARS = 6_000
MAX_PROVIDER_BYTES = 140_000
PROSE_SUFFIXES = {".md", ".rst", ".txt"}
SKIP_DIRS = {"tests", "test", "_vendor", "_vendored", "vendor", "vendored", "externals", "third_party"}
LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")

# Valuation prompts: docstring openings in the style of each provider (2-3 per provider).
QUERIES = [
    "Solve the linear equations A x = b, given the",  # scipy
    "Construct a sparse array from",
    "Compute the eigenvalues of a",
    "Return a random matrix with data from the",  # numpy
    "Return the directory that contains the",
    "Return a DataFrame with",  # pandas
    "Convert Index to ndarray of",
    "Return an int representing the number of",
    "Read into a DataFrame from a",  # polars
    "Construct a DataFrame from a sequence of",
    "Convert a String column into a",
    "Read a pandas.DataFrame from Feather format.",  # pyarrow
    "Build a ``pa.Table`` from any DataFrame",
    "Returns a tensor filled with",  # torch
    "Collects the descendants of each node in the",
    "Applies Rotary Position Embedding to the",  # transformers
    "Construct a BERT tokenizer for",
    "Converts a sequence of tokens (string) in a",
    "Materialize the asset",  # dagster
    "Returns all asset keys that belong to the",
    "Log a metric to the current run",  # mlflow
    "Set a tag for the registered",
    "Returns the shortest path between",  # networkx
    "Compute current-flow betweenness centrality for",
]


def check_license(dist: md.Distribution, spdx: str) -> None:
    """Fail unless both the metadata and the licence file confirm the expected licence."""
    meta = dist.metadata
    words = " ".join(
        [meta.get("License-Expression") or "", meta.get("License") or ""] + (meta.get_all("Classifier") or [])
    )
    if METADATA_MARKERS[spdx] not in words:
        raise SystemExit(f"{dist.name}: metadata does not say {spdx}")
    if LICENSE_MARKERS[spdx] not in license_text(dist):
        raise SystemExit(f"{dist.name}: licence file does not look like {spdx}")


def license_text(dist: md.Distribution) -> str:
    """Concatenate the package's own LICENSE/NOTICE files from its dist-info folder."""
    parts = []
    for f in sorted(dist.files or [], key=str):
        p = PurePosixPath(str(f))
        in_dist_info = p.parts[0].endswith(".dist-info") and (
            len(p.parts) == 2 or (len(p.parts) == 3 and p.parts[1] == "licenses")
        )
        if in_dist_info and p.name.upper().startswith(("LICENSE", "LICENCE", "NOTICE", "COPYING")):
            body = Path(dist.locate_file(f)).read_text(encoding="utf-8")
            parts.append(f"==== {p.name} ({dist.name} {dist.version}) ====\n\n{body.strip()}\n")
    return "\n\n".join(parts)


def candidate_files(dist: md.Distribution) -> list[PurePosixPath]:
    """Source/prose files of the package, minus tests, vendored code and any subtree with its own licence."""
    files = [PurePosixPath(str(f)) for f in dist.files or []]
    files = [f for f in files if not f.parts[0].endswith((".dist-info", ".data")) and "__pycache__" not in f.parts]
    licensed_dirs = {f.parent for f in files if f.name.upper().startswith(LICENSE_NAMES) and len(f.parts) > 2}
    # Subpackages with their own licence file (e.g. numpy/random, scipy/integrate) are left out.
    keep = []
    for f in files:
        if f.suffix not in PROSE_SUFFIXES | {".py"} or any(n in f.name.upper() for n in LICENSE_NAMES):
            continue
        if SKIP_DIRS & set(f.parts[:-1]) or f.name.startswith("test_") or f.name == "conftest.py":
            continue
        if any(d in licensed_dirs for d in f.parents):
            continue
        keep.append(f)
    return sorted(keep, key=str)


def qualified_name(path: PurePosixPath) -> str:
    """Dotted module name of a .py path (``numpy/linalg/__init__.py`` -> ``numpy.linalg``)."""
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def docstrings(source: str, module: str) -> list[str]:
    """All module/class/function docstrings in source order, each prefixed by ``qualified.name:``."""
    out: list[str] = []

    def visit(node: ast.AST, name: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            out.append(f"{name}:\n{doc.strip()}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{name}.{child.name}")

    visit(ast.parse(source), module)
    return list(dict.fromkeys(out))  # drop repeats (e.g. overloads), keep order


def normalise(text: str) -> str:
    """Strip trailing spaces, expand tabs, keep paragraphs (at most one blank line)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").expandtabs(4).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def truncate(text: str, limit: int = MAX_DOC_CHARS) -> str:
    """Cut text to at most ``limit`` characters at a paragraph (else line) boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n\n")
    if cut < limit // 2:
        cut = head.rfind("\n")
    return head[: cut if cut > 0 else limit].rstrip()


def is_prose(text: str) -> bool:
    """Heuristic for .txt files: most lines contain spaces (not data or name lists), few are # comments
    (build files)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    spaced = sum(" " in line for line in lines)
    comments = sum(line.startswith("#") for line in lines)
    return bool(lines) and spaced >= 0.6 * len(lines) and comments <= 0.3 * len(lines)


def extract(dist: md.Distribution, path: PurePosixPath) -> str | None:
    """Text of one document (docstrings of a .py file or a prose file), or None to skip it."""
    try:
        raw = Path(dist.locate_file(path)).read_bytes().decode("utf-8")
    except (UnicodeDecodeError, FileNotFoundError):
        return None
    if path.suffix == ".py":
        try:
            text = "\n\n".join(docstrings(raw, qualified_name(path)))
        except (SyntaxError, ValueError):
            return None
    else:
        text = raw
        if path.suffix == ".txt" and not is_prose(text):
            return None
    text = normalise(text)
    return truncate(text) if len(text) >= MIN_DOC_CHARS else None


def select(docs: list[dict]) -> list[dict]:
    """Fill the provider budget in a fixed order (prose files, then sha256 of doc_id); return sorted by path.

    Hash order spreads the sample over the whole package instead of only its first
    (alphabetical) subpackages, while staying fully deterministic.
    """
    chosen, used = [], 0

    def order(d):
        return d["doc_id"].endswith(".py"), hashlib.sha256(d["doc_id"].encode()).hexdigest()

    for doc in sorted(docs, key=order):  # prose files (.md/.rst/.txt) first, then docstrings
        size = len(doc["text"].encode("utf-8"))
        if used + size <= MAX_PROVIDER_BYTES:
            chosen.append(doc)
            used += size
    return sorted(chosen, key=lambda d: d["doc_id"])


def build_provider(provider_id: str, spdx: str, seen_texts: set[str]) -> tuple[md.Distribution, list[dict]]:
    """Check the licence, extract all candidate documents, drop duplicates and select within budget."""
    dist = md.distribution(provider_id)
    check_license(dist, spdx)
    docs = []
    for path in candidate_files(dist):
        text = extract(dist, path)
        if text is None or text in seen_texts:
            continue
        seen_texts.add(text)
        docs.append(
            {
                "provider_id": provider_id,
                "doc_id": str(path),
                "text": text,
                "source_uri": f"pypi:{dist.metadata['Name']}=={dist.version}#{path}",
                "license": spdx,
            }
        )
    print(f"{provider_id}: {len(docs)} candidate documents, {sum(len(d['text']) for d in docs):,} chars")
    return dist, select(docs)


def write_provider(provider_id: str, dist: md.Distribution, docs: list[dict]) -> None:
    """Write the provider's JSONL file and its licence notice."""
    with open(OUT_DIR / f"{provider_id}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (OUT_DIR / "licenses" / f"{provider_id}.txt").write_text(license_text(dist), encoding="utf-8")


def write_providers_md(rows: list[tuple[str, str, str, int, int]]) -> None:
    """Write PROVIDERS.md: provenance paragraph plus one table row per provider."""
    lines = [
        "# Embedded default corpus - providers",
        "",
        "Generated by `data/build_embedded_corpus.py` (rebuild: `.venv/bin/python data/build_embedded_corpus.py`).",
        "",
        "Each provider is one permissively licensed Python package installed from its package registry.",
        "A document is the docstrings of one of the package's source files (extracted with `ast`,",
        "each prefixed by its qualified name) or one prose file (`.md`/`.rst`/`.txt`) shipped in the",
        "package; tests, vendored code and any subfolder carrying its own licence file are excluded.",
        "Documents are capped at 6,000 characters and providers at ~140 KB. Every provider's licence",
        "(BSD-3-Clause, MIT or Apache-2.0, checked against the installed metadata and licence file)",
        "permits redistribution of this text provided the copyright and licence notice is kept; the",
        "notices are reproduced verbatim in `licenses/<provider_id>.txt` (with NOTICE files where the",
        "package ships one). Package-level licence expressions that list further licences (numpy, torch)",
        "refer to bundled third-party native code, not to the Python docstrings used here.",
        "pyarrow is deliberately left smaller: most of its documentation lives in Cython sources,",
        "and only its pure-Python modules are used.",
        "",
        "| provider_id | package version | licence | documents | characters |",
        "|---|---|---|---:|---:|",
    ]
    lines += [f"| {p} | {v} | {lic} | {n} | {c:,} |" for p, v, lic, n, c in rows]
    lines += [f"| **total** | | | {sum(r[3] for r in rows)} | {sum(r[4] for r in rows):,} |", ""]
    (OUT_DIR / "PROVIDERS.md").write_text("\n".join(lines), encoding="utf-8")


def write_queries() -> None:
    """Write the valuation prompts (docstring-like openings spread across providers)."""
    with open(QUERIES_PATH, "w", encoding="utf-8", newline="\n") as fh:
        for i, prompt in enumerate(QUERIES):
            fh.write(json.dumps({"query_id": f"q{i:02d}", "prompt": prompt}) + "\n")


def main() -> None:
    """Rebuild every output from scratch."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    (OUT_DIR / "licenses").mkdir(parents=True)
    seen_texts: set[str] = set()
    rows = []
    for provider_id, spdx in sorted(PROVIDERS.items()):
        dist, docs = build_provider(provider_id, spdx, seen_texts)
        write_provider(provider_id, dist, docs)
        rows.append((provider_id, dist.version, spdx, len(docs), sum(len(d["text"]) for d in docs)))
        print(f"{provider_id:<14} {dist.version:<12} {spdx:<13} {len(docs):>4} docs {rows[-1][4]:>8,} chars")
    write_providers_md(rows)
    write_queries()
    print(f"total          {sum(r[3] for r in rows)} docs {sum(r[4] for r in rows):,} chars -> {OUT_DIR}")


if __name__ == "__main__":
    main()
