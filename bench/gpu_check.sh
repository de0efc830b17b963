#!/usr/bin/env bash
# What a GPU user needs to know, in at most 8 minutes on one H100/H200 (bash bench/gpu_check.sh):
#   1. base d12 and d20: tokens/s, MFU (of the datasheet bf16 peak) and peak memory, bf16, T=2048, the largest
#      micro-batch that fits, torch.compile off and on; FSDP2 (fully_shard per block) on the one device
#   2. decoding: tokens/s at batch 1 and 32 (d20, random weights, bf16)
#   3. the server: requests/s at 1 and 16 concurrent streaming clients
# Each part gets a time budget; one that overruns is stopped and the check goes on (its line says so).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no GPU"; exit 1; }
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

part() {  # part <seconds> <title> <command...>
    local budget=$1 title=$2; shift 2
    echo "== $title (at most ${budget}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$budget" "$@" 2>&1 | grep -v -e "^Warning" -e "UserWarning" -e "^\s*warnings.warn"
    local rc=${PIPESTATUS[0]}
    (( rc == 124 )) && echo "   (stopped after ${budget}s)"
    (( rc != 0 && rc != 124 )) && echo "   (failed with exit status $rc)"
    echo "   took $((SECONDS - start))s"
}

part 150 "base d12 / d20, compile off" python bench/gpu_train.py --depths 12 20 --compile off --fsdp --steps 8
part 150 "base d12 / d20, compile on" python bench/gpu_train.py --depths 12 20 --compile on --steps 8 --max-batch 32
part 60 "decode d20" python bench/decode.py --device cuda --depth 20 --precision bf16 --batches 1 32 \
    --prompt 256 --new 128 --repeats 2 --no-cache-new 4
part 90 "server d20, 16 clients" python bench/serve.py --device cuda --depth 20 --clients 1 16 --requests 4 \
    --max-tokens 64 --max-batch-size 32
