"""Hugging Face folders in and out: transformers' own tiny GPT-2 and Llama models import with their logits,
tinylm-trained models of every architecture export to a folder transformers loads with the same logits,
tokens and token ids, and bad folders or paths are one-line errors that leave nothing behind."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tinylm.checkpoint import CheckpointError, load_model, save_checkpoint
from tinylm.cli import main
from tinylm.config import Config, DataConfig, SamplingConfig
from tinylm.data.instructions import collate
from tinylm.generate import Engine
from tinylm.interchange import InterchangeError, model_card, read_hf, write_hf
from tinylm.loss import lm_loss
from tinylm.model import TinyLM
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import EOS, build_tokenizer

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
AWKWARD = [
    "Hello world",
    "  leading, trailing and   inner   runs of spaces   ",
    "tabs\tand\n\nnewlines\r\n and \u00a0no-break spaces",
    "naïve café, Ελληνικά, 日本語のテキスト, emoji 🙂👍🏽 and a lone é",
    "don't won't it's 123,456.78 3.14159",
    f"a literal {EOS} inside the text",
]
QUESTIONS = ["Greet me.", "What is 2 plus 3?", "Name a colour.", "Count to three."]


@pytest.fixture(scope="module")
def tokenizers_by_kind(gpt2_ranks):
    texts = [TEMPLATE.render(q, "", "hello there, how are you?") for q in QUESTIONS] + AWKWARD
    return {
        "gpt2": build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks)),
        "bpe": build_tokenizer("bpe", texts=texts * 5, vocab_size=400),
        "byte": build_tokenizer("byte"),
    }


def hf_folder(tmp_path: Path, family: str, tokenizer, *, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A random transformers model of `family` (3 layers, 32 wide) saved with `tokenizer` as HF saves it."""
    torch.manual_seed(seed)
    vocab = tokenizer.vocab_size
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=2, eos_token_id=tokenizer.eos_id
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.eos_id,
        )
        model = transformers.LlamaForCausalLM(config)
    folder = tmp_path / f"hf-{family}"
    model.eval().save_pretrained(folder)
    eos = tokenizer.to_hf().id_to_token(tokenizer.eos_id)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.to_hf(), eos_token=eos)
    fast.save_pretrained(folder)
    return folder, model


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and positions (counted from each row's first real token) of a left-padded batch."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def assert_same_logits(ours: TinyLM, theirs: torch.nn.Module, rows: list[list[int]], pad: int) -> None:
    ids, mask, positions = left_padded(rows, pad)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask, positions=positions)
        hf = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (mine[real] - hf[real]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_a_transformers_model_imports_with_its_logits(tmp_path, tokenizers_by_kind, family, kind):
    tokenizer = tokenizers_by_kind[kind]
    folder, reference = hf_folder(tmp_path, family, tokenizer)
    imported = read_hf(folder)
    assert imported.config.model.arch == family
    assert imported.tokenizer.kind == kind
    rows = [imported.tokenizer.encode(text) for text in AWKWARD[:4]]
    assert_same_logits(imported.model, reference, rows, pad=tokenizer.eos_id)
    assert [imported.tokenizer.encode(t) for t in AWKWARD] == [tokenizer.encode(t) for t in AWKWARD]


@pytest.fixture
def trained(tiny_model_config):
    """`trained(arch, tokenizer, steps=60)`: a 2-layer, 32-wide model of `arch` trained a little on four
    prompt-answer pairs, and its config."""

    def train_one(arch: str, tokenizer, *, steps: int = 60) -> tuple[TinyLM, Config]:
        fields = {"tinylm": {"tie_weights": True}, "gpt2": {}, "llama": {"n_kv_heads": 1}}[arch]
        model_config = tiny_model_config(arch=arch, vocab_size=tokenizer.vocab_size, **fields)
        config = Config(
            model=model_config,
            data=DataConfig(source="synthetic", tokenizer=tokenizer.kind),
            sampling=SamplingConfig(temperature=0.0),
        ).validate()
        torch.manual_seed(0)
        model = TinyLM(model_config)
        answers = ["hello there", "5", "blue sky", "1 2 3"]
        examples = [
            TEMPLATE.encode_example(tokenizer, q, "", a, max_seq_length=64)
            for q, a in zip(QUESTIONS, answers, strict=True)
        ]
        inputs, targets = collate(examples, tokenizer.eos_id)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss, n = lm_loss(model, inputs, targets)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.eval(), config

    return train_one


def until_end(tokens: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first end-of-text (transformers stops there; tinylm's ids go on)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def export(tmp_path: Path, model: TinyLM, config: Config, tokenizer, name: str = "exported") -> Path:
    card = model_card(config, tokenizer, info={"step": 60, "best_val_loss": 1.5}, command="tinylm export")
    return write_hf(model, config, tokenizer, tmp_path / name, card=card)


@pytest.mark.parametrize("arch", ["tinylm", "gpt2", "llama"])
@pytest.mark.parametrize("kind", ["gpt2", "bpe", "byte"])
def test_a_trained_model_exports_to_what_transformers_loads_with_the_same_logits_and_tokens(
    tmp_path, tokenizers_by_kind, arch, kind, trained
):
    tokenizer = tokenizers_by_kind[kind]
    model, config = trained(arch, tokenizer)
    folder = export(tmp_path, model, config, tokenizer)
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    prompts = [TEMPLATE.encode_prompt(tokenizer, q) for q in QUESTIONS]
    assert_same_logits(model, theirs, prompts, pad=tokenizer.eos_id)

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    engine = Engine(model, tokenizer)
    for prompt in prompts[:2]:
        ours = [int(t) for t in engine.generate_ids([prompt], greedy)]
        ids = torch.tensor([prompt])
        out = theirs.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tokenizer.eos_id,
        )
        assert until_end(out[0, len(prompt) :].tolist(), tokenizer.eos_id) == until_end(
            ours, tokenizer.eos_id
        )

    for text in AWKWARD:
        expected = [*tokenizer.encode(text.replace(EOS, "")), tokenizer.eos_id]
        assert hf_tokenizer(text.replace(EOS, "") + EOS)["input_ids"] == expected, text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id


def test_the_model_card_says_how_to_prompt_and_what_made_it(tmp_path, tokenizers_by_kind, trained):
    tokenizer = tokenizers_by_kind["byte"]
    model, config = trained("gpt2", tokenizer, steps=1)
    card = (export(tmp_path, model, config, tokenizer) / "README.md").read_text()
    for words in ("### Instruction:", "### Response:", "tinylm export", "1.5000", "synthetic", "60"):
        assert words in card
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    rendered = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Greet me."}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == TEMPLATE.render("Greet me.")


def test_an_export_path_that_exists_is_kept_unless_overwrite(tmp_path, tokenizers_by_kind, trained):
    tokenizer = tokenizers_by_kind["byte"]
    model, config = trained("gpt2", tokenizer, steps=1)
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "mine.txt").write_text("keep me")
    with pytest.raises(InterchangeError, match=r"already exists.*--overwrite"):
        export(tmp_path, model, config, tokenizer)
    assert [p.name for p in (tmp_path / "exported").iterdir()] == ["mine.txt"]
    card = model_card(config, tokenizer, info={}, command="tinylm export")
    write_hf(model, config, tokenizer, tmp_path / "exported", card=card, overwrite=True)
    assert (tmp_path / "exported" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary folder left


def test_a_tinylm_model_with_an_output_bias_is_refused_naming_the_setting(
    tmp_path, tokenizers_by_kind, trained
):
    tokenizer = tokenizers_by_kind["byte"]
    _, config = trained("tinylm", tokenizer, steps=1)
    untied = TinyLM(replace(config.model, tie_weights=False))
    with pytest.raises(InterchangeError, match="tie_weights=true"):
        export(tmp_path, untied, replace(config, model=untied.config), tokenizer)
    assert list(tmp_path.iterdir()) == []


def break_folder(folder: Path, how: str) -> str:
    """Damage an exported Hugging Face folder; returns what the error must say."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    if how == "architecture":
        config.update(model_type="mistral", architectures=["MistralForCausalLM"])
        (folder / "config.json").write_text(json.dumps(config))
        return "model_type 'mistral' .MistralForCausalLM. is not supported"
    if how == "missing weight":
        weights = load_file(folder / "model.safetensors")
        del weights["transformer.h.1.mlp.c_fc.weight"]
        save_file(weights, folder / "model.safetensors")
        return "lack transformer.h.1.mlp.c_fc.weight"
    if how == "shape":
        config["n_inner"] = 48
        (folder / "config.json").write_text(json.dumps(config))
        return r"transformer.h.0.mlp.c_fc.weight has shape \(32, 64\), but config.json implies \(32, 48\)"
    config["vocab_size"] = 300
    (folder / "config.json").write_text(json.dumps(config))
    return "the tokenizer has 257 tokens but the model's vocabulary .* has 300"


@pytest.mark.parametrize("how", ["architecture", "missing weight", "shape", "tokenizer"])
def test_a_bad_folder_is_one_line_naming_what_is_wrong(tmp_path, tokenizers_by_kind, how, capsys, trained):
    tokenizer = tokenizers_by_kind["byte"]
    model, config = trained("gpt2", tokenizer, steps=1)
    folder = export(tmp_path, model, config, tokenizer)
    expected = break_folder(folder, how)
    with pytest.raises(InterchangeError, match=expected):
        read_hf(folder)
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_hub_name_fails_fast_offline():
    with pytest.raises(
        CheckpointError, match=r"hf:someone/some-model from the Hugging Face Hub .the Hub cannot be reached"
    ):
        load_model("hf:someone/some-model")


def test_the_command_line_exports_and_every_front_end_takes_the_folder(
    tmp_path, tokenizers_by_kind, capsys, trained
):
    tokenizer = tokenizers_by_kind["byte"]
    model, config = trained("llama", tokenizer)
    checkpoint = save_checkpoint(
        tmp_path / "run" / "best_model.pt", model=model, config=config, tokenizer=tokenizer, step=60
    )
    out = tmp_path / "llama-hf"
    assert main(["export", "--checkpoint", str(checkpoint.parent), "--to", "hf", str(out)]) == 0
    assert main(["export", "--checkpoint", str(checkpoint), "--to", "hf", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert "tinylm export --checkpoint" in (out / "README.md").read_text()

    loaded = load_model(out)
    prompt = TEMPLATE.encode_prompt(tokenizer, "Greet me.")
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
    expected = [int(t) for t in Engine(model, tokenizer).generate_ids([prompt], greedy)]
    assert [int(t) for t in Engine(loaded.model, loaded.tokenizer).generate_ids([prompt], greedy)] == expected
    generate = ["generate", "--checkpoint", str(out), "--prompt", "Greet me.", "--temperature", "0"]
    assert main([*generate, "--max-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(expected).split(EOS)[0].strip()


def test_fine_tuning_starts_from_a_hugging_face_folder(tmp_path, tokenizers_by_kind, tiny_set_args):
    tokenizer = tokenizers_by_kind["byte"]
    folder, _ = hf_folder(tmp_path, "gpt2", tokenizer)
    run = tmp_path / "run"
    args = ["train", "--init-from", str(folder), "--data", "synthetic", "--out", str(run), "--quiet"]
    assert main([*args, *tiny_set_args, "--set", "max_steps=2"]) == 0
    loaded = load_model(run)
    assert loaded.config.model.arch == "gpt2" and loaded.config.model.n_layers == 3
    assert loaded.info["step"] == 2
