"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with ``integrations.transformers.apply``: 2 gloo CPU processes
train a tiny random Llama as one process would.

Each rank builds the same float32 model, shards every decoder layer and then the root with ``fully_shard``, and runs
``STEPS`` AdamW steps on its own shard of a global batch (2 of 4 padded sequences, different numbers of labelled
tokens per rank). As ``Trainer`` does with ``average_tokens_across_devices``, each rank passes the global number of
labelled tokens as ``num_items_in_batch`` and multiplies its loss by the world size; FSDP averages the gradients
over the ranks, so the step is that of the mean loss over the whole batch, which the single-process references
compute on the concatenated batch. Cases: the unpatched model (the yardstick's check), ``apply`` then
``fully_shard``, ``fully_shard`` then ``apply`` (untied and tied embeddings). Every step's loss (averaged over the
ranks), the first step's full gradient of every parameter and every parameter after the last step are held to the
float64 single-process run within the error of the float32 single-process run (plain PyTorch: the logits and
``F.cross_entropy``), as ``helpers.assert_within_plain``. A head sharded on its own (``fully_shard(lm_head)``: its
unshard hook would be bypassed by the logits-free loss) is refused in both orders, with a message naming it.

The spawn, the per-rank reports and the wall-clock limit (a hang fails) are ``helpers.run_ranks``'s.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import check_within_plain, run_ranks

transformers = pytest.importorskip("transformers")
from test_integration_transformers import V, make  # noqa: E402

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)", allow_module_level=True)
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD, STEPS = 2, 3
WALL_LIMIT_S = 150.0


def _llama(tied: bool) -> torch.nn.Module:
    return make("llama", torch.float32, tie_word_embeddings=tied)  # seeded, training mode (the patched path)


def _batch():
    """4 sequences of 12 tokens, right-padded to lengths 12, 7, 10, 5 (mask 0, labels -100), prompts of 3, 2, 4, 1
    tokens masked to -100: ranks 0 and 1 get 14 and 10 labelled next tokens."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, V, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (length, prompt) in enumerate(zip((12, 7, 10, 5), (3, 2, 4, 1))):
        mask[row, length:] = 0
        labels[row, length:] = -100
        labels[row, :prompt] = -100
    return ids, mask, labels


def _plain_loss(model, ids, mask, labels):
    """The mean next-token cross entropy from the model's logits, in the model's dtype."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter or gradient (a collective: every rank calls it in order)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _single_process(tied: bool, dtype: torch.dtype):
    """Losses, per-step gradients and final parameters of ``STEPS`` steps on the whole batch, one process."""
    model = _llama(tied).to(dtype)
    optimizer = _optimizer(model)
    ids, mask, labels = _batch()
    losses, grads = [], []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = _plain_loss(model, ids, mask, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _sharded(rank: int, mesh, tied: bool, order: str, calls: list):
    """The same steps under FSDP2 on this rank's rows; ``order``: "native" (no apply), "apply-shard", "shard-apply"."""
    from torch.distributed.fsdp import fully_shard

    from linear_cross_entropy.integrations import transformers as lce_hf

    model = _llama(tied)
    if order == "apply-shard":
        lce_hf.apply(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if order == "shard-apply":
        lce_hf.apply(model)
    assert lce_hf.is_applied(model) == (order != "native")
    optimizer = _optimizer(model)
    ids, mask, labels = _batch()
    rows = slice(rank * 2, rank * 2 + 2)
    num_items = int((labels[:, 1:] != -100).sum())  # over all ranks, as Trainer counts it
    losses, grads = [], []
    before = len(calls)
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows], num_items_in_batch=num_items)
        assert out.logits is None or order == "native"
        loss = out.loss * WORLD  # FSDP averages gradients over the ranks; each rank's loss is its share of the sum
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total / WORLD)
        if not grads:  # the first step's (each gather is a collective; later steps are seen in the parameters)
            grads.append({n: _full(p.grad) for n, p in model.named_parameters()})
        optimizer.step()
    assert len(calls) - before == (0 if order == "native" else STEPS), "our kernel ran on every step"
    return losses, grads, {n: _full(p) for n, p in model.named_parameters()}


def _expect_refusal(errors, what, fn):
    try:
        fn()
    except ValueError as e:
        if "fully_shard" not in str(e) or "lm_head" not in str(e):
            errors.append(f"{what}: refused with a message that names neither fully_shard nor lm_head: {e}")
    else:
        errors.append(f"{what}: a separately sharded lm_head was not refused")


def _head_sharded_alone(mesh, order: str):
    from torch.distributed.fsdp import fully_shard

    from linear_cross_entropy.integrations import transformers as lce_hf

    model = _llama(tied=False)
    if order == "apply-shard":
        lce_hf.apply(model)
    fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if order == "shard-apply":
        lce_hf.apply(model)
    ids, mask, labels = _batch()
    model(input_ids=ids[:2], attention_mask=mask[:2], labels=labels[:2])


def _worker(rank, world, errors):
    from torch.distributed.device_mesh import init_device_mesh

    from linear_cross_entropy.integrations import transformers as lce_hf

    calls = []
    kernel = lce_hf.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    lce_hf.linear_cross_entropy = counting
    mesh = init_device_mesh("cpu", (world,))
    for tied, orders in ((False, ("native", "apply-shard", "shard-apply")), (True, ("shard-apply",))):
        exact = _single_process(tied, torch.float64)
        plain = _single_process(tied, torch.float32)
        for order in orders:
            got = _sharded(rank, mesh, tied, order, calls)
            name = f"{order}{' tied' if tied else ''}"
            for step in range(STEPS):
                check_within_plain(errors, f"{name} step {step} loss", got[0][step], plain[0][step], exact[0][step])
            for n, g in got[1][0].items():
                check_within_plain(errors, f"{name} first step's grad {n}", g, plain[1][0][n], exact[1][0][n])
            for n, p in got[2].items():
                check_within_plain(errors, f"{name} parameter {n} after {STEPS} steps", p, plain[2][n], exact[2][n])
    for order in ("apply-shard", "shard-apply"):
        _expect_refusal(errors, f"lm_head sharded alone, {order}", lambda o=order: _head_sharded_alone(mesh, o))


def test_fsdp2_training_matches_single_process(tmp_path):
    run_ranks(_worker, WORLD, (), tmp_path, WALL_LIMIT_S)


def test_batch_tells_the_global_mean_from_the_mean_of_rank_means():
    """The ranks' labelled-token counts differ, so a step that averaged the ranks' own means (instead of summing over
    the global count) would differ from the single-process mean and fail the test above."""
    ids, mask, labels = _batch()
    counts = [int((labels[r * 2 : r * 2 + 2, 1:] != -100).sum()) for r in range(WORLD)]
    assert counts == [14, 10]
