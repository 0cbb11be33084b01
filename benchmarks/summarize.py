"""Tables of recorded benchmark rows.

The rows of every recorded run are in ``benchmarks/results/<op>.jsonl`` (the history; a
bench writes there only with ``--record``). ``--markdown`` makes benchmarks/RESULTS.md from
them: one table per op and device, each row one size from the newest run that measured
it, with that run's machine, date and commit, and ratios only between rows of that run.

    python benchmarks/summarize.py --markdown --write    # regenerate benchmarks/RESULTS.md
    python benchmarks/summarize.py --markdown --check    # exit 1 when RESULTS.md is stale
    python benchmarks/summarize.py --device cuda --since 1764230400 token_logprobs ...
    python benchmarks/summarize.py --results gpu-out/results --device cuda token_logprobs

Without ``--markdown``: one compact line per op and size of the newest rows (the lambdapo
time, its bandwidth or matrix rate where recorded, every other implementation's time over
lambdapo's), as benchmarks/gpu_check.sh prints last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"

# Ops in the order of RESULTS.md (others follow alphabetically), their headings and targets
# (docs/design.md, "Performance targets").
OPS = {
    "token_logprobs": (
        "token_logprobs",
        "Target (bf16, N=16384, V=151936, H100/H200): fwd+bwd >= 88% of the measured copy "
        "rate over its 3 passes, >= 1.05x flash-attention's Triton cross-entropy, entropy "
        "within 3%, O(N) extra memory; on the CPU at least torch.compile."),
    "linear_token_logprobs": (
        "linear_token_logprobs",
        "Target (bf16, N=16384, H=4096, V=151936): peak extra <= the gradients + 0.5 GiB, "
        "<= 1.40x three bare matmuls, faster than Liger's fused linear cross-entropy and "
        "eager; a frozen weight costs no weight-gradient work or memory."),
    "linear_policy_loss": (
        "linear_policy_loss (the PPO-clip loss fused with the lm-head)",
        "Target (issue 40): CPU (fp32, N=4096, H=1024, V=32000, 2 threads) fwd+bwd <= 0.85x "
        "lambdapo's unfused path (linear_token_logprobs + the loss in torch), <= 1.05x eager, "
        "<= 0.70x Liger's LigerFusedLinearGRPOLoss, peak extra memory <= the unfused path's; "
        "CUDA (bf16, N=16384, H=4096, V=151936) <= 1.15x three bare matmuls, faster than "
        "Liger's best path, peak extra <= the gradients + 0.5 GiB."),
    "lambda_advantages": (
        "lambda_advantages",
        "Target: >= 1.5x torch.compile of the reference at every size from G=4 to G=4096 on "
        "CUDA, P=512, G=4096 <= 4 ms on H100/H200; on the CPU faster than torch.compile "
        "everywhere."),
    "semantic_density": (
        "semantic_density (ROUGE-N, ROUGE-L)",
        "Target (1024 pairs of 1024 tokens, CPU): ROUGE-1/2 >= 10x and ROUGE-L >= 2x "
        "rouge-score-rs (>= 100x rouge-score); on the GPU faster than the torch reference "
        "and >= 20x the CPU op."),
    "rollout": (
        "rollout (generation engines)",
        "No target: vLLM's generation against the transformers engine, in generated "
        "tokens/s, on one training step's batch."),
    "train_step": (
        "train_step (a training step, lambdapo vs TRL's GRPOTrainer)",
        "Target: a step of the built-in setting at most TRL GRPOTrainer's (issue 36 keeps "
        "it <= 0.65x; issue 19 aimed at 0.5x), the middle part <= 0.1 s. At Qwen2.5-0.5B's "
        "shape (random init, 4 prompts x 4 samples x 64 new tokens on the CPU), full "
        "fine-tuning and LoRA: step time and peak resident memory at most TRL's (issue 39). "
        "At Qwen3-4B's shape (bf16, LoRA rank 16, gradient checkpointing, the reference as "
        "the base with the adapter off, 2 x 4 x 32, lambdapo only): peak resident memory "
        "within 20 GiB (on a CPU without bf16 matrix units measured with float32 weights, "
        "which bounds it: see the note). Peak RSS: the peak resident set of the process that ran the case, "
        "model loading included (reward worker processes not in it)."),
}
# The implementation the others are compared with (the row's own op), by op.
SUBJECT = {"rollout": "transformers"}
# Extras of the subject's rows shown as columns when recorded: key -> heading.
EXTRA_COLUMNS = {"GB/s": "GB/s", "roofline": "of HBM peak", "TFLOP/s": "TFLOP/s",
                 "over_grads_MiB": "MiB over grads", "tokens_per_s": "tokens/s"}
# Context a number needs, shown under a table while it shows a row of one of the commits
# ("-dirty" ignored): (op or None for every op, device or None, commits, text).
NOTES = [
    (None, "cpu", ("ea35fba", "3e7f0cb", "48b3452"),
     "Rows of 2026-11-27 on the CPU ran the kernels on one thread: the extension was built "
     "without OpenMP until cec648a (2026-11-28)."),
    (None, "cuda", ("e023b5d", "2ceb015"),
     "The CUDA rows (2026-11-27) predate the CUDA kernel changes of issues 16-18, unmeasured "
     "since, and were timed by wall clock with a device sync: sub-ms rows read a little high."),
    ("lambda_advantages", "cpu", ("ea35fba",),
     "The CPU kernel has changed since these rows (issue 17: lane-major groups)."),
    ("linear_policy_loss", "cpu", ("ae2c6c9",),
     "Recorded at a load average of 0.1 rising to 1.9 (other jobs on the 2 vCPUs), each "
     "implementation in turn. An interleaved run the same hour (docs/ops.md: every "
     "implementation under the same load) gave 0.78x the unfused path's time, 1.01x "
     "eager's and 0.59x Liger's."),
    ("linear_token_logprobs", "cpu", ("02791ef",),
     "The 2026-11-28 rows were measured on a loaded machine (load average 8-12 on 2 vCPUs): "
     "compare within a row only."),
    ("semantic_density", "cpu", ("a730ef0",),
     "rouge-score-rs's time leaves out its tokenization of the same text (tokenize_ms in the "
     "rows, about 300 ms); rouge-score's ROUGE-L is timed on 16 pairs and scaled."),
    ("train_step", "cpu", ("a730ef0",),
     "Measured with the rms_norm, swiglu and decode_attention kernels and FusedLayer in the "
     "step (issue 36 removed them); the machine's speed drifted by up to 25% that session."),
    ("train_step", "cpu", ("e6c893f",),
     "Qwen3-4B's shape ran with float32 weights (dtype=float32): this CPU (AVX2, no bf16 "
     "matrix units) multiplies bf16 in a linear layer's input-gradient layout at 0.3-0.5 "
     "GFLOP/s, so the bf16 step would take hours. The 17.75 GiB peak holds the 14.98 GiB "
     "of float32 weights (4.02e9 parameters, file-backed); with bf16 weights they are 7.49 "
     "GiB and every other model-dtype buffer halves too, so by arithmetic (not measured) the "
     "bf16 case stays under 17.75 - 7.49 = 10.3 GiB (the fp32 LoRA adapter and its AdamW "
     "state, about 0.5 GiB, are the same in both)."),
    ("train_step", "cpu", ("a7da6e7",),
     "The Qwen2.5-0.5B rows of commit a7da6e7 (measured with the working tree of 6fa188b: "
     "the same step in one process) are one warm-up and one timed step per trainer, "
     "alternated, at a load average of 1-1.8 (another job's tests on the second core part of "
     "the time). Against the 2026-12-07 rows (no warm-up step, load about 6), the step and "
     "its memory are those of a run past its first optimizer step: AdamW's state exists."),
    ("train_step", "cpu", ("ca1dc4c",),
     "The Qwen2.5-0.5B rows of 2026-12-07 are one step per trainer (no warm-up step, so the "
     "first optimizer step's state allocation is in it), measured while other work kept the "
     "load average at about 6 on the 2 cores: their step times carry more than the usual "
     "noise (each row's cpu_s, its process's CPU time a step, is in the history)."),
]
DEVICES = ("cuda", "cpu")
WIDTH = 100   # of the prose lines
HEADER = """\
# Benchmark results

