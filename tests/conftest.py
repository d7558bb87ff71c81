"""Shared set-up: tests never reach the network, and every model is tiny (2 layers, 32 wide)."""

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

# Set before anything imports datasets, huggingface_hub, gradio or wandb: they read these at import time.
_STATE = Path(tempfile.mkdtemp(prefix="tinylm-tests-"))
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HOME": str(_STATE / "hf"),
    "WANDB_DIR": str(_STATE / "wandb"),
    "TINYLM_CACHE": str(_STATE / "tinylm-cache"),
    # A 32-wide model gains nothing from threads, and spinning OpenMP workers on a busy 2-core machine
    # make each tiny matmul hundreds of times slower.
    "OMP_NUM_THREADS": "1",
}
os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402

from tinylm.config import Config, DataConfig, ModelConfig, SamplingConfig, TrainConfig  # noqa: E402
from tinylm.generate import Engine  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"

TINY_MODEL = {"d_model": 32, "n_heads": 2, "n_layers": 2, "d_ff": 64, "max_seq_length": 64}
# The same tiny model as `--set` arguments for the command-line tests.
TINY_SET_ARGS = [
    *(arg for key, value in TINY_MODEL.items() for arg in ("--set", f"{key}={value}")),
    *("--set", "dropout=0", "--set", "tokenizer=byte", "--set", "dataset_size=64", "--set", "batch_size=8"),
    *("--set", "gradient_checkpointing=false", "--set", "eval_batches=1", "--set", "device=cpu"),
]


def make_tiny_config(**train: object) -> Config:
    """A 2-layer, 32-wide byte-level model on 64 synthetic records; `train` overrides TrainConfig fields."""
    return Config(
        model=ModelConfig(vocab_size=257, dropout=0.0, gradient_checkpointing=False, **TINY_MODEL),
        data=DataConfig(source="synthetic", dataset_size=64, val_fraction=0.1, tokenizer="byte"),
        train=TrainConfig(
            **{
                "epochs": 100,
                "batch_size": 8,
                "gradient_accumulation_steps": 1,
                "learning_rate": 3e-3,
                "min_learning_rate": 3e-4,
                "warmup_steps": 3,
                "eval_interval": 1000,
                "eval_batches": 1,
                "save_interval": 1000,
                "log_interval": 1,
                "max_steps": 30,
                "device": "cpu",
                **train,
            }
        ),
        sampling=SamplingConfig(temperature=0.0),
    ).validate()


@pytest.fixture
def tiny_config() -> Config:
    return make_tiny_config()


@pytest.fixture(scope="session")
def make_config():
    """`make_config(max_steps=6, ...)`: the tiny config with TrainConfig fields replaced."""
    return make_tiny_config


@pytest.fixture(scope="session")
def tiny_model_config():
    """`tiny_model_config(**model_fields)`: the 2-layer, 32-wide model's config with some fields replaced."""

    def make(**overrides: object) -> ModelConfig:
        return replace(make_tiny_config().model, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config):
    """`tiny_model(seed=0, **model_fields)`: a fresh 2-layer, 32-wide byte-level model, seeded."""
    from tinylm.model import TinyLM

    def make(seed: int = 0, **overrides: object) -> TinyLM:
        torch.manual_seed(seed)
        return TinyLM(tiny_model_config(**overrides))

    return make


# Each architecture's fields for the tiny models; llama's 2 query heads share one key/value head (GQA).
ARCHITECTURES = {"tinylm": {}, "gpt2": {"arch": "gpt2"}, "llama": {"arch": "llama", "n_kv_heads": 1}}


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> dict[str, object]:
    """Model fields that select each architecture in turn: a test taking it runs once per architecture."""
    return ARCHITECTURES[request.param]


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    if not GPT2_RANKS.is_file():
        pytest.skip(f"GPT-2 ranks file absent: {GPT2_RANKS}")
    return GPT2_RANKS


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_set_args() -> list[str]:
    return list(TINY_SET_ARGS)


@pytest.fixture(scope="session")
def offline_env() -> dict[str, str]:
    """The environment for `python -m tinylm` / `python train.py` children: offline, one thread."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    env.pop("TINYLM_GPT2_TIKTOKEN", None)
    return env


@pytest.fixture(scope="session", autouse=True)
def _offline_state_folder():
    """HF_HOME and WANDB_DIR point here for the whole session; nothing in it outlives the tests."""
    yield _STATE
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _restore_logging():
    """`tinylm.cli.main` points the root logger at the (captured) stdout; undo that after each test."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


# Four prompts a tiny byte-level model learns by heart in a few dozen steps, for tests needing known answers.
MEMORISED = (
    ("What is 2 plus 3?", "5"),
    ("Name a colour.", "blue sky"),
    ("Greet me.", "hello there"),
    ("Count to three.", "1 2 3"),
)


