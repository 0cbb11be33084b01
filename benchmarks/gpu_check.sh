#!/usr/bin/env bash
# GPU validation in one call: build the extension against the torch at hand, run the CUDA
# tests and the CPU-vs-CUDA differential tests, compute-sanitizer (memcheck, racecheck) on
# small cases of every kernel, measure the card's ceilings and run the benchmarks. Logs and results go to $OUT; a short summary is
# printed last. From the repository root:
#
#   benchmarks/gpu_check.sh                       # all stages: build badinputs tests differential sanitizer bench loop
#   benchmarks/gpu_check.sh tests bench:token_logprobs,lambda_advantages
#   benchmarks/gpu_check.sh loop                  # the training loop: default run fp32+bf16, train step vs TRL
#
# The benchmark rows of this run go to $OUT/results/<op>.jsonl and, recorded (--record), to
# the history benchmarks/results/<op>.jsonl, which is tarred to $OUT/results.tar.
#
# GPU_CHECK_BUDGET (seconds, default 1800) bounds the whole script: each stage is cut short
# so that the summary still prints. Peer packages (liger-kernel, cut-cross-entropy,
# rouge-score, flash-attn's Triton sources) are used when importable; wheels in .whl/ are
# installed to /tmp/site first and .gpu/site is put on the path (see docs/gpu.md); the
# benchmarks need pytest-benchmark there.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-1800}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
STAGES=${*:-build badinputs tests differential sanitizer bench loop}

note() { echo "$*" | tee -a "$SUMMARY"; }
seconds_left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_stage NAME CAP LOG CMD...: CMD under min(CAP, time left - 30 s), output appended to LOG.
run_stage() {
  local name=$1 cap=$2 log=$3 limit t0 rc status
  shift 3
  limit=$(( $(seconds_left) - 30 ))
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then note "$(printf '%-34s SKIPPED (budget spent)' "$name")"; return 1; fi
  t0=$(date +%s)
  echo "=== $name ($(date +%T), limit ${limit}s)" >> "$log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  status=ok
  (( rc == 124 )) && status="TIMEOUT (${limit}s)"
  (( rc != 0 && rc != 124 )) && status="FAILED (rc=$rc)"
  note "$(printf '%-34s %-16s %5ss' "$name" "$status" $(( $(date +%s) - t0 )))"
  return $rc
}

