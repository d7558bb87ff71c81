"""Training throughput, side by side: tinylm's configurations and its peers on the same two kinds of data.

Every row trains on both kinds, tokenized by GPT-2: instructions (Dolly-15k's mix of prompt, context and
response lengths, filled with tiny Shakespeare's words, the prompt masked out of the loss: the response is
most of a record's tokens, as in Dolly) and plain text (tiny Shakespeare's 128-token windows, where every
position is a target and the work is the same for everyone). Each run is a fresh subprocess, so peak memory (RSS) is that configuration's own. Rounds go round-robin over the
configurations and the table shows medians, so a busy machine slows every row alike. The script measures
this machine's float32 and bfloat16 matmul peaks itself, and each row's model FLOP/s as a share of them.

    python benchmarks/train_throughput.py                 # the full table (an hour or more on 2 CPU cores)
    python benchmarks/train_throughput.py --quick         # smoke test: v1, two steps a row, no torch.compile
    python benchmarks/train_throughput.py --nanogpt ~/src/nanoGPT/model.py   # adds nanoGPT's own model

Tokens/s counts the real (not padding) tokens of the stream a configuration consumed; "targets" is the share
of them whose loss counts. Model FLOPs are the matrix work the configuration needs (the output layer where it
computes it; attention over the full row; activation recomputation not counted).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Run this checkout's tinylm, not an installed copy.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tinylm.threads import USER_SETTINGS, choose_thread_waiting  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
GPT2_RANKS = SHARED / "gpt2.tiktoken"
SEED = 1234
DATA_KINDS = ("instructions", "text")
CURVE_AT = (50, 100, 150, 200)

# The seed's way to train: float32, one example per micro-batch (1 x 16), each padded, the whole output
# layer's logits at the counted positions at once, AdamW's default loop.
SEED_SETTINGS = {
    "precision": "fp32",
    "packing": False,
    "micro_batch_size": 1,
    "loss_chunk_size": 0,
    "compile": False,
    "gradient_checkpointing": True,
}


@dataclass(frozen=True)
class Row:
    """One configuration: tinylm with config overrides, or a peer (Hugging Face, nanoGPT)."""

    name: str
    kind: str = "tinylm"
    overrides: dict[str, Any] = field(default_factory=dict)
    adamw: str = "fused"
    keep_freed_memory: bool = True
    # OpenMP's own default (spin long, then sleep) instead of how tinylm's threads wait (tinylm.threads).
    spin_wait: bool = False
    threads: int | None = None
    bf16: bool = False
    compile: bool = False
    curve: bool = False


def tinylm_rows(*, with_compile: bool) -> list[Row]:
    """The seed's settings, each speed option alone on top of them, and tinylm's defaults."""

    def seed_plus(name: str, **change: Any) -> Row:
        fields = {"adamw": "loop", "keep_freed_memory": False, "curve": True}
        fields.update((k, change.pop(k)) for k in list(change) if k in fields)
        return Row(name, overrides={**SEED_SETTINGS, **change}, **fields)

    rows = [
        seed_plus("seed settings (before)"),
        seed_plus("+ bf16 autocast", precision="bf16"),
        seed_plus("+ chunked loss", loss_chunk_size=512),
        seed_plus("+ packing", packing=True),
        seed_plus("+ micro-batch auto", micro_batch_size=None),
        seed_plus("+ fused AdamW", adamw="fused"),
        seed_plus("+ keep freed memory", keep_freed_memory=True),
        seed_plus("- checkpointing", gradient_checkpointing=False),
    ]
    if with_compile:
        rows.append(seed_plus("+ torch.compile", compile=True))
    rows += [
        Row("tinylm default", curve=True),
        Row("tinylm default, fp32", overrides={"precision": "fp32"}, curve=True),
        Row("tinylm default, 1 thread", threads=1),
        Row("tinylm default, spinning OpenMP threads", spin_wait=True),
    ]
    if with_compile:
        rows.append(Row("tinylm default + compile", overrides={"compile": True}))
    return rows


def peer_rows(*, nanogpt: bool, with_compile: bool) -> list[Row]:
    rows = [Row("HF GPT2LMHeadModel fp32", kind="hf"), Row("HF GPT2LMHeadModel bf16", kind="hf", bf16=True)]
    if nanogpt:
        rows += [Row("nanoGPT fp32", kind="nanogpt"), Row("nanoGPT bf16", kind="nanogpt", bf16=True)]
        if with_compile:
            rows += [
                Row("nanoGPT compile", kind="nanogpt", compile=True),
                Row("nanoGPT bf16 + compile", kind="nanogpt", bf16=True, compile=True),
            ]
    return rows


# -- the data -------------------------------------------------------------------------------------------


def dolly_shaped_records(n: int, *, seed: int, words: list[str]) -> list[dict[str, str]]:
    """Instruction records with Dolly-15k's shape: a short instruction, a context passage in about 30% of
    records (closed QA, extraction, summarisation), a response of a few dozen words with a long tail.
    Lengths in words are log-normal around Dolly's medians; the text is consecutive tiny Shakespeare."""
    rng = random.Random(seed)
    cursor = 0

    def take(median: float, sigma: float) -> str:
        nonlocal cursor
        count = max(1, int(rng.lognormvariate(math.log(median), sigma)))
        if cursor + count > len(words):
            cursor = 0
        cursor += count
        return " ".join(words[cursor - count : cursor])

    return [
        {
            "instruction": take(12, 0.5),
            "context": take(110, 0.8) if rng.random() < 0.3 else "",
            "response": take(45, 1.0),
        }
        for _ in range(n)
    ]


