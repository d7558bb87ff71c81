"""Held-out measurements shared by training and `tinylm eval`: loss, perplexity, bits per byte, exact-match
answers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tinylm.config import Config, SamplingConfig
from tinylm.data.prepare import SAMPLE_TOKENS, PreparedData
from tinylm.data.sources import Record
from tinylm.data.tokens import TokenArrays
from tinylm.distributed import World
from tinylm.generate import Engine
from tinylm.loss import lm_loss
from tinylm.model import IGNORE_INDEX, TinyLM
from tinylm.prompts import TEMPLATE


@dataclass(frozen=True)
class HeldOut:
    """What a model scores on held-out examples: the mean loss per counted target token (nats), and the
    same total in bits per byte of the text those targets stand for, which compares across tokenizers."""

    loss: float
    bits_per_byte: float

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


@torch.no_grad()
def held_out(
    model: TinyLM,
    examples: TokenArrays,
    *,
    batch_size: int,
    pad_id: int,
    byte_lengths: Sequence[int],
    max_batches: int | None = None,
    world: World | None = None,
) -> HeldOut:
    """Loss and bits per byte over the held-out examples (in their fixed order), in eval mode.

    Bits per byte is the total loss over every counted target, in bits, divided by the UTF-8 bytes those
    targets decode to (`byte_lengths`, from the tokenizer; end-of-text is a target that adds none). Under
    torchrun (`world`) each process takes every world.size-th batch and the sums are added up over the
    processes, so all of them return what one process would.
    """
    device = next(model.parameters()).device
    bytes_of = torch.tensor(byte_lengths, dtype=torch.long)
    was_training = model.training
    model.eval()
    total, count, n_bytes = 0.0, 0, 0
    try:
        for index, first in enumerate(range(0, len(examples), batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            if world is not None and index % world.size != world.rank:
                continue
            chosen = range(first, min(first + batch_size, len(examples)))
            inputs, targets = examples.batch(chosen, pad_id=pad_id)
            loss_sum, n = lm_loss(model, inputs.to(device), targets.to(device))
            total += float(loss_sum)
            count += n
            n_bytes += int(bytes_of[targets[targets != IGNORE_INDEX]].sum())
    finally:
        model.train(was_training)
    if world is not None:
        total, summed, summed_bytes = world.sum(total, count, n_bytes)
        count, n_bytes = int(summed), int(summed_bytes)
    bits = total / math.log(2) / n_bytes if n_bytes else math.nan
    return HeldOut(loss=total / max(count, 1), bits_per_byte=bits)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass(frozen=True)
class Answer:
    record: Record
    answer: str
    correct: bool


def answer_records(
    engine: Engine,
    records: Sequence[Record],
    *,
    is_correct: Callable[[Record, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> list[Answer]:
    """Greedy answers to held-out prompts (after their earlier turns, as a chat asks them), in batches,
    each judged by `is_correct`."""
    greedy = replace(SamplingConfig(), temperature=0.0, max_new_tokens=max_new_tokens)
    budget = engine.model.config.max_seq_length - max_new_tokens
    answers: list[Answer] = []
    for first in range(0, len(records), batch_size):
        chunk = records[first : first + batch_size]
        prompts = [
            TEMPLATE.encode_chat(
                engine.tokenizer, r.history, r.instruction, r.context, max_prompt_tokens=budget
            ).ids
            for r in chunk
        ]
        done = engine.generate_batch(prompts, greedy, stop=TEMPLATE.stop_strings)
        answers += [
            Answer(r, c.text.strip(), is_correct(r, c.text)) for r, c in zip(chunk, done, strict=True)
        ]
    return answers


class Evaluator:
    """What a training run measures at each evaluation: the validation loss over (at most `eval_batches`
    batches of) the held-out examples, and the model's greedy answers to a few fixed held-out prompts, so
    users can watch it learn. Every process computes its share of the loss; the main one alone samples."""

    def __init__(self, data: PreparedData, engine: Engine, config: Config, *, world: World):
        self.data = data
        self.engine = engine
        self.batch_size = max(config.train.batch_size, 8)
        self.max_batches = config.train.eval_batches
        self.greedy = replace(config.sampling, temperature=0.0, max_new_tokens=SAMPLE_TOKENS)
        self.world = world
        self.byte_lengths = data.tokenizer.byte_lengths()

    def __call__(self) -> dict[str, Any]:
        """{val_loss, val_perplexity, val_bpb, samples}; the model is left in the mode it was in."""
        measured = held_out(
            self.engine.model,
            self.data.val,
            batch_size=self.batch_size,
            pad_id=self.data.tokenizer.eos_id,
            byte_lengths=self.byte_lengths,
            max_batches=self.max_batches,
            world=self.world,
        )
        return {
            "val_loss": measured.loss,
            "val_perplexity": measured.perplexity,
            "val_bpb": measured.bits_per_byte,
            "samples": self.samples(),
        }

    def samples(self) -> list[dict[str, str]]:
        if not self.world.is_main:
            return []
        was_training = self.engine.model.training
        self.engine.model.eval()
        self.engine.refresh()  # the weights moved since the engine last laid them out
        try:
            return [
                {
                    "prompt": p.text,
                    "completion": self.engine.complete(p.ids, self.greedy, stop=self.data.stop).text,
                }
                for p in self.data.samples
            ]
        finally:
            self.engine.model.train(was_training)
