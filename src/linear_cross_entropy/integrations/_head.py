"""The output head's operands for a logits-free loss: what ``lm_head(hidden)`` multiplies, read without calling it.

A head is served when its forward is a known linear map of ``hidden``, computed here exactly:

- ``torch.nn.Linear`` (not a subclass with its own ``forward``: bitsandbytes' ``Linear4bit``/``Linear8bitLt`` are
  ``Linear`` subclasses whose ``weight`` is packed), with a plain tensor weight (not a quantized tensor subclass):
  ``z = x·Wᵀ + b``;
- such a ``Linear`` made tensor parallel (PyTorch's ``parallelize_module(..., ColwiseParallel())``, transformers'
  ``tp_plan``): its weight is a ``DTensor``, which :func:`~linear_cross_entropy.linear_cross_entropy` serves by
  itself (:mod:`linear_cross_entropy.dtensor`: ``Shard(0)`` runs the vocabulary-parallel loss over the mesh's
  group, ``Replicate()`` the single-device one; other placements are refused there, naming the ones served). The
  tensor-parallel hooks on it only redistribute its input and output, which the loss does not use;
- PEFT's LoRA ``Linear`` over such a base: ``z = x·Wᵀ + b + Σₐ sₐ·(B_a·(A_a·drop_a(x)) + b_{B,a})`` over the active
  adapters, computed as one product of operands concatenated along the feature dimension,
  ``[x, s₁·A₁·drop₁(x), …]·[W, B₁, …]ᵀ + (b + Σ sₐ·b_{B,a})``; ``A_a`` and the dropout are called as modules (in
  training the dropout draws from the RNG as PEFT's forward does, in the same order). Disabled or merged adapters
  use the base layer, as PEFT does. Adapters kept in another dtype than the base weight (PEFT's fp32 adapters on a
  bf16 model) enter the product cast to the base weight's dtype: ``s·A·drop(x)`` and ``B`` are rounded once to it,
  where PEFT adds the adapter's fp32 output to the rounded base output and rounds the sum;
- PEFT's ``ModulesToSaveWrapper``: the copy PEFT's forward would call (the active adapter's, or the original when
  adapters are disabled).

Anything else is refused (``ValueError`` naming what was found, what is served and what to do): other PEFT tuners
and LoRA variants (DoRA, ...), a mixed-adapter batch, and forward hooks or a replaced ``forward`` on a module the
loss bypasses (they would see no call; FSDP2's ``fully_shard`` of the head alone and accelerate's device hooks are
of this kind; DeepSpeed's own hooks are not counted: the ZeRO-3 gathering below does their work).

DeepSpeed ZeRO-3 partitions every parameter to an empty placeholder, gathered only around its own module's forward
and backward. Head parameters carrying ``ds_id`` are (1) registered as external parameters of the patched model
(``deepspeed.zero.register_external_parameter``: ZeRO-3 then gathers them with the model's own parameters, in its
backward too, so that their gradients accumulate into full-size parameters and reach ZeRO's reduction hooks), and
(2) gathered for the call with ``deepspeed.zero.GatheredParameters`` where not already available (the first call,
before the registration took effect); as (2) releases them before backward, the loss is computed with its gradients
inside the gathered scope (:class:`_PrecomputedGradients`) and backward only scales them. Without an importable
``deepspeed`` such a parameter is refused (``RuntimeError``). Tested with a stand-in for DeepSpeed only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable

import torch

_SERVED = (
    "served: torch.nn.Linear with a plain weight or a tensor-parallel DTensor weight, PEFT LoRA (vanilla, any number "
    "of active adapters) on a Linear with a plain weight, PEFT modules_to_save copies of it"
)
# Hooks that only move the head's input and output between layouts (tensor parallel): the loss reads neither.
# transformers' tp_plan replaces the head's forward with one doing the same (transformers.distributed.tensor_parallel).
_TENSOR_PARALLEL_HOOKS = (
    "torch.distributed.tensor",
    "transformers.distributed.tensor_parallel",
    "transformers.integrations.tensor_parallel",
)


@dataclasses.dataclass
class _Adapter:
    """One active LoRA adapter: ``scaling · B(A(dropout(x)))``."""

    lora_a: torch.nn.Module
    lora_b: torch.nn.Linear
    dropout: torch.nn.Module
    scaling: float
    cast_input: Callable[[torch.Tensor, torch.dtype], torch.Tensor]


@dataclasses.dataclass
class Head:
    """The linear map a head computes: ``base`` plus ``adapters``."""

    base: torch.nn.Linear
    adapters: list[_Adapter]

    def parameters(self) -> list[torch.Tensor]:
        """The parameters read directly (not through a module call): base weight and bias, each adapter's B."""
        params = [self.base.weight, self.base.bias]
        for adapter in self.adapters:
            params += [adapter.lora_b.weight, adapter.lora_b.bias]
        return [p for p in params if p is not None]


