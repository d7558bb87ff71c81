"""The three tokenizers: exact GPT-2 ids, exact round trips, and rebuilding from saved state alone."""

import base64
import io
import json
from pathlib import Path

import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from tinylm.tokenizer import (
    GPT2_RANKS_ENV,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_dict,
)

GPT2_RANKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"
needs_gpt2 = pytest.mark.skipif(not GPT2_RANKS.is_file(), reason=f"GPT-2 ranks file absent: {GPT2_RANKS}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Peter Piper picked a peck of pickled peppers. 1234567890 + 42 = 1234567932",
] * 20
TRICKY_TEXTS = [
    "",
    "Hello world",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文字符，日本語のテキスト、한국어",
    "  leading, trailing  and\tinner\r\nwhitespace \n\n",
    "combining e\u0301 and NUL \x00 and U+FFFF \uffff",
    "text with <|endoftext|> inside<|endoftext|>",
]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    if not GPT2_RANKS.is_file():
        pytest.skip(f"GPT-2 ranks file absent: {GPT2_RANKS}")
    return build_tokenizer("gpt2", gpt2_ranks_path=str(GPT2_RANKS))


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return build_tokenizer("bpe", texts=CORPUS, vocab_size=300)


@pytest.fixture(params=["gpt2", "bpe", "byte"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "byte":
        return build_tokenizer("byte")
    return request.getfixturevalue(request.param)


@needs_gpt2
@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [15496, 995]),
        (" the", [262]),
        ("I'm don't", [40, 1101, 836, 470]),
        ("12345", [10163, 2231]),
        ("😀", [47249, 222]),
        ("hello<|endoftext|>", [31373, 27, 91, 437, 1659, 5239, 91, 29]),
    ],
)
def test_gpt2_golden_ids(gpt2: Tokenizer, text: str, ids: list[int]) -> None:
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


@needs_gpt2
def test_gpt2_sizes_and_eos(gpt2: Tokenizer) -> None:
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eos_id) == ("gpt2", 50257, 50256)
    assert gpt2.decode([gpt2.eos_id]) == "<|endoftext|>"


@needs_gpt2
def test_gpt2_ranks_from_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPT2_RANKS_ENV, str(GPT2_RANKS))
    assert build_tokenizer("gpt2").encode("Hello world") == [15496, 995]


@needs_gpt2
def test_gpt2_explicit_path_wins_over_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(GPT2_RANKS_ENV, str(tmp_path / "missing.tiktoken"))
    assert build_tokenizer("gpt2", gpt2_ranks_path=str(GPT2_RANKS)).encode("Hello world") == [15496, 995]


@needs_gpt2
def test_gpt2_from_tiktoken_matches_tiktokens_own_gpt2(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own GPT-2 definition, as get_encoding("gpt2") builds it from its cache, minus the network.
    ranks = {base64.b64decode(token): int(rank) for token, rank in map(str.split, GPT2_RANKS.open())}
    reference = tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )
    monkeypatch.delenv(GPT2_RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: reference)
    tok = build_tokenizer("gpt2")
    for text in TRICKY_TEXTS + CORPUS[:5]:
        assert tok.encode(text) == reference.encode_ordinary(text)
    assert tok.to_dict()["ranks"] == GPT2_RANKS.read_text()


def test_gpt2_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(TokenizerError, match=r"nope\.tiktoken"):
        build_tokenizer("gpt2", gpt2_ranks_path=str(missing))


def test_gpt2_missing_env_file_does_not_fall_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(GPT2_RANKS_ENV, str(tmp_path / "gone.tiktoken"))
    with pytest.raises(TokenizerError, match=r"gone\.tiktoken"):
        build_tokenizer("gpt2")


def test_gpt2_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    ranks = tmp_path / "bad.tiktoken"
    ranks.write_text("IQ== 0\nIg== 1\nthis is not a rank line\n")
    with pytest.raises(TokenizerError, match=r"bad\.tiktoken:3:"):
        build_tokenizer("gpt2", gpt2_ranks_path=str(ranks))


def test_gpt2_rejects_a_ranks_file_that_is_not_gpt2s(tmp_path: Path) -> None:
    ranks = tmp_path / "small.tiktoken"
    ranks.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerError, match="not GPT-2's ranks file"):
        build_tokenizer("gpt2", gpt2_ranks_path=str(ranks))


