#!/usr/bin/env bash
# The whole pipeline on the bundled data, on a laptop CPU:
#   tokenizer -> base -> mid -> sft -> rl (arithmetic) -> eval -> report card
# Artifacts go to $LLM_HOME (default ./artifacts); rerunning resumes unfinished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash recipes/setup.sh
export LLM_HOME="${LLM_HOME:-$PWD/artifacts}"

[[ -f "$LLM_HOME/tokenizer/tokenizer.model" ]] || python -m llm.train_tokenizer vocab_size=8192
python -m llm.train stage=base experiment=cpu_demo
python -m llm.train stage=mid experiment=cpu_demo trainer.max_steps=100
python -m llm.train stage=sft experiment=cpu_demo trainer.max_steps=100
python -m llm.train stage=rl experiment=cpu_demo data=rl_arith trainer.max_steps=30 \
    stage.module.sampling.max_tokens=64 optimizer.lr_scale=0.2

# offline, ARC and MMLU use the rows shipped with the package; GSM8K is the real test set
offline="task_options.arc_easy.source=fixture task_options.arc_challenge.source=fixture task_options.mmlu.source=fixture"
python -m llm.eval source=base tasks=[bpb,chat_loss]
python -m llm.eval source=mid tasks=[chat_loss]
python -m llm.eval source=sft tasks=[chat_loss,arc_easy,arc_challenge,mmlu,gsm8k,humaneval] max_per_task=64 $offline
python -m llm.eval source=rl tasks=[gsm8k,arithmetic] max_per_task=64
python -m llm.report
echo "report card: $LLM_HOME/report.md"
