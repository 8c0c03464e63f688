"""The JSON Lines manifest of a removal run: one record per input, written as each input finishes.

Generic on purpose: the plain CLI and the Ray job write the same records, so a manifest tells
what happened to every input whichever front end ran it."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ManifestRecord:
    input: str
    outputs: list[str] = field(default_factory=list)  # written (or already there and kept)
    model: str | None = None
    width: int | None = None
    height: int | None = None
    seconds: float = 0.0
    error: str | None = None
    skipped: bool = False  # every output existed already and was kept (no --overwrite)
    confidence: float | None = None  # the answering model's (rmbg_demo.confidence)
    review: bool = False  # under --review-below: its outputs went to OUT/review/
    escalated_from: str | None = None  # --escalate-to: the first model, whose score was under the threshold
    first_confidence: float | None = None  # that first model's score

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        record = asdict(self)
        record["seconds"] = round(float(self.seconds), 4)
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> ManifestRecord:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


class ManifestWriter:
    """Appends one JSON line per record and flushes it, so a crash loses at most the line being written.

    Thread-safe; usable as a context manager. Opened in append mode: a resumed run adds its
    lines after the previous run's, and `read_manifest` keeps the last line per input."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self.count = 0
        self.failed = 0

    def write(self, record: ManifestRecord) -> None:
        line = record.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.count += 1
            self.failed += 0 if record.ok else 1

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(path, *, latest: bool = True) -> list[ManifestRecord]:
    """The records of a manifest; with `latest`, only the last record of each input (a rerun's).

    A torn last line (the writer killed mid-line) is ignored rather than failing the read."""
    records: list[ManifestRecord] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(ManifestRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    if not latest:
        return records
    last = {record.input: record for record in records}
    return list(last.values())
