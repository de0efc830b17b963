"""`python -m llm.export` / `llm.import_hf`: transformers' NanoChat computes what our GPT computes, the exported
tokenizer encodes as ours, the chat template renders as ours, and export -> import loses nothing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import CONF_DIR, compose_config
from hf_support import random_artifact, random_model, run_command
from test_tokenizer import DOCS, EXPLICIT_STRINGS, HYPO, TRICKY_PIECES
from tiny_chat import free_port, start_server, stop_server
from llm.artifact import load_artifact, read_meta, save_artifact
from llm.generate.engine import Generator
from llm.model.gpt import GPTConfig
from llm.generate.sampling import Sampling
from llm.huggingface.config import model_overrides
from llm.huggingface.folder import export_folder, import_folder, read_tokenizer
from llm.tasks import build_task
from llm.tokenizer import SPECIAL_TOKENS
from llm.train import model_config, run

transformers = pytest.importorskip("transformers")

CONTEXT = 256
METRICS = {"steps": 7, "num_params": 1234, "eval": {"chatcore": 0.125, "tasks": {"arc_easy": {
    "accuracy": 0.375, "total": 8, "centered": 0.1667}}}}
MAX_LOGIT_DIFF = 1e-4
DEPTHS = [int(p.stem[1:]) for p in (Path(CONF_DIR) / "model").glob("d*.yaml")]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    return random_artifact(tmp_path_factory.mktemp("export") / "sft", tokenizer, METRICS, sequence_len=CONTEXT)


@pytest.fixture(scope="module")
def exported(source):
    out = source.parent / "hf"
    run_command("llm.export", f"source={source}", f"out={out}")
    return out


@pytest.fixture(scope="module")
def ours(source):
    model, tokenizer, _ = load_artifact(source)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False).eval()


@pytest.fixture(scope="module")
def hf_tok(exported):
    return transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=False)


@pytest.fixture(scope="module")
def imported(exported):
    run_command("llm.import_hf", f"path={exported}", "name=imported", f"paths.artifacts={exported.parent}")
    return exported.parent / "imported"


def logits_difference(model, hf_model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return float((model(x) - hf_model(x).logits).abs().max())


# ----------------------------------------------------------------------------- the folder and the model


def test_export_writes_a_complete_transformers_folder(exported, hf_model, source):
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "README.md"} <= files
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "nanochat" and "auto_map" not in config  # native class, no remote code
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    _, tokenizer, _ = load_artifact(source)
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.special_id("assistant_end"), tokenizer.bos_id]
    card = (exported / "README.md").read_text()
    assert "library_name: transformers" in card and "37.50% (n=8)" in card and "0.125" in card


def _prompts(tokenizer) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(1)
    every_special = [tokenizer.bos_id]
    for name in SPECIAL_TOKENS[1:]:
        every_special += [tokenizer.special_id(name), *tokenizer.encode(f" {name[2:-2]} says hi")]
    return {"short": torch.randint(0, tokenizer.vocab_size, (9,), generator=g).tolist(),
            "longer than 64": torch.randint(0, tokenizer.vocab_size, (200,), generator=g).tolist(),
            "every special token": every_special}


@pytest.mark.parametrize("kind", ["short", "longer than 64", "every special token"])
def test_transformers_logits_equal_ours(ours, hf_model, kind):
    model, tokenizer = ours
    diff = logits_difference(model, hf_model, _prompts(tokenizer)[kind])
    print(f"max |logit difference| ({kind}): {diff:.3g}")
    assert diff <= MAX_LOGIT_DIFF


def test_other_shapes_export_exactly(tmp_path, tokenizer):
    """GQA, tied embeddings, exact GELU, no soft-cap and another rotary base all have NanoChat equivalents."""
    shape = dict(n_kv_head=1, tie_embeddings=True, mlp="gelu", logit_softcap=None, rope_theta=5000.0,
                 sequence_len=CONTEXT)
    source = random_artifact(tmp_path / "sft", tokenizer, depth=4, **shape)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export_folder(source, tmp_path / "hf")).eval()
    model, _, _ = load_artifact(source)
    assert hf_model.config.num_key_value_heads == 1 and hf_model.config.tie_word_embeddings
    ids = torch.randint(0, tokenizer.vocab_size, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    assert logits_difference(model, hf_model, ids) <= MAX_LOGIT_DIFF


def test_greedy_generation_equals_our_generator(ours, hf_model):
    model, tokenizer = ours
    generator = Generator(model, tokenizer, tool=None)  # transformers has no calculator tool
    conv = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    for prompt in (tokenizer.render_for_completion(conv), tokenizer.encode("The object", prepend_bos=True)):
        (expected, _), = generator.generate_batch([prompt], Sampling(max_tokens=32, temperature=0.0))
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=32)
        assert out[0, len(prompt):].tolist() == expected and len(expected) == 32


def test_learned_positions_refuse_to_export(tmp_path, tokenizer):
    model = random_model(tokenizer, positions="learned", sequence_len=64)
    source = save_artifact(tmp_path / "base", model.state_dict(), model.config, tokenizer, "base", {})
    with pytest.raises(ValueError, match=r"positions='learned' cannot be exported.*model=dNN"):
        export_folder(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------- tokenizer and chat template


def assert_encodes_like_ours(hf_tok, tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    # split_special_tokens: text that spells "<|bos|>" stays text, as in ours (transformers reads it as the token)
    assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids
    assert hf_tok.decode(ids) == text
    if not any(t in text for t in (*SPECIAL_TOKENS, "<unk>")):
        assert hf_tok(text)["input_ids"] == [tokenizer.bos_id, *ids]  # the plain call, bos first


@HYPO
@given(st.text())
def test_tokenizer_encodes_any_text_like_ours(hf_tok, ours, text):
    assert_encodes_like_ours(hf_tok, ours[1], text)


@HYPO
@given(st.lists(st.sampled_from(TRICKY_PIECES), max_size=60))
def test_tokenizer_encodes_tricky_pieces_like_ours(hf_tok, ours, parts):
    assert_encodes_like_ours(hf_tok, ours[1], "".join(parts))


def test_tokenizer_encodes_code_and_prose_like_ours(hf_tok, ours):
    for text in [*EXPLICIT_STRINGS, *DOCS[:40]]:
        assert_encodes_like_ours(hf_tok, ours[1], text)


def test_special_tokens_are_single_ids(hf_tok, ours):
    tokenizer = ours[1]
    for name in SPECIAL_TOKENS:
        assert hf_tok(name, add_special_tokens=False)["input_ids"] == [tokenizer.special_id(name)]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tokenizer.bos_id, tokenizer.special_id("assistant_end"))


def _conversations() -> list[dict]:
    tools = [build_task("arithmetic", "test", size=2)[0], build_task("spelling_bee", "test", size=2)[1]]
    with_system = {"messages": [{"role": "system", "content": "You are terse.\nVery terse."}, *tools[0]["messages"],
                                {"role": "user", "content": "  and  again?\n"}, *tools[1]["messages"][1:]]}
    several = {"messages": [{"role": "user", "content": "Hi 😀"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "▁odd ▁ spaces\t"}]}
    return [*tools, with_system, several, {"messages": [{"role": "system", "content": ""},
                                                        {"role": "user", "content": "x"}]}]


@pytest.mark.parametrize("index", range(5))
def test_chat_template_renders_like_ours(hf_tok, ours, index):
    tokenizer, conv = ours[1], _conversations()[index]
    prompt = hf_tok.apply_chat_template(conv["messages"], add_generation_prompt=True)["input_ids"]
    assert prompt == tokenizer.render_for_completion(conv)
    if conv["messages"][-1]["role"] == "assistant":
        whole = hf_tok.apply_chat_template(conv["messages"])["input_ids"]
        assert whole == tokenizer.render_conversation(conv)[0]


# ----------------------------------------------------------------------------- import


def test_export_then_import_is_lossless(source, imported):
    before, tok_before, meta_before = load_artifact(source)
    after, tok_after, meta_after = load_artifact(imported)
    assert meta_after["model"] == meta_before["model"]
    assert tok_after.fingerprint() == tok_before.fingerprint() == meta_after["tokenizer_fingerprint"]
    b, a = before.state_dict(), after.state_dict()
    assert b.keys() == a.keys()
    for name in b:
        assert torch.equal(b[name], a[name]), name  # bit-identical, not just close


def test_import_rebuilds_the_tokenizer_from_tokenizer_json_alone(exported, ours, tmp_path):
    folder = tmp_path / "hub"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("tokenizer.model", "model.safetensors"))
    rebuilt, note = read_tokenizer(folder)
    tokenizer = ours[1]
    assert note is None and rebuilt.vocab_size == tokenizer.vocab_size
    for text in [*EXPLICIT_STRINGS, *DOCS[:20], "".join(SPECIAL_TOKENS)]:
        assert rebuilt.encode(text) == tokenizer.encode(text)
    assert [rebuilt.special_id(n) for n in SPECIAL_TOKENS] == [tokenizer.special_id(n) for n in SPECIAL_TOKENS]


def _edit_tokenizer_json(exported: Path, folder: Path, edit) -> Path:
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("tokenizer.model"))
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def _swap_merges(data):
    merges = data["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]


FOREIGN_TOKENIZERS = {
    "pre-tokenizer": lambda d: d.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False}),
    "normalizer": lambda d: d.update(normalizer={"type": "NFKC"}),
    "lacks the special token '<|python_end|>'": lambda d: d.update(
        added_tokens=[t for t in d["added_tokens"] if t["content"] != "<|python_end|>"]),
    "merges are not every split": _swap_merges,
    "no byte fallback": lambda d: d["model"].update(byte_fallback=False),
    "not a BPE": lambda d: d["model"].update(type="Unigram"),
}


@pytest.mark.parametrize("why", FOREIGN_TOKENIZERS)
def test_import_refuses_a_tokenizer_ours_cannot_express(exported, tmp_path, why):
    folder = _edit_tokenizer_json(exported, tmp_path / "hub", FOREIGN_TOKENIZERS[why])
    with pytest.raises(ValueError, match=f"cannot be expressed as our sentencepiece tokenizer: .*{re.escape(why)}"):
        import_folder(folder, tmp_path / "artifact", "sft")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("field, value", [("hidden_act", "silu"), ("intermediate_size", 100),
                                          ("attention_bias", True), ("model_type", "llama")])
def test_import_refuses_a_config_our_gpt_cannot_hold(exported, tmp_path, field, value):
    folder = tmp_path / "hub"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=f"{field}={value!r}, which our GPT cannot hold"):
        import_folder(folder, tmp_path / "artifact", "sft")


@pytest.mark.parametrize("extra", [64, -1])
def test_import_refuses_a_vocabulary_unlike_the_tokenizers(exported, tmp_path, tokenizer, extra):
    folder = tmp_path / "hub"
    shutil.copytree(exported, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": tokenizer.vocab_size + extra}))
    with pytest.raises(ValueError, match=f"vocab_size={tokenizer.vocab_size + extra} but tokenizer.json"):
        import_folder(folder, tmp_path / "artifact", "sft")


ODD_SHAPE = dict(n_kv_head=1, tie_embeddings=True, mlp="gelu", logit_softcap=None, rope_theta=5000.0, n_embd=192,
                 n_head=3)  # depth 3 has no conf/model file either


@pytest.mark.parametrize("depth, shape", [(2, {}), (3, ODD_SHAPE)])
def test_model_overrides_make_llm_train_build_the_imported_shape(tokenizer, depth, shape):
    config = GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=96, **shape)
    composed = compose_config("train", ["trainer=cpu", *model_overrides(config, DEPTHS)])
    assert model_config(composed, tokenizer) == config


def test_imported_folder_trains_one_sft_step(imported, tmp_path):
    overrides = ["stage=sft", f"stage.init_from={imported}", f"tokenizer_dir={imported}", "trainer=cpu",
                 *model_overrides(load_artifact(imported)[0].config, DEPTHS), f"paths.artifacts={tmp_path}",
                 "stage.batch.per_device=2", "stage.batch.per_step=2", "data.num_workers=0",
                 "stage.val_every=1000", "stage.val_batches=1", "trainer.precision=32-true",
                 "trainer.enable_progress_bar=false", "trainer.max_steps=1",
                 "data.tasks=[{name:arithmetic,size:8}]"]
    metrics = run(compose_config("train", overrides))
    assert metrics["steps"] == 1 and read_meta(tmp_path / "sft")["init_from"] == str(imported)


def test_imported_folder_serves_a_chat_request(imported, ours, tmp_path):
    port = free_port()
    proc = start_server(imported, port, "precision=fp32", log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Hello there"}]
        reply = client.chat.completions.create(model="imported", messages=messages, max_tokens=8, temperature=0)
    finally:
        stop_server(proc)
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == len(ours[1].render_for_completion({"messages": messages}))
