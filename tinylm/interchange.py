"""Models in and out of tinylm: Hugging Face folders (import and export) and GGUF files for llama.cpp.

A Hugging Face folder holds config.json, safetensors weights and tokenizer files; `read_hf` turns a GPT-2 or
Llama folder (or `hf:NAME` from the Hub) into a tinylm model of the matching architecture, and `write_hf`
writes one back in the same layout, which transformers loads with nothing else. `write_gguf` writes the
gpt2 and llama architectures (and tinylm's, where it can be said exactly) in llama.cpp's format. Every
writer builds its result under a temporary name beside the target and renames it into place, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tinylm.config import Config, ConfigError, DataConfig, ModelConfig, SamplingConfig
from tinylm.model import SinusoidalPositions, TinyLM
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import EOS, Tokenizer, TokenizerError, tokenizer_from_hf

HF_PREFIX = "hf:"
WEIGHTS = "model.safetensors"
HUB_PROBE_SECONDS = 5.0
# Model types tinylm reads, and the architecture each becomes.
HF_ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama"}
GGUF_DTYPES = ("f32", "f16", "q8_0")


class InterchangeError(RuntimeError):
    """A model folder or file that cannot be read or written; the message names it and what to do."""


@dataclass
class ImportedModel:
    model: TinyLM
    config: Config
    tokenizer: Tokenizer
    folder: Path


# -- which tinylm weight is which Hugging Face weight ------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A tinylm weight made of Hugging Face weights stacked by rows (q, k and v; gate and up), each stored
    transposed where `transposed` (GPT-2's Conv1D layers keep (in, out))."""

    name: str
    hf_names: tuple[str, ...]
    rows: tuple[int, ...]
    transposed: bool = False


def weight_parts(config: ModelConfig) -> list[Part]:
    """How each of a model's weights is laid out in a Hugging Face checkpoint of its architecture (tinylm's
    own is written as GPT-2's)."""
    d, ff, dk = config.d_model, config.d_ff, config.d_k
    if config.arch == "llama":
        parts = [Part("embed.weight", ("model.embed_tokens.weight",), (config.vocab_size,))]
        q, kv = config.n_heads * dk, config.kv_heads * dk
        for i in range(config.n_layers):
            hf, ours = f"model.layers.{i}.", f"blocks.{i}."
            attn, mlp = f"{hf}self_attn.", f"{hf}mlp."
            parts += [
                Part(f"{ours}ln_attn.weight", (f"{hf}input_layernorm.weight",), (d,)),
                Part(f"{ours}attn.qkv.weight", tuple(f"{attn}{x}_proj.weight" for x in "qkv"), (q, kv, kv)),
                Part(f"{ours}attn.proj.weight", (f"{attn}o_proj.weight",), (d,)),
                Part(f"{ours}ln_ff.weight", (f"{hf}post_attention_layernorm.weight",), (d,)),
                Part(f"{ours}ff.up.weight", (f"{mlp}gate_proj.weight", f"{mlp}up_proj.weight"), (ff, ff)),
                Part(f"{ours}ff.down.weight", (f"{mlp}down_proj.weight",), (d,)),
            ]
        parts.append(Part("ln_f.weight", ("model.norm.weight",), (d,)))
    else:
        parts = [Part("embed.weight", ("transformer.wte.weight",), (config.vocab_size,))]
        if config.arch == "gpt2":
            parts.append(Part("positions.weight", ("transformer.wpe.weight",), (config.max_seq_length,)))
        for i in range(config.n_layers):
            hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
            for name, hf_name, rows, transposed in (
                ("ln_attn", "ln_1", d, False),
                ("attn.qkv", "attn.c_attn", 3 * d, True),
                ("attn.proj", "attn.c_proj", d, True),
                ("ln_ff", "ln_2", d, False),
                ("ff.up", "mlp.c_fc", ff, True),
                ("ff.down", "mlp.c_proj", d, True),
            ):
                parts.append(Part(f"{ours}{name}.weight", (f"{hf}{hf_name}.weight",), (rows,), transposed))
                parts.append(Part(f"{ours}{name}.bias", (f"{hf}{hf_name}.bias",), (rows,)))
        parts += [
            Part("ln_f.weight", ("transformer.ln_f.weight",), (d,)),
            Part("ln_f.bias", ("transformer.ln_f.bias",), (d,)),
        ]
    if not config.tie_weights:
        parts.append(Part("head.weight", ("lm_head.weight",), (config.vocab_size,)))
    return parts


