#!/usr/bin/env bash
# nanochat's speedrun on one node of 8 GPUs: raw web text -> tokenizer -> base -> mid -> sft -> rl ->
# evaluation -> report card. Every size comes from the presets in conf/experiment/speedrun/ (d20, 8 GPUs,
# nanochat's batch and horizon); the variables below change the run without editing anything:
#
#   bash recipes/speedrun.sh                        d20 on 8 GPUs; the plans printed first estimate each stage
#   MODEL=d26 NPROC=4 bash recipes/speedrun.sh      another depth, another number of GPUs
#   DATA_FILES='/data/fineweb/*.parquet' bash ...   pretraining text from local parquet, not the hub
#   EVAL_BUNDLE=/data/eval_bundle bash ...          also CORE, on the DCLM eval bundle in that folder
#   bash recipes/speedrun.sh --dry-run              print every stage's run plan and exit
#   SMOKE=1 bash recipes/speedrun.sh                every step on a CPU in minutes (the tests run it):
#                                                   conf/experiment/speedrun_smoke/, 2 gloo processes
#
# Artifacts go to $LLM_HOME (default ./artifacts); a rerun resumes each unfinished stage. SKIP_SETUP=1
# leaves out the install step (recipes/setup.sh) when the package is installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLM_HOME="${LLM_HOME:-$PWD/artifacts}"
dry_run=$([[ "${1:-}" == "--dry-run" ]] && echo 1 || echo 0)

stages=(base mid sft rl)
if [[ "${SMOKE:-0}" == 1 ]]; then
    preset=speedrun_smoke
    tokenizer_args=(data=bundled max_chars=2000000)
    # offline: ARC and MMLU from the rows shipped with the package, a few examples of every task
    eval_args=(max_per_task=4 generation.max_tokens=32 heldout.max_tokens=8192
               "chat_loss.val_tasks=[{name:identity,split:train,stop:8}]" task_options.arc_easy.source=fixture
               task_options.arc_challenge.source=fixture task_options.mmlu.source=fixture)
else
    preset=speedrun
    tokenizer_args=(data=fineweb_edu)   # nanochat: ~2B characters of FineWeb-Edu
    eval_args=()
fi
# command-line choices over the presets' (empty: the preset's own)
run_args=(${MODEL:+model=$MODEL} ${NPROC:+trainer.devices=$NPROC})
base_data=()
if [[ -n "${DATA_FILES:-}" ]]; then
    base_data=(data.source.kind=files "data.source.files=[$DATA_FILES]")
    tokenizer_args=(data=fineweb_edu data.source.kind=files "data.source.files=[$DATA_FILES]")
fi

train() {  # train <stage> [overrides...]: one stage with its preset
    local stage=$1; shift
    python -m llm.train "stage=$stage" "experiment=$preset/$stage" "${run_args[@]}" "$@"
}

echo "== run plans (${preset}, ${MODEL:-preset model}, ${NPROC:-preset devices} devices)"
for stage in "${stages[@]}"; do
    extra=(); [[ $stage == base ]] && extra=("${base_data[@]}")
    # a plan whose data cannot be read yet (a hub mixture, offline) says so in one line and the others follow
    train "$stage" "${extra[@]}" plan_only=true || echo "   ($stage: no plan without its data, see above)"
done
(( dry_run )) && exit 0

[[ "${SKIP_SETUP:-0}" == 1 ]] || bash recipes/setup.sh
# the tokenizer's vocabulary is the model's: read it from the preset, so it is set in one place
vocab=$(python -m llm.train stage=base "experiment=$preset/base" "${run_args[@]}" --cfg job --package model \
        | awk '$1 == "vocab_size:" {print $2}')
[[ -f "$LLM_HOME/tokenizer/tokenizer.model" ]] || python -m llm.train_tokenizer "vocab_size=$vocab" "${tokenizer_args[@]}"

train base "${base_data[@]}"
train mid
train sft
train rl

# evaluation on the same ranks as training (trainer.devices of the preset or NPROC)
eval_ranks=(trainer=ddp "trainer.devices=$(python -m llm.train stage=base "experiment=$preset/base" "${run_args[@]}" \
    --cfg job --package trainer | awk '$1 == "devices:" {print $2}')")
[[ "${SMOKE:-0}" == 1 ]] && eval_ranks+=(trainer.accelerator=cpu)
base_eval=("tasks=[bpb,chat_loss]")
[[ -n "${EVAL_BUNDLE:-}" ]] && base_eval=("tasks=[bpb,chat_loss,core]" "core.bundle=$EVAL_BUNDLE")
python -m llm.eval source=base "${base_eval[@]}" "${eval_ranks[@]}" "${eval_args[@]}"
for source in mid sft rl; do
    python -m llm.eval "source=$source" "tasks=[chat_loss,arc_easy,arc_challenge,mmlu,gsm8k,humaneval]" \
        "${eval_ranks[@]}" "${eval_args[@]}"
done
python -m llm.report
echo "report card: $LLM_HOME/report.md"
