"""Speed options change how fast training runs, never what it computes: each against the plain path."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tinylm.config import ConfigError, ModelConfig, apply_overrides
from tinylm.data.packing import PAD_SEGMENT, pack_rows, packed_batch, step_micro_batches
from tinylm.model import IGNORE_INDEX, TinyLM, attention_with_dropout, dropout, linear_cross_entropy, lm_loss
from tinylm.prompts import EncodedExample
from tinylm.runtime import DeviceError, fit_micro_batch, training_dtype
from tinylm.train import Trainer

VOCAB = 257


def tiny_model(seed: int = 0, **overrides) -> TinyLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=64, dropout=0.0
    )
    return TinyLM(replace(config, **overrides))


def example(length: int, prompt: int, seed: int) -> EncodedExample:
    tokens = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return EncodedExample(tokens=tokens, loss_mask=[i >= prompt for i in range(length)])


# -- the output layer and the loss ----------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_linear_cross_entropy_equals_the_full_one_with_its_gradients(bias, chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=g, requires_grad=True)
    b = torch.randn(VOCAB, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, VOCAB, (40,), generator=g)
    params = [p for p in (hidden, weight, b) if p is not None]

    full = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    expected = torch.autograd.grad(full * 0.5, params)
    chunked = linear_cross_entropy(hidden, weight, b, targets, chunk_size=chunk_size)
    got = torch.autograd.grad(chunked * 0.5, params)

    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_chunked_loss_stays_exact_when_the_target_probability_underflows():
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [-200.0, 5.0]], requires_grad=True)
    targets = torch.tensor([2, 1])  # row 0's target is 400 nats below its best logit: exp underflows
    full = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    chunked = linear_cross_entropy(hidden, weight, None, targets, chunk_size=1)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6) and chunked.item() > 400


def test_chunked_loss_over_no_targets_gives_zero_gradients_not_none():
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    bias = torch.randn(VOCAB, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, bias, torch.zeros(0, dtype=torch.long), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_chunked_loss_without_gradients_computes_none():
    model = tiny_model().eval()
    inputs, targets = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        chunked, n = lm_loss(model, inputs, targets, chunk_size=4)
    assert n == 20 and not chunked.requires_grad
    assert chunked.item() == pytest.approx(lm_loss(model, inputs, targets)[0].item(), rel=1e-6)


def test_masked_positions_loss_equals_the_loss_over_full_logits():
    model = tiny_model()
    inputs = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    targets[:, :8] = IGNORE_INDEX  # a masked prompt
    targets[2, 15:] = IGNORE_INDEX  # padding
    full = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    for chunk_size in (0, 5):
        loss, n = lm_loss(model, inputs, targets, chunk_size=chunk_size)
        assert n == int((targets != IGNORE_INDEX).sum())
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)


# -- packing --------------------------------------------------------------------------------------------


def test_pack_rows_places_every_item_once_within_capacity():
    lengths = [60, 10, 35, 30, 64, 5, 20, 41]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 5  # the fewest rows that can hold 265 tokens
    with pytest.raises(ValueError, match="65 tokens does not fit a row of 64"):
        pack_rows([65], 64)


def test_packed_rows_restart_positions_and_keep_each_examples_loss_mask():
    a, b = example(10, prompt=4, seed=1), example(6, prompt=2, seed=2)
    batch = packed_batch([[a, b]], pad_id=0)
    assert batch.inputs[0].tolist() == a.tokens[:-1] + b.tokens[:-1]
    assert batch.positions[0].tolist() == list(range(9)) + list(range(5))
    assert batch.segments[0].tolist() == [0] * 9 + [1] * 5
    assert batch.targets[0].tolist() == [IGNORE_INDEX] * 3 + a.tokens[4:] + [IGNORE_INDEX] + b.tokens[2:]
    assert batch.n_tokens == 14 and batch.n_targets == 6 + 4
    shorter = packed_batch([[a, b], [b]], pad_id=0)
    assert shorter.segments[1].tolist() == [0] * 5 + [PAD_SEGMENT] * 9


def packed_logits(model: TinyLM, rows: list[list[EncodedExample]]) -> torch.Tensor:
    batch = packed_batch(rows, pad_id=0)
    return model(batch.inputs, positions=batch.positions, segments=batch.segments)


def test_a_packed_example_has_the_logits_it_has_alone():
    model = tiny_model().eval()
    examples = [example(n, prompt=3, seed=n) for n in (20, 12, 25, 7)]
    with torch.no_grad():
        packed = packed_logits(model, [examples])[0]
        start = 0
        for e in examples:
            alone = model(torch.tensor([e.tokens[:-1]]))[0]
            torch.testing.assert_close(packed[start : start + len(alone)], alone, rtol=0, atol=1e-5)
            start += len(alone)


def test_changing_one_packed_example_leaves_the_others_logits_unchanged():
    model = tiny_model().eval()
    first, second, third = example(20, 3, seed=1), example(15, 3, seed=2), example(18, 3, seed=3)
    changed = EncodedExample(tokens=[(t + 1) % VOCAB for t in second.tokens], loss_mask=second.loss_mask)
    with torch.no_grad():
        before = packed_logits(model, [[first, second, third]])[0]
        after = packed_logits(model, [[first, changed, third]])[0]
    mine = torch.cat([torch.arange(0, 19), torch.arange(33, 50)])  # first's and third's positions
    assert torch.equal(before[mine], after[mine])
    assert not torch.allclose(before[19:33], after[19:33])


def test_micro_batches_of_a_step_hold_every_example_once():
    examples = [example(n, prompt=2, seed=n) for n in (30, 5, 60, 12, 40, 22, 9, 50)]
    for packing in (False, True):
        batches = step_micro_batches(examples, pad_id=0, packing=packing, row_capacity=64, micro_rows=2)
        assert all(b.inputs.size(0) <= 2 for b in batches)
        assert sum(b.n_tokens for b in batches) == sum(len(e.tokens) - 1 for e in examples)
        assert sum(b.n_targets for b in batches) == sum(sum(e.loss_mask[1:]) for e in examples)
    packed = step_micro_batches(examples, pad_id=0, packing=True, row_capacity=64, micro_rows=100)
    assert sum(b.inputs.size(0) for b in packed) < len(examples)


# -- dropout --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_drops_p_scales_the_rest_and_masks_the_gradient(dtype):
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert y.dtype == dtype
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.002)  # 400,000 draws: sd 0.0005
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.9))
    g = torch.randn(400_000).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, g * kept.to(dtype) * torch.tensor(1 / 0.9, dtype=dtype))


def test_fast_dropout_follows_the_seed_and_is_the_identity_when_off():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(1)
    a = dropout(x, 0.5, True)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.5, True), a)
    assert not torch.equal(dropout(x, 0.5, True), a)
    assert dropout(x, 0.5, False) is x
    assert dropout(x, 0.0, True) is x


@pytest.mark.parametrize("packed", [False, True])
def test_attention_with_dropout_off_is_sdpa(packed):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    mask = None
    if packed:
        segments = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
        mask = (torch.ones(10, 10, dtype=torch.bool).tril() & (segments[:, :, None] == segments[:, None, :]))[
            :, None
        ]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask, 0.0), expected)


def test_training_drops_attention_weights_reproducibly():
    model = tiny_model(dropout=0.3).train()
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = model(idx)
    torch.manual_seed(5)
    assert torch.equal(model(idx), a)
    assert not torch.allclose(model.eval()(idx), a)


def test_checkpointing_redraws_the_same_dropout_masks_so_gradients_match():
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(dropout=0.3, gradient_checkpointing=checkpointing).train()
        torch.manual_seed(7)
        loss, _ = lm_loss(model, idx[:, :-1], idx[:, 1:], chunk_size=8)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain)


# -- every option trains like the plain path ------------------------------------------------------------

PLAIN = {
    "precision": "fp32",
    "packing": False,
    "micro_batch_size": 1,
    "loss_chunk_size": 0,
    "gradient_checkpointing": False,
}


def first_losses(make_config, tmp_path, steps: int = 4, **options) -> list[float]:
    config = apply_overrides(
        make_config(max_steps=steps, gradient_accumulation_steps=2), {**PLAIN, **options}
    )
    trainer = Trainer(config, out_dir=tmp_path / "run")
    trainer.build()
    trainer.model.train()
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step())  # advances trainer.step
    return losses


@pytest.mark.parametrize(
    "options",
    [
        {"packing": True},
        {"micro_batch_size": None},
        {"micro_batch_size": 3},
        {"loss_chunk_size": 16},
        {"gradient_checkpointing": True},
        {"packing": True, "micro_batch_size": None, "loss_chunk_size": 64, "gradient_checkpointing": True},
    ],
    ids=["packing", "micro-batch auto", "micro-batch 3", "chunked loss", "checkpointing", "all"],
)
def test_each_float32_speed_option_trains_like_the_plain_path(make_config, tmp_path, options):
    plain = first_losses(make_config, tmp_path / "plain")
    fast = first_losses(make_config, tmp_path / "fast", **options)
    assert fast == pytest.approx(plain, rel=1e-4)  # float32 rounding in another order, over 4 steps


def test_bfloat16_autocast_trains_like_float32_within_its_precision(make_config, tmp_path):
    plain = first_losses(make_config, tmp_path / "plain")
    bf16 = first_losses(make_config, tmp_path / "bf16", precision="bf16", loss_chunk_size=64)
    assert bf16 == pytest.approx(plain, abs=0.05)  # bfloat16 keeps 8 bits of mantissa; losses here are ~5
    assert bf16 != plain


# -- the rules that pick them ---------------------------------------------------------------------------


def test_precision_rule():
    cpu = torch.device("cpu")
    assert training_dtype(cpu, "fp32") is None
    assert training_dtype(cpu, "bf16") is torch.bfloat16
    assert training_dtype(torch.device("mps"), "auto") is None
    with pytest.raises(DeviceError, match=r"bf16.*mps"):
        training_dtype(torch.device("mps"), "bf16")


def test_micro_batch_fits_the_step_when_memory_allows_and_is_never_zero():
    cpu = torch.device("cpu")
    assert fit_micro_batch(16, 1024, cpu) == 16
    assert fit_micro_batch(16, 2**62, cpu) == 1


def test_speed_fields_load_from_set_and_reject_bad_values(make_config):
    config = apply_overrides(
        make_config(), {"micro_batch_size": "auto", "packing": "false", "precision": "bf16"}
    )
    assert (config.train.micro_batch_size, config.data.packing, config.train.precision) == (
        None,
        False,
        "bf16",
    )
    assert apply_overrides(config, {"micro_batch_size": "4"}).train.micro_batch_size == 4
    with pytest.raises(ConfigError, match=r"train\.precision"):
        apply_overrides(config, {"precision": "fp16"}).validate()
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        apply_overrides(config, {"micro_batch_size": "0"}).validate()
