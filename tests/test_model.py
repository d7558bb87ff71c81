"""The transformer: causal, the parameter count its architecture implies, a KV cache that changes nothing."""

import pytest
import torch

from tinylm.config import ARCHITECTURES, ModelConfig, preset
from tinylm.loss import lm_loss
from tinylm.model import DESIGNS, IGNORE_INDEX, KVCache, TinyLM, parameter_count

GPT2_VOCAB = 50257


def tiny_model(seed: int = 0, **overrides) -> TinyLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=257, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=64, dropout=0.0
    )
    return TinyLM(ModelConfig(**{**config.__dict__, **overrides})).eval()


@pytest.mark.parametrize("t", [0, 5, 18])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(t, arch):
    model = tiny_model(**arch)
    ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 257
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.equal(before[:, t + 1], after[:, t + 1])


# The four figures, written out so a change to the architecture shows up as a changed number here.
@pytest.mark.parametrize(
    ("name", "tied", "count"),
    [("v1", False, 13_511_121), ("v1", True, 7_027_968), ("v2", False, 21_128_785), ("v2", True, 11_429_184)],
)
def test_parameter_counts_of_the_presets(name, tied, count):
    config = ModelConfig(**{**preset(name).model.__dict__, "tie_weights": tied})
    assert config.vocab_size == GPT2_VOCAB
    assert parameter_count(config) == count  # known before anything is built
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = TinyLM(config)
    assert model.num_parameters() == count


def test_every_architecture_has_a_design():
    assert set(DESIGNS) == set(ARCHITECTURES)


@pytest.mark.parametrize(
    ("name", "count"), [("v2-gpt2", 11_453_760), ("v2-llama", 11_223_936), ("v2-fast", 11_420_544)]
)
def test_parameter_counts_of_the_other_architectures(name, count):
    config = preset(name).model
    assert parameter_count(config) == count
    with torch.device("meta"):
        assert TinyLM(config).num_parameters() == count


@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_the_other_architectures_have_no_output_bias_even_untied(arch_name):
    model = tiny_model(arch=arch_name, tie_weights=False)
    assert model.head.bias is None and model.head.weight is not model.embed.weight


def test_grouped_query_attention_caches_only_its_key_value_heads():
    model = tiny_model(arch="llama", n_kv_heads=1)
    cache = KVCache(model.config, 3, device="cpu", dtype=torch.float32)
    assert cache.keys.shape == (2, 3, 1, 64, 16)


def test_tied_head_shares_the_embedding_and_has_no_bias():
    model = tiny_model(tie_weights=True)
    assert model.head.weight is model.embed.weight
    assert model.head.bias is None


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_prefill_and_steps_equal_the_uncached_forward(arch, qk_norm):
    model = tiny_model(**arch, qk_norm=qk_norm)
    ids = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, device="cpu", dtype=torch.float32)
        prefill = model(ids[:, :10], cache=cache)
        steps = [model(ids[:, i : i + 1], cache=cache) for i in range(10, 25)]
        chunk = model(ids[:, 25:], cache=cache)  # several new tokens at once after a cache
    cached = torch.cat([prefill, *steps, chunk], dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    assert cache.length == 30


def test_cache_overflow_is_an_error():
    model = tiny_model()
    cache = KVCache(model.config, 1, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="context window"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_loss_counts_only_targets_that_are_not_ignored():
    model = tiny_model()
    inputs = torch.randint(0, 257, (1, 8), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 257, (1, 8), generator=torch.Generator().manual_seed(4))
    masked = targets.clone()
    masked[0, :5] = IGNORE_INDEX
    with torch.no_grad():
        total, n = lm_loss(model, inputs, targets)
        part, m = lm_loss(model, inputs, masked)
        logits = model(inputs)
    assert (n, m) == (8, 3)
    expected = torch.nn.functional.cross_entropy(logits[0, 5:], targets[0, 5:], reduction="sum")
    torch.testing.assert_close(part, expected)
    assert part < total
