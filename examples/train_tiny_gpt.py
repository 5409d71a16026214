"""Train a tiny GPT on the Python standard library's source, with the reference loss and with ours: same curves.

    python examples/train_tiny_gpt.py                    # defaults: ~3 minutes on 2 CPU cores (3 trainings)
    python examples/train_tiny_gpt.py --skip-float64     # the two float32 trainings only (~1.5 minutes)
    python examples/train_tiny_gpt.py --steps 1000 --out /tmp/run
    python examples/train_tiny_gpt.py --out examples/results   # regenerate the committed results (the README's)

**Corpus**: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded), in sorted
order, as bytes: real text that exists offline wherever Python does (31.5 MB for CPython 3.11). Tokens are bytes
(vocabulary 256); the last 5% of the bytes are held out (the held-out loss is printed at the end).

**Model**: a GPT written here in ~40 lines of torch (pre-norm blocks, causal self-attention, GELU MLP, learned
positions, output head tied to the token embedding; 2.3M parameters at the defaults). Written by hand rather than
taken from ``transformers`` so that the example needs nothing but torch (and matplotlib for the plot) and every line
between the data and the loss is in view; the ``transformers`` path is covered by
``linear_cross_entropy.integrations.transformers`` and ``tests/test_integration_transformers.py``.

**The runs** share the seed, the initial weights, the batches and the optimizer (AdamW, warm-up then cosine decay,
gradient clipping, no dropout); they differ only in the loss call::

    linear_cross_entropy(hidden, model.tok.weight, targets, options=None)                         # reference
    linear_cross_entropy(hidden, model.tok.weight, targets, options=OURS)                         # ours (chunked)

The reference materialises the ``(tokens, 256)`` logits and is exactly ``cross_entropy(linear(...))``. Ours names
``backend="chunked"``: with every field at its default, a CPU call this small (1024 × 256 logits) runs that same
reference computation (``linear_cross_entropy.options.materializes``), and the comparison would be empty. A third run
trains the reference in float64: the yardstick for float32 rounding.

**Tolerance**: both float32 runs compute the same function, so their curves differ only by rounding: ours sums in
a different order, the step-0 losses differ by 2 float32 ulps (1.8e-7 relative), and training amplifies that (each
step's update depends on the weights the previous steps rounded), so the gap grows with the number of steps. How
much it may grow is measured, not guessed: the float32 reference against the same training in float64 shows what
float32 rounding alone does to the curve. The asserted rule, with ``gap64`` = max over steps of
``|ref32 - ref64| / |ref64|``::

    max over steps of |ours - ref32| / |ref32|  <=  K * max(gap64, FLOOR),   K = 4,  FLOOR = 2**-22

i.e. ours may stray from the float32 reference by at most a few times the distance float32 itself puts between the
reference and exact arithmetic (``FLOOR``, 4 units of float32's 2**-24 relative rounding, covers the first steps,
where both gaps are a couple of roundings of the loss). Measured, max over steps (CPython 3.11 corpus, torch
2.13 CPU, 2 threads):

| run | steps | ours vs ref32 | ref32 vs ref64 | bound | lr x 1.01 vs ref32 |
|---|---|---|---|---|---|
| defaults (2.3M parameters) | 250 | 7.1e-6 | 4.1e-4 | 1.6e-3 | |
| defaults, ``--steps 400`` | 400 | 1.2e-4 | 2.6e-3 | 1.0e-2 | 3.0e-2 |
| ``tests/test_training_run.py`` (0.1M, 3 seeds) | 20 | 1.4e-7 – 2.0e-7 | 1.5e-7 – 1.7e-7 | 9.5e-7 | 2.9e-3 – 3.3e-3 |

Ours sits 20x inside the float32-vs-float64 gap at the defaults (a different chunk size, ``batch_chunk_size=256``,
gives 4.0e-5 at 400 steps: the same size), while a 1% change of the learning rate leaves the bound (the test
checks that it does). ``--skip-float64`` asserts the fixed ``RTOL = 2e-3`` instead: the rule evaluated with the
gap measured at the defaults (4 x 4.1e-4, rounded up); it is calibrated for the default settings only.

Outputs (``--out``, default ``examples/output/``, ignored by git; ``examples/results/`` holds the committed run that
the README quotes): ``train_tiny_gpt.csv`` (per step: both losses, their relative
difference, the float64 reference's loss and its relative difference) and ``train_tiny_gpt.png`` (the curves and the
relative differences against the asserted bound). Exit status 1 if the bound is exceeded.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy

OURS = LinearCrossEntropyOptions(backend="chunked")  # the chunked path itself (see the module docstring)

# The tolerance (module docstring): ours may differ from the float32 reference by at most K times what float32
# rounding alone does to the reference (its distance from the same training in float64), and at least by FLOOR.
K = 4
FLOOR = 2.0**-22
RTOL = 2e-3  # --skip-float64 at the defaults: K x 4.1e-4 (the float64 gap measured at the defaults), rounded up


def tolerance(float64_gap: float) -> float:
    """The bound on ``max_rel_diff(ours, reference)`` given ``max_rel_diff(reference, reference in float64)``."""
    return K * max(float64_gap, FLOOR)


@dataclasses.dataclass
class Config:
    steps: int = 250
    batch_size: int = 8
    context: int = 128
    width: int = 192
    layers: int = 5
    heads: int = 6
    lr: float = 2e-3
    warmup: int = 30
    seed: int = 0
    dtype: torch.dtype = torch.float32


def stdlib_corpus() -> torch.Tensor:
    """The bytes of every ``.py`` file of the standard library (sorted paths, site-packages excluded), as uint8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        parts += [(Path(directory) / f).read_bytes() for f in sorted(files) if f.endswith(".py")]
    return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: Config, vocab: int = 256):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.width)  # also the output head (tied)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``(B, T, width)``; the logits would be ``hidden @ tok.weight.T``."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def loss(self, idx, targets, options: LinearCrossEntropyOptions | None) -> torch.Tensor:
        h = self.hidden(idx)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.tok.weight, targets.reshape(-1), options=options)