Generated by `python benchmarks/summarize.py --markdown --write` from the rows in
`benchmarks/results/<op>.jsonl`, the history of every recorded run (device, torch version,
commit, date, and more per row than these tables show). Do not edit by hand:
`tests/ops/test_benchmarks.py` checks that this file is what the script makes of the rows. A
bench adds its rows to the history only when asked (`python benchmarks/bench_<op>.py
--record`); `benchmarks/gpu_check.sh` records its GPU rows.

One table per op and device. A row is one size from the newest recorded run that measured it,
with that run's machine (CPU model and torch threads, or GPU card), date and commit. `ms` is
the median time of the row's own op, `peak MiB` its peak memory beyond the inputs; a column
named after another implementation is that one's median time over the row's own, from the
same run (> 1: lambdapo is faster); `-`: not run, with the reason under the table. Targets
are docs/design.md's [performance targets](../docs/design.md#performance-targets). Timings on
these machines move 10-25% from run to run and from machine to machine.
"""


# ------------------------------------------------------------------------------ rows
def load_rows(folder: Path = RESULTS_DIR) -> dict[str, list[dict]]:
    """op -> its rows in file order, for every ``<op>.jsonl`` in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[path.stem] = rows
    return out


def _epoch(date: str) -> float:
    return datetime.datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def _run(row: dict) -> tuple[str, str]:
    """A run: the rows one bench invocation appended for one device share date and
    commit."""
    return row["date"], row["commit"]


