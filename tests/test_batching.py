"""The live batch: requests with their own settings join and leave between steps, each getting what it gets
alone; log-probabilities are the model's own; settings that underflow and huge limits are safe."""

import resource
from dataclasses import replace

import pytest
import torch

from tinylm.config import SamplingConfig
from tinylm.generate import Batch, Engine, Request
from tinylm.prompts import TEMPLATE
from tinylm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=30)


def ids(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def mixed_requests() -> list[Request]:
    """Greedy and seeded sampled requests with every setting varied, prompts around a 16-token window."""
    settings = [
        GREEDY,
        replace(GREEDY, repetition_penalty=1.3, max_new_tokens=12),
        SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=25),
        SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=40),
        SamplingConfig(temperature=1.3, top_k=0, top_p=0.8, min_p=0.05, max_new_tokens=9),
        SamplingConfig(temperature=0.9, top_k=5, repetition_penalty=1.2, max_new_tokens=33),
    ]
    requests = []
    for index in range(12):
        sampling = settings[index % len(settings)]
        seed = None if sampling.temperature == 0 else 100 + index
        stop = ("e",) if index % 4 == 3 else ()
        requests.append(Request(ids(1 + 3 * index, seed=index), sampling, stop=stop, seed=seed))
    return requests


def answer(chunks) -> tuple[str, str, int]:
    chunks = list(chunks)
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].completion_tokens


def test_requests_joining_and_leaving_a_live_batch_get_what_they_get_alone(random_model):
    engine = Engine(random_model(), TOK)
    requests = mixed_requests()
    alone = [answer(engine.stream(r.prompt, r.sampling, stop=r.stop, seed=r.seed)) for r in requests]
    assert len({a[0] for a in alone}) == len(alone)  # the mix really varies
    batch = Batch(engine)
    texts: dict[int, list[str]] = {}
    ends: dict[int, tuple[str, int]] = {}
    owner: dict[int, int] = {}
    # An unseeded sampled stranger shares the batch, and one request leaves half way.
    stranger = batch.add([Request(ids(7, seed=99), SamplingConfig(temperature=1.0, max_new_tokens=60))])[0]
    step = 0
    pending = list(enumerate(requests))
    while pending or batch:
        if pending and step % 3 == 0:  # two newcomers join every third step
            joining, pending = pending[:2], pending[2:]
            for (index, _), row in zip(joining, batch.add([r for _, r in joining]), strict=True):
                owner[id(row)] = index
        if step == 20 and stranger in batch.rows:
            batch.remove([stranger])
        for row, chunk in batch.step():
            if id(row) in owner:
                texts.setdefault(owner[id(row)], []).append(chunk.text)
                if chunk.finish_reason:
                    ends[owner[id(row)]] = (chunk.finish_reason, chunk.completion_tokens)
        step += 1
    together = [("".join(texts[i]), *ends[i]) for i in range(len(requests))]
    assert together == alone
    assert len(batch) == 0


def test_finished_rows_leave_at_once(random_model):
    engine = Engine(random_model(), TOK)
    batch = Batch(engine)
    batch.add([Request([1, 2], replace(GREEDY, max_new_tokens=2)), Request([3], GREEDY)])
    sizes = []
    while batch:
        batch.step()
        sizes.append(len(batch))
    assert sizes[:2] == [2, 1] and sizes[-1] == 0 and len(sizes) == GREEDY.max_new_tokens


def test_generated_tokens_report_the_models_own_log_probabilities(random_model):
    model = random_model()
    engine = Engine(model, TOK)
    prompt = ids(5, seed=1)
    chunks = list(engine.stream(prompt, replace(GREEDY, max_new_tokens=8), logprobs=3))
    entries = [entry for chunk in chunks for entry in chunk.logprobs]
    tokens = [entry.token for entry in entries]
    assert len(entries) == 8 and "".join(e.text for e in entries) == "".join(c.text for c in chunks)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for position, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token]), abs=1e-4)
        assert [t for t, _, _ in entry.top] == expected[position].topk(3).indices.tolist()
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the likeliest


def test_prompt_log_probabilities_score_each_token_after_the_ones_before(random_model):
    model = random_model()
    prompt = ids(10, seed=2)
    scored = Engine(model, TOK).prompt_logprobs(prompt, top=2)
    assert scored[0] is None and [e.token for e in scored[1:] if e] == prompt[1:]
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    for position, entry in enumerate(scored[1:]):
        assert entry is not None and len(entry.top) == 2
        assert entry.logprob == pytest.approx(float(expected[position, prompt[position + 1]]), abs=1e-5)


def test_a_temperature_that_underflows_is_greedy(random_model):
    engine = Engine(random_model(), TOK)
    prompt = ids(6, seed=3)
    tiny = SamplingConfig(temperature=1e-40, top_k=0, top_p=1.0, max_new_tokens=20)
    assert engine.complete(prompt, tiny, seed=1) == engine.complete(
        prompt, replace(GREEDY, max_new_tokens=20)
    )


def test_a_huge_token_limit_allocates_nothing_up_front(scripted_run):
    from tinylm.checkpoint import load_model

    loaded = load_model(scripted_run.folder)
    engine = Engine(loaded.model, loaded.tokenizer)
    prompt = TEMPLATE.encode_prompt(loaded.tokenizer, "hi")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = engine.complete(prompt, replace(GREEDY, max_new_tokens=10**12), stop=TEMPLATE.stop_strings)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert (done.text, done.finish_reason) == (scripted_run.answer, "stop")
    assert grown_kib < 50_000  # memory follows the tokens made (11), not the limit
