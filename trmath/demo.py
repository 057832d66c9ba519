r"""End-to-end demonstration: policy-gradient fine-tuning of a causal LM with trmath objectives.

``trmath demo`` builds a small causal language model in-process with the ``transformers`` model
classes (no downloads; a realistically large vocabulary of 32768 tokens by default), teaches it
the output format of a synthetic task with a verifiable reward in a brief supervised warm start,
and then runs policy-gradient RL from sampled rollouts -- several minibatch updates per rollout
batch, so that the policy drifts away from the rollout policy and the trust region matters --
once per algorithm, from the same warm-started weights and the same seed:

``grpo``
    PPO ratio clipping (``eps = 0.2``) with group-relative advantages.
``dppo_binary_tv``
    DPPO, binary TV of the sampled token (``delta = 0.15``).
``dppo_topk_kl``
    DPPO, top-K KL with the tail bucket from the rollout engine's top-20 log-probs
    (``delta = 0.05``).
``troll``
    The differentiable KL projection (TROLL): the new policy projected onto a KL ball of radius
    ``epsilon = 0.05`` around the rollout policy.

The task: the prompt is ``<bos> d1 d2 d3 d4 <sep>`` with four random digit tokens; the correct
response is the digits in reverse order, and the reward is the fraction of response positions
that are right (a verifiable reward in ``[0, 1]``). The warm start trains on noisy targets (each
digit replaced by a random one with probability 0.5), so that the model learns the format and
part of the task, and RL has something to improve.

At the end it prints a table (final and best reward, mean KL and TV from the rollout policy to
the trained policy over the full vocabulary, the masked or clipped fraction, time per step),
and writes ``results.csv``, ``results.json`` and ``curves.png`` (reward and divergence against
step for every algorithm) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ALGORITHMS = ("grpo", "dppo_binary_tv", "dppo_topk_kl", "dppo_exact_kl", "troll")
DEFAULT_ALGORITHMS = ("grpo", "dppo_binary_tv", "dppo_topk_kl", "troll")

DIGITS = 10
PROMPT_DIGITS = 4


@dataclass
class DemoConfig:
    """Settings of one demo run (the command-line options map onto these fields)."""

    steps: int = 30
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    seed: int = 0
    out: str = "trmath-demo"
    model: str | None = None
    device: str = "cpu"
    vocab: int = 32768
    prompts_per_step: int = 16
    group_size: int = 4
    minibatches: int = 4
    epochs: int = 2
    lr: float = 2e-3
    sft_steps: int | None = None  # None: 150, or 5 per RL step for short (smoke) runs
    sft_noise: float = 0.5
    temperature: float = 1.0
    top_k: int = 20
    threads: int | None = None
    quiet: bool = False


# ---------------------------------------------------------------------------------------------
# progress output
# ---------------------------------------------------------------------------------------------
class Progress:
    """A minimal progress bar on stderr (one line, redrawn; plain lines when not a terminal)."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.quiet = max(total, 1), label, quiet
        self.n = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_plain = -1

    def update(self, info: str = "") -> None:
        self.n += 1
        if self.quiet:
            return
        frac = self.n / self.total
        el = time.perf_counter() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        width = 24
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        line = f"{self.label:<16} [{bar}] {self.n:>3}/{self.total} {el:6.1f}s eta {eta:5.1f}s {info}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
            if self.n >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            decile = int(10 * frac)
            if decile != self._last_plain or self.n >= self.total:
                self._last_plain = decile
                sys.stderr.write(line + "\n")
                sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