# -- import ------------------------------------------------------------------------------------------------


def is_hf_model(source: str | Path) -> bool:
    """`hf:NAME`, or a folder whose config.json is a Hugging Face one (a run folder's is tinylm's own)."""
    path = Path(source)
    if str(source).startswith(HF_PREFIX):
        return True
    if not (path / "config.json").is_file() or any(path.glob("*.pt")):
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def read_hf(source: str | Path) -> ImportedModel:
    """A GPT-2 or Llama model, its config and its tokenizer from a Hugging Face folder or `hf:NAME`."""
    folder = _hub_folder(str(source)[len(HF_PREFIX) :]) if str(source).startswith(HF_PREFIX) else Path(source)
    hf_config = _read_json(folder / "config.json")
    model_config = _model_config(hf_config, folder)
    tokenizer = _read_tokenizer(folder, hf_config)
    if tokenizer.vocab_size != model_config.vocab_size:
        raise InterchangeError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocabulary "
            f"(config.json vocab_size) has {model_config.vocab_size:,}: they do not belong together"
        )
    weights = _read_weights(folder)
    model = TinyLM(model_config)
    state = model.state_dict()
    for part in weight_parts(model_config):
        missing = [n for n in part.hf_names if n not in weights]
        if missing:
            raise InterchangeError(f"{folder}: the weights lack {missing[0]} (is the model complete?)")
        pieces = [weights[n].t() if part.transposed else weights[n] for n in part.hf_names]
        tensor = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if tensor.shape != state[part.name].shape:
            got = " + ".join(str(tuple(weights[n].shape)) for n in part.hf_names)
            implied = tuple(state[part.name].shape)
            raise InterchangeError(
                f"{folder}: weight {' + '.join(part.hf_names)} has shape {got}, but config.json implies "
                f"{implied[::-1] if part.transposed else implied}"
            )
        state[part.name] = tensor.float()
    model.load_state_dict(state)
    config = Config(
        model=model_config,
        data=DataConfig(tokenizer=tokenizer.kind),
        sampling=_sampling(folder),
    ).validate()
    return ImportedModel(model.eval(), config, tokenizer, folder)


