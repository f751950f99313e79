"""monovlm's Decoder against HF transformers' LlamaForCausalLM: same tiny config, same weights, one run.

    python benchmarks/bench_decoder.py            # default sizes: ~1 minute on 2 idle cores, ~4-5 on busy ones
    python benchmarks/bench_decoder.py --quick    # smaller sizes, under a minute (a smoke run, not for quoting)
    python benchmarks/bench_decoder.py --write    # also put the result into BENCHMARKS.md

What is measured (all on CPU, torch.set_num_threads(--threads)):
  (a) training step tokens/s: forward + cross-entropy + backward + AdamW step, fp32 and bf16 autocast; monovlm
      eager and with the trainer's compiled step (a recipe's `compile = true`);
  (b) greedy decode tokens/s at batch 1 and batch 8 (monovlm `generate` vs HF `model.generate`), counting only
      generated tokens, prefill included in the time; the greedy outputs are compared token for token; once with
      fp32 weights and once more at batch 1 with both models cast to bf16 weights (the CPU step reads every weight
      once per token, so halving the bytes is worth more than anything else at batch 1);
  (c) training MFU against the machine's measured bf16 matmul peak (fp32 peak reported too).

Fairness: the HF model is built first (attn_implementation="sdpa"), saved with `save_pretrained`, and loaded into
monovlm with `load_hf_decoder`, so both hold identical weights. Both get the same inputs and the same external loss.
Repetitions are interleaved (monovlm, HF, monovlm, HF, ... with the order flipped every round) after warmup, and
the median is reported, so slow drift of the machine hits both sides equally. Rounds during which other processes
used the cores are discarded and rerun (see `Contention`): on a shared 2-core machine one competing process can slow
a 2-thread step down many times over.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sections import replace_section  # benchmarks/sections.py (the script's own folder)

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "## Decoder vs HF transformers"
NOTES_MARKER = "<!-- notes below this line are kept when bench_decoder.py --write rewrites the section -->"


# ---------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Sizes:
    train_batch: int
    train_seq: int
    train_warmup: int
    train_reps: int
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    bf16_decode_batches: tuple[int, ...]  # also decoded with both models cast to bf16 weights
    decode_warmup: int
    decode_reps: int
    peak_sizes: tuple[int, ...]
    peak_seconds: float  # per dtype and size
    quiet_wait_s: float  # longest wait for the machine to go idle before each timed round
    budget_s: float  # wall time for the training and decode phases together; rounds stop when it is spent


DEFAULT = Sizes(
    train_batch=8, train_seq=256, train_warmup=2, train_reps=7,
    prompt_len=32, new_tokens=128, decode_batches=(1, 8), bf16_decode_batches=(1,), decode_warmup=1, decode_reps=7,
    peak_sizes=(1024, 2048), peak_seconds=1.5, quiet_wait_s=5.0, budget_s=280.0,
)
QUICK = Sizes(
    train_batch=4, train_seq=128, train_warmup=1, train_reps=3,
    prompt_len=32, new_tokens=32, decode_batches=(1, 8), bf16_decode_batches=(1,), decode_warmup=1, decode_reps=3,
    peak_sizes=(1024, 2048), peak_seconds=0.4, quiet_wait_s=1.0, budget_s=35.0,
)

# SmolLM2-like (llama architecture, GQA, tied embeddings, rope_theta 1e5, eps 1e-5), scaled down to run on 2 cores
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=2048,
)


# ---------------------------------------------------------------------------------------------------------------
# models


def build_models(folder: Path):
    """(hf_model, monovlm_model) with bit-identical weights: HF builds and saves, monovlm loads the checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from monovlm.model.hf import load_hf_decoder

    torch.manual_seed(0)
    # eos None so neither side stops early (and HF adds no eos-related logits processors); pad 0 only for HF's
    # generate bookkeeping (no prompt is padded)
    hf_config = LlamaConfig(**MODEL, bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    hf_model = LlamaForCausalLM(hf_config)
    hf_model.save_pretrained(folder)
    ours = load_hf_decoder(folder)
    with torch.no_grad():  # a cheap check that the conversion really gives the same model
        probe = torch.randint(0, MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
        diff = (ours(input_ids=probe) - hf_model(input_ids=probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"monovlm and HF logits differ by {diff:.2e} on the same weights; the comparison is void")
    return hf_model, ours


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of monovlm's Decoder (the HF twin holds the same tensors)."""
    total = sum(p.numel() for p in model.parameters())
    non_embedding = total - model.embed_tokens.weight.numel()  # an untied head stays in here
    tied_head = model.output_weight.numel() if model.lm_head is None else 0  # the embedding, reused as a matmul
    return {"total": total, "non_embedding": non_embedding, "matmul": non_embedding + tied_head}


def flops_per_token(params: dict[str, int], seq: int) -> int:
    """Training FLOPs per token, nanoGPT / PaLM (appendix B) convention: 6 * N + 12 * L * C * T.

    N counts every weight that takes part in a matmul: all non-embedding parameters plus the output head
    (vocab x hidden; tied to the embedding here, so it is the embedding matrix counted once, as a matmul — the lookup
    itself is free). 12 * L * C * T is the attention score and value matmuls, forward and backward (causal masking
    not discounted). Norms, RoPE, softmax and the optimizer are not counted, as in both references.
    """
    return 6 * params["matmul"] + 12 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * seq


# ---------------------------------------------------------------------------------------------------------------
# timing helpers


class Contention:
    """CPU time that other processes (and the hypervisor, as steal) take while we measure.

    This machine's 2 cores are shared with other jobs; a 2-thread OpenMP region whose second thread is descheduled
    waits for it, so a single competing process can make a timed call many times slower (we have seen 50x). We read
    the machine's busy time from /proc/stat, subtract our own process's CPU time, and call a timing contaminated when
    the rest exceeds `max_share` of a core over its wall time. Where /proc is unreadable every timing counts as clean.
    """

    def __init__(self, max_share: float = 0.05):
        self.max_share = max_share
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy_and_own(self) -> tuple[float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        return (user + nice + system + irq + softirq + steal) / self.tick, (int(own[11]) + int(own[12])) / self.tick

    def mark(self):
        return time.perf_counter(), self._busy_and_own()

    def others_share(self, mark) -> float:
        """Cores' worth of CPU the rest of the machine used since `mark` (0 when unknown)."""
        start_wall, start = mark
        end = self._busy_and_own()
        wall = time.perf_counter() - start_wall
        if start is None or end is None or wall <= 0:
            return 0.0
        others = (end[0] - start[0]) - (end[1] - start[1])
        return max(others, 0.0) / wall

    def wait_for_quiet(self, seconds: float, window_s: float = 0.3) -> float:
        """Sleep in short windows until the rest of the machine is idle, at most `seconds`; returns the time waited."""
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            mark = self.mark()
            time.sleep(window_s)
            if self.others_share(mark) <= self.max_share:
                break
        return time.perf_counter() - began


CONTENTION = Contention()


@dataclass
class Timings:
    seconds: dict[str, list[float]]  # per runner, one entry per kept round
    discarded: int  # contaminated rounds thrown away and rerun
    contaminated_kept: int  # contaminated rounds kept because the phase ran out of time (the figure is unreliable)
    waited_s: float  # time spent waiting for the machine to go idle

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    @property
    def rounds(self) -> int:
        return len(next(iter(self.seconds.values())))


def interleaved(runs: dict[str, callable], warmup: int, reps: int, deadline: float, quiet_wait_s: float) -> Timings:
    """Seconds per call of each runner: `warmup` calls each, then up to `reps` rounds (one call of each runner, the
    order flipped every round).

    Before each round we wait (up to quiet_wait_s) for the machine to go idle. A round during which other processes
    used the cores is discarded and rerun while time remains before `deadline`; past it we stop with the rounds we
    have (at least one, contaminated or not — the counts say which).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    discarded = contaminated_kept = 0
    waited = 0.0
    attempt = 0
    while len(seconds[names[0]]) < reps:
        kept = len(seconds[names[0]])
        if kept and time.perf_counter() > deadline:
            break
        waited += CONTENTION.wait_for_quiet(min(quiet_wait_s, max(0.0, deadline - time.perf_counter())))
        order = names if attempt % 2 == 0 else names[::-1]
        attempt += 1
        this_round, clean = {}, True
        for name in order:
            gc.collect()
            mark = CONTENTION.mark()
            start = time.perf_counter()
            runs[name]()
            this_round[name] = time.perf_counter() - start
            clean = clean and CONTENTION.others_share(mark) <= CONTENTION.max_share
        if not clean and (kept or time.perf_counter() < deadline):
            discarded += 1  # rerun it while time remains; past the deadline the loop ends at the top
            continue
        contaminated_kept += not clean
        for name in names:
            seconds[name].append(this_round[name])
    return Timings(seconds, discarded, contaminated_kept, waited)


def phase_deadline(run_deadline: float, phases_left: int) -> float:
    """An equal share of the time left in the run for each remaining measurement phase."""
    now = time.perf_counter()
    return now + max(0.0, run_deadline - now) / phases_left


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], seconds: float) -> tuple[float, int]:
    """(FLOP/s, n) of the best n x n x n matmul burst over `sizes` (the trainer's peak, `matmul_rate`, reported with
    its size). Several sizes, because the fastest one differs by dtype here (fp32 runs ~2x faster at 1024 than at
    2048 on this CPU, bf16 the reverse)."""
    from monovlm.train.flops import matmul_rate

    return max((matmul_rate(dtype, n, seconds), n) for n in sizes)


# ---------------------------------------------------------------------------------------------------------------
# (a) training step


@dataclass
class Row:
    """One measured comparison: a rate (tokens/s) per side and how the timing went."""

    monovlm: float
    hf: float
    timings: Timings
    identical: bool | None = None  # decode rows: whether the greedy outputs agree token for token
    compiled: float | None = None  # monovlm compiled: GenerationConfig(compile=True) / the trainer's compile = true
    compiled_identical: bool | None = None
    agreeing: tuple[int, int] | None = None  # decode rows: leading tokens equal to HF's (eager, compiled), all rows
    compile_s: float | None = None  # train rows: the compiled step's first call (the compile), outside the rounds

    @property
    def ratio(self) -> float:
        return self.monovlm / self.hf


def make_train_step(model, logits_of, batch: torch.Tensor, targets: torch.Tensor, bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = logits_of(batch)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_compiled_train_step(ours, tokens: torch.Tensor, bf16: bool):
    """monovlm's compiled training step (a recipe's `compile = true`): `TrainModule(..., compile=True)` around an
    EncoderFreeVLM whose decoder is `ours` (same weights as the eager side), forward + summed loss / label count (the
    mean, as on the other sides) + backward + AdamW. The trainer gives labels aligned with the inputs and shifts them
    in the loss, so the batch is all B x (T + 1) tokens: the same B x T targets from the same positions as the other
    sides, plus one extra input position per row that this side pays for. -> (step, seconds of its first call, which
    compiles)."""
    from dataclasses import replace

    from monovlm.config import VisionConfig, VLMConfig
    from monovlm.data.collate import Batch
    from monovlm.model.vlm import EncoderFreeVLM
    from monovlm.train.trainer import TrainModule

    # an image id is required; a batch without images never treats it as a placeholder
    image_id = {"image": MODEL["vocab_size"] - 1}
    config = VLMConfig(decoder=replace(ours.config, special_tokens=image_id), vision=VisionConfig())
    vlm = EncoderFreeVLM(config)
    vlm.decoder = ours  # the text path never runs the embedder: it gets no gradient and AdamW leaves it alone
    module = TrainModule(vlm, compile=True).train()
    batch = Batch(tokens, tokens, torch.ones_like(tokens), [], num_samples=tokens.shape[0])  # (B, T + 1)
    targets = tokens[:, 1:].numel()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ce_sum, _ = module(batch)
            loss = ce_sum / targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()
    return step, time.perf_counter() - started


def bench_training(hf_model, ours, sizes: Sizes, bf16: bool, deadline: float) -> Row:
    """Training tokens/s of each model, same batch, same external loss, same optimizer settings; and of monovlm's
    compiled training step (compiled before the timed rounds, its compile time added to the deadline)."""
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, MODEL["vocab_size"], (sizes.train_batch, sizes.train_seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    for model in (ours, hf_model):
        model.train()
    compiled_step, compile_s = make_compiled_train_step(ours, tokens, bf16)
    steps = {
        "monovlm": make_train_step(ours, lambda x: ours(input_ids=x), inputs, targets, bf16),
        "compiled": compiled_step,
        "hf": make_train_step(hf_model, lambda x: hf_model(input_ids=x, use_cache=False).logits, inputs, targets, bf16),
    }
    timings = interleaved(steps, sizes.train_warmup, sizes.train_reps, deadline + compile_s, sizes.quiet_wait_s)
    for model in (ours, hf_model):
        model.zero_grad(set_to_none=True)
        model.eval()
    n_tokens = sizes.train_batch * sizes.train_seq
    return Row(n_tokens / timings.median("monovlm"), n_tokens / timings.median("hf"), timings,
               compiled=n_tokens / timings.median("compiled"), compile_s=compile_s)


# ---------------------------------------------------------------------------------------------------------------
# (b) decoding


def bench_decode(hf_model, ours, sizes: Sizes, batch: int, deadline: float) -> Row:
    """Greedy decode: new tokens/s of monovlm `generate` and HF `generate` on the same prompts (no padding)."""
    from monovlm.infer.generate import GenerationConfig, generate

    generator = torch.Generator().manual_seed(3 + batch)
    prompts = torch.randint(1, MODEL["vocab_size"], (batch, sizes.prompt_len), generator=generator)  # (B, P)
    prompt_lists = prompts.tolist()
    attention_mask = torch.ones_like(prompts)
    config = GenerationConfig(max_new_tokens=sizes.new_tokens)
    compiled_config = GenerationConfig(max_new_tokens=sizes.new_tokens, compile=True)
    outputs = {}

    def run_ours() -> None:
        outputs["monovlm"] = [g.token_ids for g in generate(ours, prompt_lists, config, pad_id=0)]

    def run_compiled() -> None:
        outputs["compiled"] = [g.token_ids for g in generate(ours, prompt_lists, compiled_config, pad_id=0)]

    def run_hf() -> None:
        out = hf_model.generate(prompts, attention_mask=attention_mask, do_sample=False,
                                max_new_tokens=sizes.new_tokens, eos_token_id=None, pad_token_id=0)
        outputs["hf"] = out[:, sizes.prompt_len :].tolist()

    with torch.inference_mode():
        run_compiled()  # compile outside the timed rounds (tens of seconds, once per process and shape)
        timings = interleaved({"monovlm": run_ours, "compiled": run_compiled, "hf": run_hf}, sizes.decode_warmup,
                              sizes.decode_reps, deadline, sizes.quiet_wait_s)
    generated = batch * sizes.new_tokens
    same = outputs["monovlm"] == outputs["hf"] and all(len(row) == sizes.new_tokens for row in outputs["hf"])
    agreeing = tuple(min(leading_agreement(a, b) for a, b in zip(outputs[side], outputs["hf"]))
                     for side in ("monovlm", "compiled"))
    return Row(generated / timings.median("monovlm"), generated / timings.median("hf"), timings, same,
               generated / timings.median("compiled"), outputs["compiled"] == outputs["hf"], agreeing)


def leading_agreement(ours: list[int], theirs: list[int]) -> int:
    """How many tokens from the start two greedy continuations share."""
    count = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# report


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_line(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    import transformers

    return (f"{cpu} ({os.cpu_count()} logical CPUs), {threads} threads (torch.set_num_threads), "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def timing_note(timings: Timings) -> str:
    note = f"{timings.rounds}"
    if timings.discarded:
        note += f" ({timings.discarded} rerun)"
    if timings.contaminated_kept:
        note += f", {timings.contaminated_kept} CONTAMINATED"
    return note


def markdown_section(args, sizes: Sizes, report: dict) -> str:
    params, fpt = report["params"], report["flops_per_token"]
    (peak_bf16, n_bf16), (peak_fp32, n_fp32) = report["peak_bf16"], report["peak_fp32"]
    train, decode = report["train"], report["decode"]
    rows = [*train.values(), *decode.values()]
    discarded = sum(row.timings.discarded for row in rows)
    contaminated = sum(row.timings.contaminated_kept for row in rows)
    waited = sum(row.timings.waited_s for row in rows)
    command = "python benchmarks/bench_decoder.py" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads}" if args.threads != 2 else ""
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command} --write`  ",
        f"Date: {report['date']}  ",
        f"Machine: {report['machine']}  ",
        f"Sharing: load average (1/5/15 min) {report['load_before']} before the run, {report['load_after']} after; "
        f"{discarded} timed rounds rerun because other processes used the cores meanwhile, {waited:.0f} s spent "
        "waiting for the machine to go idle"
        + (f"; {contaminated} contaminated rounds KEPT for lack of time: rows marked CONTAMINATED are unreliable."
           if contaminated else "; every kept round was clean."),
        "",
        f"Model (both sides, identical weights via `save_pretrained` -> `load_hf_decoder`): llama, vocab "
        f"{MODEL['vocab_size']}, hidden {MODEL['hidden_size']}, intermediate {MODEL['intermediate_size']}, "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} "
        f"kv heads, tied embeddings; {params['total'] / 1e6:.2f} M parameters "
        f"({params['non_embedding'] / 1e6:.2f} M non-embedding). HF uses `attn_implementation=\"sdpa\"`.",
        "",
        f"Training: batch {sizes.train_batch} x seq {sizes.train_seq}, forward + cross-entropy + backward + AdamW, "
        f"{sizes.train_warmup} warmup steps; the `compile = true` row is the trainer's `TrainModule(compile=True)` "
        "(decoder blocks + loss under `torch.compile`, dynamic shapes) on the same weights and targets, its compile "
        f"({', '.join(f'{row.compile_s:.0f} s' for row in train.values())}) outside the timed rounds. "
        f"Decode: {sizes.prompt_len}-token prompts, {sizes.new_tokens} new tokens, greedy, `torch.inference_mode`, "
        "tokens/s counts generated tokens only (prefill inside the timed call), from the same starting weights for "
        "both sides; ms/step = 1 / (calls per second x new tokens). Each figure is the median over rounds; a round "
        "is one call of each side, alternating which goes first; a round during which other processes took more "
        f"than {100 * CONTENTION.max_share:.0f}% of a core is rerun.",
        "",
        "| measurement | monovlm | HF transformers | monovlm / HF | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for precision, row in train.items():
        label = "fp32" if precision == "fp32" else "bf16 autocast"
        lines.append(f"| train step, {label} (tokens/s) | {row.monovlm:,.0f} | {row.hf:,.0f} | {row.ratio:.2f}x | "
                     f"{timing_note(row.timings)} |")
        lines.append(f"| train step, {label}, recipe `compile = true` (tokens/s) | {row.compiled:,.0f} | "
                     f"{row.hf:,.0f} | {row.compiled / row.hf:.2f}x | {timing_note(row.timings)} |")
    for precision, row in train.items():
        lines.append(f"| train MFU, {precision} step (vs bf16 peak) | {100 * row.monovlm * fpt / peak_bf16:.1f}% "
                     f"(compiled {100 * row.compiled * fpt / peak_bf16:.1f}%) | {100 * row.hf * fpt / peak_bf16:.1f}% "
                     "| | |")
    for (precision, batch), row in decode.items():
        same = "identical" if row.identical else f"same for the first {row.agreeing[0]} tokens"
        ms = {side: 1e3 * batch / rate for side, rate in (("monovlm", row.monovlm), ("hf", row.hf))}
        weights = "" if precision == "fp32" else ", bf16 weights (both sides)"
        lines.append(f"| greedy decode, batch {batch}{weights} (new tokens/s; ms/step) | {row.monovlm:,.0f}; "
                     f"{ms['monovlm']:.2f} ms | {row.hf:,.0f}; {ms['hf']:.2f} ms | {row.ratio:.2f}x (outputs {same}) "
                     f"| {timing_note(row.timings)} |")
        if row.compiled is not None:
            same = "identical" if row.compiled_identical else f"same for the first {row.agreeing[1]} tokens"
            lines.append(f"| greedy decode, batch {batch}{weights}, `GenerationConfig(compile=True)` | "
                         f"{row.compiled:,.0f}; "
                         f"{1e3 * batch / row.compiled:.2f} ms | {row.hf:,.0f}; {ms['hf']:.2f} ms | "
                         f"{row.compiled / row.hf:.2f}x (outputs {same}) | {timing_note(row.timings)} |")
    fp32 = train["fp32"]
    lines += [
        "",
        f"Peaks (best burst of square matmuls, n in {list(sizes.peak_sizes)}): bf16 {peak_bf16 / 1e9:,.0f} GFLOP/s "
        f"(n={n_bf16}), fp32 {peak_fp32 / 1e9:,.0f} GFLOP/s (n={n_fp32}). "
        f"MFU = tokens/s x FLOPs/token / bf16 peak, with FLOPs/token = 6 N + 12 L C T = "
        f"6 x {params['matmul'] / 1e6:.2f} M + 12 x {MODEL['num_hidden_layers']} x {MODEL['hidden_size']} x "
        f"{sizes.train_seq} = {fpt / 1e6:.1f} MFLOP (N = non-embedding parameters + the tied output head, which is "
        "a real matmul; nanoGPT / PaLM convention; norms, RoPE, softmax and AdamW not counted). The fp32 step is "
        "divided by the bf16 peak too, so both rows share one yardstick; against the fp32 peak it reaches "
        f"{100 * fp32.monovlm * fpt / peak_fp32:.0f}% (monovlm) and {100 * fp32.hf * fpt / peak_fp32:.0f}% (HF).",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (under a minute)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    parser.add_argument("--benchmarks-file", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    sizes = QUICK if args.quick else DEFAULT
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    load_before = load_average()

    print("measuring matmul peaks ...", file=sys.stderr)
    CONTENTION.wait_for_quiet(sizes.quiet_wait_s)
    peak_bf16 = matmul_peak(torch.bfloat16, sizes.peak_sizes, sizes.peak_seconds)
    peak_fp32 = matmul_peak(torch.float32, sizes.peak_sizes, sizes.peak_seconds)
    with tempfile.TemporaryDirectory() as folder:
        hf_model, ours = build_models(Path(folder))
    params = count_params(ours)
    # training moves the two copies apart (bf16 rounding differs a little); decoding starts again from here
    initial = [{k: v.clone() for k, v in model.state_dict().items()} for model in (hf_model, ours)]

    run_deadline = time.perf_counter() + sizes.budget_s
    phases_left = 2 + len(sizes.decode_batches) + len(sizes.bf16_decode_batches)
    train: dict[str, Row] = {}
    for precision in ("fp32", "bf16"):
        train[precision] = bench_training(hf_model, ours, sizes, precision == "bf16",
                                          phase_deadline(run_deadline, phases_left))
        phases_left -= 1
        row = train[precision]
        run_deadline += row.compile_s  # the compile is not the later phases' time
        print(f"  train {precision}: monovlm {row.monovlm:,.0f} tok/s, compiled {row.compiled:,.0f} tok/s "
              f"(compile {row.compile_s:.0f} s), hf {row.hf:,.0f} tok/s, {row.ratio:.2f}x / "
              f"{row.compiled / row.hf:.2f}x [rounds {timing_note(row.timings)}]", file=sys.stderr)
    for model, state in zip((hf_model, ours), initial):
        model.load_state_dict(state)
    decode: dict[tuple[str, int], Row] = {}
    bf16_models = [copy.deepcopy(model).to(torch.bfloat16) for model in (hf_model, ours)]
    phases = [("fp32", batch, (hf_model, ours)) for batch in sizes.decode_batches]
    phases += [("bf16", batch, bf16_models) for batch in sizes.bf16_decode_batches]
    for precision, batch, (hf_side, our_side) in phases:
        decode[precision, batch] = bench_decode(hf_side, our_side, sizes, batch,
                                                phase_deadline(run_deadline, phases_left))
        phases_left -= 1
        row = decode[precision, batch]
        print(f"  decode {precision} batch {batch}: monovlm {row.monovlm:,.0f} tok/s, compiled {row.compiled:,.0f} tok/s, "
              f"hf {row.hf:,.0f} tok/s, {row.ratio:.2f}x / {row.compiled / row.hf:.2f}x, identical={row.identical} "
              f"[rounds {timing_note(row.timings)}]", file=sys.stderr)

    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(args.threads),
        "load_before": load_before,
        "load_after": load_average(),
        "params": params,
        "flops_per_token": flops_per_token(params, sizes.train_seq),
        "peak_bf16": peak_bf16,
        "peak_fp32": peak_fp32,
        "train": train,
        "decode": decode,
    }
    section = markdown_section(args, sizes, report)
    print(section)
    print(f"(total {time.perf_counter() - began:.0f} s)", file=sys.stderr)
    if not all(row.identical and row.compiled_identical for (precision, _), row in decode.items() if precision == "fp32"):
        print("WARNING: fp32 greedy outputs differ between monovlm and HF", file=sys.stderr)
    if args.write:
        replace_section(args.benchmarks_file, SECTION_TITLE, section, NOTES_MARKER)
        print(f"wrote {args.benchmarks_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