def write_data(folder: Path, n: int) -> Path:
    path = folder / "dolly_shaped.jsonl"
    words = SHAKESPEARE.read_text(encoding="utf-8").split()
    with path.open("w", encoding="utf-8") as f:
        for record in dolly_shaped_records(n, seed=SEED, words=words):
            f.write(json.dumps(record) + "\n")
    return path


def tinylm_config(spec: dict[str, Any]):
    from tinylm.config import apply_overrides, preset

    steps = spec["warmup"] + spec["steps"]
    overrides = {
        "data.source": spec["data"],
        "data.dataset_size": spec["dataset_size"],
        "data.tokenizer": "gpt2",
        "data.gpt2_ranks_path": str(GPT2_RANKS),
        "train.device": "cpu",
        "train.seed": SEED,
        "train.max_steps": steps,
        # A whole (short) schedule: warm-up, then cosine decay over the measured steps.
        "train.warmup_steps": max(1, steps // 10),
        **spec["overrides"],
    }
    return apply_overrides(preset(spec["preset"]), overrides)


# -- one configuration, in its own process --------------------------------------------------------------


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    # Process CPU time of the measured steps: with one thread, a figure a busy machine barely moves.
    cpu_seconds: float = 0.0
    tokens: int = 0
    useful: int = 0
    flops: float = 0.0
    losses: list[float] = field(default_factory=list)
    first_steps: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add_step(
        self,
        step: int,
        warmup: int,
        clock: tuple[float, float],
        *,
        loss: float,
        tokens: int,
        useful: int,
        flops: float,
    ) -> None:
        """Record one optimizer step timed from `clock` (wall, CPU time at its start); a warm-up step only
        moves `first_steps`."""
        elapsed, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        self.losses.append(loss)
        if step < warmup:
            self.first_steps = time.perf_counter() - self.started
            return
        self.seconds.append(elapsed)
        self.cpu_seconds += cpu
        self.tokens += tokens
        self.useful += useful
        self.flops += flops


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def matmul_flops(m, *, vocab: int, positions: int, width: int, head_rows: int) -> float:
    """Forward + backward matrix FLOPs of model config `m`: 6 per weight per position, attention over full
    rows of `width`, the output layer at `head_rows` positions."""
    trunk = 6 * positions * m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff)
    attention = 12 * positions * m.n_layers * width * m.d_model
    return trunk + attention + 6 * head_rows * m.d_model * vocab


