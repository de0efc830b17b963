"""GPT + KVCache: shapes, losses, causality, cache decoding equivalence, init, config validation."""

import pytest
import torch

from llm.model.gpt import GPT, GPTConfig
from llm.model.kv_cache import KVCache

V, T = 128, 64


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=V, sequence_len=T, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    return GPTConfig(**{**base, **overrides})


def randomized(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose zero-init projections are randomised too, so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model.eval()


def tokens(B: int, L: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "rope_gqa": tiny(),
    "learned_gqa": tiny(positions="learned"),
    "gpt2_like": tiny(positions="learned", tie_embeddings=True, mlp="gelu", n_kv_head=4),
}


# ---------------------------------------------------------------- forward and loss


def test_logits_and_loss_shapes():
    model = randomized(tiny())
    idx = tokens(3, 10)
    logits = model(idx)
    assert logits.shape == (3, 10, V) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # soft-capped
    loss = model(idx, targets=tokens(3, 10, seed=2))
    assert loss.shape == () and torch.isfinite(loss)


def test_reductions_are_consistent_and_ignore_masked_targets():
    model = randomized(tiny())
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    targets[0, :5] = -1
    loss_mask = torch.ones(2, 12, dtype=torch.bool)
    loss_mask[1, 3:7] = False
    per_token = model(idx, targets, loss_mask=loss_mask, reduction="none")
    assert per_token.shape == (2, 12)
    counted = (targets != -1) & loss_mask
    assert (per_token[~counted] == 0).all() and (per_token[counted] > 0).all()
    total = model(idx, targets, loss_mask=loss_mask, reduction="sum")
    mean = model(idx, targets, loss_mask=loss_mask)
    torch.testing.assert_close(total, per_token.sum())
    torch.testing.assert_close(mean, total / counted.sum())
    # a 0/1 integer mask means the same as the bool one
    torch.testing.assert_close(model(idx, targets, loss_mask=loss_mask.long()), mean)


def test_changing_a_masked_target_does_not_change_the_loss():
    model = randomized(tiny())
    idx, targets = tokens(2, 12), tokens(2, 12, seed=2)
    loss_mask = torch.ones(2, 12)
    loss_mask[0, 4] = 0
    before = model(idx, targets, loss_mask=loss_mask)
    targets[0, 4] = (targets[0, 4] + 1) % V
    assert torch.equal(model(idx, targets, loss_mask=loss_mask), before)
    assert not torch.equal(model(idx, targets), before)  # the mask is what made the difference


def test_all_targets_ignored_gives_zero_mean_loss():
    model = randomized(tiny())
    loss = model(tokens(1, 5), torch.full((1, 5), -1))
    assert loss.item() == 0.0


def test_bad_reduction_raises():
    model = randomized(tiny())
    with pytest.raises(ValueError, match="avg"):
        model(tokens(1, 4), tokens(1, 4), reduction="avg")


def test_loss_weights_scale_token_losses():
    model, x, y = randomized(tiny()), tokens(2, 9), tokens(2, 9, seed=2)
    weights = torch.randn(2, 9)
    with torch.no_grad():
        want = (model(x, y, reduction="none") * weights).sum()
        torch.testing.assert_close(model(x, y, reduction="sum", loss_weights=weights), want)
    with pytest.raises(ValueError, match="loss_weights has shape"):
        model(x, y, reduction="sum", loss_weights=weights[:, :4])
    with pytest.raises(ValueError, match="reduction='sum'"):
        model(x, y, reduction="none", loss_weights=weights)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    model = randomized(VARIANTS[name])
    idx = tokens(1, 16)
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_untied_model_starts_with_zero_logits():
    torch.manual_seed(0)
    model = GPT(tiny())
    assert (model(tokens(2, 8)) == 0).all()
    # tied lm_head is the embedding, which is not zero
    assert model.lm_head.weight.abs().sum() == 0
    assert GPT(tiny(tie_embeddings=True))(tokens(2, 8)).abs().sum() > 0


def test_tied_means_shared_parameter_and_names():
    model = GPT(tiny(tie_embeddings=True, positions="learned"))
    assert model.lm_head.weight is model.wte.weight
    names = {n for n, _ in model.named_parameters()}
    assert "wte.weight" in names and "wpe.weight" in names and "lm_head.weight" not in names
    matrices = [n for n, p in model.named_parameters() if n.startswith("blocks.")]
    assert matrices and all(p.dim() == 2 for n, p in model.named_parameters() if n.startswith("blocks."))


def test_meta_device_then_materialise():
    config = tiny(tie_embeddings=True)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.wte.weight
    reference = GPT(config)
    torch.testing.assert_close(model.cos, reference.cos)
    assert torch.isfinite(model(tokens(1, 8))).all()


def test_num_params_and_flops():
    model = GPT(tiny())
    c = model.config
    per_block = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * c.head_dim + 8 * c.n_embd * c.n_embd
    assert model.num_params() == c.n_layer * per_block + 2 * V * c.n_embd
    assert model.num_params(exclude_embeddings=True) == c.n_layer * per_block + V * c.n_embd
    expected = 6 * (c.n_layer * per_block + V * c.n_embd) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
    assert model.flops_per_token() == expected
    tied = GPT(tiny(tie_embeddings=True))
    assert tied.num_params() == c.n_layer * per_block + V * c.n_embd
    assert tied.flops_per_token() == expected  # the unembedding matmul costs the same when tied


# ---------------------------------------------------------------- KV cache decoding


@pytest.mark.parametrize("name", VARIANTS)
def test_cache_decoding_matches_full_forward(name):
    model = randomized(VARIANTS[name])
    idx = tokens(2, 20)
    full = model(idx)
    with torch.no_grad():
        # prefill a prefix, then one token at a time
        cache = model.make_kv_cache(2)
        steps = [model(idx[:, :7], kv_cache=cache)]
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
        assert cache.pos == 20
        # chunked: prefix then uneven chunks (exercises the prefix + causal-chunk mask)
        cache = model.make_kv_cache(2)
        chunks = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 6), (6, 13), (13, 20)]]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["rope_gqa", "learned_gqa"])
