"""A numpy emulation of the fold and merge logic of the two CUDA log-prob kernels,
csrc/cuda/token_logprobs.cu and csrc/cuda/linear_token_logprobs.cu, run on the CPU by
test_softmax_kernel_emulation.py. No GPU runs in CI, so the control flow that decides where a
NaN, an inf or a row tail goes (which thread folds which column, what a fold skips, how states
merge) is checked here against the CPU kernels; a change to a CUDA fold must be made here too.

How it mirrors the kernels: one block per row; an array of shape [rows, THREADS] holds one
register of every thread of every block, and a branch is an ``np.where`` over the threads that
take it (as the GPU predicates a divergent branch); loops whose trip count differs between
threads run until no thread is left, with the finished threads masked off. The comments quote
the kernel statements each part mirrors. Arithmetic is in the kernels' accumulation type (float32
for 16-bit and float32 logits, float64 for float64); ``ex2.approx.ftz.f32`` and ``__expf`` are
``np.exp2``/``np.exp`` with subnormal results flushed to 0. Rounding is mirrored only roughly
(the GPU fuses multiply-adds), so tests compare values within a tolerance and the NaN and inf
patterns exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

THREADS = 256  # kThreads of both kernels
WARP = 32
FORWARD_LOADS = 4  # token_logprobs.cu kForwardLoads
BACKWARD_VECS_PER_THREAD = 4  # kBackwardVecsPerThread of both kernels
VEC_BYTES = 16  # kernel_constants.h kVecBytes
CPU_BLOCK = 2048  # csrc/cpu/softmax_blocks.h kBlock: the CPU kernels' block edges
LOG2E = 1.4426950408889634074
LN2 = 0.6931471805599453094


def vector_width(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector load of ``dtype`` (the kernels' N)."""
    return VEC_BYTES // torch.empty(0, dtype=dtype).element_size()


def accumulation_dtype(dtype: torch.dtype) -> type:
    """The kernels' acc_t: float64 for float64 logits, float32 otherwise."""
    return np.float64 if dtype == torch.float64 else np.float32


def _flush_subnormal(y: np.ndarray) -> np.ndarray:
    if y.dtype != np.float32:  # the float64 kernels call exp2/exp: no flush
        return y
    return np.where(np.abs(y) < np.finfo(np.float32).tiny, np.float32(0), y)


def fast_exp2(x: np.ndarray) -> np.ndarray:
    """token_logprobs.cu fast_exp2: 2^-inf = 0, NaN stays NaN, subnormal results are 0."""
    return _flush_subnormal(np.exp2(x))


def exp_acc(x: np.ndarray) -> np.ndarray:
    """linear_token_logprobs.cu exp_acc (``__expf``, an ex2.approx.ftz of x * log2(e))."""
    return _flush_subnormal(np.exp(x))


@dataclass
class State:
    """Online softmax state of each thread: arrays [rows, threads] (m, s, t)."""

    m: np.ndarray
    s: np.ndarray
    t: np.ndarray

    @classmethod
    def empty(cls, rows: int, threads: int, acc: type) -> State:
        return cls(np.full((rows, threads), -np.inf, acc), np.zeros((rows, threads), acc),
                   np.zeros((rows, threads), acc))

    def take(self, index) -> State:
        return State(self.m[..., index], self.s[..., index], self.t[..., index])


def _where(cond: np.ndarray, a: State, b: State) -> State:
    return State(np.where(cond, a.m, b.m), np.where(cond, a.s, b.s), np.where(cond, a.t, b.t))


def merge(a: State, b: State, exp) -> State:
    """merge() of both kernels (token_logprobs.cu with exp = fast_exp2, in base 2;
    linear_token_logprobs.cu with exp = exp_acc). The token_logprobs kernel skips t without
    entropy; carrying it changes nothing else."""
    m = np.where(a.m > b.m, a.m, b.m)
    da, db = a.m - m, b.m - m
    ca, cb = exp(da), exp(db)
    # "const acc_t m = a.m > b.m ? a.m : b.m; ... out{m, a.s * ca + b.s * cb, ...}"
    out = State(m, a.s * ca + b.s * cb, ca * (a.t + da * a.s) + cb * (b.t + db * b.s))
    out = _where(a.s == 0, b, out)  # if (a.s == 0) return b;
    return _where(b.s == 0, a, out)  # if (b.s == 0) return a; (tested first)