def run_tinylm(spec: dict[str, Any]) -> Measured:
    """tinylm's own step, as `tinylm train` runs it: the run built from the config, then `train_step` on
    each step's batches (which advances the state's step), timed, with the tokens and FLOPs of that step."""
    import torch

    from tinylm.runtime import keep_freed_memory
    from tinylm.train import build_training, train_step

    config = tinylm_config(spec)
    if spec["keep_freed_memory"]:
        keep_freed_memory()  # as `tinylm train` does on CPU; without it, glibc's default
    run = build_training(config, device=torch.device("cpu"), fused_optimizer=spec["adamw"] == "fused")
    if spec["dropout_seed"] is not None:
        torch.manual_seed(spec["dropout_seed"])
    run.state.model.train()
    m = run.config.model
    out = Measured()
    for step in range(spec["warmup"] + spec["steps"]):
        assert run.state.step == step
        batches = run.batches(step)
        started = clock()
        loss = train_step(run.state, batches, run.config.train, dtype=run.dtype)
        out.add_step(
            step,
            spec["warmup"],
            started,
            loss=loss,
            tokens=sum(b.n_tokens for b in batches),
            useful=sum(b.n_targets for b in batches),
            flops=sum(
                matmul_flops(
                    m,
                    vocab=m.vocab_size,
                    positions=b.inputs.numel(),
                    width=b.inputs.size(1),
                    head_rows=b.n_targets,
                )
                for b in batches
            ),
        )
    return out


def peer_rows_of_stream(spec: dict[str, Any], rows: int, ignore: int):
    """The same training data as tinylm's rows, in tinylm's epoch order, as full 128-token rows: the peers'
    own recipe (nanoGPT's train.py, transformers' run_clm). Instruction examples are concatenated and cut
    into rows, the prompt masked out; text windows are rows as they are, every position a target."""
    import torch

    from tinylm.data.instructions import epoch_order
    from tinylm.data.prepare import prepare_data

    c = tinylm_config(spec)
    data = prepare_data(c)
    order = epoch_order(len(data.train), seed=SEED, epoch=0)
    width = c.model.max_seq_length
    if data.is_text:
        windows = torch.tensor([data.train.example(int(i)).tokens for i in order[:rows]])
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), c.model
    tokens: list[int] = []
    counted: list[bool] = []
    for i in order:
        example = data.train.example(int(i))
        tokens += example.tokens
        counted += [False, *example.loss_mask[1:]]
        if len(tokens) > rows * width + 1:
            break
    stream = torch.tensor(tokens[: rows * width + 1])
    mask = torch.tensor(counted[: rows * width + 1])
    x = torch.stack([stream[r * width : (r + 1) * width] for r in range(rows)])
    y = torch.stack(
        [torch.where(mask, stream, ignore)[r * width + 1 : (r + 1) * width + 1] for r in range(rows)]
    )
    return x, y, c.model


