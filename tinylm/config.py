"""Typed, frozen configuration: one dataclass per concern, presets as data, strict loading.

Every number a run depends on lives here, travels inside each checkpoint, and can be set from a
YAML/TOML file or `--set key=value` using either the nested name (`model.d_model`) or the seed's flat
name (`d_model`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

# Config files are a few hundred bytes; anything far larger is not one.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the field or file."""


# The architectures of model.py's DESIGNS: the seed's own, and Hugging Face's GPT-2 and Llama exactly.
ARCHITECTURES = ("tinylm", "gpt2", "llama")
# train.optimizer: AdamW for everything, or Muon for the blocks' weight matrices and AdamW for the rest.
OPTIMIZERS = ("adamw", "muon")
# train.schedule: after the warm-up, a cosine down to min_learning_rate, or warm-up, stable, decay (WSD).
SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class ModelConfig:
    # tinylm (sinusoidal positions, LayerNorm, GELU: the v1/v2 design), gpt2 (learned positions, tanh GELU)
    # or llama (rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention).
    arch: str = "tinylm"
    vocab_size: int = 50257
    d_model: int = 192
    n_heads: int = 6
    n_layers: int = 4
    d_ff: int = 768
    max_seq_length: int = 128
    dropout: float = 0.1
    # The seed has a separate output projection; tying it to the embedding saves 9.6M parameters in v2.
    tie_weights: bool = False
    # Recompute each block in the backward pass instead of keeping its activations: at these sizes it saves
    # about 6% of peak memory for about 17% of the speed (docs/benchmarks.md), so it is off by default.
    gradient_checkpointing: bool = False
    # Key/value heads for grouped-query attention (llama); None means one per query head.
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    # The base wavelength of rotary positions (llama).
    rope_theta: float = 10000.0
    # RMS-normalise each head's queries and keys (with a learned gain per head dimension) before the
    # positions turn them, as Qwen3 does: it keeps the attention logits from growing.
    qk_norm: bool = False

    @property
    def d_k(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


@dataclass(frozen=True)
class DataConfig:
    # One source, or a mixture: "a.txt:0.3,b.jsonl:0.7" (a config file may give a list or a table).
    source: str = "databricks/databricks-dolly-15k"
    dataset_size: int = 10000
    val_fraction: float = 0.1
    tokenizer: str = "gpt2"
    bpe_vocab_size: int = 8192
    gpt2_ranks_path: str | None = None
    # Instruction data: count only the response in the loss unless this is set.
    train_on_prompt: bool = False
    # Plain text from the Hub (`--data hf:NAME`): which configuration, split and field to read.
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    # Several examples per max_seq_length row (each attending only to itself) instead of padding each one.
    packing: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 2e-4
    min_learning_rate: float = 2e-5
    warmup_steps: int = 1000
    # cosine: down from learning_rate after the warm-up; wsd: held, then straight down over the last
    # decay_fraction of the planned steps. Both reach min_learning_rate at the planned end.
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.01
    # adamw, or muon: Muon for the blocks' weight matrices, its updates scaled to AdamW's size so that the
    # same learning_rate, weight_decay and schedule drive it, and AdamW for everything else.
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_batches: int = 50
    save_interval: int = 1000
    log_interval: int = 25
    max_steps: int | None = None
    seed: int = 42
    device: str = "auto"
    # Stop after this many evaluations without a new best validation loss (0: never stop early).
    early_stopping_patience: int = 0
    # Optional trackers beside the console and metrics.jsonl (wandb is also on when WANDB_PROJECT is set).
    wandb: bool = False
    tensorboard: bool = False
    # auto: bfloat16 autocast where it is fast (CUDA, CPUs with AVX512-BF16 or AMX), else float32; fp32; bf16.
    precision: str = "auto"
    # Rows per forward/backward pass; None (or "auto") fits the whole step in memory when it can. The
    # effective batch, batch_size x gradient_accumulation_steps examples per step, is what learning sees.
    micro_batch_size: int | None = None
    # Output-layer rows per chunk of the loss (0: all at once, materialising their logits).
    loss_chunk_size: int = 512
    # torch.compile the transformer blocks (slow first steps; see docs/benchmarks.md for when it pays).
    compile: bool = False


# Sampling values beyond these only overflow the logits (to inf and then NaN) or change nothing further.
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Reject impossible values with one line naming the field; returns self for chaining."""
        m, d, t, s = self.model, self.data, self.train, self.sampling
        checks: list[tuple[bool, str, str]] = [
            (m.vocab_size > 0, "model.vocab_size", "must be positive"),
            (m.d_model > 0, "model.d_model", "must be positive"),
            (m.n_heads > 0, "model.n_heads", "must be positive"),
            (
                m.n_heads > 0 and m.d_model % m.n_heads == 0,
                "model.n_heads",
                f"must divide model.d_model ({m.d_model} is not divisible by {m.n_heads})",
            ),
            (m.arch in ARCHITECTURES, "model.arch", f"must be one of {', '.join(ARCHITECTURES)}"),
            (
                m.n_kv_heads is None or (m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0),
                "model.n_kv_heads",
                f"must divide model.n_heads ({m.n_heads})",
            ),
            (
                m.kv_heads == m.n_heads or m.arch == "llama",
                "model.n_kv_heads",
                "must equal model.n_heads (or be unset) unless model.arch is llama",
            ),
            (
                m.arch != "llama" or m.n_heads <= 0 or m.d_k % 2 == 0,
                "model.n_heads",
                "must leave an even head width (d_model / n_heads) for llama's rotary positions",
            ),
            (m.norm_eps > 0, "model.norm_eps", "must be positive"),
            (m.rope_theta > 0, "model.rope_theta", "must be positive"),
            (m.n_layers > 0, "model.n_layers", "must be positive"),
            (m.d_ff > 0, "model.d_ff", "must be positive"),
            (m.max_seq_length > 1, "model.max_seq_length", "must be at least 2"),
            (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
            (d.dataset_size > 0, "data.dataset_size", "must be positive"),
            (0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be between 0 and 1"),
            (d.tokenizer in ("gpt2", "bpe", "byte"), "data.tokenizer", "must be gpt2, bpe or byte"),
            (d.bpe_vocab_size >= 260, "data.bpe_vocab_size", "must be at least 260"),
            (bool(d.hf_split.strip()), "data.hf_split", "must name a split, e.g. train"),
            (bool(d.text_field.strip()), "data.text_field", "must name the field that holds the text"),
            (t.epochs > 0, "train.epochs", "must be positive"),
            (t.batch_size > 0, "train.batch_size", "must be positive"),
            (t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be positive"),
            (t.learning_rate > 0, "train.learning_rate", "must be positive"),
            (
                0 <= t.min_learning_rate <= t.learning_rate,
                "train.min_learning_rate",
                "must be between 0 and train.learning_rate",
            ),
            (t.warmup_steps >= 0, "train.warmup_steps", "must not be negative"),
            (t.schedule in SCHEDULES, "train.schedule", f"must be one of {', '.join(SCHEDULES)}"),
            (0 < t.decay_fraction <= 1, "train.decay_fraction", "must be in (0, 1]"),
            (t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}"),
            (0 <= t.seed < 2**32, "train.seed", "must be between 0 and 2**32 - 1 (NumPy's seed range)"),
            (t.weight_decay >= 0, "train.weight_decay", "must not be negative"),
            (t.grad_clip >= 0, "train.grad_clip", "must not be negative (0 turns clipping off)"),
            (t.eval_interval > 0, "train.eval_interval", "must be positive"),
            (t.eval_batches > 0, "train.eval_batches", "must be positive"),
            (t.save_interval > 0, "train.save_interval", "must be positive"),
            (t.log_interval > 0, "train.log_interval", "must be positive"),
            (t.max_steps is None or t.max_steps > 0, "train.max_steps", "must be positive"),
            (
                t.early_stopping_patience >= 0,
                "train.early_stopping_patience",
                "must not be negative (0: off)",
            ),
            (t.device in ("auto", "cpu", "cuda", "mps"), "train.device", "must be auto, cpu, cuda or mps"),
            (t.precision in ("auto", "fp32", "bf16"), "train.precision", "must be auto, fp32 or bf16"),
            (
                t.micro_batch_size is None or t.micro_batch_size > 0,
                "train.micro_batch_size",
                "must be positive (or auto)",
            ),
            (t.loss_chunk_size >= 0, "train.loss_chunk_size", "must not be negative (0 turns chunking off)"),
            (s.max_new_tokens > 0, "sampling.max_new_tokens", "must be positive"),
            (
                0 <= s.temperature <= MAX_TEMPERATURE,
                "sampling.temperature",
                f"must be between 0 and {MAX_TEMPERATURE:g} (below 1e-5 it is greedy)",
            ),
            (s.top_k >= 0, "sampling.top_k", "must not be negative (0 turns it off)"),
            (0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]"),
            (0 <= s.min_p < 1, "sampling.min_p", "must be in [0, 1)"),
            (
                REPETITION_PENALTY_RANGE[0] <= s.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
                "sampling.repetition_penalty",
                "must be between {:g} and {:g} (1 turns it off)".format(*REPETITION_PENALTY_RANGE),
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"config field {name} = {_shown(_field_value(self, name))} {why}")
        return self


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sampling": SamplingConfig,
}

V1 = Config(
    model=ModelConfig(d_model=128, n_heads=4, n_layers=3, d_ff=512),
    data=DataConfig(dataset_size=5000),
    train=TrainConfig(
        epochs=10,
        learning_rate=3e-4,
        min_learning_rate=3e-5,
        warmup_steps=500,
        eval_interval=1000,
        save_interval=2000,
        log_interval=50,
    ),
)
V2 = Config()
# Sized so that training on the synthetic tasks takes a few minutes on 2 CPU cores.
DEMO = Config(
    model=ModelConfig(
        d_model=128,
        n_heads=4,
        n_layers=3,
        d_ff=512,
        max_seq_length=96,
        dropout=0.0,
        tie_weights=True,
        gradient_checkpointing=False,
        # Normalised queries and keys take the high learning rate below without diverging; together they
        # make the two-turn tasks learnable within the budget (docs/benchmarks.md, "The demo").
        qk_norm=True,
    ),
    data=DataConfig(
        source="synthetic", dataset_size=20000, val_fraction=0.05, tokenizer="bpe", bpe_vocab_size=1024
    ),
    train=TrainConfig(
        epochs=6,
        batch_size=32,
        gradient_accumulation_steps=1,
        learning_rate=4e-3,
        min_learning_rate=1e-4,
        warmup_steps=100,
        weight_decay=0.01,
        eval_interval=500,
        eval_batches=10,
        save_interval=500,
        log_interval=50,
    ),
    sampling=SamplingConfig(temperature=0.0),
)
# v2's size and training in the two architectures that other tools run (export to Hugging Face, llama.cpp).
V2_GPT2 = replace(V2, model=replace(V2.model, arch="gpt2", tie_weights=True))
# SwiGLU's three matrices at d_ff 512 hold as many weights as GELU's two at 768; 2 key/value heads for 6.
V2_LLAMA = replace(
    V2, model=replace(V2.model, arch="llama", d_ff=512, n_kv_heads=2, tie_weights=True, norm_eps=1e-6)
)
# The recipe that learned fastest per minute in benchmarks/quality.py, against nanoGPT's own train.py
# (docs/benchmarks.md): Llama's design (rotary positions, RMSNorm, SwiGLU), the output layer tied to the
# embedding (SwiGLU at two thirds of GELU's width: as many weights), and the benchmark's learning rate.
V2_FAST = replace(
    V2,
    model=replace(V2.model, arch="llama", d_ff=512, tie_weights=True, norm_eps=1e-6),
    train=replace(V2.train, learning_rate=1e-3, min_learning_rate=1e-4),
)
PRESETS: dict[str, Config] = {
    "v1": V1,
    "v2": V2,
    "v2-gpt2": V2_GPT2,
    "v2-llama": V2_LLAMA,
    "v2-fast": V2_FAST,
    "demo": DEMO,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose {', '.join(PRESETS)})")
    return PRESETS[name]


def _flat_names() -> dict[str, str]:
    """Map each field name that is unique across sections (the seed's flat names) to its dotted path."""
    seen: dict[str, list[str]] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            seen.setdefault(f.name, []).append(f"{section}.{f.name}")
    return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


_FLAT = _flat_names()


def resolve_key(key: str) -> tuple[str, str]:
    """`d_model` or `model.d_model` -> ("model", "d_model"); unknown keys fail naming the key."""
    path = key if "." in key else _FLAT.get(key, key)
    section, _, name = path.partition(".")
    cls = _SECTIONS.get(section)
    if cls is None or name not in {f.name for f in fields(cls)}:
        raise ConfigError(f"unknown config field {_shown(key)}")
    return section, name


def _field_value(config: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def _coerce(section: str, name: str, value: Any, origin: str) -> Any:
    """Turn a file or command-line value into the field's declared type, or fail naming the field."""
    if (section, name) == ("data", "source") and isinstance(value, list | dict):
        value = _mixture_text(value, origin)
    hint = get_type_hints(_SECTIONS[section])[name]
    optional = type(None) in getattr(hint, "__args__", ())
    base = next((a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)), hint)
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", "", "auto"):
            return None
        try:
            if base is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes", "on")
            if base is int:
                return int(float(text)) if float(text).is_integer() else int(text)
            if base is float:
                return float(text)
        except ValueError:
            raise ConfigError(
                f"{origin}: field {section}.{name} wants {base.__name__}, got {_shown(value)}"
            ) from None
        return text
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{origin}: field {section}.{name} wants {base.__name__}, got {_shown(value)}")
    return value


def _mixture_text(value: list[Any] | dict[Any, Any], origin: str) -> str:
    """A config file's mixture, a list of sources (`a.txt:0.3`) or a table of sources and weights, as the
    text `--data` takes."""
    pairs: Iterable[tuple[Any, Any]] = (
        value.items() if isinstance(value, dict) else ((v, None) for v in value)
    )
    items = []
    for source, weight in pairs:
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not isinstance(source, str) or not (weight is None or number):
            shown = _shown(source if not isinstance(source, str) else weight)
            raise ConfigError(
                f"{origin}: field data.source lists sources as text, weights as numbers, got {shown}"
            )
        items.append(source if weight is None else f"{source}:{weight}")
    return ",".join(items)


def apply_overrides(config: Config, overrides: dict[str, Any], *, origin: str = "--set") -> Config:
    """Return a copy with the given (flat or dotted) fields replaced; values are type-checked."""
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, name = resolve_key(key)
        changes.setdefault(section, {})[name] = _coerce(section, name, value, origin)
    return replace(config, **{s: replace(getattr(config, s), **c) for s, c in changes.items()})


def parse_set_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set wants key=value, got {_shown(item)}")
        out[key.strip()] = value
    return out


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value) for an error message, cut short: a message stays one readable line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _flatten(data: dict[Any, Any], origin: str) -> dict[str, Any]:
    """Nested sections and flat seed names both become dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{origin}: field names must be text, got {_shown(key)}")
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: section {key!r} must be a table of fields")
            for sub, v in value.items():
                if not isinstance(sub, str):
                    raise ConfigError(f"{origin}: field names in [{key}] must be text, got {_shown(sub)}")
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def _yaml_loader() -> type:
    """YAML's safe loader without anchors and aliases: a config needs none, and nested aliases (a "billion
    laughs" file) expand to more data than any machine holds."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    "aliases (*name) are not allowed in a config file",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_config_file(path: str | Path, *, base: Config = V2) -> Config:
    """Read a YAML or TOML file: fields that override `base`, or the file's own `preset` key if it has one."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config file")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"
        ) from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}  # a safe loader, without aliases
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of fields")
    if "preset" in data:
        base = preset(str(data.pop("preset")))
    return apply_overrides(base, _flatten(data, str(path)), origin=str(path))


def config_from_dict(data: dict[str, Any], *, origin: str = "checkpoint") -> Config:
    """Rebuild a Config saved by `Config.to_dict` (inside checkpoints and run folders)."""
    return apply_overrides(Config(), _flatten(data, origin), origin=origin).validate()


def format_config(config: Config) -> str:
    lines = []
    for section in _SECTIONS:
        values = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(getattr(config, section)).items())
        lines.append(f"  {section}: {values}")
    return "\n".join(lines)