def warp_merge(st: State, exp) -> State:
    """warp_merge() over the last axis (32 lanes): __shfl_down_sync hands a lane whose
    source lies past the warp its own value. Valid in lane 0."""
    lanes = np.arange(WARP)
    for offset in (16, 8, 4, 2, 1):
        st = merge(st, st.take(np.where(lanes + offset < WARP, lanes + offset, lanes)), exp)
    return st


def block_merge(st: State, exp) -> State:
    """block_merge() of both kernels: each warp's lane 0 to shared memory, then warp 0 merges
    those ("lane < kWarps ? ...shared... : {-INFINITY, 0, 0}"). Returns thread 0's state,
    arrays [rows]."""
    rows, warps = st.m.shape[0], THREADS // WARP
    per_warp = warp_merge(State(*(v.reshape(rows, warps, WARP) for v in (st.m, st.s, st.t))),
                          exp).take(0)  # [rows, warps]
    acc = st.m.dtype.type
    lane_state = State.empty(rows, WARP, acc)
    lane_state.m[:, :warps], lane_state.s[:, :warps], lane_state.t[:, :warps] = (
        per_warp.m, per_warp.s, per_warp.t)
    return warp_merge(lane_state, exp).take(0)


# token_logprobs.cu


def row_is_vectorized(logits: torch.Tensor, row: int) -> bool:
    """The forward kernel's "vectorized" for row ``row`` of 2-D ``logits``:
    "reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && vocab % N == 0"."""
    address = logits.data_ptr() + row * logits.stride(0) * logits.element_size()
    return address % VEC_BYTES == 0 and logits.shape[-1] % vector_width(logits.dtype) == 0


def forward_fold_batches(vocab: int, vec: int, vectorized: bool):
    """The columns each thread folds, batch by batch, in token_logprobs_forward_kernel's order:
    yields (columns [THREADS, K], active [THREADS]); batch column k is the fold's x[k], and a
    thread with active False does not fold that step."""
    i = np.arange(THREADS)
    if not vectorized:  # "for (int64_t i = threadIdx.x; i < vocab; i += kThreads)": one a fold
        while (i < vocab).any():
            yield np.minimum(i, vocab - 1)[:, None], i < vocab
            i = i + THREADS
        return
    vecs = vocab // vec
    k = np.arange(vec)
    # "for (; i + (kForwardLoads - 1) * kThreads < vecs; i += kForwardLoads * kThreads)": a
    # fold of kForwardLoads vectors, "x[u * N + k] = v[u].v[k] * scale", "v[u] = vrow[i + u *
    # kThreads]"
    while True:
        active = i + (FORWARD_LOADS - 1) * THREADS < vecs
        if not active.any():
            break
        vectors = i[:, None] + np.arange(FORWARD_LOADS) * THREADS
        columns = (vectors[:, :, None] * vec + k).reshape(THREADS, FORWARD_LOADS * vec)
        yield np.where(active[:, None], columns, 0), active
        i = np.where(active, i + FORWARD_LOADS * THREADS, i)
    while (i < vecs).any():  # "for (; i < vecs; i += kThreads)": the rest, a vector a fold
        active = i < vecs
        yield np.where(active[:, None], i[:, None] * vec + k, 0), active
        i = i + THREADS


def token_logprobs_fold(st: State, x: np.ndarray, active: np.ndarray, entropy: bool) -> None:
    """fold() of token_logprobs.cu on x [rows, THREADS, K] in base-2 units, for the threads
    where ``active``; updates ``st`` in place."""
    # "local_max = x[0]; ... local_max = x[k] > local_max ? x[k] : local_max"
    local_max = x[..., 0]
    for k in range(1, x.shape[-1]):
        local_max = np.where(x[..., k] > local_max, x[..., k], local_max)
    # "if (local_max > st.m) { if (st.s > 0) { ...rescale... } st.m = local_max; }"
    grow = active & (local_max > st.m)
    rescale = grow & (st.s > 0)
    d = st.m - local_max
    c = fast_exp2(d)
    if entropy:
        st.t = np.where(rescale, c * (st.t + d * st.s), st.t)
    st.s = np.where(rescale, st.s * c, st.s)
    st.m = np.where(grow, local_max, st.m)
    # "if (!(st.m > -INFINITY)) { for k: if (x[k] != x[k]) st.s = x[k]; return; }"
    only_minus_inf = active & ~(st.m > -np.inf)
    for k in range(x.shape[-1]):
        st.s = np.where(only_minus_inf & np.isnan(x[..., k]), x[..., k], st.s)
    live = active & ~only_minus_inf
    # "d = x[k] - st.m; e = fast_exp2(d); st.s += e; if (kEntropy) st.t += e > 0 ? e * d : 0"
    for k in range(x.shape[-1]):
        d = x[..., k] - st.m
        e = fast_exp2(d)
        st.s = np.where(live, st.s + e, st.s)
        if entropy:
            st.t = np.where(live, st.t + np.where(e > 0, e * d, 0), st.t)