@dataclass
class Task:
    """Token layout of the synthetic reverse-the-digits task inside a large vocabulary."""

    vocab: int
    bos: int = 1
    sep: int = 2
    digit0: int = 1000  # digits live in the middle of the vocabulary, not at its start

    def digit_ids(self, torch):
        return torch.arange(self.digit0, self.digit0 + DIGITS)

    def prompts(self, n: int, gen, torch):
        d = torch.randint(0, DIGITS, (n, PROMPT_DIGITS), generator=gen)
        bos = torch.full((n, 1), self.bos, dtype=torch.long)
        sep = torch.full((n, 1), self.sep, dtype=torch.long)
        return torch.cat([bos, d + self.digit0, sep], dim=1), d

    def targets(self, digits, torch):
        return digits.flip(-1) + self.digit0

    def reward(self, responses, digits, torch):
        """Fraction of correct response positions, in ``[0, 1]`` (shape ``[n]``)."""
        return (responses == self.targets(digits, torch)).float().mean(-1)


def build_model(cfg: DemoConfig, torch):
    """A small Llama-architecture causal LM built in-process, or a local checkpoint."""
    if cfg.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, local_files_only=True)
        return model.to(cfg.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mc = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(mc).to(cfg.device)


def last_logits(model, seq, n: int):
    """The model's logits at the last ``n`` positions of ``seq``, ``[B, n, V]``.

    Only those positions go through the LM head where the model's ``forward`` takes
    ``logits_to_keep`` (transformers >= 4.50) or ``num_logits_to_keep`` (4.45 - 4.49); the
    keyword is never passed to a ``forward`` that would swallow it in ``**kwargs`` and return
    every position. Other models compute all the logits, sliced here.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for kw in ("logits_to_keep", "num_logits_to_keep"):
        if kw in params:
            return model(seq, **{kw: n}).logits[:, -n:, :]
    return model(seq).logits[:, -n:, :]


def response_logits(model, prompts, responses):
    """The model's logits ``[B, R, V]`` scoring each response token (before temperature)."""
    full = __import__("torch").cat([prompts, responses], dim=1)
    # Only the positions that score a response token go through the LM head.
    n = responses.shape[1] + 1
    return last_logits(model, full, n)[:, :-1, :]


def sample(model, prompts, n_tokens: int, temperature: float, gen, torch):
    """Sample ``n_tokens`` response tokens per prompt (no gradient)."""
    seq = prompts
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = last_logits(model, seq, 1)[:, -1, :].float() / temperature
            # Drawn on the CPU with the CPU generator: the same tokens on every device (a CUDA
            # multinomial would need a generator of its own device).
            probs = torch.softmax(logits, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(seq.device)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompts.shape[1] :]


def warm_start(model, task: Task, cfg: DemoConfig, torch, progress: Progress | None = None) -> float:
    """Supervised warm start on noisy targets; returns the final training loss."""
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    loss_v = float("nan")
    for _ in range(cfg.sft_steps):
        prompts, digits = task.prompts(64, gen, torch)
        tgt = task.targets(digits, torch)
        noise = torch.rand(tgt.shape, generator=gen) < cfg.sft_noise
        rnd = torch.randint(0, DIGITS, tgt.shape, generator=gen) + task.digit0
        tgt = torch.where(noise, rnd, tgt)
        logits = response_logits(model, prompts.to(cfg.device), tgt.to(cfg.device))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1).to(cfg.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
        if progress:
            progress.update(f"loss {loss_v:.3f}")
    return loss_v


# ---------------------------------------------------------------------------------------------
# RL
# ---------------------------------------------------------------------------------------------
@dataclass
class StepRecord:
    """One RL step of one algorithm: mean reward of the rollout batch, mean per-token KL and TV
    from the rollout policy to the policy after the step's updates (full vocabulary), the
    masked or clipped fraction of tokens, and the wall time of the step."""

    algorithm: str
    step: int
    reward: float
    kl: float
    tv: float
    masked_fraction: float
    seconds: float


@dataclass
class RunResult:
    """The step records of one algorithm, and their ``summary()``."""

    algorithm: str
    records: list[StepRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Final reward (mean over the last fifth of the steps), best reward, mean divergences,
        mean masked fraction and seconds per step."""
        r = [x.reward for x in self.records]
        tail = r[-max(1, len(r) // 5) :]
        return {
            "algorithm": self.algorithm,
            "final_reward": sum(tail) / len(tail),
            "best_reward": max(r),
            "mean_kl": sum(x.kl for x in self.records) / len(self.records),
            "mean_tv": sum(x.tv for x in self.records) / len(self.records),
            "masked_fraction": sum(x.masked_fraction for x in self.records) / len(self.records),
            "seconds_per_step": sum(x.seconds for x in self.records) / len(self.records),
        }


def run_algorithm(alg: str, state: dict, task: Task, cfg: DemoConfig, torch, progress: Progress) -> RunResult:
    """RL fine-tuning with one algorithm from the warm-started weights ``state``."""
    from . import adapter

    import trmath

    model = build_model(cfg, torch)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)  # the same prompts for every algorithm
    spec = adapter.demo_algorithm(alg)
    result = RunResult(alg)
    n_resp = PROMPT_DIGITS
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        prompts, digits = task.prompts(cfg.prompts_per_step, gen, torch)
        prompts = prompts.repeat_interleave(cfg.group_size, 0).to(cfg.device)
        digits = digits.repeat_interleave(cfg.group_size, 0)
        model.eval()
        responses = sample(model, prompts, n_resp, cfg.temperature, gen, torch)
        with torch.no_grad():
            rollout_logits = response_logits(model, prompts, responses).float()
        model.train()
        rewards = task.reward(responses.cpu(), digits, torch)
        rollout = adapter.Rollout.from_logits(
            rollout_logits, responses, advantages=adapter.group_advantages(rewards, cfg.group_size),
            top_k=cfg.top_k if spec.needs_topk else 0, keep_logits=spec.needs_full_logits,
            temperature=cfg.temperature,
        )
        B = prompts.shape[0]
        masked, n_mb = 0.0, 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(B, generator=gen)
            for idx in perm.chunk(cfg.minibatches):
                logits = response_logits(model, prompts[idx], responses[idx])
                loss, metrics = spec.loss(logits, rollout.select(idx), cfg.temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                masked += float(metrics.get("masked_frac", metrics.get("clip_frac", 0.0)))
                n_mb += 1
        with torch.no_grad():
            new_logits = response_logits(model, prompts, responses).float()
            kl = float(trmath.kl(rollout_logits, new_logits, temperature=cfg.temperature).mean())
            tv = float(trmath.tv(rollout_logits, new_logits, temperature=cfg.temperature).mean())
        rec = StepRecord(alg, step, float(rewards.mean()), kl, tv, masked / max(n_mb, 1), time.perf_counter() - t0)
        result.records.append(rec)
        progress.update(f"reward {rec.reward:.3f} kl {kl:.2e}")
    return result


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def format_table(results: list[RunResult]) -> str:
    """The summary table printed at the end of a run."""
    head = f"{'algorithm':<16}{'final reward':>13}{'best':>8}{'mean KL':>11}{'mean TV':>10}{'masked':>9}{'s/step':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        lines.append(
            f"{s['algorithm']:<16}{s['final_reward']:>13.3f}{s['best_reward']:>8.3f}{s['mean_kl']:>11.2e}"
            f"{s['mean_tv']:>10.4f}{s['masked_fraction']:>9.3f}{s['seconds_per_step']:>8.2f}"
        )
    return "\n".join(lines)


def write_outputs(results: list[RunResult], cfg: DemoConfig, extra: dict[str, Any]) -> list[Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["algorithm", "step", "reward", "kl", "tv", "masked_fraction", "seconds"])
        for r in results:
            for x in r.records:
                w.writerow([x.algorithm, x.step, x.reward, x.kl, x.tv, x.masked_fraction, x.seconds])
    written.append(out / "results.csv")
    payload = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "summary": [r.summary() for r in results],
        "steps": [asdict(x) for r in results for x in r.records],
        **extra,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    written.append(out / "results.json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return written
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = [x.step for x in r.records]
        a1.plot(steps, [x.reward for x in r.records], label=r.algorithm)
        a2.plot(steps, [max(x.kl, 1e-12) for x in r.records], label=r.algorithm)
    a1.set_xlabel("RL step")
    a1.set_ylabel("mean reward")
    a1.set_title("reward")
    a2.set_xlabel("RL step")
    a2.set_ylabel("KL(rollout || trained), mean per token")
    a2.set_yscale("log")
    a2.set_title("divergence from the rollout policy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    written.append(out / "curves.png")
    return written


def run(cfg: DemoConfig) -> list[RunResult]:
    """Run the demo: warm start, then RL with every algorithm of ``cfg``; print the table and
    write ``results.csv``, ``results.json`` and ``curves.png`` to ``cfg.out``.

    Every algorithm starts from the same warm-started weights and sees the same prompts.
    """
    import torch

    import trmath

    unknown = [a for a in cfg.algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"algorithms: unknown {unknown}; valid: {', '.join(ALGORITHMS)}")
    if cfg.steps < 1:
        raise ValueError(f"steps: expected >= 1, got {cfg.steps}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    task = Task(cfg.vocab)
    model = build_model(cfg, torch)
    V = model.config.vocab_size
    if cfg.model is None and V < task.digit0 + DIGITS:
        raise ValueError(f"vocab: must be at least {task.digit0 + DIGITS}, got {V}")
    if not cfg.quiet:
        n_par = sum(p.numel() for p in model.parameters())
        print(f"trmath {trmath.__version__} demo: causal LM with {n_par / 1e6:.1f}M parameters, vocabulary {V}, "
              f"device {cfg.device}, torch threads {torch.get_num_threads()}")
    if cfg.sft_steps is None:
        cfg = replace(cfg, sft_steps=150 if cfg.steps >= 20 else 5 * cfg.steps)
    sft = Progress(cfg.sft_steps, "warm start", cfg.quiet)
    warm_start(model, task, cfg, torch, sft)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for alg in cfg.algorithms:
        results.append(run_algorithm(alg, state, task, cfg, torch, Progress(cfg.steps, alg, cfg.quiet)))
    table = format_table(results)
    elapsed = time.perf_counter() - t_start
    files = write_outputs(results, cfg, {"seconds_total": elapsed})
    if not cfg.quiet:
        print()
        print(table)
        print()
        print(f"total {elapsed:.0f} s; wrote " + ", ".join(str(f) for f in files))
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"RL steps per algorithm (default {d.steps})")
    p.add_argument("--algorithms", default=",".join(d.algorithms),
                   help=f"comma-separated, from {', '.join(ALGORITHMS)} (default: {','.join(d.algorithms)})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--model", default=None, help="path of a local Hugging Face causal-LM checkpoint "
                   "(default: a small model built in-process)")
    p.add_argument("--device", default=d.device, help="torch device (default cpu)")
    p.add_argument("--vocab", type=int, default=d.vocab, help=f"vocabulary of the built-in model (default {d.vocab})")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> DemoConfig:
    """The demo's configuration from parsed arguments; a bad value is reported through
    ``parser.error`` (usage and a one-line message, exit status 2) when a parser is given,
    else raised as ``ValueError``."""
    algs = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    problems = []
    if args.steps < 1:
        problems.append(f"--steps: expected an integer >= 1, got {args.steps}")
    unknown = [a for a in algs if a not in ALGORITHMS]
    if unknown or not algs:
        problems.append(f"--algorithms: unknown {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"valid: {', '.join(ALGORITHMS)}")
    if problems:
        if parser is not None:
            parser.error("; ".join(problems))
        raise ValueError("; ".join(problems))
    return DemoConfig(steps=args.steps, algorithms=algs, seed=args.seed, out=args.out, model=args.model,
                      device=args.device, vocab=args.vocab, quiet=args.quiet)
