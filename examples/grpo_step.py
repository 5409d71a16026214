"""One GRPO-style policy-gradient step on a tiny random Llama, with per-token log-probs and entropies from
``next_token_log_probs`` (no logits), checked against the same step computed from ``log_softmax`` of the full logits.

The step (DeepSeekMath's GRPO with an entropy bonus): ``G`` completions per prompt, rewards normalised within each
group into advantages ``A = (r − mean_group) / (std_group + 1e-4)``; per completion token the clipped surrogate
``min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A)`` with ``ρ = exp(log p − log p_old)`` (``log p_old`` from a stale copy of the
policy, so the clip is active), plus ``β·H``; each sequence's mean over its completion tokens, then the mean over
sequences, negated. Sampling temperature ``T`` as the sampler used it.

The yardstick is the same step in float64 from the full logits; the reference in float32 (full logits) shows the
rounding a float32 run cannot avoid. The check: ours (float32, no logits) within 4× the float32 reference's error of
float64, for the loss and every parameter's gradient (``‖g − g64‖ / ‖g64‖``), plus a floor of 1e-7.

    python examples/grpo_step.py          # CPU; on a CUDA machine the model runs there (fused kernels)
"""

from __future__ import annotations

import copy
import sys

import torch
import transformers

from linear_cross_entropy.integrations.log_probs import next_token_log_probs

PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN = 2, 4, 8, 16
CLIP, ENTROPY_BONUS, TEMPERATURE = 0.2, 0.01, 0.8


def tiny_policy(device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).to(device).eval()  # eval: no dropout; gradients still flow


def rollout_batch(device):
    """Prompts repeated ``GROUP`` times, random completions of random lengths (right-padded), rewards."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 512, (PROMPTS, PROMPT_LEN), generator=g).repeat_interleave(GROUP, dim=0)
    completions = torch.randint(1, 512, (PROMPTS * GROUP, COMPLETION_LEN), generator=g)
    lengths = torch.randint(4, COMPLETION_LEN + 1, (PROMPTS * GROUP,), generator=g)
    in_completion = torch.arange(COMPLETION_LEN)[None, :] < lengths[:, None]
    input_ids = torch.cat([prompts, torch.where(in_completion, completions, 0)], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompts), in_completion.long()], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompts), in_completion.long()], dim=1)
    rewards = torch.rand(PROMPTS * GROUP, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (input_ids, attention_mask, completion_mask, rewards)]


def from_logits(model, input_ids, attention_mask, completion_mask, temperature):
    """The usual way: the model's full logits (soft-cap included) / T, ``log_softmax``, gather, entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T − 1, V)
    log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    keep = (attention_mask[:, 1:] * completion_mask[:, 1:]).bool()
    log_probs = log_p.gather(-1, input_ids[:, 1:, None])[..., 0] * keep
    entropy = -(log_p.exp() * log_p).sum(-1) * keep
    return log_probs, entropy


def ours(model, input_ids, attention_mask, completion_mask, temperature):
    return next_token_log_probs(
        model, input_ids, attention_mask, completion_mask, temperature=temperature, return_entropy=True
    )


def grpo_loss(log_probs, entropy, old_log_probs, rewards, completion_mask):
    """``(B, T − 1)`` per-token inputs → the scalar GRPO objective to minimise."""
    grouped = rewards.view(PROMPTS, GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
    advantages = advantages.to(log_probs.dtype)
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - CLIP, 1 + CLIP) * advantages)
    mask = completion_mask[:, 1:].to(log_probs.dtype)
    per_token = surrogate + ENTROPY_BONUS * entropy
    return -((per_token * mask).sum(1) / mask.sum(1)).mean(), ((ratio - 1).abs() > CLIP)[mask.bool()].float().mean()


def step(model, log_prob_fn, batch, old_log_probs):
    """The loss and every parameter's gradient (a copy of the model, so runs do not share gradients)."""
    model = copy.deepcopy(model)
    input_ids, attention_mask, completion_mask, rewards = batch
    log_probs, entropy = log_prob_fn(model, input_ids, attention_mask, completion_mask, TEMPERATURE)
    loss, clipped = grpo_loss(log_probs, entropy, old_log_probs.to(log_probs.dtype), rewards, completion_mask)
    loss.backward()
    grads = {name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach().double(), grads, clipped.item()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = tiny_policy(device)
    batch = rollout_batch(device)
    stale = copy.deepcopy(policy)  # the policy that sampled: a few optimiser steps behind
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(torch.randn_like(p) * 0.003)
        old_log_probs = next_token_log_probs(stale, *batch[:3], temperature=TEMPERATURE).double()

    loss64, grads64, clipped = step(policy.double(), from_logits, batch, old_log_probs)
    policy = policy.float()
    loss32, grads32, _ = step(policy, from_logits, batch, old_log_probs)
    loss_ours, grads_ours, _ = step(policy, ours, batch, old_log_probs)

    assert grads64.keys() == grads32.keys() == grads_ours.keys()
    worst_ours = max(rel(grads_ours[k], grads64[k]) for k in grads64)
    worst_ref = max(rel(grads32[k], grads64[k]) for k in grads64)
    loss_err_ours, loss_err_ref = rel(loss_ours, loss64), rel(loss32, loss64)
    print(f"GRPO step, {PROMPTS} prompts x {GROUP} completions, tiny Llama (V=512), T={TEMPERATURE}, on {device}")
    print(f"loss (float64, full logits): {loss64.item():.10f}; tokens outside the clip range: {clipped:.0%}")
    print("relative error against float64 | loss    | worst parameter gradient")
    print(f"float32, full logits           | {loss_err_ref:.1e} | {worst_ref:.1e}")
    print(f"float32, ours (no logits)      | {loss_err_ours:.1e} | {worst_ours:.1e}")
    ok = loss_err_ours <= 4 * loss_err_ref + 1e-7 and all(
        rel(grads_ours[k], grads64[k]) <= 4 * rel(grads32[k], grads64[k]) + 1e-7 for k in grads64
    )
    print("agree:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
