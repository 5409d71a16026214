"""Integrations with training stacks. Each submodule imports its framework lazily, on import of the submodule.

- :mod:`linear_cross_entropy.integrations.transformers`: ``apply(model)`` makes a Hugging Face causal LM compute its
  training loss with :func:`~linear_cross_entropy.linear_cross_entropy`, without the logits (extra ``transformers``).
- :mod:`linear_cross_entropy.integrations.log_probs`: ``next_token_log_probs(model, input_ids, ...)``, per-token
  log-probabilities and entropies of a causal LM's next tokens with gradients, for RL (same models and extra).
- :mod:`linear_cross_entropy.integrations.trl`: ``apply(trainer)`` puts it in place of TRL's own fused LM head in an
  ``SFTTrainer`` (needs ``trl``).
"""
