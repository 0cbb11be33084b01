"""A compact table of recorded benchmark rows: per op and size, the lambdapo time, its
bandwidth or matrix rate where recorded, and every other implementation's time divided by
lambdapo's (> 1: lambdapo is faster).

    python benchmarks/summarize.py --device cuda --since 1764230400 token_logprobs ...
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def latest_rows(op: str, device: str, since: float) -> dict[tuple[str, str], dict]:
    """(size, impl) -> the newest row of ``op`` on ``device`` dated at or after ``since``."""
    rows = {}
    path = RESULTS_DIR / f"{op}.jsonl"
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        row = json.loads(line)
        date = datetime.datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc).timestamp()
        if row["device"] == device and date >= since - 1:
            rows[(row["size"], row["impl"])] = row
    return rows


def summarize(op: str, device: str, since: float) -> list[str]:
    rows = latest_rows(op, device, since)
    lines = []
    for size in dict.fromkeys(s for s, _ in rows):
        ours = rows.get((size, "lambdapo"))
        if ours is None:
            continue
        cells = []
        if ours["median_ms"] is None:
            cells.append(ours["status"][:40])
        else:
            cells.append(f"{ours['median_ms']:.3f} ms")
            extra = ours.get("extra", {})
            for key in ("GB/s", "roofline", "TFLOP/s"):
                if key in extra:
                    cells.append(f"{key}={extra[key]}")
        for (s, impl), row in rows.items():
            if s != size or impl == "lambdapo":
                continue
            if row["median_ms"] and ours["median_ms"]:
                cells.append(f"{impl} {row['median_ms'] / ours['median_ms']:.2f}x")
            elif row["status"] != "ok" and not row["status"].startswith("not run: CUDA only"):
                cells.append(f"{impl}: {row['status'][:30]}")
        lines.append(f"{op[:14]:<14} {size:<36} " + "  ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="+")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--since", type=float, default=0.0, help="epoch seconds")
    args = parser.parse_args()
    for op in args.ops:
        for line in summarize(op, args.device, args.since):
            print(line)


if __name__ == "__main__":
    main()
