"""Tensor parallel through DTensor: gloo, 2 and 3 CPU processes, every rank against the single-process float64 result.

One spawned group per world size runs every case (``helpers.run_ranks``: a wall-clock limit turns
a hang into a failure). The head is ``distribute_tensor(W, mesh, [Shard(0)])`` with V = 37: DTensor's own uneven
split (19 + 18 on 2 ranks, 13 + 13 + 11 on 3), which the vocabulary-parallel path must agree with. Inputs are
plain, ``Replicate()`` and ``Shard(0)`` (sequence parallel, 13 rows: uneven too); each case checks the loss,
metrics, every gradient (values and DTensor placements) and what type the results come back as. Then the module
and a tiny Llama under ``parallelize_module(..., ColwiseParallel())`` against their unparallelized training step,
and the placements that are refused.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from helpers import INTERPRET, check_close, expect_error, run_ranks
from test_distributed import WALL_LIMIT_S, V, check_results, single_process, vocab_problem

from linear_cross_entropy import LinearCrossEntropyLoss, LinearCrossEntropyOptions, linear_cross_entropy

tensor_api = pytest.importorskip("torch.distributed.tensor")
DTensor, Partial, Replicate, Shard = tensor_api.DTensor, tensor_api.Partial, tensor_api.Replicate, tensor_api.Shard
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _slice(rank, world, classes=V):
    """DTensor's Shard(0) rows of this rank (torch.chunk's split)."""
    per = -(-classes // world)
    return rank * per, min((rank + 1) * per, classes)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _cases():
    """(name, loss kwargs, bias, class weights as 'dtensor' | 'plain' | None, input form)."""
    cases = []
    for reduction in ("mean", "sum", "none"):
        base = {"reduction": reduction}
        for form in ("plain", "replicate", "shard"):
            cases += [
                (f"{reduction}-{form}-plain", base, False, None, form),
                (
                    f"{reduction}-{form}-weight-smooth-ignore5",
                    {**base, "label_smoothing": 0.2, "ignore_index": 5},
                    True,
                    "dtensor" if form != "plain" else "plain",
                    form,
                ),
                (
                    f"{reduction}-{form}-extras-metrics",
                    {
                        **base,
                        "z_loss": 0.01,
                        "logit_scale": 0.8,
                        "logit_softcap": 3.0,
                        "label_smoothing": 0.1,
                        "return_metrics": True,
                    },
                    True,
                    "plain",
                    form,
                ),
            ]
    cases.append(("mean-small-chunks", {"options": LinearCrossEntropyOptions(batch_chunk_size=4)}, True, None, "shard"))
    cases.append(("mean-options-none", {"options": None}, True, "dtensor", "replicate"))
    return cases


def _run_case(rank, world, mesh, errors, name, kwargs, use_bias, class_weights, form, placement=None):
    """One call with a DTensor head (``placement``: Shard(0) by default, or Replicate()) against float64."""
    placement = placement or Shard(0)
    x, w, b, cw, t, upstream = vocab_problem()
    kwargs = dict(kwargs)
    if "ignore_index" in kwargs:
        t = torch.where(t == -100, kwargs["ignore_index"], t)
    options = kwargs.pop("options", LinearCrossEntropyOptions())
    extras = {k: kwargs.pop(k) for k in ("z_loss", "logit_scale", "logit_softcap", "return_metrics") if k in kwargs}
    fused = options is not None and options.backend == "fused"
    b = b if use_bias else None
    cw = cw if class_weights else None
    ref = single_process(x, w, b, cw, t, kwargs, extras, upstream)
    if fused:  # fp32 kernels; plain PyTorch's own fp32 error sets the tolerance
        x, w, b, cw = (None if v is None else v.float() for v in (x, w, b, cw))
        plain = single_process(x, w, b, cw, t, kwargs, extras, upstream)

    def dt(v, place):
        return tensor_api.distribute_tensor(v, mesh, [place])

    ws = dt(w, placement).requires_grad_()
    bs = dt(b, placement).requires_grad_() if use_bias else None
    cws = dt(cw, placement) if class_weights == "dtensor" else cw
    if form == "plain":
        xs, ts = x.clone().requires_grad_(), t
    else:
        rows = Replicate() if form == "replicate" else Shard(0)
        xs, ts = dt(x, rows).requires_grad_(), dt(t, rows)
    out = linear_cross_entropy(xs, ws, ts, linear_bias=bs, weight=cws, options=options, **kwargs, **extras)
    metrics = extras.get("return_metrics", False)
    loss = out.loss if metrics else out

    # what comes back: plain for a plain input; DTensors (rows placed as the input's for "none") otherwise
    if form == "plain":
        if isinstance(loss, DTensor):
            errors.append(f"{name}: a plain input gave a DTensor loss")
    else:
        expect = (Shard(0),) if form == "shard" and kwargs.get("reduction") == "none" else (Replicate(),)
        if not isinstance(loss, DTensor) or tuple(loss.placements) != expect:
            errors.append(f"{name}: loss {type(loss).__name__} {getattr(loss, 'placements', '')}, expected {expect}")
    if loss.dim() == 0:
        loss.backward()
    else:
        up = upstream.to(loss.dtype)
        if isinstance(loss, DTensor):
            up = dt(up, loss.placements[0])
        (loss * up).sum().backward()
    for what, leaf in [("grad_weight", ws), ("grad_bias", bs)]:
        if leaf is not None and (not isinstance(leaf.grad, DTensor) or tuple(leaf.grad.placements) != (placement,)):
            errors.append(f"{name}: {what} {type(leaf.grad).__name__} {getattr(leaf.grad, 'placements', '')}")
    if form == "shard" and tuple(xs.grad.placements) != (Shard(0),):
        errors.append(f"{name}: grad_input placed {xs.grad.placements}, expected the input's (Shard(0),)")

    results = tuple(
        None if v is None else _full(v) for v in (loss.detach(), xs.grad, ws.grad, bs.grad if use_bias else None)
    )
    full_metrics = type(out.metrics)(*map(_full, out.metrics)) if metrics else None
    check_results(errors, name, results, full_metrics, ref, plain if fused else None)


def _expect_value_error(errors, name, match, fn):
    expect_error(errors, name, ValueError, match, fn)


def _error_cases(rank, world, mesh, errors):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    x, w, b, cw, t, _ = vocab_problem()
    ws = tensor_api.distribute_tensor(w, mesh, [Shard(0)])

    def call(xx=x, ww=ws, tt=t, **kw):
        return linear_cross_entropy(xx, ww, tt, options=LinearCrossEntropyOptions(), **kw)

    served = "served: linear_weight as a DTensor on a 1-D device mesh"
    _expect_value_error(errors, "Shard(1)", served, lambda: call(ww=tensor_api.distribute_tensor(w, mesh, [Shard(1)])))
    mesh_2d = init_device_mesh("cpu", (1, world))
    w_2d = tensor_api.distribute_tensor(w, mesh_2d, [Replicate(), Shard(0)])
    _expect_value_error(errors, "2-D mesh", "2-D device mesh", lambda: call(ww=w_2d))
    _expect_value_error(
        errors, "process_group too", "process_group must be None", lambda: call(process_group=mesh.get_group())
    )
    _expect_value_error(errors, "plain bias", "linear_bias is a plain tensor", lambda: call(linear_bias=b))
    b_rep = tensor_api.distribute_tensor(b, mesh, [Replicate()])
    _expect_value_error(errors, "bias placed otherwise", "placed alike", lambda: call(linear_bias=b_rep))
    x_cols = tensor_api.distribute_tensor(x, mesh, [Shard(1)])
    _expect_value_error(errors, "input Shard(1)", "input is a DTensor placed (Shard(dim=1),)", lambda: call(xx=x_cols))
    x_rep = tensor_api.distribute_tensor(x, mesh, [Replicate()])
    _expect_value_error(
        errors,
        "input_grad_all_reduce",
        "input_grad_all_reduce=False",
        lambda: call(xx=x_rep, input_grad_all_reduce=False),
    )
    _expect_value_error(errors, "plain weight", "linear_weight is a plain Tensor", lambda: call(xx=x_rep, ww=w))
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
    w_rev = tensor_api.distribute_tensor(w, reversed_mesh, [Shard(0)])
    _expect_value_error(errors, "reversed mesh", "orders its ranks differently", lambda: call(ww=w_rev))
    w_tiny = tensor_api.distribute_tensor(w[: world - 1], mesh, [Shard(0)])
    _expect_value_error(errors, "empty shard", "leaves a rank without classes", lambda: call(ww=w_tiny))
    try:
        call(weight=cw[:-1])
        errors.append("class weights of the wrong size: no error")
    except RuntimeError as e:
        if "weight tensor" not in str(e):
            errors.append(f"class weights of the wrong size: {e}")
    # the group still works after every error
    _run_case(rank, world, mesh, errors, "after-errors", {"reduction": "mean"}, True, "dtensor", "replicate")


def _module_and_training_step(rank, world, mesh, errors):
    """``LinearCrossEntropyLoss`` (class weights a plain buffer) under ``parallelize_module`` with
    ``ColwiseParallel()`` on its ``linear``, inside a tiny model: one AdamW step equals the unparallelized one."""
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    _, _, _, cw, t, _ = vocab_problem()
    torch.manual_seed(0)  # the same model on every rank
    model = torch.nn.ModuleDict(
        {
            "body": torch.nn.Sequential(torch.nn.Linear(6, 8, dtype=torch.float64), torch.nn.Tanh()),
            "loss": LinearCrossEntropyLoss(
                8, V, bias=True, dtype=torch.float64, weight=cw, label_smoothing=0.1, z_loss=0.01
            ),
        }
    )
    reference = copy.deepcopy(model)
    parallelize_module(model["loss"], mesh, {"linear": ColwiseParallel()})
    if not isinstance(model["loss"].linear.weight, DTensor):
        errors.append("module: parallelize_module left the head's weight plain")
    features = torch.randn(13, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (model, reference)]
    for step in range(2):
        losses = []
        for m, opt in zip((model, reference), optimizers):
            opt.zero_grad()
            with loss_parallel() if m is model and step else torch.enable_grad():  # ours ignores loss_parallel
                loss = m["loss"](m["body"](features), t)
                loss.backward()
            opt.step()
            losses.append(loss.detach())
        check_close(errors, f"module step {step} loss", losses[0], losses[1])
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        check_close(errors, f"module after 2 steps: {name}", _full(p.detach()), q.detach())


def _hf_llama(rank, world, mesh, errors):
    """A tiny random Llama, patched by ``apply``, against the unparallelized patched model (loss and every
    parameter's gradient): with ``lm_head`` parallelized by ``ColwiseParallel(output_layouts=Replicate())`` (and
    the unlabelled forward still returning whole logits), and with transformers' own ``tp_plan="auto"`` (every
    layer tensor-parallel, ``lm_head`` a ``Shard(0)`` DTensor), loaded from a local checkpoint."""
    transformers = pytest.importorskip("transformers")
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from linear_cross_entropy.integrations import transformers as lce_hf

    os.environ.update(HF_HUB_OFFLINE="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # the same model on every rank
    base = transformers.LlamaForCausalLM(config).double()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(9))
    reference = lce_hf.apply(copy.deepcopy(base))
    reference_loss = reference(input_ids=ids, labels=ids).loss
    reference_loss.backward()

    head_only = copy.deepcopy(base)
    parallelize_module(head_only, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    # transformers saves on global rank 0 only: rank 0 writes, every rank reads
    checkpoint = [tempfile.mkdtemp(prefix="lce-llama-") if rank == 0 else None]
    dist.broadcast_object_list(checkpoint, src=0)
    if rank == 0:
        base.save_pretrained(checkpoint[0])
    dist.barrier()
    native = transformers.LlamaForCausalLM.from_pretrained(
        checkpoint[0], tp_plan="auto", device_mesh=mesh, dtype=torch.float64
    )
    dist.barrier()
    if rank == 0:
        shutil.rmtree(checkpoint[0])
    for label, model in (("hf lm_head ColwiseParallel", head_only), ("hf tp_plan=auto", native)):
        if not isinstance(model.lm_head.weight, DTensor):
            errors.append(f"{label}: lm_head.weight is not a DTensor")
        model.train()  # from_pretrained leaves eval mode, where a labelled call runs the model's own forward
        loss = lce_hf.apply(model)(input_ids=ids, labels=ids).loss
        loss.backward()
        if isinstance(loss, DTensor):
            errors.append(f"{label}: the loss of plain hidden states came back as a DTensor")
        check_close(errors, f"{label} loss", loss.detach(), reference_loss.detach())
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            check_close(errors, f"{label} grad {name}", _full(p.grad), q.grad)
    with torch.no_grad():
        logits = head_only(input_ids=ids).logits
        check_close(errors, "hf logits without labels", _full(logits), reference(input_ids=ids).logits)


def _dtensor_cases(rank, world, errors):
    mesh = _mesh(world)
    for name, kwargs, use_bias, class_weights, form in _cases():
        if world == 3 and form == "replicate":  # 3 ranks: the uneven slices and rows (plain and Shard(0)) suffice
            continue
        _run_case(rank, world, mesh, errors, name, kwargs, use_bias, class_weights, form)
    # a replicated head: the single-device path on every rank (sequence-parallel rows gathered)
    for form in ("plain", "replicate", "shard"):
        for reduction in ("mean", "none"):
            kwargs = {"reduction": reduction, "label_smoothing": 0.1}
            _run_case(
                rank, world, mesh, errors, f"replicated-{reduction}-{form}", kwargs, True, "dtensor", form, Replicate()
            )
    if INTERPRET and world == 2:  # the fused path on 3 uneven ranks: tests/test_distributed.py
        pytest.importorskip("triton")
        fused = {"options": LinearCrossEntropyOptions(backend="fused"), "z_loss": 0.01, "return_metrics": True}
        _run_case(rank, world, mesh, errors, "fused-mean-shard", fused, True, "dtensor", "shard")
        _run_case(
            rank, world, mesh, errors, "fused-none-replicate", {**fused, "reduction": "none"}, True, None, "replicate"
        )
    _module_and_training_step(rank, world, mesh, errors)
    if world == 2:
        _hf_llama(rank, world, mesh, errors)
    _error_cases(rank, world, mesh, errors)


@pytest.mark.parametrize("world", [2, 3], ids=["2ranks", "3ranks"])
def test_dtensor_head_matches_single_process(world, tmp_path):
    run_ranks(_dtensor_cases, world, (), tmp_path, WALL_LIMIT_S)


class _TinyLM(torch.nn.Module):
    """A body and our loss module (class weights, smoothing, z-loss): the head is the loss's ``linear``."""

    def __init__(self, class_weights):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8, dtype=torch.float64), torch.nn.Tanh())
        self.loss = LinearCrossEntropyLoss(
            8, V, bias=True, dtype=torch.float64, weight=class_weights, label_smoothing=0.1, z_loss=0.01
        )

    def forward(self, features, target):
        return self.loss(self.body(features), target)


