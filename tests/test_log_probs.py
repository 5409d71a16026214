"""``token_log_probs``: per-token log-probabilities and entropies, values and gradients, on every path.

The oracle is written here: the full logits, ``log_softmax``, ``gather`` and ``−Σ p·log p``, differentiated by
autograd in float64. The objective is ``Σ a·log p + b·H`` with random per-row ``a``, ``b`` (so both upstream
gradients vary per row). Low-precision runs must stay within twice plain PyTorch's error in the same dtype (logits in
that dtype, softmax in fp32), as ``helpers.assert_within_plain``; the fused path's kernels run in Triton's
interpreter on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CUDA, HAS_TRITON, INTERPRET, assert_within_plain, plain_bound, rel_err, upstream_grad

from linear_cross_entropy import LinearCrossEntropyOptions, token_log_probs

FUSED_HERE = HAS_TRITON and (INTERPRET or HAS_CUDA)
needs_fused = pytest.mark.skipif(not FUSED_HERE, reason="needs triton and CUDA or TRITON_INTERPRET=1")

NAMES = ("log_probs", "entropy", "grad_input", "grad_weight", "grad_bias")


def _problem(n, h, v, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2 / h**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = -100
    t[0] = 1
    return x, w, b, t


def _oracle(x, w, t, linear_bias=None, logit_scale=1.0, logit_softcap=None, ignore_index=-100, **_):
    """Plain PyTorch: logits in the input dtype, ``log_softmax`` in (at least) fp32."""
    z = F.linear(x, w, linear_bias).to(torch.promote_types(x.dtype, torch.float32)) * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    log_p = torch.log_softmax(z, dim=1)
    keep = t != ignore_index
    log_probs = log_p.gather(1, torch.where(keep, t, 0)[:, None])[:, 0] * keep
    entropy = -(log_p.exp() * log_p).sum(dim=1) * keep
    return log_probs, entropy


def _run(fn, x, w, b, t, dtype, a, c, **kw):
    """``fn``'s log-probs and entropies and the gradients of ``Σ a·log p + c·H``, all float64."""
    leaves = [None if v is None else v.detach().to(dtype).requires_grad_() for v in (x, w, b)]
    log_probs, entropy = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], **kw)
    objective = (log_probs * a.to(log_probs.dtype)).sum()
    if c is not None:
        objective = objective + (entropy * c.to(entropy.dtype)).sum()
    objective.backward()
    grads = [None if v is None else v.grad for v in leaves]
    return [None if v is None else v.detach().double() for v in (log_probs, entropy, *grads)]


def _ours(options, **kw):
    def fn(x, w, t, **more):
        return token_log_probs(x, w, t, return_entropy=True, options=options, **kw, **more)

    return fn


EXTRAS = {
    "plain": {},
    "scale+softcap": {"logit_scale": 0.7, "logit_softcap": 2.0},
    "temperature": {"logit_scale": 1 / 0.6},
}
PATHS = {
    "reference": None,
    "chunked": LinearCrossEntropyOptions(backend="chunked", batch_chunk_size=4),
}


def _weights(n, seed=7):
    return upstream_grad(torch.empty(n), seed).double(), upstream_grad(torch.empty(n), seed + 1).double()


