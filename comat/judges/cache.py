"""Judge outputs cached per (judge id and version, image sha256, question), so re-scoring costs nothing.

SQLite (standard library) because several benchmark runs may share one cache and it locks safely.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence

from comat.core.runtime import cache_dir

Item = tuple[str, str]  # (image sha256, question)


class JudgeCache:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "judges.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (judge TEXT, image TEXT, question TEXT, value TEXT, "
                         "PRIMARY KEY (judge, image, question))")
        self._db.commit()
        self.computed = 0

    def lookup(self, judge: str, items: Sequence[Item]) -> dict[Item, Any]:
        found = {}
        for image, question in set(items):
            row = self._db.execute("SELECT value FROM answers WHERE judge=? AND image=? AND question=?",
                                   (judge, image, question)).fetchone()
            if row is not None:
                found[(image, question)] = json.loads(row[0])
        return found

    def get_or_compute(self, judge: str, items: Sequence[Item], compute: Callable[[list[Item]], list[Any]]) -> list[Any]:
        """Values for ``items`` in order; ``compute`` gets only the distinct items not yet cached."""
        known = self.lookup(judge, items)
        todo = list(dict.fromkeys(i for i in items if i not in known))
        if todo:
            values = compute(todo)
            if len(values) != len(todo):
                raise RuntimeError(f"judge {judge} returned {len(values)} values for {len(todo)} items")
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                                     [(judge, im, q, json.dumps(v)) for (im, q), v in zip(todo, values)])
            known.update(zip(todo, values))
            self.computed += len(todo)
        return [known[i] for i in items]