def _fsdp_tp_step(rank, world, errors):
    """A torchtitan-style 2-D mesh (dp × tp = 2 × 2): the head ``ColwiseParallel`` on "tp", the whole model
    ``fully_shard`` on "dp"; each dp rank its own batch. Two AdamW steps equal the single-process steps on the
    mean of the dp ranks' losses (FSDP averages gradients over dp)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    _, _, _, cw, _, _ = vocab_problem()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = _TinyLM(cw)
    reference = copy.deepcopy(model)
    parallelize_module(model.loss, mesh["tp"], {"linear": ColwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(13, 6, dtype=torch.float64, generator=g), torch.randint(0, V, (13,), generator=g))]
    batches.append((torch.randn(13, 6, dtype=torch.float64, generator=g), torch.randint(0, V, (13,), generator=g)))
    mine = batches[mesh.get_coordinate()[0]]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.01) for m in (model, reference)]
    for _ in range(2):
        for opt in optimizers:
            opt.zero_grad()
        model(*mine).backward()
        reference_loss = sum(reference(*batch) for batch in batches) / len(batches)
        reference_loss.backward()
        for opt in optimizers:
            opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        check_close(errors, f"fsdp x tp after 2 steps: {name}", _full(p.detach()), q.detach())


def test_fsdp_times_tensor_parallel_step(tmp_path):
    run_ranks(_fsdp_tp_step, 4, (), tmp_path, WALL_LIMIT_S)
