"""The paper's numbers (paper_values.yaml), looked up by table, row and domain.

The values file ships inside the package (it is data of the code, like a constant table), so the
report depends on it through hrkd/report/ in dvc.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hrkd.errors import HRKDError

VALUES_FILE = "paper_values.yaml"


@dataclass(frozen=True)
class PaperTable:
    """One results table of the paper restricted to the domains we ran (others are not comparable)."""

    rows: dict[str, dict[str, float]]
    stds: dict[str, dict[str, float]]
    domains: list[str]

    def row(self, key: str) -> dict[str, float]:
        values = self.rows.get(key, {})
        out = {d: float(values[d]) for d in self.domains if values.get(d) is not None}
        # The paper's average is over all of its domains: only comparable when we ran all of them.
        if values.get("average") is not None and set(self.domains) == {k for k in values if k != "average"}:
            out["average"] = float(values["average"])
        return out

    def std_text(self) -> str:
        parts = []
        for key, values in self.stds.items():
            parts.append(f"`{key}` " + "/".join(f"{float(values[d]):.2f}" for d in self.domains if d in values))
        return "; ".join(parts)


class PaperValues:
    def __init__(self, data: dict[str, Any]) -> None:
        if not isinstance(data, dict) or "table2" not in data:
            raise HRKDError(f"{VALUES_FILE} is not the paper-values file; restore hrkd/report/{VALUES_FILE} from git")
        self.data = data

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PaperValues":
        if path is None:
            text = resources.files("hrkd.report").joinpath(VALUES_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        return cls(yaml.safe_load(text))

    def results(self, table: str, domains: list[str]) -> PaperTable | None:
        """Table 2, 3 or 4, or None when none of our domains is in it (e.g. a custom task)."""
        block = self.data.get(table) or {}
        rows = block.get("rows", {})
        known = {d for values in rows.values() for d in values}
        if not any(d in known for d in domains):
            return None
        return PaperTable(rows, block.get("std", {}), list(domains))

    def table1(self, kind: str) -> dict[str, dict[str, int]]:
        return (self.data.get("table1") or {}).get(kind, {})

    def figure2(self, kind: str, rate: float) -> dict[str, float]:
        block = self.data.get("figure2") or {}
        if block.get("task") != kind:
            return {}
        return {run: float(v[rate]) for run, v in block.items() if isinstance(v, dict) and rate in v}

    def significance(self, kind: str) -> str:
        return str((self.data.get("significance") or {}).get(kind, ""))

    def case_study(self) -> dict[str, list[dict[str, Any]]]:
        return self.data.get("case_study") or {}
