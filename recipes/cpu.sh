#!/usr/bin/env bash
# The whole pipeline on the bundled data, on a laptop CPU: tokenizer -> base pretraining.
# Artifacts go to $LLM_HOME (default ./artifacts); rerunning resumes or skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup.sh
export LLM_HOME="${LLM_HOME:-$PWD/artifacts}"

[[ -f "$LLM_HOME/tokenizer/tokenizer.model" ]] || python -m llm.train_tokenizer vocab_size=8192
python -m llm.train stage=base experiment=cpu_demo

python - <<'PY'
import json, os
home = os.environ["LLM_HOME"]
tok = json.load(open(f"{home}/tokenizer/compression.json"))
base = json.load(open(f"{home}/base/metrics.json"))
print(f"tokenizer: vocab {tok['vocab_size']}, bytes/token " +
      ", ".join(f"{k} {v:.2f}" for k, v in tok["bytes_per_token"].items()))
print(f"base: {base['steps']} steps, {base['tokens']:,} tokens, train loss {base['train_loss']:.3f}, "
      f"val bpb {base['val_bpb']:.3f}, {base['wall_time_s'] / 60:.1f} min")
PY