def run_peer(spec: dict[str, Any]) -> Measured:
    """Hugging Face's GPT2LMHeadModel or nanoGPT's GPT, same shape, micro-batch 16 rows, AdamW (0.9, 0.95)."""
    import contextlib

    import torch

    micro = 16
    steps = spec["warmup"] + spec["steps"]
    ignore = -100 if spec["kind"] == "hf" else -1
    x, y, m = peer_rows_of_stream(spec, steps * micro, ignore)
    torch.manual_seed(SEED)
    if spec["kind"] == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.max_seq_length,
            n_embd=m.d_model,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_inner=m.d_ff,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(hf_config)
        vocab = m.vocab_size
        decay = [p for p in model.parameters() if p.dim() >= 2]
        groups = [
            {"params": decay, "weight_decay": 0.01},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ]
        # transformers' Trainer defaults to the fused AdamW with torch >= 2.8.
        optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)

        # transformers shifts labels itself: labels[t] is the token at t, predicted from position t - 1.
        def loss_of(inputs, targets):
            labels = torch.cat([torch.full_like(targets[:, :1], ignore), targets[:, :-1]], dim=1)
            return model(input_ids=inputs, labels=labels).loss
    else:
        module = load_module(spec["nanogpt"])
        gpt_config = module.GPTConfig(
            block_size=m.max_seq_length,
            vocab_size=50304,  # nanoGPT pads GPT-2's vocabulary to a multiple of 64
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_embd=m.d_model,
            dropout=m.dropout,
            bias=True,
        )
        with contextlib.redirect_stdout(sys.stderr):
            model = module.GPT(gpt_config)
            optimizer = model.configure_optimizers(0.01, 3e-4, (0.9, 0.95), "cpu")
        vocab = gpt_config.vocab_size

        def loss_of(inputs, targets):
            return model(inputs, targets)[1]

    if spec["compile"]:
        model = torch.compile(model)
    model.train()
    out = Measured()
    for step in range(steps):
        inputs, targets = x[step * micro : (step + 1) * micro], y[step * micro : (step + 1) * micro]
        started = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16) if spec["bf16"] else contextlib.nullcontext():
            loss = loss_of(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.add_step(
            step,
            spec["warmup"],
            started,
            loss=loss.item(),
            tokens=inputs.numel(),
            useful=int((targets != ignore).sum()),
            flops=matmul_flops(
                m, vocab=vocab, positions=inputs.numel(), width=inputs.size(1), head_rows=inputs.numel()
            ),
        )
    return out


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(spec: dict[str, Any]) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    out = run_tinylm(spec) if spec["kind"] == "tinylm" else run_peer(spec)
    result = {
        "seconds": sum(out.seconds),
        "cpu_seconds": out.cpu_seconds,
        "tokens": out.tokens,
        "useful": out.useful,
        "flops": out.flops,
        "losses": out.losses,
        "first_steps": out.first_steps,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: peaks, rounds, tables --------------------------------------------------------------------


def matmul_peaks(repeats: int = 3) -> dict[str, float]:
    """Best float32 and bfloat16 torch.mm rate (FLOP/s) of 2048^3 products over a few tries. bfloat16 only
    where this CPU computes it natively (elsewhere it is emulated, a product takes minutes, and NaN)."""
    import torch

    from tinylm.runtime import has_fast_bfloat16

    peaks = {"bf16": math.nan}
    kinds = [("fp32", torch.float32)]
    if has_fast_bfloat16(torch.device("cpu")):
        kinds.append(("bf16", torch.bfloat16))
    for name, dtype in kinds:
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            best = max(best, 3 * 2 * 2048**3 / (time.perf_counter() - t0))
        peaks[name] = best
    return peaks


def run_worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    # Every row, the peers' too, gets how tinylm's threads wait (chosen once, as `tinylm train` chooses),
    # except the row that measures OpenMP's own default.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if spec["spin_wait"]:
        for name in USER_SETTINGS:
            env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"  failed: {spec['name']}: {tail}", file=sys.stderr)
    return None


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    import torch

    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    notable = [
        f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags
    ]
    return (
        f"{model}, {os.cpu_count()} CPUs ({', '.join(notable) or 'no AVX-512'}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def median_of(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] / r["seconds"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: v1 only, 2 steps a row, 1 round")
    parser.add_argument("--versions", default="v1,v2", help="comma-separated presets (default v1,v2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per row and round")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unmeasured first steps (compilation happens here)"
    )
    parser.add_argument("--curve-steps", type=int, default=200, help="v1 steps for the loss curves (0: none)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--nanogpt", help="path to nanoGPT's model.py, to add its rows (never vendored here)")
    parser.add_argument("--json", help="also write every raw result to this file")
    parser.add_argument(
        "--only", help="comma-separated words: keep the rows whose name contains one (e.g. 'default,HF')"
    )
    parser.add_argument(
        "--data",
        default="instructions,text",
        help="comma-separated data kinds: instructions (Dolly-shaped, prompt masked), text (every position "
        "counts); default both",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    choose_thread_waiting()  # as the rows run, before torch loads here
    for path in (SHAKESPEARE, GPT2_RANKS):
        if not path.is_file():
            sys.exit(f"error: {path} is missing (the shared data folder beside the repository)")
    if args.nanogpt and not Path(args.nanogpt).is_file():
        sys.exit(f"error: --nanogpt {args.nanogpt}: no such file")
    if args.quick:
        args.versions, args.rounds, args.steps, args.warmup, args.curve_steps = "v1", 1, 2, 1, 10
        args.no_compile = True
    versions = [v.strip() for v in args.versions.split(",")]
    kinds = [k.strip() for k in args.data.split(",")]
    if not set(kinds) <= set(DATA_KINDS):
        sys.exit(f"error: --data {args.data}: choose from {', '.join(DATA_KINDS)}")
    rows = tinylm_rows(with_compile=not args.no_compile) + peer_rows(
        nanogpt=bool(args.nanogpt), with_compile=not args.no_compile
    )
    if args.only:
        words = [w.strip() for w in args.only.split(",")]
        rows = [r for r in rows if any(w in r.name for w in words)]
        if not rows:
            sys.exit(f"error: --only {args.only}: no row's name contains any of those words")
    per_step = 16
    dataset_size = max(per_step * max(args.curve_steps, args.warmup + args.steps) + per_step, 256)
    raw: dict[str, Any] = {"machine": machine(), "load_before": load(), "peaks": [], "runs": [], "curves": {}}
    print(f"machine: {raw['machine']}; load average {raw['load_before']}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as tmp:
        paths = {"instructions": str(write_data(Path(tmp), dataset_size + dataset_size // 10 + 8))}
        paths["text"] = str(SHAKESPEARE)
        base = {
            "data": paths["instructions"],
            "dataset_size": dataset_size,
            "scratch": tmp,
            "nanogpt": args.nanogpt,
            "dropout_seed": None,
        }
        if args.curve_steps:
            # Losses only, so two at a time and one thread each (the same for every row, so the sums
            # inside each matmul run in the same order).
            curve_rows = [r for r in rows if r.curve]
            if curve_rows and curve_rows[0].name == "seed settings (before)":
                curve_rows.insert(1, replace(curve_rows[0], name="seed settings, other dropout draws"))
            specs = [
                {
                    **base,
                    **row.__dict__,
                    "threads": 1,
                    "preset": "v1",
                    "warmup": 0,
                    "steps": args.curve_steps,
                    "dropout_seed": SEED + 1 if "dropout" in row.name else None,
                }
                for row in curve_rows
            ]
            print(
                f"loss curves: {len(specs)} runs of {args.curve_steps} v1 steps (load {load()})",
                file=sys.stderr,
            )
            with ThreadPoolExecutor(max_workers=2) as pool:
                for spec, result in zip(specs, pool.map(run_worker, specs), strict=True):
                    if result:
                        raw["curves"][spec["name"]] = result["losses"]
        for round_index in range(args.rounds):
            raw["peaks"].append(matmul_peaks())
            order = [(v, k, r) for v in versions for k in kinds for r in rows]
            # Rotate the order each round, so no row always runs first or last.
            shift = round_index * len(order) // max(args.rounds, 1)
            for version, kind, row in order[shift:] + order[:shift]:
                spec = {
                    **base,
                    **row.__dict__,
                    "data": paths[kind],
                    "preset": version,
                    "warmup": args.warmup,
                    "steps": args.steps,
                }
                print(
                    f"round {round_index + 1}: {version} {kind} {row.name} (load {load()})", file=sys.stderr
                )
                result = run_worker(spec)
                if result:
                    raw["runs"].append(
                        {
                            "version": version,
                            "data": kind,
                            "row": row.name,
                            "round": round_index,
                            "load": load(),
                            **result,
                        }
                    )
    raw["load_after"] = load()
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")
    print(report(raw, versions, rows, args))


def report(raw: dict[str, Any], versions: list[str], rows: list[Row], args: argparse.Namespace) -> str:
    lines = throughput_table(raw, versions, rows, args) if raw["runs"] else ["(no throughput rounds)"]
    if raw["curves"]:
        lines += ["", *curve_table(raw, args)]
    return "\n".join(lines)


def throughput_table(
    raw: dict[str, Any], versions: list[str], rows: list[Row], args: argparse.Namespace
) -> list[str]:
    peak = {k: max(p[k] for p in raw["peaks"]) for k in ("fp32", "bf16")}
    bf16 = "not native on this CPU" if math.isnan(peak["bf16"]) else f"{peak['bf16'] / 1e9:,.0f} GFLOP/s"
    lines = [
        f"Machine: {raw['machine']}. Load average before {raw['load_before']}, after {raw['load_after']}.",
        f"Measured matmul peak (2048^3 torch.mm, best of {len(raw['peaks'])} rounds): "
        f"float32 {peak['fp32'] / 1e9:,.0f} GFLOP/s, bfloat16 {bf16}.",
        f"Medians of {args.rounds} round(s) of {args.steps} steps after {args.warmup} warm-up step(s); "
        "effective batch 16 examples or windows (tinylm) or 16 rows of 128 tokens (peers). Targets: the share "
        "of real tokens whose loss counts.",
        "",
        "| model | data | configuration | tokens/s | targets | x HF best | x nanoGPT best | model GFLOP/s "
        "| % bf16 peak | % fp32 peak | peak RSS MiB | warm-up s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    kinds = [k for k in DATA_KINDS if any(r.get("data") == k for r in raw["runs"])]
    for version in versions:
        for kind in kinds:
            stats = {}
            for row in rows:
                runs = [
                    r
                    for r in raw["runs"]
                    if r["version"] == version and r.get("data") == kind and r["row"] == row.name
                ]
                if runs:
                    stats[row.name] = {
                        "tokens": median_of(runs, "tokens"),
                        "useful": median_of(runs, "useful"),
                        "flops": median_of(runs, "flops"),
                        "rss": statistics.median(r["rss"] for r in runs),
                        "first": statistics.median(r["first_steps"] for r in runs),
                    }
            hf_best = max((s["tokens"] for n, s in stats.items() if n.startswith("HF")), default=math.nan)
            nano_best = max(
                (s["tokens"] for n, s in stats.items() if n.startswith("nanoGPT")), default=math.nan
            )
            for name, s in stats.items():
                share = f"{100 * s['flops'] / peak['bf16']:.0f}%" if not math.isnan(peak["bf16"]) else ""
                lines.append(
                    f"| {version} | {kind} | {name} | {s['tokens']:,.0f} | {100 * s['useful'] / s['tokens']:.0f}% "
                    f"| {ratio(s['tokens'], hf_best)} | {ratio(s['tokens'], nano_best)} "
                    f"| {s['flops'] / 1e9:,.1f} | {share} "
                    f"| {100 * s['flops'] / peak['fp32']:.0f}% | {s['rss'] / 2**20:,.0f} | {s['first']:.1f} |"
                )
    return lines


def ratio(a: float, b: float) -> str:
    return "" if math.isnan(b) else f"{a / b:.2f}"


def curve_table(raw: dict[str, Any], args: argparse.Namespace) -> list[str]:
    reference = raw["curves"].get("seed settings (before)")
    at = [s for s in CURVE_AT if s <= args.curve_steps] or [args.curve_steps]
    lines = [
        f"Loss curves, v1, {args.curve_steps} steps from the same seed (same init, same examples per "
        "step); each figure is the mean training loss of the 10 steps ending there.",
        "",
        "| configuration | " + " | ".join(f"step {s}" for s in at) + " | max diff vs seed settings |",
        "| --- | " + " | ".join("---:" for _ in at) + " | ---: |",
    ]
    for name, losses in raw["curves"].items():
        means = [statistics.fmean(losses[max(0, s - 10) : s]) for s in at]
        diff = ""
        if reference:
            ref = [statistics.fmean(reference[max(0, s - 10) : s]) for s in at]
            diff = f"{max(abs(a - b) for a, b in zip(means, ref, strict=True)):.3f}"
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {diff} |")
    return lines


if __name__ == "__main__":
    main()
