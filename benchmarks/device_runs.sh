#!/usr/bin/env bash
# The device runs behind benchmarks/RESULTS.md (session 2), one argument per call:
#   gpu-tests-and-scaling | peers | peers-capped | peers-uncapped | kv8-check | envelope
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
    python3 -m yalm_runner.bench_multigpu --shape 13b --gpus 2 --gpu-memory 8GiB --rows 128 \
      -n 16 --json "$OUT/multigpu.json" 2>&1 | tee "$OUT/multigpu.txt"
    ;;
  peers)  # as run in session 2 (465 s)
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes "" --gpu-memory 8GiB \
      --peers zero,accelerate --uncapped-peers "" -n 32 --max-batch 512 --kv-bits 8 \
      --peer-timeout 200 --json "$OUT/bench13b.json" 2>&1 | tee "$OUT/bench13b.txt"
    ;;
  peers-capped)  # next: the compressed-KV rows that session 2 could not measure
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes "" --gpu-memory 8GiB \
      --peers zero,accelerate --uncapped-peers "" -n 32 --max-batch 512 --kv-bits 4 \
      --peer-timeout 200 --json "$OUT/bench13b.json" 2>&1 | tee "$OUT/bench13b.txt"
    ;;
  peers-uncapped)  # ZeRO-3 uncapped at B=32, and ours within ZeRO's peak GPU memory
    python3 -m yalm_runner.cli bench --shape 13b --batch-sizes 32 --peers "" \
      --uncapped-peers zero -n 32 --peer-timeout 200 --json "$OUT/uncapped.json" 2>&1 \
      | tee "$OUT/uncapped.txt"
    ;;
  kv8-check)  # ours alone at the 8-bit-KV plan, row-major against slot-major host cache
    python3 - <<'PY' 2>&1 | tee "$OUT/kv8.txt"
import torch
from yalm_runner.bench import SHAPES, SyntheticStore, _try_ours, format_table, measure_h2d
from yalm_runner.offload import OffloadPolicy, parse_bytes
from yalm_runner.planning import plan_memory
from yalm_runner.streaming import StreamingWeights
store = SyntheticStore(SHAPES["13b"], torch.bfloat16)
pinned = measure_h2d()["pinned"]
rows = []
for layout in ("rows", "slots"):
    policy = OffloadPolicy(gpu_memory_bytes=parse_bytes("8GiB"), weights_on="cpu", kv_bits=8,
                           kv_layout=layout)
    plan = plan_memory(store, torch.device("cuda"), torch.bfloat16, policy, batch_size=None,
                       max_context=160, prompt_tokens=128, rows=512)
    print(f"pinned {pinned / 1e9:.1f} GB/s; {layout}: {plan.describe()}", flush=True)
    with StreamingWeights(store, "cuda", torch.bfloat16, plan.placement, verify=False) as w:
        row = _try_ours(w, plan.batch_size, 128, 32, policy, pinned, plan, f"8-bit KV {layout}")
    rows += [row] if row else []
    torch.cuda.empty_cache()
print(format_table(rows))
PY
    ;;
  envelope)
    python3 -m yalm_runner.bench_envelope --shape yalm-100b --quantize int4 --group-size 128 \
      --gpu-memory 8GiB --cpu-memory 64GiB --kv-bits 4 --prompt-len 100-128 -n 128 \
      --json "$OUT/envelope.json" 2>&1 | tee "$OUT/envelope.txt"
    ;;
  *) echo "usage: $0 gpu-tests-and-scaling|peers|peers-capped|peers-uncapped|envelope" >&2
     exit 2 ;;
esac