@pytest.mark.parametrize("extras", EXTRAS.values(), ids=EXTRAS.keys())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(13, 8, 203), (6, 4, 9)], ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_log_softmax_of_the_logits(path, shape, extras):
    x, w, b, t = _problem(*shape, seed=sum(shape))
    a, c = _weights(shape[0])
    ref = _run(_oracle, x, w, b, t, torch.float64, a, c, **extras)
    ours = _run(_ours(PATHS[path], **extras), x, w, b, t, torch.float64, a, c)
    for name, o, r in zip(NAMES, ours, ref):
        assert rel_err(o, r) <= 1e-13, (name, rel_err(o, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_chunked_low_precision_within_plain_error(dtype):
    x, w, b, t = _problem(33, 16, 301, seed=3)
    a, c = _weights(33)
    ref = _run(_oracle, x, w, b, t, torch.float64, a, c, logit_softcap=3.0)
    plain = _run(_oracle, x, w, b, t, dtype, a, c, logit_softcap=3.0)
    ours = _run(_ours(PATHS["chunked"], logit_softcap=3.0), x, w, b, t, dtype, a, c)
    assert_within_plain(ours, plain, ref, dtype, names=NAMES)


def test_the_tolerance_sees_a_missing_entropy_gradient():
    """The low-precision bound is far tighter than the entropy's share of the gradients: leaving out ``g_H·∂H/∂z``
    (an objective without the entropy term against an oracle with it) fails it many times over."""
    dtype = torch.bfloat16
    x, w, b, t = _problem(33, 16, 301, seed=3)
    a, c = _weights(33)
    ref = _run(_oracle, x, w, b, t, torch.float64, a, c)
    plain = _run(_oracle, x, w, b, t, dtype, a, c)
    without = _run(_ours(PATHS["chunked"]), x, w, b, t, dtype, a, None)
    for i in (2, 3, 4):
        assert rel_err(without[i], ref[i]) > 10 * plain_bound(plain[i], ref[i], dtype)


FUSED = {
    "one-chunk": dict(rows=None, weight_grad_pass="accumulate"),  # the logits kept for backward's second sweep
    "chunks-of-5": dict(rows=5, weight_grad_pass="accumulate"),  # recomputed chunk by chunk in backward
    "chunks-of-5-recompute": dict(rows=5, weight_grad_pass="recompute"),  # + the vocabulary-major weight pass
}


@needs_fused
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("fused", FUSED.values(), ids=FUSED.keys())
@pytest.mark.parametrize("extras", EXTRAS.values(), ids=EXTRAS.keys())
def test_fused_within_plain_error(dtype, fused, extras, force_weight_grad_pass):
    force_weight_grad_pass(fused["weight_grad_pass"])
    device = "cuda" if HAS_CUDA else "cpu"
    x, w, b, t = (v.to(device) for v in _problem(13, 8, 203, seed=11))
    a, c = (v.to(device) for v in _weights(13))
    ref = _run(_oracle, x, w, b, t, torch.float64, a, c, **extras)
    plain = _run(_oracle, x, w, b, t, dtype, a, c, **extras)
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=fused["rows"], chunking_method=None)
    ours = _run(_ours(options, **extras), x, w, b, t, dtype, a, c)
    assert_within_plain(ours, plain, ref, dtype, names=NAMES)


@pytest.mark.parametrize(
    "options",
    [None, PATHS["chunked"]] + ([LinearCrossEntropyOptions(backend="fused", batch_chunk_size=4)] if FUSED_HERE else []),
    ids=["reference", "chunked"] + (["fused"] if FUSED_HERE else []),
)
@pytest.mark.parametrize("used", ["log_probs", "entropy"])
def test_one_output_alone(options, used):
    """Backward with only one of the two outputs in the graph (the other's upstream gradient is None)."""
    x, w, b, t = _problem(9, 4, 11, seed=5)
    dtype = torch.float64 if options is None or options.backend == "chunked" else torch.float32
    a, c = _weights(9)
    a, c = (a, None) if used == "log_probs" else (torch.zeros_like(a), c)

    def run(fn, dtype):
        leaves = [v.detach().to(dtype).requires_grad_() for v in (x, w, b)]
        log_probs, entropy = fn(leaves[0], leaves[1], t, linear_bias=leaves[2])
        out = (log_probs * a.to(log_probs.dtype)).sum() if used == "log_probs" else (entropy * c).sum()
        out.backward()
        return [v.grad.double() for v in leaves]

    ref = run(_oracle, torch.float64)
    ours = run(_ours(options), dtype)
    for name, o, r in zip(NAMES[2:], ours, ref):
        assert rel_err(o, r) <= (1e-13 if dtype == torch.float64 else 1e-5), (name, rel_err(o, r))


def test_ignored_positions_give_zero_and_no_gradient():
    x, w, b, t = _problem(8, 4, 11, seed=2)
    t = t.clamp_min(0)
    t[3] = t[6] = -7
    for options in (None, PATHS["chunked"]):
        xs = x.clone().requires_grad_()
        log_probs, entropy = token_log_probs(xs, w, t, ignore_index=-7, return_entropy=True, options=options)
        assert log_probs[[3, 6]].abs().sum() == 0 and entropy[[3, 6]].abs().sum() == 0
        (log_probs.sum() + entropy.sum()).backward()
        assert xs.grad[[3, 6]].abs().sum() == 0 and xs.grad[[0, 1]].abs().sum() > 0


def test_leading_shape_and_dtype():
    """``(B, T, H)`` hidden states give ``(B, T)`` outputs, fp32 for a bf16 input (the ratio of RL needs it)."""
    x, w, _, t = _problem(12, 8, 50, seed=4)
    x3, t2 = x.reshape(3, 4, 8).bfloat16(), t.reshape(3, 4)
    for options in (None, PATHS["chunked"]):
        log_probs, entropy = token_log_probs(x3, w.bfloat16(), t2, return_entropy=True, options=options)
        assert log_probs.shape == entropy.shape == (3, 4)
        assert log_probs.dtype == entropy.dtype == torch.float32
    flat = token_log_probs(x3.reshape(12, 8), w.bfloat16(), t, options=PATHS["chunked"])
    torch.testing.assert_close(flat.reshape(3, 4), log_probs, rtol=0, atol=0)


def test_bad_input_raises_naming_the_argument():
    x, w, _, t = _problem(6, 4, 9, seed=1)
    with pytest.raises(RuntimeError, match="target of class indices with input's leading shape"):
        token_log_probs(x, w, t[:5])
    with pytest.raises(RuntimeError, match="target of class indices"):
        token_log_probs(x, w, t.double())
    with pytest.raises(RuntimeError, match=r"weight of shape \(V, H\)"):
        token_log_probs(x, w[:, None], t)
    with pytest.raises(ValueError, match="logit_softcap"):
        token_log_probs(x, w, t, logit_softcap=0.0)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        token_log_probs(x, w, torch.tensor([0, 1, 9, 2, 3, 4]), options=PATHS["chunked"])
    with pytest.raises(RuntimeError, match="dtype"):
        token_log_probs(x, w.float(), t)


@needs_fused
def test_tiled_falls_back_to_fused_with_one_warning():
    x, w, b, t = _problem(6, 4, 9, seed=1)
    x, w = x.float(), w.float()
    if HAS_CUDA:
        x, w, t = x.cuda(), w.cuda(), t.cuda()
    with pytest.warns(UserWarning, match="tiled"):
        ours = token_log_probs(x, w, t, options=LinearCrossEntropyOptions(backend="tiled"))
    fused = token_log_probs(x, w, t, options=LinearCrossEntropyOptions(backend="fused"))
    torch.testing.assert_close(ours, fused, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [None, 96], ids=["one-chunk", "chunks"])
def test_gpu_fused_within_plain_error(dtype, rows):
    """The GPU's kernels at a size where the row kernel takes several column steps (V = 40000)."""
    x, w, b, t = (v.cuda() for v in _problem(384, 256, 40000, seed=21))
    a, c = (v.cuda() for v in _weights(384))
    extras = {"logit_scale": 0.9, "logit_softcap": 30.0}
    ref = _run(_oracle, x, w, b, t, torch.float64, a, c, **extras)
    plain = _run(_oracle, x, w, b, t, dtype, a, c, **extras)
    options = LinearCrossEntropyOptions(backend="fused", batch_chunk_size=rows, chunking_method=None)
    ours = _run(_ours(options, **extras), x, w, b, t, dtype, a, c)
    assert_within_plain(ours, plain, ref, dtype, names=NAMES)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_fused_has_no_host_sync():
    x, w, b, t = (v.cuda().bfloat16() if v.is_floating_point() else v.cuda() for v in _problem(256, 128, 5000, 3))
    x.requires_grad_(), w.requires_grad_()
    options = LinearCrossEntropyOptions(backend="fused")
    token_log_probs(x, w, t, return_entropy=True, options=options)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        log_probs, entropy = token_log_probs(x, w, t, return_entropy=True, options=options)
        (log_probs.sum() + 0.1 * entropy.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------------------------------
# Hugging Face: next_token_log_probs against the model's own logits; the GRPO example.

_HF_COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    attn_implementation="eager",
)


def _hf_model(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_HF_COMMON))
    elif family == "gemma2":  # final-logit soft-capping, small enough to bend these logits
        config = transformers.Gemma2Config(**_HF_COMMON, head_dim=8, final_logit_softcapping=2.0)
        model = transformers.Gemma2ForCausalLM(config)
    elif family == "granite":  # logits divided by config.logits_scaling
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**_HF_COMMON, logits_scaling=0.25))
    elif family == "llama-lora":  # PEFT LoRA on lm_head: the head is [x, s·A·x]·[W, B]ᵀ
        peft = pytest.importorskip("peft")
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_HF_COMMON))
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
        return peft.get_peft_model(model.double(), lora).eval()
    else:
        config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    return model.double().eval()


