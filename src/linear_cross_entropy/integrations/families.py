"""Which causal LMs the integrations serve, and what each family's forward does between its base model and its loss.

Shared by :func:`.transformers.apply`, :mod:`.trl` and :func:`.log_probs.next_token_log_probs`: a model is
recognised by what it is (:func:`recognise`), and :func:`head_transform` gives the loss keywords that reproduce
what its family does to ``lm_head``'s output.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

__all__ = ["Family", "SUPPORTED_CLASSES", "recognise", "head_transform", "unwrap"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How a family's ``forward`` turns the base model's output into its loss."""

    base: str = "model"  # attribute holding the base model whose last_hidden_state feeds lm_head
    logit_scale: Callable[[torch.nn.Module], float] | None = None  # z = logit_scale(model) · lm_head(h)
    softcap: bool = False  # z = c·tanh(z / c) with c = config.final_logit_softcapping when that is not None
    router_aux_loss: bool = False  # + router_aux_loss_coef · load_balancing_loss_func(...) with output_router_logits


_PLAIN, _SOFTCAP, _MOE = Family(), Family(softcap=True), Family(router_aux_loss=True)
_COHERE = Family(logit_scale=lambda model: model.logit_scale)  # forward: logits * self.logit_scale

# Class name (in the ``transformers`` namespace) -> its family. Names the installed version lacks are skipped.
SUPPORTED_CLASSES: dict[str, Family] = {
    "LlamaForCausalLM": _PLAIN,
    "MistralForCausalLM": _PLAIN,
    "Qwen2ForCausalLM": _PLAIN,
    "Qwen3ForCausalLM": _PLAIN,
    "GemmaForCausalLM": _PLAIN,
    "Gemma2ForCausalLM": _SOFTCAP,
    "Gemma3ForCausalLM": _SOFTCAP,
    "Phi3ForCausalLM": _PLAIN,
    "PhiForCausalLM": _PLAIN,
    "Olmo2ForCausalLM": _PLAIN,
    "GPT2LMHeadModel": Family(base="transformer"),
    "GPTNeoXForCausalLM": Family(base="gpt_neox"),
    "CohereForCausalLM": _COHERE,
    "Cohere2ForCausalLM": _COHERE,
    "GraniteForCausalLM": Family(logit_scale=lambda model: 1.0 / model.config.logits_scaling),  # logits / scaling
    "MixtralForCausalLM": _MOE,
    "Qwen2MoeForCausalLM": _MOE,
    "Qwen3MoeForCausalLM": _MOE,
    # vision-language models: the base model merges the image features; lm_head reads its last hidden state
    "Qwen2VLForConditionalGeneration": _PLAIN,
    "Qwen2_5_VLForConditionalGeneration": _PLAIN,
    "LlavaForConditionalGeneration": _PLAIN,
    "Gemma3ForConditionalGeneration": _PLAIN,  # no final soft-cap in its forward (transformers 5.25)
}


def recognise(model: torch.nn.Module, caller: str) -> tuple[torch.nn.Module, type, Family]:
    """``(target, cls, family)``: the transformers model inside ``model``'s wrappers (PEFT, ``torch.compile``), the
    supported class it is an instance of, and that class's :class:`Family`; ``ValueError`` (prefixed with
    ``caller``) saying what was found, what is supported and what to do for anything else."""
    target = unwrap(model)
    name = type(target).__name__
    cls = next((c for c in type(target).__mro__ if c in _supported()), None)
    if cls is None:
        raise ValueError(
            f"{caller}: {type(model).__module__}.{type(model).__name__}"
            f" (config.model_type={getattr(getattr(target, 'config', None), 'model_type', None)!r}) is not a "
            f"supported causal LM; supported: {', '.join(c.__name__ for c in _supported())} and their subclasses "
            "that keep their forward. Other families may transform their logits or loss differently; train them "
            "without apply()."
        )
    if type(target).forward is not cls.forward:
        raise ValueError(
            f"{caller}: {name} subclasses {cls.__name__} but overrides forward; the integration reproduces "
            f"{cls.__name__}.forward and would bypass yours. Use a model whose forward is the library's, or compute "
            "the loss in yours with linear_cross_entropy directly."
        )
    if getattr(target, "loss_function", None) is not ForCausalLMLoss:
        raise ValueError(
            f"{caller}: {name} has a custom loss (loss_function={getattr(target, 'loss_function', None)!r}, "
            f"loss_type={getattr(target, 'loss_type', None)!r}); the integration would replace it with "
            "transformers' ForCausalLMLoss."
        )
    family = _supported()[cls]
    base = getattr(target, family.base, None)
    if not isinstance(base, torch.nn.Module) or base is target:
        raise ValueError(f"{caller}: {name} has no base model at .{family.base}; unknown transformers layout.")
    return target, cls, family


def head_transform(model: torch.nn.Module, family: Family) -> dict:
    """The ``logit_scale`` and ``logit_softcap`` keywords of :func:`linear_cross_entropy` that reproduce what the
    family's forward does to ``lm_head``'s output."""
    cap = model.config.final_logit_softcapping if family.softcap else None
    return {
        "logit_scale": 1.0 if family.logit_scale is None else float(family.logit_scale(model)),
        "logit_softcap": None if cap is None else float(cap),
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside ``torch.compile``'s and PEFT's wrappers."""
    while True:
        dynamo = sys.modules.get("torch._dynamo.eval_frame")  # a compiled module exists only once it is imported
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel):
            model = model.get_base_model()
        else:
            return model


@functools.cache
def _supported() -> dict[type, Family]:
    import transformers

    classes = {name: getattr(transformers, name, None) for name in SUPPORTED_CLASSES}
    return {cls: SUPPORTED_CLASSES[name] for name, cls in classes.items() if cls is not None}