def resolve(head: torch.nn.Module, where: str) -> Head:
    """The linear map ``head`` computes, or ``ValueError`` saying why it cannot be read without calling it.

    ``where`` names the head in messages (e.g. ``"LlamaForCausalLM.lm_head"``)."""
    tensor_parallel = _has_dtensor_weight(head)
    _refuse_bypassed_hooks(head, where, tensor_parallel)
    peft = sys.modules.get("peft")  # a model holding PEFT's modules has imported it
    if peft is not None:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper

        if isinstance(head, ModulesToSaveWrapper):
            return resolve(_active_copy(head), f"{where} (modules_to_save copy)")
        if isinstance(head, LoraLayer) and type(head) is LoraLinear:
            return _lora(head, where)
        if isinstance(head, BaseTunerLayer):
            raise ValueError(
                f"{where} is PEFT's {type(head).__module__}.{type(head).__name__}; {_SERVED}. Leave lm_head out of "
                "the adapter's target_modules, or merge the adapter (merge_and_unload), or call "
                "linear_cross_entropy.integrations.transformers.remove(model)."
            )
    if (
        not isinstance(head, torch.nn.Linear)
        or type(head).forward is not torch.nn.Linear.forward
        or (type(head.weight.data) is not torch.Tensor and not tensor_parallel)
    ):
        found = f"{type(head).__module__}.{type(head).__name__}"
        if isinstance(head, torch.nn.Linear) and type(head.weight.data) is not torch.Tensor:
            found += f" with a {type(head.weight.data).__name__} weight"
        raise ValueError(
            f"{where} is {found}; its output is not x·weightᵀ + bias of a plain weight (a quantized, tensor-parallel "
            f"or custom head), so the loss cannot be computed without calling it. {_SERVED}. Keep lm_head in full "
            "precision (e.g. BitsAndBytesConfig(llm_int8_skip_modules=['lm_head']), transformers' default), or call "
            "linear_cross_entropy.integrations.transformers.remove(model)."
        )
    return Head(head, [])


def _has_dtensor_weight(module: torch.nn.Module) -> bool:
    tensor_api = sys.modules.get("torch.distributed.tensor")
    return tensor_api is not None and isinstance(getattr(module, "weight", None), tensor_api.DTensor)


def _refuse_bypassed_hooks(module: torch.nn.Module, where: str, tensor_parallel: bool = False) -> None:
    allowed = _TENSOR_PARALLEL_HOOKS if tensor_parallel else ()
    hooks = [
        kind
        for kind, registry in (
            ("forward pre-hooks", _foreign(module._forward_pre_hooks, allowed)),
            ("forward hooks", _foreign(module._forward_hooks, allowed)),
            (
                "a forward replaced on the instance",
                _foreign({"forward": vars(module)["forward"]}, allowed) if "forward" in vars(module) else [],
            ),
        )
        if registry
    ]
    if hooks:
        raise ValueError(
            f"{where} ({type(module).__name__}) has {' and '.join(hooks)}; the logits-free loss reads its weight "
            "without calling it, so they would silently not run (FSDP2's fully_shard of the head on its own, "
            "accelerate's device-map hooks, PEFT's mixed-adapter batches and user hooks are of this kind). Remove "
            "them (shard the head together with its parent model), or call "
            "linear_cross_entropy.integrations.transformers.remove(model) to train with the model's own head."
        )


def _foreign(hooks: dict, allowed: tuple[str, ...] = ()) -> list:
    """The hooks not DeepSpeed's (ZeRO-3's own gather/release hooks are replaced by :func:`zero3_gathered`) and not
    from the ``allowed`` modules."""
    return [
        hook
        for hook in hooks.values()
        if not (getattr(getattr(hook, "func", hook), "__module__", "") or "").startswith(("deepspeed", *allowed))
    ]