def current_rows(rows: list[dict], device: str, subject: str
                 ) -> list[tuple[str, dict[str, dict]]]:
    """(size, impl -> row) for each size of ``device``, from the newest run with a row of
    ``subject`` at that size; newest runs first, sizes in their run's order."""
    runs: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
    for row in rows:
        if row["device"] == device:
            runs.setdefault(_run(row), {})[(row["size"], row["impl"])] = row
    newest: dict[str, tuple[str, str]] = {}
    for key in sorted(runs, key=lambda k: k[0]):   # stable: later lines win a tie
        for size, impl in runs[key]:
            if impl == subject:
                newest[size] = key
    out = []
    for key in sorted(set(newest.values()), key=lambda k: k[0], reverse=True):
        sizes = dict.fromkeys(size for size, _ in runs[key] if newest.get(size) == key)
        for size in sizes:
            out.append((size, {impl: row for (s, impl), row in runs[key].items() if s == size}))
    return out


def _measured(row: dict | None) -> bool:
    return bool(row and row.get("status") == "ok" and row.get("median_ms"))


def _ratio(row: dict | None, base: dict | None) -> float | None:
    if not (_measured(row) and _measured(base)):
        return None
    return row["median_ms"] / base["median_ms"]


# ------------------------------------------------------------------------------ markdown
def machine(name: str) -> str:
    """A device name as a table shows it: ``Intel(R) Xeon(R) Processor (2 threads)`` ->
    ``Intel Xeon (2 threads)``."""
    name = re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", name)
    name = re.sub(r"\(1 threads\)", "(1 thread)", name)
    return re.sub(r"\s+", " ", name).strip()


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return (f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 0.01
            else f"{value:.2g}")


def _mib(value: float | None) -> str:
    if value is None:
        return "-"
    return "~0" if value < 0.1 else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _times(value: float) -> str:
    return (f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10
            else f"{value:.2f}x")


def _extra(key: str, value: object) -> str:
    if key == "roofline" and isinstance(value, (int, float)):
        return f"{100 * value:.0f}%"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _prose(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH) + [""]