def test_left_padded_batch_matches_each_prompt_alone(name):
    model = randomized(VARIANTS[name])
    long_prompt, short_prompt = tokens(1, 9, seed=3), tokens(1, 5, seed=4)
    pad = 9 - 5
    batch = torch.cat([long_prompt, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_prompt], 1)])
    follow = tokens(2, 4, seed=5)  # the tokens each row "samples" next
    with torch.no_grad():
        cache = model.make_kv_cache(2, max_len=16)
        cache.set_left_padding(torch.tensor([0, pad]))
        prefill = model(batch, kv_cache=cache)
        decoded = [model(follow[:, i:i + 1], kv_cache=cache) for i in range(4)]
        for row, prompt in enumerate([long_prompt, short_prompt]):
            alone = model(torch.cat([prompt, follow[row:row + 1]], 1))
            n = prompt.size(1)
            torch.testing.assert_close(prefill[row, -n:], alone[0, :n], atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.cat(decoded, 1)[row], alone[0, n:], atol=1e-4, rtol=0)
        # a chunk of several tokens after a padded prefill takes the masked-chunk path
        cache = model.make_kv_cache(2, max_len=16)
        cache.set_left_padding([0, pad])
        model(batch, kv_cache=cache)
        chunk = model(follow, kv_cache=cache)
        torch.testing.assert_close(chunk, torch.cat(decoded, 1), atol=1e-4, rtol=0)


def test_expand_after_prefill_gives_identical_rows():
    model = randomized(tiny())
    with torch.no_grad():
        cache = model.make_kv_cache(1, max_len=16)
        model(tokens(1, 6), kv_cache=cache)
        wide = cache.expand(3)
        assert wide.batch_size == 3 and wide.pos == 6
        nxt = torch.full((3, 1), 7)
        out = model(nxt, kv_cache=wide)
        torch.testing.assert_close(out, out[:1].expand(3, 1, V), atol=0, rtol=0)
        reference = model(nxt[:1], kv_cache=cache)
        torch.testing.assert_close(out[:1], reference, atol=1e-5, rtol=0)


def test_expand_keeps_padding_per_row():
    cache = KVCache(2, 8, n_layer=1, n_kv_head=1, head_dim=2)
    cache.set_left_padding([0, 3])
    cache.advance(5)
    wide = cache.expand(2)
    assert wide.start.tolist() == [0, 0, 3, 3]
    assert wide.positions(1).squeeze(1).tolist() == [5, 5, 2, 2]


