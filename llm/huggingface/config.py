"""GPTConfig <-> transformers' NanoChatConfig (config.json), field by field.

transformers' NanoChat (models/nanochat/modeling_nanochat.py) is our GPT, checked line by line:

    ours (llm/model/gpt.py)                         NanoChat
    wte -> norm -> blocks -> norm -> lm_head        embed_tokens -> norm -> layers -> norm -> lm_head
    x + attn(norm(x)); x + mlp(norm(x))             input_layernorm / post_attention_layernorm, residuals
    rotary on channel pairs (i, i + D/2),           rotate_half: q*cos + cat(-x2, x1)*sin, the same pairs
      inv_freq = theta^(-2i/D)                        and frequencies (rope_type "default")
    QK-norm after rotary                            q_norm / k_norm after apply_rotary_pos_emb
    F.rms_norm without a gain, eps = float32 eps    NanoChatRMSNorm without a gain, eps = rms_norm_eps
    c_fc -> relu(x)^2 (or exact gelu) -> c_proj     fc1 -> ACT2FN[hidden_act] -> fc2, intermediate 4 * width
    no biases; GQA: query head h reads kv h // g    attention_bias false; repeat_kv groups the same way
    cap * tanh(logits / cap), after lm_head         final_logit_softcapping, the same formula
    untied or tied lm_head                          tie_word_embeddings

The one thing NanoChat cannot hold is a learned position table (positions="learned", the gpt2 config):
it has rotary positions only, so such a model refuses to export, naming the field.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from llm.model.gpt import GPTConfig

MODEL_TYPE = "nanochat"
ARCHITECTURE = "NanoChatForCausalLM"
# F.rms_norm(x, shape) with eps=None uses the input dtype's machine epsilon; an export runs in float32.
RMS_NORM_EPS = torch.finfo(torch.float32).eps
# Within this, another eps changes a normalised value by under 1e-5 relative: imported with a note.
RMS_NORM_EPS_TOLERATED = 1e-5
ACTIVATIONS = {"relu2": "relu2", "gelu": "gelu"}  # our mlp -> transformers' hidden_act (exact erf GELU)
EXPORTABLE = "model=dNN (d2, d4, ..., d32: rotary positions, with any mlp, tie_embeddings or logit_softcap)"


def check_exportable(config: GPTConfig) -> None:
    """Raise ValueError, naming the field, when NanoChat cannot hold this shape (before any weight is read)."""
    if config.positions != "rope":
        raise ValueError(f"positions={config.positions!r} cannot be exported: transformers' NanoChat has rotary "
                         f"position embeddings only, no learned position table. Models that export: {EXPORTABLE}")
    if config.mlp not in ACTIVATIONS:
        raise ValueError(f"mlp={config.mlp!r} cannot be exported: NanoChat's activations here are "
                         f"{sorted(ACTIVATIONS)}. Models that export: {EXPORTABLE}")


def to_hf_config(config: GPTConfig, token_ids: dict[str, int], dtype: torch.dtype) -> dict:
    """config.json for transformers' NanoChatConfig; token_ids: bos_token_id, eos_token_id, pad_token_id
    (tokenizer_json.special_token_ids)."""
    check_exportable(config)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": ACTIVATIONS[config.mlp],
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)},
        "final_logit_softcapping": config.logit_softcap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        **token_ids,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _refuse(field: str, value, why: str) -> ValueError:
    return ValueError(f"this NanoChat checkpoint has {field}={value!r}, which our GPT cannot hold: {why}")


def from_hf_config(hf) -> tuple[GPTConfig, list[str]]:
    """(GPTConfig, notes) of a transformers NanoChatConfig; ValueError naming the first field that does not map.
    Notes say what maps only approximately (another rms_norm_eps)."""
    if hf.model_type != MODEL_TYPE:
        raise _refuse("model_type", hf.model_type, "only transformers' NanoChat (model_type 'nanochat') is our "
                      "architecture; convert other models with their own tools")
    width, heads = hf.hidden_size, hf.num_attention_heads
    if hf.hidden_act not in ACTIVATIONS.values():
        raise _refuse("hidden_act", hf.hidden_act, f"our MLP is one of {sorted(ACTIVATIONS.values())}")
    if hf.intermediate_size != 4 * width:
        raise _refuse("intermediate_size", hf.intermediate_size, f"our MLP is 4 x hidden_size = {4 * width} wide")
    if hf.attention_bias:
        raise _refuse("attention_bias", True, "our attention has no biases")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim * heads != width:
        raise _refuse("head_dim", head_dim, f"our heads are hidden_size / num_attention_heads = {width // heads} wide")
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        raise _refuse("rope_parameters", rope, "our rotary embedding is the plain one (rope_type 'default', "
                      "with a rope_theta), without scaling")
    notes = []
    if hf.rms_norm_eps != RMS_NORM_EPS:
        if not 0 <= hf.rms_norm_eps <= RMS_NORM_EPS_TOLERATED:
            raise _refuse("rms_norm_eps", hf.rms_norm_eps, f"our RMSNorm uses eps={RMS_NORM_EPS:.3g}, and "
                          f"one above {RMS_NORM_EPS_TOLERATED:g} changes the model's outputs")
        notes.append(f"rms_norm_eps={hf.rms_norm_eps:g} becomes our {RMS_NORM_EPS:.3g}: normalised activations "
                     f"change by under {RMS_NORM_EPS_TOLERATED:g} relative")
    mlp = next(ours for ours, theirs in ACTIVATIONS.items() if theirs == hf.hidden_act)
    config = GPTConfig(
        vocab_size=hf.vocab_size, sequence_len=hf.max_position_embeddings, n_layer=hf.num_hidden_layers,
        n_embd=width, n_head=heads, n_kv_head=hf.num_key_value_heads or heads, positions="rope", mlp=mlp,
        tie_embeddings=bool(hf.tie_word_embeddings), logit_softcap=hf.final_logit_softcapping,
        rope_theta=float(rope["rope_theta"]),
    )
    return config, notes


def model_overrides(config: GPTConfig, named_depths: Collection[int]) -> list[str]:
    """The overrides under which `python -m llm.train` builds exactly this shape (what `stage=sft
    init_from=<imported folder>` needs): model=dNN (a depth without its conf/model file: model=d2 model.depth=NN),
    its sequence_len, and every field the depth dial sizes otherwise (conf/model/_depth_dial.yaml lists them all).
    named_depths: the NN of the conf/model/dNN.yaml files."""
    n = config.n_layer
    dial = GPTConfig.from_depth(n, vocab_size=config.vocab_size)
    out = [f"model=d{n}"] if n in named_depths else ["model=d2", f"model.depth={n}"]
    out.append(f"model.sequence_len={config.sequence_len}")
    for name, value in vars(config).items():
        if name not in ("vocab_size", "sequence_len") and getattr(dial, name) != value:
            out.append(f"model.{name}={_hydra_value(value)}")
    return out


def _hydra_value(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