def _table(head: list[str], right: set[int], body: list[list[str]]) -> list[str]:
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(head))) + "|"
    return ["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(r) + " |" for r in body]


def _where(row: dict) -> list[str]:
    return [machine(row.get("device_name", "")), row["date"][:10], f"`{row['commit']}`"]


def op_table(op: str, device: str, rows: list[dict]) -> list[str]:
    """The markdown table of ``op`` on ``device`` with its notes, or [] with no rows."""
    if op == "train_step":
        return train_step_table(device, rows)
    subject = SUBJECT.get(op, "lambdapo")
    current = current_rows(rows, device, subject)
    if not current:
        return []
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows if r["device"] == device)
             if i != subject and any(_ratio(by.get(i), by[subject]) for _, by in current)]
    extras = [k for k in EXTRA_COLUMNS
              if any(k in by[subject].get("extra", {}) for _, by in current)]
    head = (["size", f"{subject} ms", "peak MiB"] + [EXTRA_COLUMNS[k] for k in extras]
            + impls + ["machine", "date", "commit"])
    body, not_run = [], {}
    for size, by in current:
        ours = by[subject]
        cells = [size.replace(",", ", "),
                 _ms(ours.get("median_ms")) if _measured(ours) else ours.get("status", "-"),
                 _mib(ours.get("peak_mib"))]
        cells += [_extra(k, ours["extra"][k]) if k in ours.get("extra", {}) else ""
                  for k in extras]
        for impl in impls:
            other = by.get(impl)
            value = _ratio(other, ours)
            if value is not None:
                cells.append(_times(value))
            elif other is None:
                cells.append("")
            else:
                cells.append("-")
                if _measured(ours):
                    reason = other.get("status", "").removeprefix("not run: ")
                    not_run.setdefault(reason, {}).setdefault(impl, []).append(size)
        body.append(cells + _where(ours))
    lines = _table(head, set(range(1, len(head) - 3)), body) + [""]
    if not_run:
        parts = []
        for reason, by_impl in not_run.items():
            sizes = dict.fromkeys(s for impl_sizes in by_impl.values() for s in impl_sizes)
            where = (f"at {'; '.join(s.replace(',', ', ') for s in sizes)}" if len(sizes) <= 2
                     else f"at {len(sizes)} sizes")
            parts.append(f"{' and '.join(by_impl)} {where}: {reason}")
        lines += _prose(f"`-`: not run ({'; '.join(parts)}).")
    return lines + _notes(op, device, [by[subject] for _, by in current])


def train_step_table(device: str, rows: list[dict]) -> list[str]:
    """lambdapo's step against TRL's, with the parts of the step, per setting."""
    current = current_rows(rows, device, "lambdapo")
    if not current:
        return []
    head = ["setting", "lambdapo s", "TRL s", "lambdapo / TRL", "gen s (ours / TRL)",
            "middle s (ours / TRL)", "train s (ours / TRL)", "peak RSS GiB (ours / TRL)",
            "peak / TRL", "machine", "date", "commit"]
    body = []
    for size, by in current:
        ours, trl = by["lambdapo"], by.get("trl")
        a, b = ours.get("extra", {}), (trl or {}).get("extra", {})

        def pair(key: str) -> str:
            return " / ".join(f"{e[key]:.3f}" if key in e else "-" for e in (a, b))
        ratio = 1 / r if (r := _ratio(trl, ours)) else None
        peaks = [e.get("peak_rss_mib") for e in (a, b)]
        peak = (" / ".join("-" if p is None else f"{p / 1024:.2f}" for p in peaks)
                if peaks[0] is not None else "")
        peak_ratio = _times(peaks[0] / peaks[1]) if all(peaks) else ("-" if peak else "")
        body.append([size.replace(",", ", "),
                     f"{a['step_s']:.3f}" if "step_s" in a else ours.get("status", "-"),
                     f"{b['step_s']:.3f}" if "step_s" in b else (trl or {}).get("status", "-"),
                     _times(ratio) if ratio else "-", pair("gen_s"), pair("middle_s"),
                     pair("train_s"), peak, peak_ratio] + _where(ours))
    lines = _table(head, {1, 2, 3, 4, 5, 6, 7, 8}, body) + [""]
    return lines + _notes("train_step", device, [by["lambdapo"] for _, by in current])


def _notes(op: str, device: str, shown: list[dict]) -> list[str]:
    commits = {r["commit"].removesuffix("-dirty") for r in shown}
    return [line for o, d, cs, text in NOTES
            if o in (None, op) and d in (None, device) and commits & set(cs)
            for line in _prose(text)]


def markdown(folder: Path = RESULTS_DIR) -> str:
    """benchmarks/RESULTS.md: a short header, then one table per op and device."""
    data = load_rows(folder)
    lines = HEADER.splitlines() + [""]
    ops = [op for op in OPS if op in data] + sorted(op for op in data if op not in OPS)
    for op in ops:
        title, target = OPS.get(op, (op, ""))
        sections = [(device, op_table(op, device, data[op])) for device in DEVICES]
        sections = [(device, table) for device, table in sections if table]
        if not sections:
            continue
        lines += [f"## {title}", ""]
        if target:
            lines += _prose(target)
        for device, table in sections:
            lines += [f"### {'CUDA' if device == 'cuda' else 'CPU'}", ""] + table
    while lines[-1] == "":
        lines.pop()
    return "\n".join(line.rstrip() for line in lines) + "\n"