def token_logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                           ignore_index: int, entropy: bool):
    """token_logprobs_forward_kernel on every row of 2-D ``logits`` (any row stride): returns
    (logprobs, entropy, lse) as numpy arrays [rows] in the accumulation type (entropy is
    None without ``entropy``)."""
    acc = accumulation_dtype(logits.dtype)
    vec, vocab = vector_width(logits.dtype), logits.shape[-1]
    rows = logits.shape[0]
    inv_t = acc(1.0 / temperature)
    scale = inv_t * acc(LOG2E)  # "const acc_t scale = inv_t * kLog2e<acc_t>"
    values = logits.to(torch.float64).numpy().astype(acc)  # static_cast<acc_t>(v)
    target = targets.numpy()
    lp, h, lse = np.zeros(rows, acc), np.zeros(rows, acc), np.zeros(rows, acc)
    with np.errstate(all="ignore"):
        for vectorized in (False, True):  # rows grouped by the path they take
            # "if (target == ignore_index) { ...= 0; return; }"
            group = [r for r in range(rows) if row_is_vectorized(logits, r) == vectorized
                     and target[r] != ignore_index]
            if not group:
                continue
            x_rows = values[group] * scale
            st = State.empty(len(group), THREADS, acc)
            for columns, active in forward_fold_batches(vocab, vec, vectorized):
                token_logprobs_fold(st, x_rows[:, columns], active[None, :], entropy)
            st = block_merge(st, fast_exp2)
            # thread 0: "log2_s = log2(st.s); row_lse = (st.m + log2_s) * kLn2; lp = target in
            # range ? row[target] * inv_t - row_lse : NAN; logprobs[r] = lp > 0 ? 0 : lp;
            # entropy[r] = (log2_s - st.t / st.s) * kLn2"
            log2_s = np.log2(st.s)
            row_lse = (st.m + log2_s) * acc(LN2)
            t = target[group]
            in_range = (t >= 0) & (t < vocab)
            x_target = values[group, np.where(in_range, t, 0)] * inv_t
            row_lp = np.where(in_range, x_target - row_lse, np.nan).astype(acc)
            lp[group] = np.where(row_lp > 0, 0, row_lp)
            lse[group] = row_lse
            h[group] = (log2_s - st.t / st.s) * acc(LN2)
    return lp, (h if entropy else None), lse


def token_logprobs_backward_columns(vocab: int, vec: int, vectorized: bool) -> np.ndarray:
    """How many times token_logprobs_backward_kernel, over its (row, chunk) grid of
    backward_chunks(), writes each column of a row: must be 1 everywhere."""
    chunk = THREADS * vec * BACKWARD_VECS_PER_THREAD
    writes = np.zeros(vocab, np.int64)
    for chunk_begin in range(0, vocab, chunk):
        chunk_end = min(chunk_begin + chunk, vocab)
        # "first = chunk_begin / N + threadIdx.x, last = chunk_end / N; ... i = first + u *
        # kThreads; if (i < last) vout[i] = dz"
        if vectorized:
            first, last = chunk_begin // vec + np.arange(THREADS), chunk_end // vec
            for u in range(BACKWARD_VECS_PER_THREAD):
                i = first + u * THREADS
                for col in (i[i < last, None] * vec + np.arange(vec)).ravel():
                    writes[col] += 1
        else:  # "for (j = chunk_begin + threadIdx.x; j < chunk_end; j += kThreads)"
            for start in range(chunk_begin, chunk_end, THREADS):
                writes[start:min(start + THREADS, chunk_end)] += 1
    return writes


