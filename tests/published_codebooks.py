"""The published BOF4 codebooks (paper Table 6, block size 64), from ``data/bof4_table6.json``
(one copy of the table, also read by ``benches/bench_opq.py``)."""

from __future__ import annotations

import json
from pathlib import Path

#: The table's file.
TABLE6_PATH = Path(__file__).resolve().parent / "data" / "bof4_table6.json"

#: ``{(metric, normalization): 16 ascending levels}``, in the table's column order.
TABLE6: dict[tuple[str, str], list[float]] = {
    (entry["metric"], entry["normalization"]): entry["levels"]
    for entry in json.loads(TABLE6_PATH.read_text())["codebooks"]
}
