#!/usr/bin/env bash
# Installs nanochat-lightning into the current Python, with what the tests need:
#   bash recipes/setup.sh          the package (CPU torch if no torch is installed yet), bubblewrap
#   bash recipes/setup.sh --dev    + test tools (pytest, openai client, nbclient, headless Chromium,
#                                    the Debian packages the bundled corpus is rebuilt from)
set -euo pipefail
cd "$(dirname "$0")/.."

# A plain `pip install torch` may pull a multi-GB CUDA build; on a machine without torch take the CPU build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
need=()
# HumanEval's sandbox runs model-written code in bubblewrap's namespaces (llm/evaluate/sandbox).
command -v bwrap >/dev/null || need+=(bubblewrap)
if [[ "${1:-}" == "--dev" ]]; then
    pip install -q -e ".[dev]"
    command -v chromium >/dev/null || need+=(chromium)
    [[ -e /usr/share/doc/dict-devil/copyright ]] || need+=(dict-devil)
    [[ -e /usr/share/doc/jargon-text/copyright ]] || need+=(jargon-text)
else
    pip install -q -e .
fi
if (( ${#need[@]} )); then
    SUDO=$([[ $(id -u) == 0 ]] && echo "" || echo sudo)
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python -c "import llm, torch, lightning; print(f'nanochat-lightning ready: torch {torch.__version__}, lightning {lightning.__version__}')"
