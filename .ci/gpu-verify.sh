#!/usr/bin/env bash
# What only a GPU can check, in under 10 minutes, for a GPU machine lent for a short time. From the project's root,
# with the requirements importable and CIFAR-10 under $DATA_PATH (default .data):
#     bash .ci/gpu-verify.sh
# In parallel: tests/test_cuda.py, and 15-epoch ResNet-18 runs on real CIFAR-10 (all 7 norms at batch
# 32, bn and wn at 256) through sweep.py --jobs auto; then bench.py's packed runs at batch 2 and 32 and bench.py at
# batch 128 (bn and wn) once the GPU is free.
# Everything lands in results/gpu/ and, as one archive, in $OUT/gpu.tgz. DRY=1 runs the same steps tiny on the CPU,
# to check the script itself before spending device time.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
R=results/gpu; mkdir -p "$R"
start=$(date +%s)
if [[ ${DRY:-0} == 1 ]]; then
  PY=${PY:-python3}; DATA=(--data_name synthetic --subset 64); RUN=(--width 8 --epochs 2 --init_images 16 --device cpu)
  B32=8; B256=16; BENCH=(--data_name synthetic --subset 256 --device cpu --steps 2 --warmup 1 --width 8 --init_images 16); TESTS=tests/test_cuda.py
else
  PY=python3; DATA=(--data_path "${DATA_PATH:-.data}"); RUN=(--epochs 15); B32=32; B256=256
  BENCH=("${DATA[@]}" --steps 200 --warmup 30 --workers 8); TESTS=tests/test_cuda.py
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$R/device.txt"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$R/device.txt"
fi
git log -1 --format='commit %H %s' > "$R/commit.txt" 2>/dev/null
# 1. the CUDA tests, beside the runs (correctness only; their timings are not read)
( timeout 420 $PY -m pytest -q -p no:cacheprovider $TESTS > "$R/test_cuda.log" 2>&1; echo "exit $?" >> "$R/test_cuda.log" ) &
tests=$!
# 2. the 15-epoch runs: every norm at batch 32, bn and wn at 256, several at once on the one GPU
( timeout 480 $PY sweep.py "${DATA[@]}" "${RUN[@]}" --norm_type bn in gn wn wn_mbn ws_gn sws --batch_size $B32 --jobs auto \
    --results_dir "$R/runs" > "$R/sweep32.log" 2>&1
  echo "exit $?" >> "$R/sweep32.log" ) &
s32=$!
( timeout 480 $PY sweep.py "${DATA[@]}" "${RUN[@]}" --norm_type bn wn --batch_size $B256 --jobs auto \
    --results_dir "$R/runs" > "$R/sweep256.log" 2>&1
  echo "exit $?" >> "$R/sweep256.log" ) &
s256=$!
wait $s32 $s256 $tests
# 3. speed with the GPU to itself, while time is left (the call's limit is 600 s): packed runs against runs one
# after another at batch 2 and 32 (full width; width 8 in DRY), then ours against the standard pipeline
W=64; [[ ${DRY:-0} == 1 ]] && W=8
if (( $(date +%s) - start < 440 )); then
  timeout $(( 500 - ($(date +%s) - start) )) $PY bench.py "${BENCH[@]}" --pack_speed 1 8 --norms bn wn \
    --widths $W --batch_sizes 2 $B32 --rounds 1 >> "$R/pack.md" 2>&1
fi
for norm in bn wn; do
  (( $(date +%s) - start < 500 )) || break
  timeout $(( 580 - ($(date +%s) - start) )) $PY bench.py "${BENCH[@]}" --batch_size $((B32 * 4)) --norm_type $norm \
    >> "$R/bench.md" 2>&1
done
$PY report.py --results_dir "$R/runs" --all > "$R/report.log" 2>&1
echo "verify.sh: $(( $(date +%s) - start )) s" | tee -a "$R/device.txt"
tar czf "$OUT/gpu.tgz" --exclude='*.pth' "$R"
tail -n 3 "$R/test_cuda.log" "$R/sweep32.log" "$R/sweep256.log"; cat "$R/pack.md" "$R/bench.md" 2>/dev/null | tail -n 20