# ------------------------------------------------------------------------------ compact lines
def latest_rows(op: str, device: str, since: float, folder: Path = RESULTS_DIR
                ) -> dict[tuple[str, str], dict]:
    """(size, impl) -> the newest row of ``op`` on ``device`` dated at or after ``since``."""
    rows = {}
    for row in load_rows(folder).get(op, []):
        if row["device"] == device and _epoch(row["date"]) >= since - 1:
            rows[(row["size"], row["impl"])] = row
    return rows


# Short implementation names of the compact lines.
SHORT = {"torch_eager": "eager", "torch_compile": "compile", "torch_reference": "ref",
         "flash_attn_triton": "flash", "liger_kernel": "liger", "liger_fused_linear": "liger",
         "cut_cross_entropy": "cce", "bare_matmuls": "bare", "rouge_score": "rouge",
         "rouge_score_rs": "rouge_rs", "lambdapo_validated": "validated",
         "lambdapo_1_thread": "1_thread", "lambdapo_cpu": "cpu_op"}
LINE_WIDTH = 120


def summarize(op: str, device: str, since: float, folder: Path = RESULTS_DIR) -> list[str]:
    """A heading, then one line (at most 120 characters) per size of the newest rows:
    lambdapo's time, its GB/s and roofline fraction or TFLOP/s, every other
    implementation's time over lambdapo's."""
    rows = latest_rows(op, device, since, folder)
    lines = [f"{op} on {device}: lambdapo's time, others' time over it"] if rows else []
    width = max((len(_short_size(s)) for s, _ in rows), default=0)
    for size in dict.fromkeys(s for s, _ in rows):
        ours = rows.get((size, "lambdapo"))
        if ours is None:
            continue
        cells, others = [], []
        if not _measured(ours):
            cells.append(ours["status"][:40])
        else:
            cells.append(f"{_ms(ours['median_ms'])} ms")
            extra = ours.get("extra", {})
            for key in ("GB/s", "roofline", "TFLOP/s"):
                if key in extra:
                    cells.append(_extra(key, extra[key]) + ("" if key == "roofline" else f" {key}"))
        for (s, impl), row in rows.items():
            if s != size or impl == "lambdapo":
                continue
            name = SHORT.get(impl, impl)
            if (value := _ratio(row, ours)) is not None:
                others.append(f"{name} {_times(value)}")
            elif row["status"] != "ok" and not re.search(r"CUDA only|CPU only", row["status"]):
                others.append(f"{name} -")
        line = "  ".join([f"  {_short_size(size):<{width}}", *cells, " ".join(others)])
        lines.append(line if len(line) <= LINE_WIDTH else line[:LINE_WIDTH - 1] + "~")
    return lines


def _short_size(size: str) -> str:
    for long, short in (("bfloat16", "bf16"), ("float32", "fp32"), ("float16", "fp16")):
        size = size.replace(long, short)
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="*", help="ops of the compact lines")
    parser.add_argument("--markdown", action="store_true",
                        help="print benchmarks/RESULTS.md as the rows make it")
    parser.add_argument("--write", action="store_true", help="with --markdown: write it")
    parser.add_argument("--check", action="store_true",
                        help="with --markdown: exit 1 when RESULTS.md differs")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, metavar="DIR",
                        help="the folder of <op>.jsonl files (default benchmarks/results)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--since", type=float, default=0.0, help="epoch seconds")
    args = parser.parse_args()
    if args.markdown:
        text = markdown(args.results)
        if args.check:
            if RESULTS_MD.read_text() != text:
                print("benchmarks/RESULTS.md differs from the rows: run "
                      "python benchmarks/summarize.py --markdown --write", file=sys.stderr)
                return 1
        elif args.write:
            RESULTS_MD.write_text(text)
            print(f"wrote {RESULTS_MD}")
        else:
            sys.stdout.write(text)
        return 0
    if not args.ops:
        parser.error("name the ops, or use --markdown")
    for op in args.ops:
        for line in summarize(op, args.device, args.since, args.results):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