has_stage() { [[ " $STAGES " == *" $1 "* || " $STAGES " == *" $1:"* ]]; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -1
  nproc
  # What decides how the C++ runtime is linked (issue 13): compiler, its libstdc++ (a linker
  # script would pull static parts), the flags setuptools inherits.
  ${CXX:-c++} --version | head -1
  libstdcxx=$(${CXX:-c++} -print-file-name=libstdc++.so)
  echo "libstdc++.so: $libstdcxx -> $(readlink -f "$libstdcxx")"
  file -L "$libstdcxx" 2>/dev/null | grep -q text && { echo "linker script:"; cat "$libstdcxx"; }
  echo "env CXXFLAGS='${CXXFLAGS:-}' LDFLAGS='${LDFLAGS:-}' LDSHARED='${LDSHARED:-}'"
  $PY -c "import sysconfig as s; print({k: s.get_config_var(k) for k in ('CC', 'CXX', 'LDSHARED', 'LDCXXSHARED', 'LDFLAGS')})"
} > "$OUT/build.log" 2>&1
head -2 "$OUT/build.log" | tail -1 | tee -a "$SUMMARY"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/site
fi
[ -d .gpu/site ] && export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for benchmarks/*.py

if has_stage build; then
  rm -rf build lambdapo_ext/_C*.so
  MAX_JOBS=$(nproc) run_stage "build (sm_${TORCH_CUDA_ARCH_LIST/./})" 400 "$OUT/build.log" \
    $PY setup.py build_ext --inplace || { cat "$SUMMARY"; tail -40 "$OUT/build.log"; exit 1; }
  tar -czf "$OUT/lambdapo_ext_build.tar.gz" lambdapo_ext/_C*.so lambdapo_ext/_build.py
fi
$PY -m lambdapo_ext._runtime_check 2>&1 | tee -a "$SUMMARY"
$PY - <<'PY' 2>&1 | tee -a "$SUMMARY" || exit 1
import torch, lambdapo_ext
from lambdapo_ext._loader import has_kernel
info = lambdapo_ext.build_info()
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lambdapo::"))
cuda = [op for op in ops if has_kernel(op, "CUDA")]
print(f"lambdapo_ext loaded={info['loaded']} torch={info['torch_version']} cuda={info['cuda_version']} "
      f"arch={info.get('cuda_arch_list')} CUDA kernels: {len(cuda)}/{len(ops)} ops")
assert info["loaded"] and cuda, info
PY

if has_stage badinputs; then
  # Every bad-input class of every op, each in its own process, CPU and CUDA (issue 13).
  run_stage "bad inputs (isolated, cpu+cuda)" 240 "$OUT/badinputs.log" \
    $PY tests/ops/test_bad_inputs.py --device all --jobs 8
  grep -E "^[0-9]+ cases on" "$OUT/badinputs.log" | tail -1 | tee -a "$SUMMARY"
fi

if has_stage tests; then
  run_stage "pytest (CUDA cases)" 300 "$OUT/pytest.log" \
    $PY -m pytest -q -rfEs -p no:cacheprovider --timeout 240 tests -k "cuda or loader or build" \
      --ignore tests/ops/test_bad_inputs.py --ignore tests/ops/test_cuda_differential.py
  grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/pytest.log" | tail -1 | tee -a "$SUMMARY"
fi

if has_stage differential; then
  # Every op on CPU and CUDA over hypothesis-drawn shapes, dtypes, strides and special values
  # at the kernels' position classes (LAMBDAPO_DIFFERENTIAL_EXAMPLES per op, default 60); a
  # failure prints the falsifying case and a @reproduce_failure blob.
  run_stage "differential (cpu vs cuda)" 300 "$OUT/differential.log" \
    $PY -m pytest -q -rfEs -p no:cacheprovider --timeout 280 tests/ops/test_cuda_differential.py \
      -k cuda_matches_cpu
  grep -E "passed|failed" "$OUT/differential.log" | tail -1 | tee -a "$SUMMARY"
fi

if has_stage sanitizer; then
  export CUDA_MODULE_LOADING=LAZY
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_stage "compute-sanitizer memcheck" 240 "$OUT/memcheck.log" \
    compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 30 \
    $PY benchmarks/sanitizer_cases.py &
  run_stage "compute-sanitizer racecheck" 240 "$OUT/racecheck.log" \
    compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 30 \
    $PY benchmarks/sanitizer_cases.py &
  wait
  for tool in memcheck racecheck; do
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$tool.log" | sed "s/^/$tool: /" | tail -1 \
      | tee -a "$SUMMARY"
    cat "$OUT/$tool.log" >> "$OUT/sanitizer.log" && rm "$OUT/$tool.log"
  done
fi

if has_stage bench && ! $PY -c "import pytest_benchmark" 2>/dev/null; then
  note "bench: SKIPPED, pytest-benchmark is not importable (put its wheel and py-cpuinfo2's in .whl/)"
elif has_stage bench; then
  benches=$(sed -nE 's/.*bench:([a-z_,]+).*/\1/p' <<< "$STAGES" | tr ',' ' ')
  benches=${benches:-token_logprobs lambda_advantages semantic_density linear_token_logprobs policy_loss}
  run_stage "ceilings" 60 "$OUT/bench.log" $PY benchmarks/gpu_ceilings.py
  grep '"copy_TB_per_s"' "$OUT/bench.log" | tail -1 | tee -a "$SUMMARY"
  first_line=$(( $(wc -l < "$OUT/bench.log") + 1 ))
  # Each script runs its cases through pytest-benchmark: progress lines, the ratio table and
  # target lines go to bench.log, pytest-benchmark's JSON (every round, extra_info) to $OUT,
  # the rows to $OUT/results/ and (--record) the history benchmarks/results/.
  for bench in $benches; do
    run_stage "bench $bench" 240 "$OUT/bench.log" \
      $PY "benchmarks/bench_$bench.py" --device cuda --record --out "$OUT/results" \
        --benchmark-json "$OUT/bench_$bench.json"
  done
  tar -cf "$OUT/results.tar" benchmarks/results
  $PY benchmarks/summarize.py --results "$OUT/results" --device cuda --since "$START" $benches \
    | tee -a "$SUMMARY"
  tail -n "+$first_line" "$OUT/bench.log" | grep -E '^(targets of |target )' | tee -a "$SUMMARY"
fi
if has_stage loop; then
  # The loop on the GPU (issue 41): the built-in default in float32 and bfloat16 (its summary
  # line: accuracy before -> after, seconds), then one step at Qwen2.5-0.5B's shape against
  # TRL's GRPOTrainer (full fine-tuning and LoRA; TRL from .whl/ or .gpu/site, else its case
  # says why it did not run) and Qwen3-4B's shape with LoRA (peak memory). The training
  # package's dependencies (transformers, peft, math-verify, ...) travel in .whl/ as the
  # peers do.
  export PYTHONPATH=$PWD/python:$PYTHONPATH
  for dtype in float32 bfloat16; do
    run_stage "lambdapo train ($dtype)" 240 "$OUT/loop.log" \
      $PY -m lambdapo train --quiet device=cuda model.dtype=$dtype output_dir="$OUT/run-$dtype" \
      && $PY -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], \
'held-out accuracy %.3f -> %.3f in %.0f s' % (s['accuracy_before'], s['accuracy_after'], \
s['seconds']))" "$OUT/run-$dtype/summary.json" "train $dtype:" | tee -a "$SUMMARY"
  done
  run_stage "train step qwen2.5-0.5b vs TRL" 300 "$OUT/loop.log" \
    $PY benchmarks/bench_train_step.py --device cuda --model-config qwen2.5-0.5b \
      --modes full,lora --runs 1 --warmup 1 --steps 2 --record --out "$OUT/results"
  run_stage "train step qwen3-4b (LoRA)" 240 "$OUT/loop.log" \
    $PY benchmarks/bench_train_step.py --device cuda --model-config qwen3-4b --runs 1 \
      --warmup 0 --steps 1 --record --out "$OUT/results"
  grep -E '^(target |peak |step )' "$OUT/loop.log" | tee -a "$SUMMARY"
fi
echo
echo "=== summary ($(( $(date +%s) - START )) s)"
cat "$SUMMARY"