def test_gpt2_offline_without_a_file_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("no network")

    monkeypatch.delenv(GPT2_RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError) as excinfo:
        build_tokenizer("gpt2")
    message = str(excinfo.value)
    assert "\n" not in message
    assert GPT2_RANKS_ENV in message and "data.gpt2_ranks_path" in message and "gpt2.tiktoken" in message


def test_bpe_respects_vocab_size(bpe: Tokenizer) -> None:
    assert (bpe.kind, bpe.vocab_size) == ("bpe", 300)
    assert all(0 <= i < 300 for text in CORPUS[:5] for i in bpe.encode(text))
    # Merges were learnt: common corpus text takes fewer tokens than bytes.
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode())


def test_bpe_default_vocab_size_is_an_upper_bound() -> None:
    # A tiny corpus cannot fill 8192 entries; vocab_size reports what the model really needs.
    tok = build_tokenizer("bpe", texts=CORPUS[:5])
    assert 257 < tok.vocab_size <= 8192


def test_bpe_rejects_bad_options() -> None:
    with pytest.raises(TokenizerError, match="texts"):
        build_tokenizer("bpe")
    with pytest.raises(TokenizerError, match="at least 257"):
        build_tokenizer("bpe", texts=CORPUS, vocab_size=100)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_literal_eos_in_text_is_ordinary_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("user says <|endoftext|> here")
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode([*ids, tokenizer.eos_id]) == "user says <|endoftext|> here<|endoftext|>"


def test_partial_utf8_decodes_to_replacement_char(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("😀")
    assert len(ids) > 1
    assert tokenizer.decode(ids[:1]) == "\ufffd"


def test_lone_surrogate_does_not_raise(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"


def test_out_of_range_id_is_a_clear_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tokenizer.decode([-1])


def test_saved_state_rebuilds_identical_tokenizer(tokenizer: Tokenizer) -> None:
    state = tokenizer.to_dict()
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(state)))
    assert (rebuilt.kind, rebuilt.vocab_size, rebuilt.eos_id) == (
        tokenizer.kind,
        tokenizer.vocab_size,
        tokenizer.eos_id,
    )
    for text in TRICKY_TEXTS + CORPUS[:5]:
        assert rebuilt.encode(text) == tokenizer.encode(text)


def test_saved_state_loads_with_torch_weights_only(tokenizer: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"tokenizer": tokenizer.to_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["tokenizer"]
    assert tokenizer_from_dict(state).encode("Hello world") == tokenizer.encode("Hello world")


def test_byte_tokenizer_is_utf8_plus_eos() -> None:
    tok = build_tokenizer("byte")
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("byte", 257, 256)
    assert tok.encode("hé") == [104, 195, 169]


def test_fixed_vocab_sizes_reject_other_values() -> None:
    with pytest.raises(TokenizerError, match="fixed at 257"):
        build_tokenizer("byte", vocab_size=8192)
    with pytest.raises(TokenizerError, match="fixed at 50257"):
        build_tokenizer("gpt2", vocab_size=8192)


def test_unknown_kind() -> None:
    with pytest.raises(TokenizerError, match=r"^unknown tokenizer 'xyz' \(choose gpt2, bpe or byte\)$"):
        build_tokenizer("xyz")


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"kind": "xyz"}, "unknown kind 'xyz'"),
        ({}, "unknown kind None"),
        ({"kind": "gpt2"}, "'ranks'"),
        ({"kind": "bpe", "json": "{not json"}, "not valid tokenizer JSON"),
    ],
)
def test_bad_saved_state(state: dict, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        tokenizer_from_dict(state)


def test_bpe_training_cuts_long_unbroken_runs_so_no_token_spans_more_than_the_limit() -> None:
    """A long run without a space trains in linear time: no pre-token (so no merged token) is longer
    than BPE_MAX_WORD bytes, and the text still round-trips exactly."""
    from tinylm.tokenizer import BPE_MAX_WORD

    run = "ACGT" * 50_000  # 200,000 characters, no space
    tok = build_tokenizer("bpe", texts=[run, "an ordinary sentence, with words."], vocab_size=600)
    ids = tok.encode(run)
    assert tok.decode(ids) == run
    assert max(len(tok.decode([i]).encode()) for i in set(ids)) <= BPE_MAX_WORD
    assert len(ids) < len(run) // 8  # it still learned long merges inside the run
    words = "an ordinary sentence, with words."
    assert tok.decode(tok.encode(words)) == words
