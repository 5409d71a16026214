"""TRL's ``SFTTrainer`` with this package's loss in place of TRL's own fused LM head.

TRL (1.x) trains through its own logits-free head: ``SFTTrainer.__init__`` calls
``trl.trainer.utils.add_fused_lm_head`` on the model, which replaces the instance's ``forward``, and
``SFTTrainer.compute_loss`` then calls ``model(**inputs, fused_lm_head=True)`` and reads per-token fields of the
returned ``FusedCausalLMOutput``: the loss is ``-Σ log_probs / num_items_in_batch`` (the number of non-ignored
tokens without it), ``entropy`` and ``is_top1`` feed the logged ``entropy`` and ``mean_token_accuracy``,
``label_mask`` counts the tokens, ``aux_loss`` (Mixture-of-Experts) is added weighted by the router coefficient.
A model patched by :func:`linear_cross_entropy.integrations.transformers.apply` before the trainer is built is
wrapped by TRL's head, so TRL's kernel runs and ours never does. The one supported way::

    from trl import SFTConfig, SFTTrainer
    from linear_cross_entropy.integrations import trl as lce_trl

    trainer = lce_trl.apply(SFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset))
    trainer.train()

:func:`apply` removes TRL's head from the model, applies
:func:`~linear_cross_entropy.integrations.transformers.apply` (same families, heads, PEFT base models and options)
and installs a ``forward`` that answers ``fused_lm_head=True`` with the same ``FusedCausalLMOutput`` computed by
:func:`~linear_cross_entropy.linear_cross_entropy` with ``reduction="none", return_metrics=True`` (``log_probs`` =
minus the per-token loss, ``entropy`` and ``is_top1`` from its metrics); every other call goes to the patched
model's forward. TRL's loss types (``nll``, ``dft``), completion-only and assistant-only masks,
``num_items_in_batch``, its metrics and evaluation work unchanged, since they only read those fields.

A model that ``transformers.apply`` patched and TRL's head later wrapped warns once (``UserWarning``) the first time
TRL's head runs on it, naming :func:`apply` as the fix.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings

import torch

from . import _head
from . import transformers as lce_hf
from .families import unwrap

__all__ = ["apply", "is_applied"]

_WARNED = "_lce_trl_warned"
_WATCHED = "_lce_trl_watched"


def apply(trainer, *, options=None):
    """Make ``trainer`` (a TRL ``SFTTrainer``, after construction) compute its loss with :func:`linear_cross_entropy`.

    Args:
        trainer: a ``trl.SFTTrainer`` (or subclass) whose model carries TRL's fused LM head.
        options: passed to :func:`linear_cross_entropy.integrations.transformers.apply`; ``None`` keeps the options
            of an earlier ``transformers.apply`` on the model, else its default (fp32 loss). An earlier ``apply``'s
            ``eval_without_logits`` is kept too.

    Returns:
        ``trainer`` itself.

    Raises:
        ValueError: the model carries no TRL fused head (not an ``SFTTrainer``'s model, or one from a TRL without
            it), or :func:`~linear_cross_entropy.integrations.transformers.apply` refuses the model.
    """
    target = unwrap(trainer.model)  # TRL patches the PEFT base model, as transformers.apply does
    state = lce_hf.patch_state(target)  # an earlier transformers.apply's choices are kept
    if options is None and state is not None:
        options = state.options
    flags = {} if state is None else {"eval_without_logits": state.eval_without_logits}
    if is_applied(target):
        lce_hf.apply(target, options=options, **flags)
        return trainer
    forward = vars(target).get("forward")
    if not _is_trl_fused_head(forward):
        found = "the class's own forward" if forward is None else getattr(forward, "__qualname__", repr(forward))
        raise ValueError(
            f"linear_cross_entropy.integrations.trl.apply: {type(target).__name__}'s forward is {found}, not TRL's "
            "fused LM head (trl.trainer.utils.add_fused_lm_head), which SFTTrainer installs when it is built. Pass "
            "an SFTTrainer right after constructing it; for a plain transformers Trainer use "
            "linear_cross_entropy.integrations.transformers.apply(model) instead."
        )
    if not _is_trl_fused_head(forward, outermost=True):
        raise ValueError(
            f"linear_cross_entropy.integrations.trl.apply: TRL's fused LM head on this {type(target).__name__} is "
            "wrapped by another forward (accelerate's mixed-precision wrapper, installed when training starts); "
            "call apply() right after constructing the SFTTrainer, before train()."
        )
    del target.forward  # TRL's head, and with it the forward it wrapped: the class's own shows through
    lce_hf.apply(target, options=options, **flags)
    patched = vars(target)["forward"]

    @functools.wraps(patched)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return patched(*args, **kwargs)
        return _fused_lm_head(self, args, kwargs)

    forward._linear_cross_entropy = True  # transformers.is_applied / remove see it as the patch
    forward._linear_cross_entropy_trl = True
    target.forward = types.MethodType(forward, target)
    return trainer


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` installed its fused-head forward on ``model`` (or the model inside its wrappers)."""
    forward = vars(unwrap(model)).get("forward")
    return any(getattr(f, "_linear_cross_entropy_trl", False) for f in _wrapped(forward))