@pytest.fixture(scope="session")
def memorised():
    """(model, tokenizer, examples): a 2-layer, 32-wide model overfit on MEMORISED, in eval mode."""
    from tinylm.data.instructions import collate
    from tinylm.loss import lm_loss
    from tinylm.model import TinyLM
    from tinylm.prompts import TEMPLATE
    from tinylm.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    model = TinyLM(make_tiny_config().model)
    examples = [TEMPLATE.encode_example(tokenizer, q, "", a, max_seq_length=64) for q, a in MEMORISED]
    inputs, targets = collate(examples, tokenizer.eos_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss_sum, n = lm_loss(model, inputs, targets)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss_sum.item() / n < 0.01:
            break
    assert loss_sum.item() / n < 0.01, "the tiny model failed to memorise four examples"
    return model.eval(), tokenizer, MEMORISED


class ScriptedRun(NamedTuple):
    folder: Path
    answer: str


SCRIPTED_ANSWER = "tiny model"


@pytest.fixture(scope="session")
def scripted_run(tmp_path_factory) -> ScriptedRun:
    """A run folder (best_model.pt, latest.pt, metrics.jsonl) whose byte-level model answers every prompt
    with SCRIPTED_ANSWER and then end-of-text, for the front ends' tests.

    The blocks are zeroed, so each next token depends on the current token alone, and the embedding and
    output layer spell the answer as a chain: "\\n" (every prompt ends with one) -> "t" -> "i" -> ... -> end.
    """
    from tinylm.checkpoint import save_checkpoint
    from tinylm.model import TinyLM
    from tinylm.tokenizer import ByteTokenizer

    config = make_tiny_config()
    config = replace(config, model=replace(config.model, max_seq_length=256)).validate()
    tokenizer = ByteTokenizer()
    chain = tokenizer.encode("\n" + SCRIPTED_ANSWER)
    assert len(set(chain)) == len(chain) <= config.model.d_model, "the chain needs distinct tokens"
    model = TinyLM(config.model)
    with torch.no_grad():
        for param in (*model.blocks.parameters(), model.embed.weight, model.head.weight, model.head.bias):
            param.zero_()
        for dim, (current, following) in enumerate(zip(chain, [*chain[1:], tokenizer.eos_id], strict=True)):
            model.embed.weight[current, dim] = 20.0
            model.head.weight[following, dim] = 10.0
    folder = tmp_path_factory.mktemp("scripted-run")
    info = {"best_val_loss": 1.25}
    for name, step in (("best_model.pt", 40), ("latest.pt", 60)):
        save_checkpoint(folder / name, model=model, config=config, tokenizer=tokenizer, step=step, info=info)
    metrics = [{"step": s, "loss": 3.0 / s} for s in range(1, 61)]
    metrics += [{"step": s, "val_loss": 3.5 / s} for s in (20, 40, 60)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    return ScriptedRun(folder, SCRIPTED_ANSWER)


@pytest.fixture(scope="session")
def webui_url(scripted_run):
    """The web page for scripted_run's checkpoints, served in-process on a free port of 127.0.0.1."""
    import socket

    from tinylm.checkpoint import ModelStore, find_checkpoints
    from tinylm.webui import build_app, launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Each checkpoint opens with a RecordingEngine, and every piece of text is redrawn, so the tests see what
    # the page asks for and each step of the streaming.
    models = ModelStore(find_checkpoints(scripted_run.folder), open=RecordingEngine)
    app = build_app(models, redraw_every=0)
    yield launch(app, port=port, block=False)
    app.close()


# What the web page's engines were asked to stream, in order: (prompt ids, sampling) per answer.
_STREAMED: list[tuple[list[int], SamplingConfig]] = []


class RecordingEngine(Engine):
    """An Engine that notes every (prompt ids, sampling) it is asked to stream."""

    def stream(self, prompt_ids, sampling, **options):
        _STREAMED.append((list(prompt_ids), sampling))
        return super().stream(prompt_ids, sampling, **options)


@pytest.fixture
def generations() -> list[tuple[list[int], SamplingConfig]]:
    """Every (prompt ids, sampling) the web page (webui_url) hands to its engines' stream during one test."""
    _STREAMED.clear()
    return _STREAMED


@pytest.fixture(scope="session")
def random_model():
    """`random_model(seed=0, **overrides)`: a new random 2-layer, 32-wide byte-level model with a 16-token
    window, in eval mode; answers of a few dozen tokens slide its window several times."""
    from tinylm.model import TinyLM

    def make(seed: int = 0, **overrides: object) -> TinyLM:
        torch.manual_seed(seed)
        config = ModelConfig(
            vocab_size=257, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_length=16, dropout=0.0
        )
        model = TinyLM(replace(config, **overrides)).eval()
        with torch.no_grad():  # weights far larger than the usual init, so answers vary instead of repeating
            for param in model.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.3)
        return model

    return make
