"""What every evaluation writes: per-sample JSONL, aggregate JSON, a Markdown and a CSV table, and a manifest.

A table is a list of rows (dicts with the same keys). The Markdown table always carries the protocol line
under it, so a number never travels without the settings that produced it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from comat.core.io import atomic_write_json, atomic_write_text
from comat.core.runtime import environment

Row = dict[str, Any]


def format_value(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(r.get(c), digits).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def protocol_line(protocol: dict[str, Any]) -> str:
    return "Protocol: " + "; ".join(f"{k}={v}" for k, v in protocol.items() if v is not None and v != "")


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_run(out: Path, name: str, *, records: Sequence[dict], aggregate: dict, rows: Sequence[Row],
              manifest: dict, title: str | None = None, notes: Sequence[str] = (), csv_rows: Sequence[Row] | None = None) -> dict[str, Path]:
    """Write ``<name>.samples.jsonl`` (only when there are per-sample ``records``), ``<name>.json``, ``<name>.md``,
    ``<name>.csv`` (``csv_rows`` when the Markdown rows hold formatted text) and the manifest into ``out``; the
    manifest gains the package versions."""
    out = Path(out)
    manifest = {**manifest, "environment": manifest.get("environment") or environment()}
    protocol = manifest.get("protocol", {})
    md = [f"# {title or name}", "", markdown_table(rows), protocol_line(protocol), ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["Manifest: [manifest.json](manifest.json)", ""]
    csv_rows = rows if csv_rows is None else csv_rows
    files = {"samples": write_jsonl(out / f"{name}.samples.jsonl", records)} if records else {}
    return {
        **files,
        "aggregate": atomic_write_json(out / f"{name}.json", {**aggregate, "protocol": protocol}),
        "markdown": atomic_write_text(out / f"{name}.md", "\n".join(md)),
        "csv": atomic_write_text(out / f"{name}.csv", csv_table(csv_rows)),
        "manifest": atomic_write_json(out / "manifest.json", manifest),
    }
