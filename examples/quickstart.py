"""Quickstart: the drop-in API on whatever device is here, checked against the materialised reference.

python examples/quickstart.py
"""

import time

import torch

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16
n, hidden, vocab = 2048, 512, 32000
torch.manual_seed(0)
x = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
y = torch.randint(0, vocab, (n,), device=device)
y[::10] = -100  # ignored positions (ignore_index defaults to -100 for class indices)

results = {}
for name, options in [("reference (options=None)", None), ("ours (default options)", LinearCrossEntropyOptions())]:
    x.grad = w.grad = None
    start = time.perf_counter()
    loss = linear_cross_entropy(x, w, y, options=options)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    results[name] = (loss.detach().float(), x.grad.float(), w.grad.float(), time.perf_counter() - start)

(ref_loss, ref_dx, ref_dw, _), (loss, dx, dw, seconds) = results.values()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"device={device} dtype={dtype} N×H×V={n}×{hidden}×{vocab}")
for name, (value, _, _, s) in results.items():
    print(f"  {name:26s} loss {value.item():.5f}  fwd+bwd {s * 1e3:7.1f} ms (first call, includes warm-up)")
print(
    f"  relative difference to the reference: loss {rel(loss, ref_loss):.1e}, "
    f"grad_input {rel(dx, ref_dx):.1e}, grad_weight {rel(dw, ref_dw):.1e}"
)

# The module form: PyTorch's LinearCrossEntropyLoss layout (parameters in self.linear, flat).
head = LinearCrossEntropyLoss(hidden, vocab, bias=True, device=device, dtype=dtype, options=LinearCrossEntropyOptions())
print("  module:", head, "loss", head(x.detach(), y).item())
