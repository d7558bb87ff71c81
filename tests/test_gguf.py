"""GGUF for llama.cpp: llama.cpp itself (llama-cpp-python) runs the exported gpt2 and llama models,
tokenizes like tinylm and decodes the same greedy tokens; f16 and q8_0 files load and answer."""

from importlib.util import find_spec

import pytest
import torch

from tinylm.config import Config, DataConfig, ModelConfig, SamplingConfig
from tinylm.data.instructions import collate
from tinylm.generate import Engine
from tinylm.interchange import InterchangeError, write_gguf
from tinylm.loss import lm_loss
from tinylm.model import TinyLM
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import build_tokenizer

pytestmark = [
    pytest.mark.llama_cpp,
    pytest.mark.skipif(
        find_spec("llama_cpp") is None or find_spec("gguf") is None,
        reason="llama-cpp-python and gguf are not installed (make install, or pip install llama-cpp-python gguf)",
    ),
]

PAIRS = [
    ("Greet me.", "hello there, friend"),
    ("What is 2 plus 3?", "five"),
    ("Name a colour.", "blue like the sky"),
    ("Count to three.", "one two three"),
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def bpe():
    texts = [TEMPLATE.render(q, "", a) for q, a in PAIRS] * 20
    return build_tokenizer("bpe", texts=texts, vocab_size=320)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, bpe, tiny_model_config):
    """A 2-layer, 32-wide model of each architecture that has learned PAIRS, so greedy choices are clear."""
    fields = {"n_kv_heads": 1} if request.param == "llama" else {}
    config = tiny_model_config(arch=request.param, vocab_size=bpe.vocab_size, tie_weights=True, **fields)
    torch.manual_seed(0)
    model = TinyLM(config)
    examples = [TEMPLATE.encode_example(bpe, q, "", a, max_seq_length=64) for q, a in PAIRS]
    inputs, targets = collate(examples, bpe.eos_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss, n = lm_loss(model, inputs, targets)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def llama_cpp_model(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, seed=0)


def greedy(llm, prompt: list[int]) -> list[int]:
    llm.reset()
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if len(tokens) == NEW_TOKENS:
            break
    return tokens


def test_llama_cpp_runs_the_f32_file_with_tinylms_tokens(tmp_path, trained, bpe):
    path = write_gguf(trained, bpe, tmp_path / "model.gguf", dtype="f32")
    llm = llama_cpp_model(path)
    engine = Engine(trained, bpe)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)
    for question, _ in PAIRS:
        prompt = TEMPLATE.encode_prompt(bpe, question)
        text = TEMPLATE.render(question)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe.encode(text)
        assert greedy(llm, prompt) == [int(t) for t in engine.generate_ids([prompt], sampling)]


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_smaller_files_load_and_answer(tmp_path, trained, bpe, dtype):
    path = write_gguf(trained, bpe, tmp_path / f"model-{dtype}.gguf", dtype=dtype)
    assert path.stat().st_size < write_gguf(trained, bpe, tmp_path / "f32.gguf").stat().st_size
    prompt = TEMPLATE.encode_prompt(bpe, PAIRS[0][0])
    assert len(greedy(llama_cpp_model(path), prompt)) > 0


def test_tinylms_own_design_and_an_existing_file_are_refused(tmp_path, bpe):
    config = Config(
        model=ModelConfig(
            vocab_size=bpe.vocab_size, d_model=32, n_heads=2, n_layers=1, d_ff=64, tie_weights=True
        ),
        data=DataConfig(tokenizer="bpe"),
    )
    with pytest.raises(InterchangeError, match="--set arch=gpt2"):
        write_gguf(TinyLM(config.model), bpe, tmp_path / "tinylm.gguf")
    (tmp_path / "taken.gguf").write_text("mine")
    gpt2 = TinyLM(ModelConfig(**{**config.model.__dict__, "arch": "gpt2"}))
    with pytest.raises(InterchangeError, match="already exists"):
        write_gguf(gpt2, bpe, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]
