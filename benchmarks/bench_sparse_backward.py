"""The tiled backend's sparse backward on a trained language model's head: speed-up and the gradient error it costs.

    python benchmarks/bench_sparse_backward.py [--steps 300] [--width 1024] [--vocab 32768]

Random Gaussian inputs have flat softmaxes (no tile is skippable), so the logits here come from a model trained in
this script: the GPT of ``examples/train_tiny_gpt.py`` (pre-norm blocks, head tied to the embedding) on the Python
standard library's source, with a word-level vocabulary (identifiers, numbers, whitespace runs and single
characters; the ``--vocab`` − 1 most frequent, the rest mapped to one unknown token), trained in bf16 autocast with
our fused loss for ``--steps`` steps. Then, on a held-out batch of N = batch·context tokens: its final hidden states
``(N, width)`` and the head ``(V, width)`` in bf16, fwd+bwd of ``backend="tiled"`` with ``sparse_backward_eps``
from 0 (exact) up, and cut-cross-entropy with its default filter (``filter_eps = eps_bf16/32 = 2^-12``) and without.
Reported: median ms (CUDA events), the speed-up over exact, the share of the backward's 256×128 logit tiles the filter can skip at
that eps (computed from the float64 softmax), and relative errors of loss / grad_input / grad_weight against float64.
Benchmarks measure; they do not assert.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from train_tiny_gpt import Config, TinyGPT, stdlib_corpus  # noqa: E402

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.bench.measure import reference_fp64, rel  # noqa: E402
from linear_cross_entropy.bench.timing import time_fn  # noqa: E402

_TOKEN = re.compile(rb"[A-Za-z_][A-Za-z_0-9]*|[0-9]+|\s+|.", re.DOTALL)


def word_tokens(corpus_bytes: bytes, vocab: int) -> torch.Tensor:
    words = _TOKEN.findall(corpus_bytes)
    common = [w for w, _ in collections.Counter(words).most_common(vocab - 1)]
    index = {w: i + 1 for i, w in enumerate(common)}  # 0 = unknown
    return torch.tensor([index.get(w, 0) for w in words], dtype=torch.int64)


def train(tokens, cfg: Config, vocab: int, device):
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg, vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    options = LinearCrossEntropyOptions()
    g = torch.Generator().manual_seed(cfg.seed)
    train_part = tokens[: int(0.95 * len(tokens))]
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_part) - cfg.context - 1, (cfg.batch_size,), generator=g)
        window = torch.stack([train_part[s : s + cfg.context + 1] for s in starts.tolist()]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.hidden(window[:, :-1])
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.tok.weight, window[:, 1:].reshape(-1),
                                        options=options)  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}", flush=True)
    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)
    held = tokens[int(0.95 * len(tokens)) :]
    starts = torch.randint(0, len(held) - cfg.context - 1, (cfg.batch_size,), generator=g)
    window = torch.stack([held[s : s + cfg.context + 1] for s in starts.tolist()]).to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        h = model.hidden(window[:, :-1])
    x = h.reshape(-1, h.shape[-1]).to(torch.bfloat16).contiguous()
    return x, model.tok.weight.detach().to(torch.bfloat16).contiguous(), window[:, 1:].reshape(-1).contiguous()


def skippable_share(x, w, y, eps, tile=(256, 128), rows=1024):
    """Share of the backward's logit tiles with every probability below eps and no target in them."""
    skipped = total = 0
    for s in range(0, x.shape[0], rows):
        z = x[s : s + rows].double() @ w.double().T
        p = torch.softmax(z, dim=1)
        r, c = p.shape
        tm, tn = tile
        pad = torch.zeros((-(-r // tm)) * tm, (-(-c // tn)) * tn, dtype=p.dtype, device=p.device)
        pad[:r, :c] = p
        yc = y[s : s + rows]
        pad[torch.arange(r, device=p.device), yc] = 1.0  # a tile holding a target is never skipped
        tiles = pad.view(pad.shape[0] // tm, tm, pad.shape[1] // tn, tn).amax(dim=(1, 3))
        skipped += (tiles < eps).sum().item()
        total += tiles.numel()
    return skipped / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--corpus-mb", type=float, default=12.0, help="bytes of the stdlib corpus to tokenize")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda")
    corpus = bytes(stdlib_corpus()[: int(args.corpus_mb * 2**20)].numpy())
    t0 = time.perf_counter()
    tokens = word_tokens(corpus, args.vocab)
    print(f"{len(tokens)} tokens, vocabulary {args.vocab} ({time.perf_counter() - t0:.1f} s)", flush=True)
    cfg = Config(steps=args.steps, batch_size=args.batch, context=args.context, width=args.width,
                 layers=args.layers, heads=args.width // 64, lr=1e-3, warmup=30)  # fmt: skip
    x, w, y = train(tokens, cfg, args.vocab, device)
    n, h, v = x.shape[0], x.shape[1], w.shape[0]
    ref = reference_fp64(x, w, y)
    print(f"held-out batch {n}x{h}x{v}: loss {ref[0].item():.3f}", flush=True)

    methods = {}
    for eps in (0.0, 2**-16, 2**-12, 2**-8):
        opts = LinearCrossEntropyOptions(backend="tiled", sparse_backward_eps=eps)
        methods[f"tiled eps={eps:.1e}"] = (eps, lambda a, b, t, o=opts: linear_cross_entropy(a, b, t, options=o))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["cut-cross-entropy filter 2^-12"] = (2**-12, lambda a, b, t: cce(a, b, t))
        methods["cut-cross-entropy no filter"] = (0.0, lambda a, b, t: cce(a, b, t, filter_eps=None))
    except ImportError as e:
        print("cut-cross-entropy unavailable:", e)

    table = []
    for name, (eps, fn) in methods.items():
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

        def step(fn=fn, xr=xr, wr=wr):
            xr.grad = wr.grad = None
            fn(xr, wr, y).backward()

        loss = fn(xr, wr, y)
        loss.backward()
        errs = (rel(loss.detach(), ref[0]), rel(xr.grad, ref[1]), rel(wr.grad, ref[2]))
        ms = time_fn(step, args.reps)
        share = skippable_share(x, w, y, eps) if eps else 0.0
        table.append((name, ms, share, errs))
        print(name, f"{ms:.2f} ms", flush=True)
    exact = {name.split()[0]: ms for name, ms, _, _ in table if "eps=0.0" in name or "no filter" in name}
    print(f"\n{n}x{h}x{v} bf16, trained {args.steps} steps (H100 run; fwd+bwd median of {args.reps})")
    print("| method | ms | speed-up vs its exact | skippable tiles | loss err | dx err | dw err |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, share, (le, xe, we) in table:
        base = exact.get(name.split()[0], ms)
        print(f"| {name} | {ms:.2f} | {base / ms:.2f}x | {share:.1%} | {le:.1e} | {xe:.1e} | {we:.1e} |")


if __name__ == "__main__":
    main()