def test_cache_positions_and_masks():
    cache = KVCache(2, 10, n_layer=1, n_kv_head=1, head_dim=2)
    assert cache.attn_mask(4) is None  # fresh, unpadded: plain causal
    cache.advance(4)
    assert cache.attn_mask(1) is None  # single query sees everything
    assert cache.attn_mask(3).shape == (2, 1, 3, 7)
    cache.reset()
    cache.set_left_padding(torch.tensor([0, 2]))
    assert cache.positions(4).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    mask = cache.attn_mask(4)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[1, 0, 3].tolist() == [False, False, True, True]
    assert mask[1, 0, 0].tolist() == [True, False, False, False]  # pad query sees only itself


def test_cache_overflow_raises():
    model = randomized(tiny())
    cache = model.make_kv_cache(1, max_len=8)
    model(tokens(1, 6), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(tokens(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len"):
        model.make_kv_cache(1, max_len=10 * T + 1)


def test_learned_positions_cannot_exceed_sequence_len():
    model = randomized(tiny(positions="learned"))
    with pytest.raises(ValueError, match=str(T)):
        model(tokens(1, T + 1))


def test_rope_model_generates_past_training_length():
    model = randomized(tiny(sequence_len=8))
    cache = model.make_kv_cache(1, max_len=12)
    with torch.no_grad():
        out = model(tokens(1, 12), kv_cache=cache)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["rope_gqa", "gpt2_like", "tied_rope"])
def test_loss_falls_on_a_repeated_batch(name):
    config = VARIANTS.get(name) or tiny(tie_embeddings=True)
    torch.manual_seed(0)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tokens(4, 17, seed=6)
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_compiled_model_matches_eager():
    # what `compile=true` runs: torch.compile traces the blocks; the loss runs as the C++ kernel
    model = randomized(tiny()).train()
    batch = tokens(4, 17, seed=7)
    eager = model(batch[:, :-1], batch[:, 1:])
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.cpu_loss_kernel = True  # as StageModule.configure_model sets it beside torch.compile
    compiled = torch.compile(model)(batch[:, :-1], batch[:, 1:])
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("depth,layers,width,heads,head_dim", [
    (1, 1, 64, 2, 32), (2, 2, 128, 2, 64), (4, 4, 256, 2, 128), (20, 20, 1280, 10, 128),
])
def test_from_depth(depth, layers, width, heads, head_dim):
    c = GPTConfig.from_depth(depth)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (layers, width, heads, heads, head_dim)


def test_from_depth_overrides():
    c = GPTConfig.from_depth(2, vocab_size=256, positions="learned", tie_embeddings=True)
    assert (c.vocab_size, c.positions, c.tie_embeddings, c.n_layer) == (256, "learned", True, 2)
    with pytest.raises(ValueError, match="n_layers"):
        GPTConfig.from_depth(2, n_layers=3)
    with pytest.raises(ValueError, match="depth=0"):
        GPTConfig.from_depth(0)


@pytest.mark.parametrize("overrides,named", [
    (dict(n_embd=100, n_head=3), "n_embd=100"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head=3"),
    (dict(positions="alibi"), "alibi"),
    (dict(mlp="swiglu"), "swiglu"),
    (dict(n_embd=12, n_head=4), "head_dim=3"),
    (dict(n_layer=0), "n_layer=0"),
    (dict(vocab_size=-5), "vocab_size=-5"),
    (dict(logit_softcap=0.0), "logit_softcap=0.0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
])
def test_bad_config_names_the_value(overrides, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        tiny(**overrides)


def test_odd_head_dim_is_fine_with_learned_positions():
    assert tiny(n_embd=12, n_head=4, n_kv_head=4, positions="learned").head_dim == 3


def test_bad_padding_raises():
    cache = KVCache(2, 8, n_layer=1, n_kv_head=1, head_dim=2)
    with pytest.raises(ValueError, match="shape"):
        cache.set_left_padding([1, 2, 3])
    cache.advance(1)
    with pytest.raises(ValueError, match="before the prefill"):
        cache.set_left_padding([0, 1])
