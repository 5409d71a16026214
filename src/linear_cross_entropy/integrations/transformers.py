"""Hugging Face ``transformers`` causal LMs: the training loss straight from the final hidden states.

``apply(model)`` patches one model instance so that a forward call **with** ``labels`` computes the loss with
:func:`~linear_cross_entropy.linear_cross_entropy` from the last hidden states and the output embedding, never
materialising the ``(batch · sequence, vocabulary)`` logits (the output's ``logits`` is ``None``). A call without
``labels`` (inference, ``generate``) runs the model's own ``forward`` unchanged and returns its logits::

    from transformers import AutoModelForCausalLM
    from linear_cross_entropy.integrations import transformers as lce_hf

    model = lce_hf.apply(AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B"))
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss   # logits never held

How: the instance's ``forward`` is replaced (only on that instance; ``functools.wraps`` keeps the original signature
for ``Trainer`` and ``generate``) by a function that, given ``labels``, runs the base model (``model.model``, or
``model.transformer`` for GPT-2) with the arguments the original ``forward`` passes it, takes its
``last_hidden_state`` and calls ``linear_cross_entropy(hidden, model.get_output_embeddings().weight, shifted_labels,
linear_bias=...)``: the computation of the original's ``lm_head`` → (soft-cap) → ``ForCausalLMLoss``, without the
logits. Transformers' internals are not touched. In detail:

- label shift: labels are padded with ``ignore_index`` on the right and shifted left by one, as transformers does
  (position ``t`` predicts token ``t + 1``; the last position is ignored); a ``shift_labels=`` keyword (already
  shifted, as transformers accepts) is used as given;
- ``ignore_index`` (default ``-100``) is passed through;
- ``num_items_in_batch`` (passed by ``Trainer`` under gradient accumulation): ``reduction="sum"`` divided by it;
  otherwise ``reduction="mean"`` over the non-ignored tokens;
- tied embeddings: the output embedding's ``weight`` *is* the input embedding when tied, so its gradient collects
  both uses as in the original; an ``lm_head`` bias, if any, is passed as ``linear_bias``;
- Gemma 2/3 final-logit soft-capping (``config.final_logit_softcapping = c``, logits ``c·tanh(z / c)``): passed as
  ``logit_softcap=c`` where ``linear_cross_entropy`` accepts that keyword; otherwise ``apply`` (and the forward)
  raise ``NotImplementedError`` instead of computing an uncapped loss.

Supported (each one's ``forward`` is "base model → ``last_hidden_state`` → ``lm_head`` → [soft-cap] →
``ForCausalLMLoss``" in transformers 4.57 and 5.x; each is tested against the model's own loss and gradients):
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``GemmaForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``, ``GPT2LMHeadModel``. Other classes are refused
(``ValueError``): a family that scales its logits (Cohere, Granite, ...) or has a custom loss would silently get a
different loss from a generic patch. A model whose ``loss_function`` was replaced is refused for the same reason.

The loss dtype: default options are ``LinearCrossEntropyOptions(loss_dtype=torch.float32)``, the fp32 loss that
transformers' own ``ForCausalLMLoss`` returns (it upcasts the logits with ``.float()``; note that this also rounds a
float64 model's loss to fp32; pass ``options=LinearCrossEntropyOptions()`` to keep the input's dtype).

Limitations: the ``lm_head`` module's own ``forward`` is not called on the training path, so hooks on it, tensor
parallel plans for ``lm_head`` and FSDP wrapping of ``lm_head`` alone are bypassed. ``apply`` refuses a model whose
``forward`` was already replaced on the instance (e.g. ``model.forward = torch.compile(model.forward)``, or
accelerate's hooks on a model dispatched with a ``device_map``): apply it first. A labelled call with
``logits_to_keep != 0`` is handed to the original ``forward``. Evaluation that needs logits (``compute_metrics``)
must call without ``labels``. Tested with transformers 4.57.6 and 5.23.0 on the CPU.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

from ..functional import linear_cross_entropy
from ..options import LinearCrossEntropyOptions

__all__ = ["SUPPORTED_CLASSES", "apply", "is_applied", "remove"]

# Class name -> (attribute holding the base model whose ``last_hidden_state`` feeds ``lm_head``, output class).
SUPPORTED_CLASSES: dict[str, tuple[str, type]] = {
    "LlamaForCausalLM": ("model", CausalLMOutputWithPast),
    "MistralForCausalLM": ("model", CausalLMOutputWithPast),
    "Qwen2ForCausalLM": ("model", CausalLMOutputWithPast),
    "Qwen3ForCausalLM": ("model", CausalLMOutputWithPast),
    "GemmaForCausalLM": ("model", CausalLMOutputWithPast),
    "Gemma2ForCausalLM": ("model", CausalLMOutputWithPast),
    "Gemma3ForCausalLM": ("model", CausalLMOutputWithPast),
    "Phi3ForCausalLM": ("model", CausalLMOutputWithPast),
    "GPT2LMHeadModel": ("transformer", CausalLMOutputWithCrossAttentions),
}

# Keywords of the original forward that belong to the head and the loss, not to the base model.
_HEAD_KEYWORDS = ("labels", "logits_to_keep", "return_dict", "num_items_in_batch", "ignore_index", "shift_labels")

_OPTIONS = "_lce_options"


def apply(model: torch.nn.Module, *, options: LinearCrossEntropyOptions | None = None) -> torch.nn.Module:
    """Make ``model`` (one instance, in place) compute its labelled loss with :func:`linear_cross_entropy`.

    Args:
        model: an instance of one of :data:`SUPPORTED_CLASSES`.
        options: passed to :func:`linear_cross_entropy`; ``None`` means
            ``LinearCrossEntropyOptions(loss_dtype=torch.float32)``. Applying again only replaces the options.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: unsupported class, replaced ``loss_function`` or an output embedding that is not a linear layer.
        NotImplementedError: the model soft-caps its logits and ``linear_cross_entropy`` has no ``logit_softcap``.
    """
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise ValueError(
            f"linear_cross_entropy.integrations.transformers.apply: {name} is not supported; supported classes: "
            f"{', '.join(SUPPORTED_CLASSES)}."
        )
    if "_loss_function" in vars(model) or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(
            f"{name} has a custom loss (loss_function / loss_type); apply() would replace it with plain causal "
            "LM cross entropy."
        )
    base = getattr(model, SUPPORTED_CLASSES[name][0], None)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ValueError(f"{name} has no base model at .{SUPPORTED_CLASSES[name][0]}; unknown transformers layout.")
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"{name}'s output embedding is {type(head).__name__}, expected torch.nn.Linear.")
    if "forward" in vars(model) and not is_applied(model):
        raise ValueError(
            f"This {name}'s forward was already replaced on the instance (accelerate's device-map hooks, "
            "torch.compile(model.forward), another patch); apply() must come first, on the plain model."
        )
    _softcap_kwargs(model.config)  # fail now, not at the first training step

    setattr(model, _OPTIONS, options if options is not None else LinearCrossEntropyOptions(loss_dtype=torch.float32))
    if not is_applied(model):

        @functools.wraps(type(model).forward)  # the original's name, docstring and signature (Trainer reads it)
        def forward(self, *args, **kwargs):
            return _forward(self, *args, **kwargs)

        forward._linear_cross_entropy = True

        model.forward = types.MethodType(forward, model)  # this instance only; copy.deepcopy rebinds it
    return model


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` patched ``model``."""
    forward = vars(model).get("forward")
    return getattr(getattr(forward, "__func__", None), "_linear_cross_entropy", False)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply` on ``model`` (a no-op if it was not applied); returns ``model``."""
    if is_applied(model):
        del model.forward  # the instance attribute: the class's forward shows through again
        delattr(model, _OPTIONS)
    return model


def _forward(self, *args, **kwargs):
    """The patched forward: the original without ``labels``, the base model + :func:`linear_cross_entropy` with."""
    original = type(self).forward.__get__(self)
    call = _bind(type(self), args, kwargs)
    labels, logits_to_keep = call.get("labels"), call.get("logits_to_keep", 0)
    if labels is None or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return original(*args, **kwargs)  # no loss (inference, generate) or a labelled logits_to_keep: unchanged

    head = {key: call.pop(key, None) for key in _HEAD_KEYWORDS}
    ignore_index = -100 if head["ignore_index"] is None else head["ignore_index"]
    return_dict = head["return_dict"]
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    base_attribute, output_class = SUPPORTED_CLASSES[type(self).__name__]
    outputs = getattr(self, base_attribute)(**call, return_dict=True)  # what the original passes on to it
    hidden = outputs.last_hidden_state
    lm_head = self.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias

    shift_labels = head["shift_labels"]
    if shift_labels is None:  # as transformers' ForCausalLMLoss: position t predicts token t + 1
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = head["num_items_in_batch"]
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]).to(weight.device),
        weight,
        shift_labels.reshape(-1).to(weight.device),
        linear_bias=bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        options=getattr(self, _OPTIONS),
        **_softcap_kwargs(self.config),
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

    fields = {k: v for k, v in outputs.items() if k in output_class.__dataclass_fields__}
    output = output_class(loss=loss, logits=None, **fields)
    return output if return_dict else output.to_tuple()


def _bind(cls: type, args: tuple, kwargs: dict) -> dict:
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


def _softcap_kwargs(config) -> dict:
    """``{"logit_softcap": c}`` for a model that soft-caps its final logits, ``{}`` for one that does not."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return {}
    if "logit_softcap" not in inspect.signature(linear_cross_entropy).parameters:
        raise NotImplementedError(
            f"This model soft-caps its final logits (config.final_logit_softcapping={cap}), and this version of "
            "linear_cross_entropy has no logit_softcap argument; its loss would differ from the model's. Set "
            "config.final_logit_softcapping = None to train without the cap, or upgrade linear-cross-entropy."
        )
    return {"logit_softcap": float(cap)}
