"""Hugging Face ``transformers`` causal LMs: the training loss straight from the final hidden states.

``apply(model)`` patches one model instance so that a forward call **in training mode with** ``labels`` computes
the loss with :func:`~linear_cross_entropy.linear_cross_entropy` from the last hidden states and the output head,
never materialising the ``(batch · sequence, vocabulary)`` logits (the output's ``logits`` is ``None``). Any other
call runs the model's own ``forward`` unchanged: without ``labels`` (inference, ``generate``), and outside training
mode (``model.eval()``: evaluation gets the logits and loss the unpatched model returns, so ``Trainer.evaluate`` and
``compute_metrics`` work; ``apply(..., eval_without_logits=True)`` keeps the logits-free loss there too, for
evaluation on long sequences)::

    from transformers import AutoModelForCausalLM
    from linear_cross_entropy.integrations import transformers as lce_hf

    model = lce_hf.apply(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"))
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss   # logits never held

``apply`` also accepts a PEFT ``PeftModel`` or a ``torch.compile``d module and patches the transformers model inside.

How: the instance's ``forward`` is replaced (only on that instance; ``functools.wraps`` keeps the original signature
for ``Trainer`` and ``generate``) by a function that, given ``labels`` in training, runs the base model (the
family's ``model``, ``transformer`` or ``gpt_neox``) with the arguments the original ``forward`` passes it, takes
its ``last_hidden_state`` and calls ``linear_cross_entropy`` with the head's operands: the computation of the
original's ``lm_head`` → (logit scale, soft-cap) → ``ForCausalLMLoss`` (+ router auxiliary loss), without the logits.
Transformers' internals are not touched. In detail:

- label shift: labels are padded with ``ignore_index`` on the right and shifted left by one, as transformers does
  (position ``t`` predicts token ``t + 1``; the last position is ignored); a ``shift_labels=`` keyword (already
  shifted, as transformers accepts) is used as given; ``ignore_index`` (default ``-100``) is passed through;
- ``num_items_in_batch`` (passed by ``Trainer`` under gradient accumulation): ``reduction="sum"`` divided by it;
  otherwise ``reduction="mean"`` over the non-ignored tokens;
- the head: its ``weight`` (the input embedding itself when tied, so its gradient collects both uses) and ``bias``;
  PEFT LoRA adapters on it, ``modules_to_save`` copies and ZeRO-3 partitioned weights as described in
  :mod:`linear_cross_entropy.integrations._head`; a tensor-parallel head (a ``DTensor`` weight, from
  ``parallelize_module(..., ColwiseParallel())`` or ``tp_plan="auto"``) runs the vocabulary-parallel loss over its
  mesh (:mod:`linear_cross_entropy.dtensor`); a head that cannot be read without calling it (quantized, hooked) is
  refused at ``apply`` and at each call;
- Cohere / Cohere2 multiply the logits by ``config.logit_scale`` and Granite divides them by
  ``config.logits_scaling``: ``logit_scale=`` (``1 / logits_scaling`` for Granite);
- Gemma 2 / Gemma 3 (text) final-logit soft-capping ``c·tanh(z / c)`` (``config.final_logit_softcapping = c``):
  ``logit_softcap=c``;
- Mixtral / Qwen2-MoE / Qwen3-MoE with ``output_router_logits`` (argument or config): the family's own
  ``load_balancing_loss_func`` on the router logits, added as ``router_aux_loss_coef · aux_loss`` and returned as
  ``aux_loss``, as their forward does.

Supported families (:data:`SUPPORTED_CLASSES`; each one's ``forward`` is "base model → ``last_hidden_state`` →
``lm_head`` → [scale / soft-cap] → ``loss_function`` [+ router loss]" in transformers 5.25, and each is tested
against the model's own loss and every parameter gradient). A model is recognised by what it is: an instance of one
of these classes, a subclass that does not override ``forward`` (FSDP2's ``fully_shard`` makes ``FSDP<Name>``
subclasses; applying before or after sharding both work), looked up once by ``apply``. Anything else is refused
(``ValueError`` saying what was found, what is served, what to do): a family that transforms its logits or its loss
differently would silently get a different loss from a generic patch; so would a model whose ``loss_function`` or
``loss_type`` was replaced, or a subclass with its own ``forward``.

The loss dtype: default options are ``LinearCrossEntropyOptions(loss_dtype=torch.float32)``, the fp32 loss that
transformers' own ``ForCausalLMLoss`` returns (it upcasts the logits with ``.float()``; note that this also rounds a
float64 model's loss to fp32; pass ``options=LinearCrossEntropyOptions()`` to keep the input's dtype).

Limitations: LoRA on a tensor-parallel ``lm_head`` is refused; ``apply`` refuses a model
whose ``forward`` was already replaced on the instance (accelerate's hooks on a model dispatched with a
``device_map``, ``model.forward = torch.compile(model.forward)``): apply it first. A labelled training call with
``logits_to_keep != 0`` is handed to the original ``forward``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..functional import linear_cross_entropy
from ..options import LinearCrossEntropyOptions
from . import _head
from .families import SUPPORTED_CLASSES, Family, head_transform, recognise, unwrap

__all__ = ["SUPPORTED_CLASSES", "apply", "is_applied", "remove", "patch_state", "bind_call", "head_loss"]


# Keywords of the original forward that belong to the head and the loss, not to the base model.
_HEAD_KEYWORDS = ("labels", "logits_to_keep", "return_dict", "num_items_in_batch", "ignore_index", "shift_labels")

_STATE = "_lce_state"


def patch_state(model: torch.nn.Module) -> _Patch | None:
    """What :func:`apply` found and chose for ``model`` (the transformers model itself), or None when not applied."""
    return getattr(model, _STATE, None)


@dataclasses.dataclass(frozen=True)
class _Patch:
    """What ``apply`` found and chose, kept on the instance: the forward never looks a class up by name."""

    cls: type  # the supported class the model is an instance of
    family: Family
    output_class: type
    options: LinearCrossEntropyOptions
    eval_without_logits: bool
    load_balancing_loss: Callable | None  # the family module's own load_balancing_loss_func


def apply(
    model: torch.nn.Module,
    *,
    options: LinearCrossEntropyOptions | None = None,
    eval_without_logits: bool = False,
) -> torch.nn.Module:
    """Make ``model`` (one instance, in place) compute its labelled training loss with :func:`linear_cross_entropy`.

    Args:
        model: an instance of (or an FSDP2 / non-``forward``-overriding subclass of) one of
            :data:`SUPPORTED_CLASSES`, or a PEFT ``PeftModel`` / ``torch.compile``d module around one.
        options: passed to :func:`linear_cross_entropy`; ``None`` means
            ``LinearCrossEntropyOptions(loss_dtype=torch.float32)``. Applying again replaces options and flags.
        eval_without_logits: outside training mode too, a labelled call computes the logits-free loss (and returns
            ``logits=None``) instead of running the model's own forward.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: an unsupported model (class, subclass with its own ``forward``, custom loss, replaced forward,
            layout) or an output head that cannot be read without calling it.
    """
    target, cls, family = recognise(model, "linear_cross_entropy.integrations.transformers.apply")
    name = type(target).__name__
    if "forward" in vars(target) and not is_applied(target):
        raise ValueError(
            f"This {name}'s forward was already replaced on the instance (accelerate's device-map hooks, "
            "torch.compile(model.forward), another patch); apply() must come first, on the plain model."
        )
    with _head.fsdp_unsharded(target):  # FSDP2 keeps DTensor shards between forwards; its forward reads these
        _head.resolve(target.get_output_embeddings(), f"{name}.lm_head")  # fail now, not at the first training step

    state = _Patch(
        cls=cls,
        family=family,
        output_class=_output_class(cls),
        options=options if options is not None else LinearCrossEntropyOptions(loss_dtype=torch.float32),
        eval_without_logits=eval_without_logits,
        load_balancing_loss=sys.modules[cls.__module__].load_balancing_loss_func if family.router_aux_loss else None,
    )
    setattr(target, _STATE, state)
    if not is_applied(target):

        @functools.wraps(cls.forward)  # the original's name, docstring and signature (Trainer reads it)
        def forward(self, *args, **kwargs):
            return _forward(self, *args, **kwargs)

        forward._linear_cross_entropy = True

        target.forward = types.MethodType(forward, target)  # this instance only; copy.deepcopy rebinds it
        from .trl import watch  # (here, not at the top: trl imports this module)

        watch(target)  # TRL's SFTTrainer replaces this forward with its own fused head: warn once when that runs
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` patched ``model`` (or the model inside a ``PeftModel`` / compiled module)."""
    forward = vars(unwrap(model)).get("forward")
    return getattr(getattr(forward, "__func__", None), "_linear_cross_entropy", False)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply` on ``model`` (a no-op if it was not applied); returns ``model``."""
    target = unwrap(model)
    if is_applied(target):
        del target.forward  # the instance attribute: the class's forward shows through again
        delattr(target, _STATE)
    return model


def _output_class(cls: type) -> type:
    """The ``ModelOutput`` class ``cls.forward`` returns (read from its return annotation)."""
    returned = typing.get_type_hints(cls.forward).get("return")
    for candidate in typing.get_args(returned) or (returned,):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    raise ValueError(f"{cls.__name__}.forward's return annotation names no ModelOutput: {returned!r}.")


def _forward(self, *args, **kwargs):
    """The patched forward: the original unless training with labels, else the base model + the fused loss."""
    state: _Patch = getattr(self, _STATE)
    original = state.cls.forward.__get__(self)
    call = bind_call(state.cls, args, kwargs)
    labels, logits_to_keep = call.get("labels"), call.get("logits_to_keep", 0)
    if (
        labels is None
        or not (self.training or state.eval_without_logits)
        or not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
    ):
        return original(*args, **kwargs)  # inference, generate, evaluation, a labelled logits_to_keep: unchanged

    head = {key: call.pop(key, None) for key in _HEAD_KEYWORDS}
    ignore_index = -100 if head["ignore_index"] is None else head["ignore_index"]
    return_dict = head["return_dict"]
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    family = state.family
    if family.router_aux_loss and call.get("output_router_logits") is None:
        call["output_router_logits"] = self.config.output_router_logits  # resolved as the original does

    outputs = getattr(self, family.base)(**call, return_dict=True)  # what the original passes on to it
    hidden = outputs.last_hidden_state
    shift_labels = head["shift_labels"]
    if shift_labels is None:  # as transformers' ForCausalLMLoss: position t predicts token t + 1
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = head["num_items_in_batch"]
    loss = head_loss(
        self,
        state,
        hidden.reshape(-1, hidden.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    fields = {k: v for k, v in outputs.items() if k in state.output_class.__dataclass_fields__}
    if family.router_aux_loss and call["output_router_logits"]:
        aux_loss = state.load_balancing_loss(
            outputs.router_logits, self.num_experts, self.num_experts_per_tok, call.get("attention_mask")
        )
        loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        fields["aux_loss"] = aux_loss
    output = state.output_class(**{**fields, "loss": loss, "logits": None})
    return output if return_dict else output.to_tuple()


def head_loss(model, state: _Patch, hidden: torch.Tensor, labels: torch.Tensor, **loss_kwargs) -> torch.Tensor:
    """The loss of ``lm_head(hidden)`` (N, H) → (scale, soft-cap) against ``labels`` (N,), without the logits."""
    where = f"{state.cls.__name__}.lm_head"
    head = _head.resolve(model.get_output_embeddings(), where)
    kwargs = dict(loss_kwargs, options=state.options, **head_transform(model, state.family))
    device = head.base.weight.device
    hidden, labels = hidden.to(device), labels.to(device)
    partitioned = _head.zero3_partitioned(head)
    if not partitioned:
        input, weight, bias = _head.operands(head, hidden)
        return linear_cross_entropy(input, weight, labels, linear_bias=bias, **kwargs)
    if head.adapters:
        raise ValueError(f"{where}: LoRA adapters on a DeepSpeed ZeRO-3 partitioned head are not supported.")

    def loss_fn(x, weight, bias=None):
        return linear_cross_entropy(x, weight, labels, linear_bias=bias, **kwargs)

    params = [head.base.weight] + ([] if head.base.bias is None else [head.base.bias])
    with _head.zero3_gathered(partitioned, model, where):
        return _head.precomputed_gradients(loss_fn, hidden, *params)


def bind_call(cls: type, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name as the class's forward receives them (its ``**kwargs`` flattened in)."""
    signature, var_keyword = _signature(cls)
    call = dict(signature.bind(None, *args, **kwargs).arguments)  # None stands for self
    del call[next(iter(signature.parameters))]
    if var_keyword is not None:
        call.update(call.pop(var_keyword, {}))
    return call


@functools.cache
def _signature(cls: type) -> tuple[inspect.Signature, str | None]:
    signature = inspect.signature(cls.forward)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    return signature, var_keyword
