#!/usr/bin/env bash
# The study's net at full width on one GPU: `resvae bench --synthetic` of the study-28 and
# study-100 presets in bf16, compiled, at batch 256 (or the largest of BATCHES that fits),
# about 2 minutes of measuring each; then images/s, the share of the GPU's bf16 matmul ceiling,
# and the hours a CIFAR-10 epoch (50,000 images) and a study run would take.
#
# For a machine with one GPU, PyTorch, no network and no data set (the images are synthetic
# uint8 batches of CIFAR-10's shape). resvae comes from this checkout: `pip install -e .
# --no-deps`, or nothing (src/ goes on PYTHONPATH). Finishes in under 10 minutes: a run that
# would pass the deadline is stopped and reported as such.
#
#   bash benchmarks/gpu.sh
#
# Settings (environment): DEVICE (cuda), BENCH_SECONDS (120: measuring time per preset, shared
# by the compiled bf16 step and the eager fp32 baseline), PRESETS ("study-28 study-100"),
# BATCHES ("256 128 64 32": tried in turn while the GPU runs out of memory), MATMUL_SIZE (8192:
# at 2048 a large GPU's matmuls are too short to reach its ceiling), EXTRA_ARGS (more `resvae
# bench` flags), OUT (where each preset's JSON record goes; default a new temporary folder),
# DEADLINE_SECONDS (570: when the script stops starting or running benches), PYTHON (python).
# A quick check of the script on a CPU (seconds, a tiny width, eager):
#   BENCH_SECONDS=2 DEVICE=cpu BATCHES=8 MATMUL_SIZE=256 \
#     EXTRA_ARGS="--width 0.0625 --compile false" bash benchmarks/gpu.sh
set -euo pipefail

cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
BENCH_SECONDS=${BENCH_SECONDS:-120}
PRESETS=${PRESETS:-study-28 study-100}
BATCHES=${BATCHES:-256 128 64 32}
MATMUL_SIZE=${MATMUL_SIZE:-8192}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${DEADLINE_SECONDS:-570}))  # 9.5 minutes from now unless told
mkdir -p "$OUT"

"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: "
                                 f"{torch.cuda.is_available()}")'
if [[ $DEVICE == cuda* ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv || true; fi

for preset in $PRESETS; do
  record="$OUT/$preset.json"
  rm -f "$record"
  for batch in $BATCHES; do
    left=$((DEADLINE - SECONDS))
    if ((left < 30)); then echo "$preset: no time left before the 10-minute deadline"; break; fi
    echo "== $preset: batch $batch, bf16, compiled, ${BENCH_SECONDS}s (at most ${left}s) =="
    status=0
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    timeout "$left" "$PYTHON" -m resvae bench --preset "$preset" --synthetic \
      --precision bf16 --compile --batch-size "$batch" --seconds "$BENCH_SECONDS" \
      --device "$DEVICE" --matmul-size "$MATMUL_SIZE" --json $EXTRA_ARGS \
      >"$record.tmp" 2>"$OUT/$preset.log" || status=$?
    if ((status == 0)); then
      mv "$record.tmp" "$record"
      break
    fi
    if grep -qi "out of memory" "$OUT/$preset.log"; then
      echo "$preset: batch $batch does not fit; trying a smaller one"
      continue
    fi
    ((status == 124)) && echo "$preset: stopped at the deadline" || tail -n 20 "$OUT/$preset.log"
    break
  done
  if [[ -f $record ]]; then
    "$PYTHON" - "$record" "$preset" <<'EOF'
import json
import sys

r, preset = json.load(open(sys.argv[1])), sys.argv[2]
# The study's training times on a GTX 1070 (README, the study's Table 1). Its epoch counts are
# not known (early stopping after 50 epochs without gain, at most 1000 epochs), so runs are
# given as hours per 100 and per 1000 epochs, and as the epochs the study's hours buy here.
STUDY_HOURS = {"study-28": 79.2, "study-40": 61.9, "study-70": 80.0, "study-100": 164.7}
ips = r["images_per_s"]


def rate(gflops):
    return f"{gflops / 1e3:,.1f} TFLOP/s" if gflops >= 1e3 else f"{gflops:,.0f} GFLOP/s"



epoch_h = 50_000 / ips / 3600
print(f"{preset}: {r['device_name']}, batch {r['batch_size']}, {r['variant']}")
print(f"  {ips:,.0f} images/s ({r['speedup_vs_baseline']:.2f}x the eager fp32 baseline's "
      f"{r['baseline_images_per_s']:,.0f}); {r['flops_per_image'] / 1e9:.2f} GFLOP per training "
      f"image -> {rate(r['achieved_gflops'])}")
print(f"  {r['ratio_to_bf16_peak']:.0%} of the device's bf16 matmul ceiling "
      f"({rate(r['peak_bf16_gflops'])} at {r['matmul_size']}^3; fp32: "
      f"{rate(r['peak_fp32_gflops'])}); first 3 steps (compiling included) "
      f"{r['variants'][r['variant']]['warmup_seconds']:.0f} s")
print(f"  one CIFAR-10 epoch (50,000 images): {epoch_h * 60:.1f} min; 100 epochs: "
      f"{100 * epoch_h:.1f} h; 1000 epochs (the presets' maximum): {1000 * epoch_h:.1f} h")
if preset in STUDY_HOURS:
    h = STUDY_HOURS[preset]
    print(f"  the study's {h} h on a GTX 1070 train {h / epoch_h:,.0f} epochs here")
for name, v in r["variants"].items():  # EXTRA_ARGS="--variants ...": each side by side
    if name not in (r["variant"], "baseline"):
        print(f"  variant {name}: {v['images_per_s']:,.0f} images/s "
              f"({v['speedup_vs_baseline']:.2f}x the baseline)")
EOF
    echo "  (record: $record)"
  fi
done