def _hub_folder(name: str) -> Path:
    """The Hub model's files, downloaded (or found in the cache); an offline machine fails at once."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    patterns = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]
    offline = constants.HF_HUB_OFFLINE
    if not offline:
        try:
            HfApi().model_info(name, timeout=HUB_PROBE_SECONDS)
        except HfHubHTTPError:
            pass  # the server answered: snapshot_download reports what it said
        except Exception:
            offline = True
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:
        where = "the Hub cannot be reached and no copy is cached here" if offline else _first_line(exc)
        raise InterchangeError(
            f"could not load model {HF_PREFIX}{name} from the Hugging Face Hub ({where}); give a local folder "
            "with config.json, *.safetensors and tokenizer.json instead"
        ) from None


def _model_config(hf: dict[str, Any], folder: Path) -> ModelConfig:
    """The tinylm architecture that computes exactly what this config.json describes, or a refusal naming
    the setting that tinylm does not have."""
    kind = hf.get("model_type")
    if kind not in HF_ARCHITECTURES:
        named = ", ".join(hf.get("architectures") or []) or "no architecture"
        raise InterchangeError(
            f"{folder / 'config.json'}: model_type {kind!r} ({named}) is not supported: tinylm imports "
            f"{' and '.join(HF_ARCHITECTURES)} models"
        )

    def refuse_unless(ok: bool, setting: str) -> None:
        if not ok:
            raise InterchangeError(f"{folder / 'config.json'}: {setting} is not supported by tinylm's {kind}")

    try:
        if kind == "gpt2":
            refuse_unless(
                hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                f"activation_function {hf.get('activation_function')!r}",
            )
            refuse_unless(hf.get("scale_attn_weights", True), "scale_attn_weights false")
            refuse_unless(
                not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"
            )
            refuse_unless(not hf.get("add_cross_attention", False), "add_cross_attention")
            d = int(hf["n_embd"])
            config = ModelConfig(
                arch="gpt2",
                vocab_size=int(hf["vocab_size"]),
                d_model=d,
                n_heads=int(hf["n_head"]),
                n_layers=int(hf["n_layer"]),
                d_ff=int(hf.get("n_inner") or 4 * d),
                max_seq_length=int(hf["n_positions"]),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_weights=bool(hf.get("tie_word_embeddings", True)),
                dropout=0.0,
            )
        else:
            rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            refuse_unless(rope_type == "default", f"rope_type {rope_type!r} (rotary scaling)")
            refuse_unless(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}")
            refuse_unless(not hf.get("attention_bias", False), "attention_bias")
            refuse_unless(not hf.get("mlp_bias", False), "mlp_bias")
            d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            refuse_unless(hf.get("head_dim") in (None, d // heads), f"head_dim {hf.get('head_dim')}")
            config = ModelConfig(
                arch="llama",
                vocab_size=int(hf["vocab_size"]),
                d_model=d,
                n_heads=heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                n_layers=int(hf["num_hidden_layers"]),
                d_ff=int(hf["intermediate_size"]),
                max_seq_length=int(hf["max_position_embeddings"]),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                tie_weights=bool(hf.get("tie_word_embeddings", False)),
                dropout=0.0,
            )
        Config(model=config).validate()
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"lacks {exc}" if isinstance(exc, KeyError) else str(exc)
        raise InterchangeError(f"{folder / 'config.json'}: {reason}") from None
    return config


def _read_tokenizer(folder: Path, hf_config: dict[str, Any]) -> Tokenizer:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    if (folder / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = tokenizers.Tokenizer(
            models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOS) is not None:
            tok.add_special_tokens([tokenizers.AddedToken(EOS, special=True)])
    else:
        raise InterchangeError(f"{folder}: holds no tokenizer.json (nor vocab.json and merges.txt)")
    settings = (
        _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    eos = settings.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        eos_id = hf_config.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        eos = tok.id_to_token(eos_id) if isinstance(eos_id, int) else None
    if eos is None:
        raise InterchangeError(
            f"{folder}: neither tokenizer_config.json nor config.json names the end-of-text token"
        )
    try:
        return tokenizer_from_hf(tok, eos=eos, source=str(folder))
    except TokenizerError as exc:
        raise InterchangeError(str(exc)) from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file, or shards), by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InterchangeError(f"{folder}: holds no *.safetensors weights (tinylm reads no pickled weights)")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise InterchangeError(f"{file}: not readable safetensors ({_first_line(exc)})") from None
    # Some GPT-2 files (OpenAI's own upload) name their weights without the "transformer." prefix.
    prefixed = {
        f"transformer.{k}": v for k, v in weights.items() if k.split(".")[0] in ("wte", "wpe", "h", "ln_f")
    }
    return {**weights, **prefixed}


def _sampling(folder: Path) -> SamplingConfig:
    """tinylm's sampling defaults, with the folder's generation_config.json where it sets them."""
    path = folder / "generation_config.json"
    saved = _read_json(path) if path.is_file() else {}
    defaults = SamplingConfig()
    if saved.get("do_sample") is False:
        return replace(defaults, temperature=0.0)
    keys = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
    found = {k: cast(saved[k]) for k, cast in keys.items() if isinstance(saved.get(k), int | float)}
    try:
        return Config(sampling=replace(defaults, **found)).validate().sampling
    except ConfigError:
        return defaults


# -- export to a Hugging Face folder ----------------------------------------------------------------------


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json for `config`: tinylm's own architecture is said as GPT-2 with the exact GELU."""
    eos = tokenizer.eos_id
    common = {"vocab_size": config.vocab_size, "bos_token_id": eos, "eos_token_id": eos, "dtype": "float32"}
    if config.arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "hidden_size": config.d_model,
            "intermediate_size": config.d_ff,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.kv_heads,
            "head_dim": config.d_k,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_length,
            "rms_norm_eps": config.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": config.tie_weights,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **common,
        "n_embd": config.d_model,
        "n_head": config.n_heads,
        "n_layer": config.n_layers,
        "n_inner": config.d_ff,
        "n_positions": config.max_seq_length,
        "activation_function": "gelu_new" if config.arch == "gpt2" else "gelu",
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": config.tie_weights,
    }


