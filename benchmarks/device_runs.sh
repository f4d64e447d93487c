#!/usr/bin/env bash
# The device runs behind benchmarks/RESULTS.md (session 2), one argument per call:
#   gpu-tests-and-scaling | peers | peers-capped | peers-uncapped | kv8-check |
#   tests-and-kv-check | fused-check | envelope | signals | cpu-attention |
#   step-profile | perf-sweep | resume | resume-envelope | envelope-disk | kv-fused |
#   host-attention | sweep-host | envelope-host
# Needs the DeepSpeed wheels in .whl (see RESULTS.md) for "peers"; writes under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "$1" in
  gpu-tests-and-scaling)
    nvidia-smi -L
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_streaming.py tests/test_multigpu.py \
      2>&1 | tail -15
    python3 -m yalm_runner.bench.multigpu --shape 13b --gpus 2 --gpu-memory 8GiB --rows 128 \
      -n 16 --json "$OUT/multigpu.json" 2>&1 | tee "$OUT/multigpu.txt"
    ;;
  peers)  # as run in session 2 (465 s)
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes "" --gpu-memory 8GiB \
      --peers zero,accelerate --uncapped-peers "" -n 32 --max-batch 512 --kv-bits 16,8 \
      --peer-timeout 200 --json "$OUT/bench13b.json" 2>&1 | tee "$OUT/bench13b.txt"
    ;;
  peers-capped)  # session 3: ours at the planner's batch with 8- and 4-bit pinned KV
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes "" --gpu-memory 8GiB \
      --peers zero,accelerate --uncapped-peers "" -n 32 --max-batch 512 --kv-bits 8,4 \
      --peer-timeout 200 --json "$OUT/bench13b.json" 2>&1 | tee "$OUT/bench13b.txt"
    ;;
  peers-uncapped)  # ZeRO-3 uncapped at B=32, and ours within ZeRO's peak GPU memory
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes 32 --peers "" \
      --uncapped-peers zero -n 32 --peer-timeout 200 --json "$OUT/uncapped.json" 2>&1 \
      | tee "$OUT/uncapped.txt"
    ;;
  kv8-check)  # session 2: ours alone at the 8-bit-KV plan, row-major against slot-major
    python3 benchmarks/kv_check.py 8 2>&1 | tee "$OUT/kv8.txt"
    ;;
  tests-and-kv-check)  # session 3: GPU tests, then ours alone at the planner's batch for
    # 16/8/4-bit pinned KV in both host layouts (layer-major grouped prefill, exact pinning)
    nvidia-smi -L
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_streaming.py 2>&1 | tail -15
    python3 benchmarks/kv_check.py 16,8,4 2>&1 | tee "$OUT/kv.txt"
    ;;
  fused-check)  # session 3: the fused 4-bit kernel against torch's dequantization
    nvidia-smi -L
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_quant.py tests/test_streaming.py \
      2>&1 | tail -5
    python3 benchmarks/fused_check.py 2>&1 | tee "$OUT/fused.txt"
    ;;
  resume)  # issue 16: exact resume's GPU kill tests, then kills at fractions of a tiny bf16 job
    # on the GPU: the re-run's time against what was left (tee: a cut-off run keeps its lines)
    nvidia-smi -L
    timeout 360 python3 -m pytest -q -p no:cacheprovider -m gpu -rf tests/test_resume_exact.py \
      2>&1 | tee "$OUT/gpu_tests.txt"
    timeout 200 python3 benchmarks/resume_exact.py --device cuda --only kills 2>&1 \
      | tee "$OUT/resume_kills.txt"
    ;;
  resume-envelope)  # issue 16: the 100B envelope (40 of its 80 layers, to save device time,
    # at the whole envelope's 64 rows: the planner gives half the layers 160, which ran past
    # 250 s) with KV checkpoints off and at every checkpoint on one weight placement
    python3 benchmarks/resume_exact.py --envelope --envelope-layers 40 --envelope-batch 64 \
      -n 64 --kv-dir "${KV_DIR:-/tmp}" \
      2>&1 | tee "$OUT/resume_envelope.txt"
    ;;
  envelope)
    python3 -m yalm_runner.bench.envelope --shape yalm-100b --quantize int4 --group-size 128 \
      --gpu-memory 8GiB --cpu-memory 64GiB --kv-bits 4 --prompt-len 100-128 -n 128 \
      --json "$OUT/envelope.json" 2>&1 | tee "$OUT/envelope.txt"
    ;;
  kv-fused)  # issue 17: the fused KV kernel against torch's expansion (codec rates, then the
    # 13B int4 g64 + 4-bit KV configuration at the planner's batch with each)
    nvidia-smi -L
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_streaming.py -k fused \
      2>&1 | tail -3
    python3 benchmarks/kv_fused_check.py 2>&1 | tee "$OUT/kv_fused.txt"
    ;;
  envelope-disk)  # issue 17: the same envelope with the planner free to read layers from the
    # drive holding DISK_DIR (measured in the run; the plan is made at the measured link and
    # drive rates, the chosen layers written there as real files and removed after)
    python3 -m yalm_runner.bench.envelope --shape yalm-100b --quantize int4 --group-size 128 \
      --gpu-memory 8GiB --cpu-memory 64GiB --kv-bits 4 --prompt-len 100-128 -n 128 \
      --disk-dir "${DISK_DIR:-/tmp}" --json "$OUT/envelope-disk.json" 2>&1 \
      | tee "$OUT/envelope-disk.txt"
    ;;
  signals)  # issue 15: signals per hour beside texts per hour, same prompts, same run
    python3 -m yalm_runner.bench.signals --shape yalm-100b --quantize int4 --group-size 128 \
      --gpu-memory 8GiB --cpu-memory 64GiB --kv-bits 4 --prompt-len 800 \
      --content-free-len 100 --answers 3 -n 128 --json "$OUT/signals.json" 2>&1 \
      | tee "$OUT/signals.txt"
    ;;
  cpu-attention)  # issue 17: can 16 cores attend over a RAM-resident KV cache in a layer's time?
    python3 benchmarks/cpu_attention.py --rows 64 --contexts 128,256 2>&1 \
      | tee "$OUT/cpu_attention.txt"
    ;;
  host-attention)  # issue 17: decode attention on the host (hostattn): the GPU tests against
    # the device path, then the compiled kernel's time per layer at the envelope's rows, alone
    # and while pinned copies run flat out (the layer's weights' time is the budget)
    nvidia-smi -L
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hostattn.py \
      tests/test_streaming.py -k "host" 2>&1 | tail -5
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_resume_exact.py \
      -k "attended" 2>&1 | tail -5
    # at every core, one fewer (the engine's copy and reader threads need one), and one (a
    # core's own rate: session 9 measured 1.4 G elements/s a core here, 5-8 on a Zen 4)
    python3 benchmarks/cpu_attention.py --kernel-only --rows 77 --contexts 128,178,256 \
      --threads "$(nproc),$(( $(nproc) - 1 )),1" 2>&1 | tee "$OUT/host_attention.txt"
    ;;
  sweep-host)  # issue 17: the planner sweep's host-attention cases (8/4-bit, weights pinned
    # and on disk, 8 and 4 GiB): the reserved peak under each cap, the step against the model
    # with the host's rate calibrated while the link streams
    timeout 560 python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/test_planner_safety.py \
      -k "host" 2>&1 | tee "$OUT/sweep_host.txt" | grep -E "reserved|passed|failed|Error"
    ;;
  envelope-host)  # issue 17: the envelope with decode attention on the host (the KV cache
    # never crosses the link: the floor is the weights' bytes alone), the planner free to keep
    # layers on the GPU and to read some from the drive holding DISK_DIR, as envelope-disk
    python3 -m yalm_runner.bench.envelope --shape yalm-100b --quantize int4 --group-size 128 \
      --gpu-memory 8GiB --cpu-memory 64GiB --kv-bits 4 --prompt-len 100-128 -n 128 \
      --kv-attention host --disk-dir "${DISK_DIR:-/tmp}" --json "$OUT/envelope-host.json" 2>&1 | tee "$OUT/envelope-host.txt"
    ;;
  step-profile)  # issue 17: where the envelope's step goes above its floor (20-layer slice)
    python3 benchmarks/step_profile.py --layers 20 --steps 8 2>&1 | tee "$OUT/step_profile.txt"
    ;;
  perf-sweep)  # issue 17: decode tokens/s against batch for the plot, with each row's
    # predicted step (rates calibrated in the run). One weight placement per call, shared by
    # every batch and KV width; one engine per width (its KV memory locked once, largest first).
    echo "estimate ~7.5 min (the step model at 55 GB/s): 13B bf16 placed twice (~35 s each);"
    echo "  KV on the GPU, B=8/32/128, overlap on and off: 6 rows x ~9 s;"
    echo "  8 GiB, KV pinned slot-major 16/8/4 at the planner's batch (422/512/512) and 256, 128:"
    echo "  9 rows, ~140 s + ~35 s locking KV; 13B int4 g64 placed (~15 s), 4-bit KV at 512,"
    echo "  256, 128: ~30 s; ~1 s of calibration a row"
    nvidia-smi -L
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes 8,32,128 -n 16 \
      --json "$OUT/perf-13b-kv-gpu.json" 2>&1 | tee "$OUT/perf-13b-kv-gpu.txt"
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes "" --gpu-memory 8GiB \
      --kv-bits 16,8,4 --kv-layout slots --kv-batches 128,256 --max-batch 512 -n 16 \
      --json "$OUT/perf-13b-kv-pinned.json" 2>&1 | tee "$OUT/perf-13b-kv-pinned.txt"
    python3 -m yalm_runner.cli bench --shape 13b --quantize int4 --group-size 64 \
      --batch-sizes "" --gpu-memory 8GiB --kv-bits 4 --kv-layout slots --kv-batches 128,256 \
      --max-batch 512 -n 16 --json "$OUT/perf-13b-int4.json" 2>&1 | tee "$OUT/perf-13b-int4.txt"
    python3 benchmarks/plot.py "$OUT"/perf-13b-*.json -o "$OUT/throughput.svg" \
      --title "13B shape on one H200: decode tokens/s against batch, and the link's bound"
    ;;
  *) echo "usage: $0 MODE (see the top of this file)" >&2
     exit 2 ;;
esac
