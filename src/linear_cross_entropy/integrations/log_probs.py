"""Per-token log-probabilities (and entropies) of a Hugging Face causal LM's next tokens, without the logits.

For RL fine-tuning (PPO, GRPO, DPO, KTO): run the base model, then :func:`~linear_cross_entropy.token_log_probs` on
its last hidden states and output embedding, with the model's own final-logit soft-cap and the sampling
temperature; the ``(batch, sequence, vocabulary)`` logits are never formed::

    from linear_cross_entropy.integrations.log_probs import next_token_log_probs

    log_probs, entropy = next_token_log_probs(model, ids, attention_mask, completion_mask, return_entropy=True)
    # (B, T − 1) each: [:, t] is about token ids[:, t + 1]; 0 where completion_mask[:, t + 1] is 0

Which models: those :mod:`.transformers` recognises (the same families and the same base-model attribute, via
:func:`model_head`, the one place that knows them), patched by ``apply`` or not.

Temperature ``T`` divides the model's (soft-capped) logits, as samplers and TRL do: ``(c·tanh(s·r/c))/T =
(c/T)·tanh((s/T)·r/(c/T))``, i.e. ``logit_scale = s/T`` and ``logit_softcap = c/T`` for a model with logit scale
``s`` and soft-cap ``c``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..log_probs import token_log_probs
from ..options import LinearCrossEntropyOptions
from . import _head

__all__ = ["ModelHead", "model_head", "next_token_log_probs"]

_BACKENDS = LinearCrossEntropyOptions()  # fused on CUDA, chunked elsewhere


class ModelHead(NamedTuple):
    """What turns a causal LM's last hidden states into its logits: ``z = c·tanh(s·head(h)/c)``."""

    base: torch.nn.Module  # called with input_ids, attention_mask, ...; returns last_hidden_state (B, T, H)
    head: _head.Head  # the output head's linear map (plain, LoRA, modules_to_save), read without calling it
    logit_scale: float  # s
    logit_softcap: float | None  # c, or None


def model_head(model: torch.nn.Module) -> ModelHead:
    """The base model, head, logit scale and soft-cap of a causal LM the transformers integration recognises (the
    same classes, wrappers and heads as :func:`~linear_cross_entropy.integrations.transformers.apply`, patched or
    not). ``ValueError`` for anything else, saying what was found; ``NotImplementedError`` for a DeepSpeed ZeRO-3
    partitioned head."""
    from .families import head_transform, recognise  # imports transformers

    caller = "linear_cross_entropy.integrations.log_probs.next_token_log_probs"
    target, cls, family = recognise(model, caller)
    head = _head.resolve(target.get_output_embeddings(), f"{cls.__name__}.lm_head")
    if _head.zero3_partitioned(head):
        raise NotImplementedError(f"{caller}: a DeepSpeed ZeRO-3 partitioned lm_head is not supported.")
    transform = head_transform(target, family)
    return ModelHead(getattr(target, family.base), head, transform["logit_scale"], transform["logit_softcap"])


def next_token_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,  # (B, T) int64
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token
    completion_mask: torch.Tensor | None = None,  # (B, T) 1 = a token whose log-prob is wanted
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    options: LinearCrossEntropyOptions | None = _BACKENDS,
    **model_kwargs,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log p(input_ids[:, t + 1] | input_ids[:, ≤ t])`` for ``t < T − 1`` (and the entropy of that next-token
    distribution), differentiable with respect to every parameter, without the logits.

    Args:
        model: a causal LM :func:`model_head` recognises.
        input_ids: ``(B, T)`` prompt and completion tokens.
        attention_mask: ``(B, T)`` or None; passed to the base model. Positions whose next token is masked give 0.
        completion_mask: ``(B, T)`` or None (every next token): the tokens to score; the others give 0 and no
            gradient (their rows still pass through the head's GEMM: no host sync to select them).
        temperature: ``T > 0``: the distribution of ``logits / T``, as sampled.
        return_entropy: also return the entropies.
        options: for :func:`~linear_cross_entropy.token_log_probs` (default: the fused path on CUDA, chunked on the
            CPU; None materialises the logits).
        model_kwargs: passed to the base model (e.g. ``position_ids``).

    Returns:
        ``(B, T − 1)`` fp32 log-probs (fp64 for a fp64 model), or ``(log_probs, entropy)``.
    """
    if not temperature > 0:
        raise ValueError(f"next_token_log_probs: temperature must be > 0, got {temperature!r}")
    head = model_head(model)
    hidden = head.base(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).last_hidden_state
    next_tokens = input_ids[:, 1:]
    keep = torch.ones_like(next_tokens, dtype=torch.bool)
    for mask in (attention_mask, completion_mask):
        if mask is not None:
            keep = keep & mask[:, 1:].bool()
    ignore_index = -100
    device = head.head.base.weight.device
    hidden = hidden[:, :-1].to(device)
    input, weight, bias = _head.operands(head.head, hidden.reshape(-1, hidden.shape[-1]))  # LoRA: [x, s·A·x]
    return token_log_probs(
        input.reshape(*hidden.shape[:-1], input.shape[-1]),
        weight,
        torch.where(keep, next_tokens, ignore_index).to(device),
        linear_bias=bias,
        logit_scale=head.logit_scale / temperature,
        logit_softcap=None if head.logit_softcap is None else head.logit_softcap / temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        options=options,
    )