def batches(data: torch.Tensor, cfg: Config, count: int, seed: int):
    """``count`` batches of random windows, the same sequence for every run with the same seed."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        starts = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch_size,), generator=g)
        window = torch.stack([data[s : s + cfg.context + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


def train(data: torch.Tensor, cfg: Config, options: LinearCrossEntropyOptions | None, progress: str = ""):
    """Train from the seed; returns (per-step training losses, held-out loss at the end, seconds)."""
    train_data, held_out = data[: int(0.95 * len(data))], data[int(0.95 * len(data)) :]
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg).to(cfg.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / cfg.warmup
            if s < cfg.warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))
        ),
    )
    losses, start = [], time.perf_counter()
    for step, (x, y) in enumerate(batches(train_data, cfg, cfg.steps, cfg.seed)):
        loss = model.loss(x, y, options)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if progress and (step % 50 == 0 or step == cfg.steps - 1):
            print(f"  {progress} step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.0f} s)")
    with torch.no_grad():
        held = [model.loss(x, y, options).item() for x, y in batches(held_out, cfg, 8, cfg.seed + 1)]
    return losses, sum(held) / len(held), time.perf_counter() - start


def relative_differences(a: list[float], b: list[float]) -> list[float]:
    """``|a - b| / |b|`` step by step."""
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(relative_differences(a, b))


def plot(path: Path, curves: dict[str, list[float]], rel: dict[str, list[float]], title: str, bound: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 2])
    for (label, ys), style in zip(curves.items(), ["-", "--", ":"]):
        top.plot(ys, style, label=label, linewidth=1.2)
    top.set_ylabel("training loss (nats / byte)")
    top.set_title(title, fontsize=10)
    top.legend()
    top.grid(alpha=0.3)
    for label, ys in rel.items():
        bottom.semilogy([v if v > 0 else float("nan") for v in ys], label=label, linewidth=1)  # 0: a gap
    bottom.axhline(bound, color="red", linestyle="--", linewidth=1, label=f"asserted bound {bound:.1e}")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative difference (gaps: equal)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=Config.steps)
    parser.add_argument("--batch-size", type=int, default=Config.batch_size)
    parser.add_argument("--context", type=int, default=Config.context)
    parser.add_argument("--width", type=int, default=Config.width)
    parser.add_argument("--layers", type=int, default=Config.layers)
    parser.add_argument("--lr", type=float, default=Config.lr)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument(
        "--skip-float64", action="store_true", help="skip the float64 reference (faster; asserts the fixed RTOL)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output")
    args = parser.parse_args(argv)
    cfg = Config(
        steps=args.steps,
        batch_size=args.batch_size,
        context=args.context,
        width=args.width,
        layers=args.layers,
        lr=args.lr,
        seed=args.seed,
    )

    data = stdlib_corpus()
    n_params = sum(p.numel() for p in TinyGPT(cfg).parameters())
    print(
        f"corpus: {len(data) / 1e6:.1f} MB of standard-library source ({sysconfig.get_paths()['stdlib']}); "
        f"model: {n_params / 1e6:.2f}M parameters; {cfg.steps} steps of {cfg.batch_size}x{cfg.context} bytes; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    runs = {
        "reference (options=None)": train(data, cfg, None, "reference"),
        "ours (backend='chunked')": train(data, cfg, OURS, "ours"),
    }
    if not args.skip_float64:
        runs["reference, float64"] = train(data, dataclasses.replace(cfg, dtype=torch.float64), None, "float64")
    ref, ours, *fp64 = (losses for losses, _, _ in runs.values())
    rel = {"ours vs reference": relative_differences(ours, ref)}
    if fp64:
        rel["reference: float32 vs float64"] = relative_differences(ref, fp64[0])

    diff = max(rel["ours vs reference"])
    if fp64:
        gap = max(rel["reference: float32 vs float64"])
        bound, why = tolerance(gap), f"{K} x max(float32-vs-float64 gap {gap:.1e}, FLOOR {FLOOR:.1e})"
    else:
        bound, why = RTOL, "the fixed RTOL for the default settings"

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train_tiny_gpt.csv", "w", newline="") as f:
        writer = csv.writer(f)
        extra = ["loss_reference_fp64", "rel_diff_reference_fp32_vs_fp64"] if fp64 else []
        writer.writerow(["step", "loss_reference", "loss_ours", "rel_diff_ours_vs_reference", *extra])
        for step in range(cfg.steps):
            row = [step, f"{ref[step]:.9g}", f"{ours[step]:.9g}", f"{rel['ours vs reference'][step]:.3e}"]
            if fp64:
                row += [f"{fp64[0][step]:.12g}", f"{rel['reference: float32 vs float64'][step]:.3e}"]
            writer.writerow(row)
    title = (
        f"TinyGPT ({n_params / 1e6:.1f}M parameters) on {len(data) / 1e6:.0f} MB of Python standard-library source\n"
        f"max relative difference, ours vs reference: {diff:.1e} (asserted bound {bound:.1e})"
    )
    plot(args.out / "train_tiny_gpt.png", {n: r[0] for n, r in runs.items()}, rel, title, bound)

    for name, (losses, held, seconds) in runs.items():
        print(f"{name:38s} final loss {losses[-1]:.4f}  held-out {held:.4f}  {seconds:.0f} s")
    for name, values in rel.items():
        print(f"max relative difference, {name}: {max(values):.2e} (step 0: {values[0]:.1e})")
    print(f"wrote {args.out / 'train_tiny_gpt.csv'} and {args.out / 'train_tiny_gpt.png'}")
    ok = diff <= bound
    print(f"{'OK' if ok else 'FAIL'}: max relative difference {diff:.2e} {'<=' if ok else '>'} {bound:.1e} ({why})")
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