def token_logprobs_backward(logits: torch.Tensor, targets: torch.Tensor, grad_logprobs,
                            grad_entropy, lse, entropy, *, temperature: float,
                            ignore_index: int) -> np.ndarray:
    """grad_at() of token_logprobs_backward_kernel on every column of 2-D ``logits``: dlogits
    [rows, V] in the accumulation type, before the kernel's cast to the logits dtype.
    ``grad_entropy`` None is the kernel without entropy terms."""
    acc = accumulation_dtype(logits.dtype)
    rows, vocab = logits.shape
    inv_t = acc(1.0 / temperature)
    scale = inv_t * acc(LOG2E)
    z = logits.to(torch.float64).numpy().astype(acc)
    target = targets.numpy()
    ignored = (target == ignore_index)[:, None]
    g_lp = np.where(ignored[:, 0], 0, np.asarray(grad_logprobs, acc))[:, None]
    with np.errstate(all="ignore"):
        lse2 = np.where(ignored[:, 0], 0, np.asarray(lse, acc) * acc(LOG2E))[:, None]
        log2_p = z * scale - lse2  # "log2_p = z * scale - lse2; p = fast_exp2(log2_p)"
        p = fast_exp2(log2_p)
        if grad_entropy is not None:
            g_h = np.where(ignored[:, 0], 0, np.asarray(grad_entropy, acc))[:, None]
            h = np.where(ignored[:, 0], 0, np.asarray(entropy, acc))[:, None]
            # "dz = p == 0 ? 0 : neg_inv_t * p * (g_lp + g_h * (log2_p * kLn2 + h))"
            dz = np.where(p == 0, 0, -inv_t * p * (g_lp + g_h * (log2_p * acc(LN2) + h)))
        else:
            dz = -inv_t * g_lp * p  # "dz = neg_inv_t * g_lp * p"
        # "if (j == target) dz += target_grad"
        dz = dz + np.where(np.arange(vocab) == target[:, None], inv_t * g_lp, 0)
    return np.where(ignored, 0, dz).astype(acc)


# linear_token_logprobs.cu: the tile kernels, and the driver's use of their state
# (csrc/linear_token_logprobs.h).