@pytest.mark.parametrize("options", [None, PATHS["chunked"]], ids=["reference", "chunked"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "llama-lora", "gpt2"])
def test_hf_next_token_log_probs_match_the_models_logits(family, options):
    from linear_cross_entropy.integrations.log_probs import next_token_log_probs

    model = _hf_model(family)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (3, 12), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 9:] = 0  # right padding
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    a, c = (torch.randn(3, 11, generator=g, dtype=torch.float64) for _ in range(2))
    temperature = 0.7

    def grads_of(fn):
        model.zero_grad()
        log_probs, entropy = fn()
        ((a * log_probs).sum() + (c * entropy).sum()).backward()
        return [log_probs.detach(), entropy.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def from_logits():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1] / temperature
        log_p = torch.log_softmax(logits, dim=-1)
        keep = (attention[:, 1:] * completion[:, 1:]).bool()
        return log_p.gather(-1, ids[:, 1:, None])[..., 0] * keep, -(log_p.exp() * log_p).sum(-1) * keep

    ref = grads_of(from_logits)
    ours = grads_of(
        lambda: next_token_log_probs(
            model, ids, attention, completion, temperature=temperature, return_entropy=True, options=options
        )
    )
    assert ours[0].shape == (3, 11) and ours[0][1, 8:].abs().sum() == 0 and ours[0][:, :4].abs().sum() == 0
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert rel_err(o, r) <= 1e-12, (i, rel_err(o, r))


def test_hf_unsupported_model_is_refused():
    transformers = pytest.importorskip("transformers")
    from linear_cross_entropy.integrations.log_probs import next_token_log_probs

    model = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with pytest.raises(ValueError, match="BertModel.*not a supported causal LM"):
        next_token_log_probs(model, torch.zeros(1, 4, dtype=torch.long))


def test_grpo_example_agrees_with_the_full_logits():
    pytest.importorskip("transformers")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "grpo_step.py"
    spec = importlib.util.spec_from_file_location("grpo_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == 0
