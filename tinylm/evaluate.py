"""Held-out measurements shared by training and `tinylm eval`: loss, perplexity, exact-match answers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from tinylm.config import SamplingConfig
from tinylm.data.sources import Record
from tinylm.data.tokens import TokenArrays
from tinylm.distributed import World
from tinylm.generate import Engine
from tinylm.model import TinyLM, lm_loss
from tinylm.prompts import DEFAULT_STOP_STRINGS, encode_prompt


@torch.no_grad()
def validation_loss(
    model: TinyLM,
    examples: TokenArrays,
    *,
    batch_size: int,
    pad_id: int,
    max_batches: int | None = None,
    world: World | None = None,
) -> float:
    """Mean per-token loss over the held-out examples (in their fixed order), in eval mode.

    Under torchrun (`world`) each process takes every world.size-th batch and the sums are added up over
    the processes, so all of them return the mean over the same batches as one process would.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
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
    finally:
        model.train(was_training)
    if world is not None:
        total, count = world.sum(total, count)
    return total / max(count, 1)


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
    """Greedy answers to held-out prompts, in batches, each judged by `is_correct`."""
    greedy = replace(SamplingConfig(), temperature=0.0, max_new_tokens=max_new_tokens)
    budget = engine.model.config.max_seq_length - max_new_tokens
    answers: list[Answer] = []
    for first in range(0, len(records), batch_size):
        chunk = records[first : first + batch_size]
        prompts = [encode_prompt(engine.tokenizer, r.instruction, r.context, budget=budget) for r in chunk]
        done = engine.generate_batch(prompts, greedy, stop=DEFAULT_STOP_STRINGS)
        answers += [
            Answer(r, c.text.strip(), is_correct(r, c.text)) for r, c in zip(chunk, done, strict=True)
        ]
    return answers
