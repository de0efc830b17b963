"""Tokenizer.render_conversation / render_for_completion: nanochat's format and the loss mask."""

from __future__ import annotations

import copy

import pytest
import torch

from llm.data.chat import render_row
from llm.model.gpt import GPT, GPTConfig

PLAIN = {"messages": [
    {"role": "user", "content": "Hello there, who are you?"},
    {"role": "assistant", "content": "I am a small model."},
]}
MULTI_TURN = {"messages": [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]}
TOOL = {"messages": [
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute: "},
        {"type": "python", "text": "12 * 7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "So it is 84.\n#### 84"},
    ]},
]}
SYSTEM = {"messages": [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}


def expected(tok, conversation) -> tuple[list[int], list[int]]:
    """The rendering written out token by token: (id, learned?) pairs in nanochat's layout."""
    s = tok.special_id
    pairs = [(tok.bos_id, 0)]
    messages = conversation["messages"]
    if messages[0]["role"] == "system":
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged, *messages[2:]]
    for m in messages:
        if m["role"] == "user":
            pairs += [(s("user_start"), 0), *[(i, 0) for i in tok.encode(m["content"])], (s("user_end"), 0)]
            continue
        pairs.append((s("assistant_start"), 0))
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for p in parts:
            body = tok.encode(p["text"])
            if p["type"] == "text":
                pairs += [(i, 1) for i in body]
            elif p["type"] == "python":
                pairs += [(i, 1) for i in [s("python_start"), *body, s("python_end")]]
            else:
                pairs += [(i, 0) for i in [s("output_start"), *body, s("output_end")]]
        pairs.append((s("assistant_end"), 1))
    return [i for i, _ in pairs], [m for _, m in pairs]


@pytest.mark.parametrize("conversation", [PLAIN, MULTI_TURN, TOOL, SYSTEM], ids=["plain", "multi", "tool", "system"])
def test_rendering_matches_the_format_token_for_token(tokenizer, conversation):
    assert tokenizer.render_conversation(conversation) == expected(tokenizer, conversation)


def learned_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_mask_is_one_exactly_on_what_the_assistant_writes(tokenizer):
    ids, mask = tokenizer.render_conversation(MULTI_TURN)
    assert learned_text(tokenizer, ids, mask) == "Blue.<|assistant_end|>Green, like grass.<|assistant_end|>"
    given = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert given == ("<|bos|><|user_start|>Name a colour.<|user_end|><|assistant_start|>"
                     "<|user_start|>Another one?<|user_end|><|assistant_start|>")

    ids, mask = tokenizer.render_conversation(TOOL)
    # the tool call is learned (with its delimiters), the tool's output is given
    assert learned_text(tokenizer, ids, mask) == (
        "Let me compute: <|python_start|>12 * 7<|python_end|>So it is 84.\n#### 84<|assistant_end|>")
    out_start, out_end = tokenizer.special_id("output_start"), tokenizer.special_id("output_end")
    span = ids.index(out_start), ids.index(out_end)
    assert tokenizer.decode(ids[span[0]:span[1] + 1]) == "<|output_start|>84<|output_end|>"
    assert not any(mask[span[0]:span[1] + 1])


def test_system_message_is_merged_into_the_first_user_turn(tokenizer):
    merged = {"messages": [{"role": "user", "content": "You answer in one word.\n\nCapital of France?"},
                           SYSTEM["messages"][2]]}
    before = copy.deepcopy(SYSTEM)
    assert tokenizer.render_conversation(SYSTEM) == tokenizer.render_conversation(merged)
    assert SYSTEM == before  # the caller's conversation is left alone
    assert tokenizer.special_id("assistant_start") in tokenizer.render_conversation(SYSTEM)[0]


def test_truncation_keeps_a_prefix(tokenizer):
    ids, mask = tokenizer.render_conversation(TOOL)
    for n in (1, 5, len(ids) - 1, len(ids), len(ids) + 10):
        cut_ids, cut_mask = tokenizer.render_conversation(TOOL, max_tokens=n)
        assert cut_ids == ids[:n] and cut_mask == mask[:n] and len(cut_ids) == min(n, len(ids))
    with pytest.raises(ValueError, match="max_tokens=0"):
        tokenizer.render_conversation(TOOL, max_tokens=0)


def test_render_for_completion_primes_the_assistant(tokenizer):
    start = tokenizer.special_id("assistant_start")
    for conversation in (PLAIN, MULTI_TURN, TOOL, SYSTEM):
        prompt = tokenizer.render_for_completion(conversation)
        full, mask = tokenizer.render_conversation(conversation)
        # the prompt is the conversation up to and including the last assistant_start; the rest is the answer
        assert prompt[-1] == start and full[:len(prompt)] == prompt
        assert start not in full[len(prompt):] and mask[len(prompt)] == 1 and mask[-1] == 1
    # a conversation that already ends with the user's turn: just append assistant_start
    question = {"messages": MULTI_TURN["messages"][:3]}
    assert tokenizer.render_for_completion(question) == tokenizer.render_conversation(question)[0] + [start]
    assert tokenizer.render_for_completion(MULTI_TURN) == tokenizer.render_for_completion(question)


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ValueError, match="role"):
        tokenizer.render_conversation({"messages": [{"role": "assistant", "content": "Hi"}]})
    with pytest.raises(ValueError, match="part 0"):
        tokenizer.render_conversation({"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]})


def test_loss_ignores_every_target_the_mask_leaves_out(tokenizer):
    """Changing a masked-out target changes nothing; changing a learned one does."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=128)).eval()
    with torch.no_grad():  # the fresh model's zero-initialised head would predict uniformly: randomise it
        for p in model.parameters():
            p.normal_(0, 0.1)
    seq_len = 96
    inputs, targets = (torch.tensor([row]) for row in render_row(tokenizer, TOOL, seq_len)[:2])
    ids, mask = tokenizer.render_conversation(TOOL, max_tokens=seq_len + 1)
    learned = torch.zeros(seq_len, dtype=torch.bool)
    learned[: len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.bool)
    assert (targets[0] != -1).tolist() == learned.tolist()  # render_row's -1 targets are the mask

    # the same loss as the unmasked targets with GPT's loss_mask
    plain = torch.tensor([ids[1:] + [0] * (seq_len + 1 - len(ids))])
    with torch.no_grad():
        loss = model(inputs, targets=targets)
        assert model(inputs, targets=plain, loss_mask=learned[None].long()) == pytest.approx(loss.item(), abs=1e-6)
        scrambled = plain.clone()
        scrambled[0, ~learned] = torch.randint(0, tokenizer.vocab_size, (int((~learned).sum()),))
        assert model(inputs, targets=scrambled, loss_mask=learned[None].long()) == pytest.approx(loss.item(), abs=1e-6)
        changed = plain.clone()
        first_learned = int(learned.nonzero()[0])
        changed[0, first_learned] = (changed[0, first_learned] + 1) % tokenizer.vocab_size
        assert model(inputs, targets=changed, loss_mask=learned[None].long()).item() != pytest.approx(loss.item())