def check_exportable(config: ModelConfig) -> None:
    """Refuse, in one line, a model that another library's architecture cannot say exactly."""
    if config.qk_norm:
        raise InterchangeError(
            "this model normalises its queries and keys (model.qk_norm = true), which neither Hugging Face's "
            "GPT-2 and Llama nor llama.cpp's architectures do: it cannot be exported"
        )
    if config.arch == "tinylm" and not config.tie_weights:
        raise InterchangeError(
            "this tinylm model's output layer has a bias, which GPT-2 has not: train with --set "
            "tie_weights=true (or --set arch=gpt2) to export"
        )


def hf_weights(model: TinyLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names and layouts (contiguous float32 copies)."""
    config = model.config
    check_exportable(config)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if config.arch == "tinylm":
        # GPT-2 has no sqrt(d_model) on its embeddings: it moves into them, and out of the tied output layer
        # through the final norm, whose output feeds nothing else. The fixed table becomes learned positions.
        scale = math.sqrt(config.d_model)
        state["embed.weight"] = state["embed.weight"] * scale
        state["ln_f.weight"], state["ln_f.bias"] = state["ln_f.weight"] / scale, state["ln_f.bias"] / scale
        assert isinstance(model.positions, SinusoidalPositions)
        state["positions.weight"] = model.positions.table.detach().float().cpu()
        parts = weight_parts(replace(config, arch="gpt2"))
    else:
        parts = weight_parts(config)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for hf_name, piece in zip(part.hf_names, state[part.name].split(list(part.rows)), strict=True):
            out[hf_name] = (piece.t() if part.transposed else piece).contiguous().clone()
    return out


def write_hf(
    model: TinyLM,
    config: Config,
    tokenizer: Tokenizer,
    folder: str | Path,
    *,
    card: str,
    overwrite: bool = False,
) -> Path:
    """A folder that transformers' AutoModelForCausalLM and AutoTokenizer load with nothing else."""
    from safetensors.torch import save_file

    weights = hf_weights(model)
    with _replacing(Path(folder), overwrite=overwrite, is_dir=True) as tmp:
        tmp.mkdir()
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config(config.model, tokenizer))
        _write_json(tmp / "generation_config.json", generation_config(config.sampling, tokenizer))
        tokenizer.to_hf().save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(config.model, tokenizer))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(folder)


