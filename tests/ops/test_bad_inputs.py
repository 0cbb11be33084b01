"""Every bad-input class of every public op, each case in a process of its own (issue 13).

A case passes when the op raises an exception that names the offending argument (or, for a
valid edge case or a strided input, returns the right result), the process survives, and on
CUDA a small valid call afterwards still works. The cases are listed per op family in
tests/ops/bad_inputs_{advantages,logprobs,overlap,policy_loss}.py; tests/ops/bad_input_runner.py judges
them and holds the forking server that runs them.

As a script (for benchmarks/gpu_check.sh on a GPU machine), prints a table of case -> verdict
and exits non-zero on any failure; --device all (the default) runs the CPU cases, and the CUDA
ones when a GPU is visible:

    python tests/ops/test_bad_inputs.py [--device cpu|cuda|all] [--jobs 4] [-k token_logprobs/]
    python tests/ops/test_bad_inputs.py --case token_logprobs/range/target_ge_vocab --device cpu
        runs one case in this process on each device and prints its verdict (no isolation:
        for debugging)
    python tests/ops/test_bad_inputs.py --serve
        the case server that bad_input_runner.CaseServer starts (bad_input_runner.serve)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bad_input_runner as runner  # noqa: E402
import bad_inputs_advantages  # noqa: E402
import bad_inputs_logprobs  # noqa: E402
import bad_inputs_overlap  # noqa: E402
import bad_inputs_policy_loss  # noqa: E402

import lambdapo_ext  # noqa: E402
from lambdapo_ext._loader import has_kernel  # noqa: E402

FAMILIES = (bad_inputs_advantages, bad_inputs_logprobs, bad_inputs_overlap,
            bad_inputs_policy_loss)
CASES: list[runner.Case] = [case for family in FAMILIES for case in family.CASES]
DISPATCH_OPS = {op: ops for family in FAMILIES for op, ops in family.DISPATCH_OPS.items()}
SMOKE_CALLS = {op: call for family in FAMILIES for op, call in family.SMOKE_CALLS.items()}
CASES_BY_ID = {case.id: case for case in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"
CASES_BY_ID.update((case.id, case) for _, case in runner.SELFTEST_CASES)

PUBLIC_OPS = sorted(name for name in lambdapo_ext.__all__
                    if name not in ("__version__", "build_info", "library_error"))
CLASSES = ("shape", "dtype", "device", "range", "nonfinite", "empty", "scalar", "memory")
# Per issue 13: the classes that killed the process (SIGSEGV) on the H200 machine, and the one
# that raised ZeroDivisionError on the project machine.
ISSUE_13_CASES = (
    "token_logprobs/range/target_ge_vocab",
    "token_logprobs/range/negative_target_not_ignore_index",
    "token_logprobs/shape/targets_not_leading_shape",
    "token_logprobs/scalar/temperature_zero",
    "linear_token_logprobs/range/target_ge_vocab",
    "linear_token_logprobs/shape/hidden_size_differs_from_weight",
    "lambda_advantages/shape/mask_shape_differs",
    "ngram_overlap/range/ref_index_out_of_range",
    "rouge_n/range/ref_index_out_of_range",
    "linear_token_logprobs/empty/vocab_zero",
)


def backend_present(op: str, device: str) -> bool:
    """CPU always; CUDA with a GPU and a CUDA kernel of every dispatcher op behind ``op``."""
    return device == "cpu" or (torch.cuda.is_available()
                               and all(has_kernel(d, "CUDA") for d in DISPATCH_OPS[op]))


def judge_case(case_id: str, device: str) -> dict[str, str]:
    """The verdict of one case on one device, judged in this process."""
    case = CASES_BY_ID[case_id]
    return runner.judge(case, device, SMOKE_CALLS.get(case.op))


def _params():
    for case in CASES:
        for device in case.devices:
            marks = () if device == "cpu" else pytest.mark.skipif(
                not backend_present(case.op, device),
                reason=f"needs a GPU and the CUDA kernels of {case.op}")
            yield pytest.param(case.id, device, id=f"{case.id}-{device}", marks=marks)


JOBS = min(4, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def case_server():
    with runner.CaseServer(__file__) as server:
        yield server


@pytest.fixture(scope="module")
def selected_verdicts(request, case_server):
    """Verdicts of every selected case of this module, run ``JOBS`` at a time in one batch."""
    requests = []
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if item.module is request.module and params and "case_id" in params:
            case_id, device = params["case_id"], params["device"]
            if backend_present(CASES_BY_ID[case_id].op, device):
                requests.append((case_id, device))
    return {(v["case"], v["device"]): v for v in case_server.run(requests, jobs=JOBS)}


def _failure(verdict: dict) -> str:
    case = CASES_BY_ID[verdict["case"]]
    seen = f" [seen before: {case.issue}]" if case.issue else ""
    return f"{verdict['case']} on {verdict['device']}: {verdict['verdict']}{seen}: " \
           f"{verdict['detail']}"


@pytest.mark.parametrize("case_id, device", list(_params()))
def test_bad_input_is_rejected_by_name_without_a_crash(selected_verdicts, case_id, device):
    verdict = selected_verdicts[(case_id, device)]
    assert verdict["verdict"] == "ok", _failure(verdict)


def test_harness_tells_each_failure_apart(case_server):
    requests = [(case.id, "cpu") for _, case in runner.SELFTEST_CASES]
    verdicts = {v["case"]: v["verdict"] for v in case_server.run(requests, jobs=2, timeout_s=2)}
    assert verdicts == {case.id: expected for expected, case in runner.SELFTEST_CASES}


def test_an_argument_is_named_by_a_whole_word():
    assert runner.names_argument("lcs_length: ref_values holds negative token ids", ["ref"])
    assert runner.names_argument("cand offsets must be non-decreasing", ["cand"])
    assert not runner.names_argument("lcs_length: ref_index must lie in [0, 1)", ["ref"])
    assert not runner.names_argument("logits must be float32", ["targets", "logit"])


def test_every_public_op_has_every_class():
    assert PUBLIC_OPS == sorted(DISPATCH_OPS), "a public op without bad-input cases"
    assert sorted(SMOKE_CALLS) == PUBLIC_OPS, "a public op without a smoke call"
    for op in PUBLIC_OPS:
        kinds = {case.kind for case in CASES if case.op == op}
        cpu_kinds = {case.kind for case in CASES if case.op == op and not case.cuda_only}
        assert kinds == set(CLASSES), f"{op}: classes {sorted(kinds)}"
        # Mixed devices need a second real device: CUDA only.
        assert cpu_kinds == set(CLASSES) - {"device"}, f"{op}: CPU classes {sorted(cpu_kinds)}"


def test_issue_13_cases_are_present():
    missing = [case_id for case_id in ISSUE_13_CASES if case_id not in CASES_BY_ID]
    assert not missing
    assert all(CASES_BY_ID[case_id].issue for case_id in ISSUE_13_CASES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every bad-input case, each in its own "
                                                 "process; print case -> verdict.")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: the CPU, and CUDA when a GPU is visible")
    parser.add_argument("--jobs", type=int, default=JOBS, help="cases running at once")
    parser.add_argument("--timeout", type=int, default=runner.DEFAULT_TIMEOUT_S,
                        help="seconds per case")
    parser.add_argument("-k", dest="only", default="", help="only case ids containing this")
    parser.add_argument("--case", help="run this case id in this process (no isolation)")
    parser.add_argument("--serve", action="store_true",
                        help="answer case requests on stdin (bad_input_runner.serve)")
    args = parser.parse_args(argv)
    if args.serve:
        runner.serve(judge_case)
        return 0
    if lambdapo_ext.library_error():
        print(lambdapo_ext.library_error())
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU visible: torch.cuda.is_available() is False")
        return 2
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) \
        if args.device == "all" else [args.device]
    if args.case:
        if args.case not in CASES_BY_ID:
            parser.error(f"no case {args.case!r}")
        verdicts = [{"device": device, **judge_case(args.case, device)} for device in devices
                    if device in CASES_BY_ID[args.case].devices]
        for verdict in verdicts:
            print(json.dumps(verdict))
        return 0 if all(v["verdict"] == "ok" for v in verdicts) else 1
    requests, skipped = [], set()
    for device in devices:
        for c in CASES:
            if device in c.devices and args.only in c.id:
                if backend_present(c.op, device):
                    requests.append((c.id, device))
                else:
                    skipped.add(f"{c.op} on {device}")
    start = time.perf_counter()
    with runner.CaseServer(__file__) as server:
        verdicts = {(v["case"], v["device"]): v
                    for v in server.run(requests, jobs=args.jobs, timeout_s=args.timeout)}
    width = max(len(case_id) for case_id, _ in requests)
    failed = 0
    for case_id, device in requests:
        v = verdicts[(case_id, device)]
        failed += v["verdict"] != "ok"
        detail = v["detail"] if v["verdict"] != "ok" else v["detail"][:80]
        print(f"{case_id:<{width}}  {device:<4}  {v['verdict']:<14} {detail}")
    if skipped:
        print(f"skipped (no kernel): {', '.join(sorted(skipped))}")
    counts = {}
    for v in verdicts.values():
        counts[v["verdict"]] = counts.get(v["verdict"], 0) + 1
    print(f"{len(requests)} cases on {'+'.join(devices)}: {failed} failed "
          f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}) in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