def watch(model: torch.nn.Module) -> None:
    """Warn once if TRL's fused LM head later runs on ``model`` in place of the patch (called by
    :func:`linear_cross_entropy.integrations.transformers.apply`)."""
    if not getattr(model, _WATCHED, False):
        model.register_forward_pre_hook(_warn_if_trl_head_runs, with_kwargs=True)
        setattr(model, _WATCHED, True)


def _warn_if_trl_head_runs(model, args, kwargs):
    if (
        torch.compiler.is_compiling()
        or not kwargs.get("fused_lm_head")
        or getattr(model, _WARNED, False)
        or lce_hf.patch_state(model) is None  # transformers.remove undid the patch
        or not _is_trl_fused_head(vars(model).get("forward"))
    ):
        return
    setattr(model, _WARNED, True)
    warnings.warn(
        f"TRL's fused LM head replaced linear_cross_entropy's patch of this {type(model).__name__}: SFTTrainer "
        "computes its loss with TRL's own kernel, not linear_cross_entropy. Call "
        "linear_cross_entropy.integrations.trl.apply(trainer) after building the SFTTrainer to train with ours.",
        UserWarning,
        stacklevel=2,
    )


def _wrapped(forward):
    """The function of ``forward`` and those it wraps (``functools.wraps``' ``__wrapped__``), outermost first:
    accelerate's mixed-precision wrapper (installed on ``model.forward`` when training starts), TRL's head, ours."""
    function = getattr(forward, "__func__", forward)
    while function is not None:
        yield function
        function = getattr(function, "__wrapped__", None)
        function = getattr(function, "__func__", function)


def _is_trl_fused_head(forward, outermost: bool = False) -> bool:
    """Whether ``forward`` is (``outermost``) or wraps the function ``trl.trainer.utils.add_fused_lm_head``
    installs: its code object is one of that function's constants (``functools.wraps`` gave it the model's name)."""
    utils = sys.modules.get("trl.trainer.utils")  # a model carrying TRL's head has imported it
    if utils is None or forward is None:
        return False
    functions = list(_wrapped(forward))[:1] if outermost else _wrapped(forward)
    heads = [c for c in utils.add_fused_lm_head.__code__.co_consts if inspect.iscode(c)]  # co_consts holds None too
    return any(getattr(f, "__code__", None) in heads for f in functions)


def _fused_lm_head(model, args, kwargs):
    """TRL's ``FusedCausalLMOutput`` for ``model(*args, fused_lm_head=True, **kwargs)`` (labels required), from
    :func:`linear_cross_entropy`: the same fields, shapes ``(batch, seq_len - 1)`` (``(batch, seq_len)`` with
    ``shift_labels``), zero where the label is ``-100``."""
    from trl.trainer.utils import FusedCausalLMOutput

    state = lce_hf.patch_state(model)
    call = lce_hf.bind_call(state.cls, args, kwargs)
    labels, shift_labels = call.pop("labels", None), call.pop("shift_labels", None)
    num_items = call.pop("num_items_in_batch", None)
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels= or shift_labels= (as TRL's fused LM head).")
    call["use_cache"] = False
    text_config = model.config.get_text_config()
    if state.family.router_aux_loss and getattr(text_config, "output_router_logits", False):
        call.setdefault("output_router_logits", True)  # as TRL's head: the config asks for the router loss

    outputs = getattr(model, state.family.base)(**call, return_dict=True)
    hidden = outputs.last_hidden_state  # (B, T, H)
    if shift_labels is None:  # position t predicts token t + 1
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    where = f"{state.cls.__name__}.lm_head"
    if _head.zero3_partitioned(_head.resolve(model.get_output_embeddings(), where)):
        raise NotImplementedError(
            f"{where} is partitioned by DeepSpeed ZeRO-3: the per-token losses TRL reads cannot be formed with their "
            "gradients inside the gathered scope. Train without linear_cross_entropy.integrations.trl.apply."
        )
    labels = labels.to(model.get_output_embeddings().weight.device)
    mask = labels != -100  # (B, T')
    out = lce_hf.head_loss(
        model,
        state,
        hidden.reshape(-1, hidden.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
        return_metrics=True,
    )
    log_probs = -out.loss.view(mask.shape)  # 0 where ignored, as the loss
    entropy = out.metrics.entropy.view(mask.shape).masked_fill(~mask, 0.0)
    is_top1 = out.metrics.accuracy.view(mask.shape).bool() & mask
    denominator = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -log_probs.sum() / denominator

    aux_loss = None
    if state.family.router_aux_loss and call.get("output_router_logits"):
        aux_loss = state.load_balancing_loss(
            outputs.router_logits, model.num_experts, model.num_experts_per_tok, call.get("attention_mask")
        )
        loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss.to(loss.device)
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask, aux_loss=aux_loss
    )
