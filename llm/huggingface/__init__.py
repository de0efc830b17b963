"""Our artifacts as transformers NanoChat folders, and back.

transformers ships nanochat's architecture natively (`model_type: "nanochat"`, NanoChatForCausalLM, no
remote code), and our GPT is that architecture, so a model moves between the two exactly:

    config.py          GPTConfig <-> NanoChatConfig fields; the shapes that have no NanoChat equivalent
    weights.py         our parameter names <-> transformers' (the tensors themselves are the same)
    tokenizer_json.py  our sentencepiece model <-> a `tokenizers` BPE (tokenizer.json) that encodes the same
    chat_template.py   the jinja chat template that renders like Tokenizer.render_for_completion
    model_card.py      README.md for the hub, with the artifact's metrics
    folder.py          writing an exported folder / reading one into an artifact, each all-or-nothing

Nothing here imports Hydra; `python -m llm.export` and `python -m llm.import_hf` are the commands.
Exporting needs only `tokenizers` and `safetensors`; importing reads the config with transformers.
"""