def generation_config(sampling: SamplingConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    eos = tokenizer.eos_id
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if sampling.temperature == 0:
        return {**ids, "do_sample": False}
    return {
        **ids,
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
    }


def tokenizer_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    eos = tokenizer.to_hf().id_to_token(tokenizer.eos_id)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "model_max_length": config.max_seq_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


# tinylm's prompt template as a Jinja chat template: each user turn is an instruction, each assistant turn a
# response ended by end-of-text, and the prompt closes with the response header. (tinylm tokenizes the pieces
# one by one; a whole-string tokenizer can merge across a piece's edge, which rarely changes the ids.)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + f"{{{{ {json.dumps(TEMPLATE.instruction_header)} }}}}"
    + "{{ message['content'] }}"
    + f"{{{{ {json.dumps(TEMPLATE.response_header)} }}}}"
    + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def model_card(config: Config, tokenizer: Tokenizer, *, info: dict[str, Any], command: str) -> str:
    """README.md of an exported folder: what the model is, what it learned from, and how to prompt it."""
    m, d = config.model, config.data
    arch = {"tinylm": "GPT-2 (tinylm's own design, said exactly as GPT-2)", "gpt2": "GPT-2", "llama": "Llama"}
    best = info.get("best_val_loss")
    loss = f"{best:.4f}" if isinstance(best, int | float) and math.isfinite(best) else "not measured"
    example = TEMPLATE.render("Name three primary colours.")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [tinylm]
---

# A tinylm model

A {arch[m.arch]} model of {m.n_layers} layers, {m.d_model} wide, {m.n_heads} attention heads, a
{m.max_seq_length}-token context window and a {tokenizer.vocab_size:,}-token `{tokenizer.kind}` vocabulary,
trained with [tinylm](https://github.com/) and exported with:

```
{command}
```

| | |
| --- | --- |
| training data | `{d.source}` ({d.dataset_size:,} examples at most) |
| training steps | {info.get("step", 0):,} |
| best validation loss | {loss} |

## How to prompt it

It was trained on instructions rendered like this, the answer ending with `{EOS}`:

```
{example}<answer>
```

An optional context passage goes between the instruction and the response, after a `### Context:` header.
The tokenizer's chat template renders a conversation the same way:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
messages = [{{"role": "user", "content": "Name three primary colours."}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
out = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Stop at `{EOS}` (the end-of-sequence token) or at a new `### Instruction:`.
"""


# -- export to GGUF ---------------------------------------------------------------------------------------


def write_gguf(
    model: TinyLM,
    tokenizer: Tokenizer,
    path: str | Path,
    *,
    dtype: str = "f32",
    name: str = "tinylm",
    overwrite: bool = False,
) -> Path:
    """A GGUF file that llama.cpp runs: its gpt2 or llama architecture, the tokenizer as a byte-level BPE."""
    try:
        import gguf
    except ImportError:
        raise InterchangeError("--to gguf needs the gguf package: pip install 'tinylm[gguf]'") from None
    import numpy as np

    config = model.config
    if dtype not in GGUF_DTYPES:
        raise InterchangeError(f"--dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if config.arch == "tinylm":
        raise InterchangeError(
            "llama.cpp's gpt2 has only the tanh GELU and tinylm's architecture uses the exact one: train with "
            "--set arch=gpt2 (or export --to hf, which can say it exactly)"
        )
    tensors = _gguf_tensors(config, hf_weights(model))
    vocab, merges = _gguf_vocab(tokenizer)
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
    quant["q8_0"] = gguf.GGMLQuantizationType.Q8_0
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type["q8_0"] = gguf.LlamaFileType.MOSTLY_Q8_0
    with _replacing(Path(path), overwrite=overwrite, is_dir=False) as tmp:
        arch = config.arch
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name)
        writer.add_context_length(config.max_seq_length)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.kv_heads)
        if arch == "llama":
            writer.add_layer_norm_rms_eps(config.norm_eps)
            writer.add_rope_dimension_count(config.d_k)
            writer.add_rope_freq_base(config.rope_theta)
            writer.add_vocab_size(config.vocab_size)
        else:
            writer.add_layer_norm_eps(config.norm_eps)
        writer.add_file_type(file_type[dtype])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(vocab)
        token_types = [gguf.TokenType.NORMAL] * len(vocab)
        token_types[tokenizer.eos_id] = gguf.TokenType.CONTROL
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_add_bos_token(False)
        for tensor_name, tensor in tensors.items():
            data = tensor.numpy().astype(np.float32)
            # Norms and biases (one row) stay float32, as llama.cpp's converter keeps them.
            kind = quant[dtype] if data.ndim > 1 else quant["f32"]
            if kind == quant["q8_0"] and data.shape[-1] % 32:
                kind = quant["f16"]  # q8_0 packs rows in blocks of 32
            if kind == quant["f16"]:
                writer.add_tensor(tensor_name, data.astype(np.float16))
            elif kind == quant["q8_0"]:
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
            else:
                writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _gguf_tensors(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face weights under llama.cpp's names. GGUF stores (out, in) matrices: GPT-2's Conv1D ones are
    turned back, and Llama's q and k rows are reordered for llama.cpp's pairwise rotation (as its converter
    does); the output layer is always written, tied or not."""
    out: dict[str, torch.Tensor] = {}
    if config.arch == "llama":
        out["token_embd.weight"] = hf["model.embed_tokens.weight"]
        for i in range(config.n_layers):
            src = f"model.layers.{i}."
            names = {
                "attn_norm": "input_layernorm",
                "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj",
                "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj",
            }
            for ours, theirs in names.items():
                out[f"blk.{i}.{ours}.weight"] = hf[f"{src}{theirs}.weight"]
            out[f"blk.{i}.attn_q.weight"] = _interleave_rotary(out[f"blk.{i}.attn_q.weight"], config.n_heads)
            out[f"blk.{i}.attn_k.weight"] = _interleave_rotary(out[f"blk.{i}.attn_k.weight"], config.kv_heads)
        out["output_norm.weight"] = hf["model.norm.weight"]
        out["output.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
        return out
    out["token_embd.weight"] = hf["transformer.wte.weight"]
    out["position_embd.weight"] = hf["transformer.wpe.weight"]
    for i in range(config.n_layers):
        src = f"transformer.h.{i}."
        gpt2_names = {
            "attn_norm": ("ln_1", False),
            "attn_qkv": ("attn.c_attn", True),
            "attn_output": ("attn.c_proj", True),
            "ffn_norm": ("ln_2", False),
            "ffn_up": ("mlp.c_fc", True),
            "ffn_down": ("mlp.c_proj", True),
        }
        for ours, (theirs, transposed) in gpt2_names.items():
            weight = hf[f"{src}{theirs}.weight"]
            out[f"blk.{i}.{ours}.weight"] = weight.t().contiguous() if transposed else weight
            out[f"blk.{i}.{ours}.bias"] = hf[f"{src}{theirs}.bias"]
    out["output_norm.weight"] = hf["transformer.ln_f.weight"]
    out["output_norm.bias"] = hf["transformer.ln_f.bias"]
    out["output.weight"] = hf.get("lm_head.weight", hf["transformer.wte.weight"])
    return out


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from (first halves, second halves) to (x0, y0, x1, y1, ...) pairs."""
    rows = weight.size(0)
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape).contiguous()


def _gguf_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    """Tokens by id and merges ("a b"), as a byte-level BPE; other tokenizers are refused."""
    state = json.loads(tokenizer.to_hf().to_str())
    model, pre = state["model"], state.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or state.get("normalizer"):
        raise InterchangeError(
            "this tokenizer is not a GPT-2-style byte-level BPE, the only kind tinylm writes to GGUF"
        )
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, merges


# -- writing without leaving half a file -----------------------------------------------------------------


@contextmanager
def _replacing(target: Path, *, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """A temporary path beside `target` to build it at; on success it is renamed into place (replacing an
    old one only with overwrite), on failure removed."""
    if target.exists() and not overwrite:
        raise InterchangeError(f"{target} already exists: choose another path or add --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    build = tmp / target.name
    try:
        yield build
        if is_dir and target.exists():
            os.replace(target, tmp / "old")  # the old folder goes only once the new one is whole
        os.replace(build, target)
    except OSError as exc:
        raise InterchangeError(f"{target}: could not be written: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InterchangeError(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise InterchangeError(f"{path}: the top level must be an object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
