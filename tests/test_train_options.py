"""Every speed option trains like the plain path, and the options' own rules (precision, micro-batch)."""

import pytest
import torch

from tinylm.config import ConfigError, apply_overrides
from tinylm.runtime import DeviceError, fit_micro_batch, training_dtype
from tinylm.train import build_training

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
    run = build_training(config, device=torch.device("cpu"))
    run.state.model.train()
    return [run.step() for _ in range(steps)]


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