def tile_fold_columns(cols: int, vec: int):
    """The columns each thread of forward_tile_kernel folds, one per step, in its order:
    yields (column [THREADS], active [THREADS]). A tile is a fresh contiguous [rows, cols]
    matmul output, so "reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && cols % N == 0"
    holds exactly when cols is a multiple of the vector width."""
    i = np.arange(THREADS)
    if cols % vec:  # "for (i = threadIdx.x; i < cols; i += kThreads) fold(st, row[i] * inv_t)"
        while (i < cols).any():
            yield np.minimum(i, cols - 1), i < cols
            i = i + THREADS
        return
    # "for (i = threadIdx.x; i < cols / N; i += kThreads) ... for k: fold(st, v.v[k] * inv_t)"
    while (i < cols // vec).any():
        active = i < cols // vec
        for k in range(vec):
            yield np.where(active, i * vec + k, 0), active
        i = i + THREADS


def linear_fold(st: State, x: np.ndarray, active: np.ndarray) -> None:
    """fold() of linear_token_logprobs.cu on x [rows, THREADS] (natural units) for the
    threads where ``active``; updates ``st`` in place."""
    # "if (x > st.m) { if (st.s > 0) { ...rescale... } st.m = x; }"
    grow = active & (x > st.m)
    rescale = grow & (st.s > 0)
    d = st.m - x
    c = exp_acc(d)
    st.t = np.where(rescale, c * (st.t + d * st.s), st.t)
    st.s = np.where(rescale, st.s * c, st.s)
    st.m = np.where(grow, x, st.m)
    # "if (x != -INFINITY) { d = x - st.m, e = exp_acc(d); st.s += e; st.t += e * d; }"
    add = active & (x != -np.inf)
    d = x - st.m
    e = exp_acc(d)
    st.s = np.where(add, st.s + e, st.s)
    st.t = np.where(add, st.t + e * d, st.t)


def linear_token_logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, *,
                                  temperature: float, ignore_index: int,
                                  vocab_chunk_size: int):
    """linear::forward's per-row state over vocabulary tiles (linear_token_logprobs.h) with
    forward_tile_kernel, for the logits [rows, V] the matmuls produce: returns (logprobs,
    entropy, lse), numpy arrays [rows]."""
    acc = accumulation_dtype(logits.dtype)
    vec, (rows, vocab) = vector_width(logits.dtype), logits.shape
    inv_t = acc(1.0 / temperature)
    values = logits.to(torch.float64).numpy().astype(acc)
    target = targets.numpy()
    kept = target != ignore_index
    state = State.empty(rows, 1, acc)  # linear::kMax, kSumExp, kSumExpShift
    # "if (first) row_state[kTargetLogit] = NAN": NaN unless a tile holds the target
    target_logit = np.full(rows, np.nan, acc)
    with np.errstate(all="ignore"):
        for col0 in range(0, vocab, vocab_chunk_size):
            cols = min(vocab_chunk_size, vocab - col0)
            tile = values[:, col0:col0 + cols] * inv_t
            st = State.empty(rows, THREADS, acc)
            for column, active in tile_fold_columns(cols, vec):
                linear_fold(st, tile[:, column], active[None, :])
            st = block_merge(st, exp_acc)
            st = State(st.m[:, None], st.s[:, None], st.t[:, None])
            # "if (!first) st = merge(row_state..., st)", stored back to the row's state
            state = st if col0 == 0 else merge(state, st, exp_acc)
            # "y = target - col0; if (y >= 0 && y < cols) row_state[kTargetLogit] = row[y] * inv_t"
            y = target - col0
            holds = (y >= 0) & (y < cols)
            target_logit = np.where(holds, tile[np.arange(rows), np.where(holds, y, 0)],
                                    target_logit)
        m, s, t = state.m[:, 0], state.s[:, 0], state.t[:, 0]
        # linear::forward: "lse = where(kept, max + log_sum, 0); logprobs = where(kept,
        # (target_logit - lse).clamp_max_(0), 0); entropy = where(kept, log_sum - t / s, 0)"
        log_sum = np.log(s)
        lse = np.where(kept, m + log_sum, 0).astype(acc)
        diff = target_logit - lse
        lp = np.where(kept, np.where(diff > 0, 0, diff), 0).astype(acc)  # clamp_max keeps NaN
        h = np.where(kept, log_sum - t / s, 0).astype(acc)
    return lp, h, lse


