"""Bits per byte: the held-out loss in bits over the UTF-8 bytes its targets stand for, so that models with
different tokenizers compare."""

import math

import numpy as np
import pytest

from tinylm.data.tokens import TokenArrays
from tinylm.evaluate import held_out
from tinylm.loss import lm_loss
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer, build_tokenizer

TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n" * 4
# Characters of two, three and four bytes, which GPT-2 spells with tokens that are parts of a character.
UNICODE = "naïve café — 東京 🙂 done"


def measure(model, tokenizer, examples):
    return held_out(
        model, examples, batch_size=4, pad_id=tokenizer.eos_id, byte_lengths=tokenizer.byte_lengths()
    )


def test_bytes_are_tokens_so_bits_per_byte_is_the_loss_in_bits(tiny_model):
    tokenizer = ByteTokenizer()
    stream = np.array(tokenizer.encode(TEXT), dtype=np.uint16)  # no end-of-text among the targets
    measured = measure(tiny_model(), tokenizer, TokenArrays.windows(stream, max_seq_length=32))
    assert measured.bits_per_byte == pytest.approx(measured.loss / math.log(2), rel=1e-12)


def test_gpt2_tokens_divide_the_same_nats_by_the_bytes_of_text_they_stand_for(tiny_model, gpt2_ranks):
    tokenizer = build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks))
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    stream = np.array(tokenizer.encode(TEXT), dtype=np.uint16)
    windows = TokenArrays.windows(stream, max_seq_length=8)
    inputs, targets = windows.batch(range(len(windows)), pad_id=tokenizer.eos_id)
    nats, _ = lm_loss(model.eval(), inputs, targets)
    text_bytes = len(tokenizer.decode(stream[1 : 1 + 8 * len(windows)].tolist()).encode())
    measured = measure(model, tokenizer, windows)
    assert measured.bits_per_byte == pytest.approx(nats.item() / math.log(2) / text_bytes, rel=1e-6)
    assert measured.bits_per_byte < measured.loss / math.log(2)  # a GPT-2 token is several bytes


def test_instruction_data_counts_the_answers_bytes_and_end_of_text_adds_none(tiny_model):
    tokenizer = ByteTokenizer()
    answers = ["5 apples", "blue sky", "12"]
    examples = TokenArrays.from_examples(
        [TEMPLATE.encode_example(tokenizer, "Say it.", "", a, max_seq_length=64) for a in answers],
        vocab_size=tokenizer.vocab_size,
    )
    model = tiny_model()
    inputs, targets = examples.batch(range(len(examples)), pad_id=tokenizer.eos_id)
    nats, count = lm_loss(model.eval(), inputs, targets)
    measured = measure(model, tokenizer, examples)
    assert count == sum(len(a) + 1 for a in answers)  # each answer and its end-of-text
    assert measured.bits_per_byte == pytest.approx(
        nats.item() / math.log(2) / len("".join(answers)), rel=1e-6
    )


def test_every_tokenizer_spells_text_with_exactly_its_bytes(gpt2_ranks):
    tokenizers = [
        ByteTokenizer(),
        build_tokenizer("gpt2", gpt2_ranks_path=str(gpt2_ranks)),
        build_tokenizer("bpe", texts=[TEXT, UNICODE] * 20, vocab_size=300),
    ]
    for tokenizer in tokenizers:
        lengths = tokenizer.byte_lengths()
        assert len(lengths) == tokenizer.vocab_size and lengths[tokenizer.eos_id] == 0
        for text in (TEXT, UNICODE):
            assert sum(lengths[t] for t in tokenizer.encode(text)) == len(text.encode()), tokenizer.kind
