"""The run's ledger: `experiments.jsonl` (every record, append-only, flushed and synced per
line) and `results.tsv` (the classic five columns, for people and notebooks).

The JSON lines are the truth. `results.tsv` is rewritten from them after every record (write,
then rename), so the two never disagree. Loading goes through `runner.record.read` with
repair: a line cut short by a crash (`kill -9` in the middle of a write) is dropped and the
file truncated back to the last whole record, so the next append starts clean and no record
is ever duplicated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runner import record
from runner.record import KEEP, Record

TSV_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")


def tsv_line(rec: Record) -> str:
    bpb = rec.get("val_bpb")
    mem = rec.get("memory_gb")
    cells = [
        (rec.get("commit") or "-")[:7],
        f"{bpb:.6f}" if isinstance(bpb, (int, float)) else "-",
        f"{mem:.1f}" if isinstance(mem, (int, float)) else "-",
        rec.get("status", "-"),
        " ".join(str(rec.get("description", "")).split()).replace("\t", " ") or "-",
    ]
    return "\t".join(cells)


@dataclass
class Ledger:
    folder: Path
    records: list[Record] = field(default_factory=list)

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
        ledger.records = record.read(ledger.jsonl, repair=True)
        ledger.write_tsv()
        return ledger

    def append(self, rec: Record) -> None:
        """Append one record: written, flushed and fsynced before this returns."""
        line = json.dumps(rec, sort_keys=True) + "\n"
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        self.write_tsv()

    def write_tsv(self) -> None:
        tmp = self.tsv.with_name(self.tsv.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\t".join(TSV_COLUMNS) + "\n")
            for rec in self.records:
                f.write(tsv_line(rec) + "\n")
        os.replace(tmp, self.tsv)

    # ---- questions the loop asks ----

    def numbers(self) -> set[int]:
        return {int(r["number"]) for r in self.records if "number" in r}

    def next_number(self) -> int:
        return max(self.numbers(), default=-1) + 1

    def kept(self) -> list[Record]:
        return [r for r in self.records if r.get("status") == KEEP]

    def best(self) -> Record | None:
        """The record the branch stands on: the last kept one (each keep beat the one before)."""
        kept = self.kept()
        return kept[-1] if kept else None

    def best_bpb(self) -> float:
        """val_bpb of the best record (a kept record was always scored)."""
        best = self.best()
        value = best.get("val_bpb") if best else None
        if value is None:
            raise LookupError(f"{self.jsonl} has no kept experiment yet")
        return float(value)

    def total_cost(self) -> float:
        return sum(float((r.get("llm") or {}).get("cost_usd") or 0.0) for r in self.records)