def linear_tile_backward_columns(cols: int, vec: int) -> np.ndarray:
    """How many times backward_tile_kernel, over its grid of backward_chunks(), writes each
    column of a tile row: must be 1."""
    chunk = THREADS * vec * BACKWARD_VECS_PER_THREAD
    writes = np.zeros(cols, np.int64)
    for begin in range(0, cols, chunk):
        end = min(begin + chunk, cols)
        if cols % vec == 0:  # "for (i = begin / N + threadIdx.x; i < end / N; i += kThreads)"
            for i in range(begin // vec, end // vec):
                writes[i * vec:(i + 1) * vec] += 1
        else:  # "for (j = begin + threadIdx.x; j < end; j += kThreads)"
            writes[begin:end] += 1
    return writes


def linear_token_logprobs_backward(logits: torch.Tensor, targets: torch.Tensor, grad_logprobs,
                                   grad_entropy, lse, entropy, *, temperature: float,
                                   ignore_index: int) -> np.ndarray:
    """grad_at() of backward_tile_kernel on every column of the logits [rows, V]: dlogits in
    the accumulation type, before the cast. ``grad_entropy`` None is a backward without an
    entropy gradient (g_h = h = 0)."""
    acc = accumulation_dtype(logits.dtype)
    rows, vocab = logits.shape
    inv_t = acc(1.0 / temperature)
    z = logits.to(torch.float64).numpy().astype(acc)
    target = targets.numpy()
    ignored = (target == ignore_index)[:, None]
    g_lp = np.where(ignored[:, 0], 0, np.asarray(grad_logprobs, acc))[:, None]
    g_h = (np.zeros((rows, 1), acc) if grad_entropy is None
           else np.where(ignored[:, 0], 0, np.asarray(grad_entropy, acc))[:, None])
    h = (np.zeros((rows, 1), acc) if grad_entropy is None
         else np.where(ignored[:, 0], 0, np.asarray(entropy, acc))[:, None])
    with np.errstate(all="ignore"):
        # "log_p = z * inv_t - row_lse; p = exp_acc(log_p); dz = p == 0 ? 0 : -inv_t * p *
        # (g_lp + g_h * (log_p + h)); if (j == y) dz += inv_t * g_lp"
        log_p = z * inv_t - np.where(ignored[:, 0], 0, np.asarray(lse, acc))[:, None]
        p = exp_acc(log_p)
        dz = np.where(p == 0, 0, -inv_t * p * (g_lp + g_h * (log_p + h)))
        dz = dz + np.where(np.arange(vocab) == target[:, None], inv_t * g_lp, 0)
    return np.where(ignored, 0, dz).astype(acc)


# Position classes of the kernels' work split, for placing special values.


def token_logprobs_positions(vocab: int, vec: int, vectorized: bool) -> dict[str, int]:
    """Columns of one row at each position class of token_logprobs' CUDA work split (the
    first and last column of a thread's first and last fold, for threads at warp edges;
    backward chunk edges; the row's last column) and of the CPU kernel's block edges:
    name -> column."""
    positions = {}
    batches = list(forward_fold_batches(vocab, vec, vectorized))
    for thread in (0, 1, 31, 32, 255):
        mine = [cols[thread] for cols, active in batches if active[thread]]
        if mine:
            positions[f"thread{thread}-first-fold-x0"] = int(mine[0][0])
            positions[f"thread{thread}-first-fold-end"] = int(mine[0][-1])
            positions[f"thread{thread}-last-fold-x0"] = int(mine[-1][0])
    chunk = THREADS * vec * BACKWARD_VECS_PER_THREAD
    for edge in range(chunk, vocab, chunk):
        positions[f"backward-chunk-edge-{edge}"] = edge
        positions[f"backward-chunk-end-{edge}"] = edge - 1
    for edge in range(CPU_BLOCK, vocab, CPU_BLOCK):
        positions[f"cpu-block-edge-{edge}"] = edge
    positions["row-last"] = vocab - 1
    return _unique(positions)


def linear_positions(vocab: int, vec: int, vocab_chunk_size: int) -> dict[str, int]:
    """Columns at each position class of linear_token_logprobs' tiles: each tile's first and
    last column, the first column thread 1, 31, 32 and 255 fold in the first and last tile,
    the CPU block edges, the row's last column: name -> column."""
    positions = {}
    tiles = list(range(0, vocab, vocab_chunk_size))
    for col0 in tiles:
        positions[f"tile-{col0}-first"] = col0
        positions[f"tile-{col0}-last"] = min(col0 + vocab_chunk_size, vocab) - 1
    for col0 in (tiles[0], tiles[-1]):
        column, active = next(tile_fold_columns(min(vocab_chunk_size, vocab - col0), vec))
        for thread in (1, 31, 32, 255):
            if active[thread]:
                positions[f"tile-{col0}-thread{thread}-first"] = col0 + int(column[thread])
    for edge in range(CPU_BLOCK, vocab, CPU_BLOCK):
        positions[f"cpu-block-edge-{edge}"] = edge
    positions["row-last"] = vocab - 1
    return _unique(positions)


def _unique(positions: dict[str, int]) -> dict[str, int]:
    seen, out = set(), {}
    for name, col in positions.items():
        if col not in seen:
            seen.add(col)
            out[name] = col
    return out


def special_values(dtype: torch.dtype) -> dict[str, float]:
    """Values to place at the position classes: NaN, +-inf, +-1000 (exp overflows float32
    past 88.7 and float64 past 709: only a max-shifted sum survives it), -1e30 (or float16's
    lowest) whose probability underflows to 0, and the smallest normal magnitude.

    Finite magnitudes far above 1000 are left out: their float32 rounding alone moves a
    log-prob by more than 1 (ulp(1e30 / T) ~ 1e23) in either kernel, and near float32's
    maximum the CUDA kernels' base-2 scaling x log2(e) / T overflows to inf (a NaN row) where
    the CPU kernels' x / T does not (docs/ops.md)."""
    info = torch.finfo(dtype)
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1000": 1000.0,
            "-1000": -1000.0, "-1e30": max(info.min, -1e30), "tiny": info.tiny}
