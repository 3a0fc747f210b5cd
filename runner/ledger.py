"""The run's ledger: `experiments.jsonl` (every record, append-only, flushed and synced per
line) and `results.tsv` (the classic five columns, for people and notebooks).

The JSON lines are the truth. `results.tsv` is rewritten from them after every record (write,
then rename), so the two never disagree. A line cut short by a crash (`kill -9` in the middle
of a write) has no newline; it is dropped on load and the file is truncated back to the last
whole record, so the next append starts clean and no record is ever duplicated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")


def tsv_line(record: dict[str, Any]) -> str:
    bpb = record.get("val_bpb")
    mem = record.get("memory_gb")
    cells = [
        (record.get("commit") or "-")[:7],
        f"{bpb:.6f}" if isinstance(bpb, (int, float)) else "-",
        f"{mem:.1f}" if isinstance(mem, (int, float)) else "-",
        record.get("status", "-"),
        " ".join(str(record.get("description", "")).split()).replace("\t", " ") or "-",
    ]
    return "\t".join(cells)


@dataclass
class Ledger:
    folder: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def jsonl(self) -> Path:
        return self.folder / "experiments.jsonl"

    @property
    def tsv(self) -> Path:
        return self.folder / "results.tsv"

    @classmethod
    def open(cls, folder: Path) -> "Ledger":
        """Load the ledger in `folder` (created if missing), repairing a torn last line."""
        folder.mkdir(parents=True, exist_ok=True)
        ledger = cls(folder)
        path = ledger.jsonl
        if path.exists():
            raw = path.read_bytes()
            whole = raw[: raw.rfind(b"\n") + 1]
            if len(whole) != len(raw):                  # torn write: drop the partial line
                with open(path, "r+b") as f:
                    f.truncate(len(whole))
                    f.flush()
                    os.fsync(f.fileno())
            for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        ledger.records.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path}:{n} is not a JSON record ({e}); the ledger is "
                                         "damaged: fix or move that line") from None
        ledger.write_tsv()
        return ledger

    def append(self, record: dict[str, Any]) -> None:
        """Append one record: written, flushed and fsynced before this returns."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.write_tsv()

    def write_tsv(self) -> None:
        tmp = self.tsv.with_name(self.tsv.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\t".join(TSV_COLUMNS) + "\n")
            for record in self.records:
                f.write(tsv_line(record) + "\n")
        os.replace(tmp, self.tsv)

    # ---- questions the loop asks ----

    def numbers(self) -> set[int]:
        return {int(r["number"]) for r in self.records if "number" in r}

    def next_number(self) -> int:
        return max(self.numbers(), default=-1) + 1

    def kept(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") == "keep"]

    def best(self) -> dict[str, Any] | None:
        """The record the branch stands on: the last kept one (each keep beat the one before)."""
        kept = self.kept()
        return kept[-1] if kept else None

    def total_cost(self) -> float:
        return sum(float((r.get("llm") or {}).get("cost_usd") or 0.0) for r in self.records)