def _active_copy(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module PEFT's ``ModulesToSaveWrapper.forward`` calls (peft 0.21)."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or any(name not in wrapper._adapters for name in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _lora(layer: torch.nn.Module, where: str) -> Head:
    if layer.disable_adapters and layer.merged:
        layer.unmerge()  # what PEFT's forward does on this call
    base = resolve(layer.get_base_layer(), f"{where}.base_layer")
    if layer.disable_adapters or layer.merged or base.adapters:
        return base
    if _has_dtensor_weight(base.base):
        raise ValueError(
            f"{where}: LoRA on a tensor-parallel head (a DTensor base weight); {_SERVED}. Leave lm_head out of the "
            "adapter's target_modules, or keep lm_head out of the tensor-parallel plan."
        )
    adapters = []
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue  # as PEFT: an active adapter that does not touch this layer
        if name in layer.lora_variant:
            raise ValueError(
                f"{where}: adapter {name!r} is a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA), "
                f"whose output is not linear in the base weight; {_SERVED}. Leave lm_head out of its target_modules."
            )
        lora_b = layer.lora_B[name]
        for module, part in ((layer.lora_A[name], "lora_A"), (lora_b, "lora_B")):
            if type(module) is not torch.nn.Linear:
                raise ValueError(f"{where}.{part}[{name!r}] is {type(module).__name__}, expected torch.nn.Linear.")
        _refuse_bypassed_hooks(lora_b, f"{where}.lora_B[{name!r}]")
        adapters.append(
            _Adapter(layer.lora_A[name], lora_b, layer.lora_dropout[name], layer.scaling[name], layer._cast_input_dtype)
        )
    return Head(base.base, adapters)


def operands(head: Head, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(input, weight, bias)`` with ``input·weightᵀ + bias`` = the head's output on ``hidden`` (N, H).

    Without adapters these are ``hidden`` and the base layer's own parameters (no copy)."""
    weight, bias = head.base.weight, head.base.bias
    if not head.adapters:
        return hidden, weight, bias
    inputs, weights, x = [hidden], [weight], hidden
    for adapter in head.adapters:
        x = adapter.cast_input(x, adapter.lora_a.weight.dtype)  # PEFT casts the input once per adapter, cumulatively
        inputs.append((adapter.lora_a(adapter.dropout(x)) * adapter.scaling).to(weight.dtype))  # (N, r)
        weights.append(adapter.lora_b.weight.to(weight.dtype))  # (V, r)
        if adapter.lora_b.bias is not None:
            term = adapter.lora_b.bias.to(weight.dtype) * adapter.scaling
            bias = term if bias is None else bias + term
    return torch.cat(inputs, dim=-1), torch.cat(weights, dim=-1), bias


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module):
    """``model``'s own FSDP2 parameters gathered (``FSDPModule.unshard``) for the duration, as in its forward.

    A collective: every rank must enter it. A no-op for a model that ``fully_shard`` did not wrap or whose
    parameters are not sharded (no ``DTensor``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    sharded = fsdp is not None and isinstance(model, getattr(fsdp, "FSDPModule", ()))
    if sharded:
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        model.unshard()
    try:
        yield
    finally:
        if sharded:
            model.reshard()


def zero3_partitioned(head: Head) -> list[torch.Tensor]:
    """The head's directly read parameters that DeepSpeed ZeRO-3 manages (they carry ``ds_id``)."""
    return [p for p in head.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def zero3_gathered(params: list[torch.Tensor], owner: torch.nn.Module, where: str):
    """``params`` registered as external parameters of ``owner`` and, within the scope, gathered where not already
    available (``deepspeed.zero.GatheredParameters``, read-only)."""
    try:
        import deepspeed
    except ImportError as error:
        raise RuntimeError(
            f"{where}'s parameters are partitioned by DeepSpeed ZeRO-3 (they carry ds_id/ds_status), but deepspeed "
            "cannot be imported to gather them; the loss would read empty placeholders. Install deepspeed, or call "
            "linear_cross_entropy.integrations.transformers.remove(model)."
        ) from error
    for param in params:
        deepspeed.zero.register_external_parameter(owner, param)  # idempotent
    unique = {id(p): p for p in params if getattr(p.ds_status, "name", p.ds_status) != "AVAILABLE"}
    with deepspeed.zero.GatheredParameters(list(unique.values()), modifier_rank=None):
        yield


class _PrecomputedGradients(torch.autograd.Function):
    """``loss_fn(*tensors)`` with its gradients formed in forward and only scaled in backward.

    For parameters that exist in full only during forward (ZeRO-3 releases them on leaving the gathered scope): no
    tensor that aliases them is kept for backward. Backward returns ``g · ∂loss/∂t`` for each tensor."""

    @staticmethod
    def forward(ctx, loss_fn, *tensors):
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        with torch.enable_grad():
            loss = loss_fn(*leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
        ctx.grads = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        return (None, *(None if g is None else g * grad_loss.to(g.dtype) for g in grads))


def precomputed_gradients(loss_fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """``loss_fn(*tensors)`` (a scalar) through :class:`_PrecomputedGradients`."""
    return _PrecomputedGradients.apply(loss_fn, *tensors)
