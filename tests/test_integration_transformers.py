"""``integrations.transformers.apply``: a patched causal LM's loss and gradients equal the model's own.

Every family is a tiny randomly initialised model built here (no hub download) in float64. Two yardsticks:

- **exact**: the unpatched model's own logits (its forward without labels, soft-cap included), shifted and reduced
  here with ``F.cross_entropy`` in float64 — the patch must agree to ``EXACT`` = 1e-10 relative (float64 rounding
  of differently ordered sums; measured: 1.2e-15 at worst over all families, loss and gradients);
- **native**: the unpatched model called with ``labels`` (transformers' ``ForCausalLMLoss``: its label shift,
  ``ignore_index``, ``num_items_in_batch``). That path upcasts/downcasts the logits to float32 (``logits.float()``)
  even for a float64 model, so it is only float32-accurate: ``NATIVE`` = 2**-24 · 128 ≈ 7.6e-6 relative (float32's
  unit roundoff times a margin for the V-term sums; measured: 3.3e-7 at worst).

The families are those of ``SUPPORTED_CLASSES``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-3
and GPT-2. A ``Trainer`` run with gradient accumulation is checked too where ``accelerate`` is installed.

Gradients are compared per parameter as ``‖g − g_ref‖ / ‖g_ref‖``; a parameter without a gradient on one side must
have none on the other.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from linear_cross_entropy import LinearCrossEntropyOptions, linear_cross_entropy  # noqa: E402
from linear_cross_entropy.integrations import transformers as lce_hf  # noqa: E402

EXACT = 1e-10
NATIVE = 2.0**-24 * 128
V = 97
HAS_SOFTCAP = "logit_softcap" in inspect.signature(linear_cross_entropy).parameters
F64 = LinearCrossEntropyOptions()  # loss in the input's dtype (float64 here)

_COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,  # logits of order 1, so that the loss and the soft-cap are not trivial
    pad_token_id=0,
    attn_implementation="eager",
)

FAMILIES = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_COMMON, **kw})),
    "mistral": lambda **kw: transformers.MistralForCausalLM(transformers.MistralConfig(**{**_COMMON, **kw})),
    "qwen2": lambda **kw: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**_COMMON, **kw})),
    "qwen3": lambda **kw: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**_COMMON, "head_dim": 8, **kw})),
    "gemma": lambda **kw: transformers.GemmaForCausalLM(transformers.GemmaConfig(**{**_COMMON, "head_dim": 8, **kw})),
    "gemma2": lambda **kw: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**{**_COMMON, "head_dim": 8, "final_logit_softcapping": None, **kw})
    ),
    "gemma3": lambda **kw: transformers.Gemma3ForCausalLM(
        transformers.Gemma3TextConfig(**{**_COMMON, "head_dim": 8, **kw})
    ),
    "phi3": lambda **kw: transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**_COMMON, **kw})),
    "gpt2": lambda **kw: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2, **kw
        )
    ),
}


def make(family: str, dtype=torch.float64, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return FAMILIES[family](**config).to(dtype).eval()  # eval: no dropout (GPT-2 has some); gradients still flow


def batch(seed: int = 1):
    """3 sequences of 16 tokens: row 1 right-padded (mask 0, labels -100), a few prompt tokens masked to -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.clone()
    labels[1, 11:] = -100
    labels[0, :4] = -100
    labels[2, torch.randperm(16, generator=g)[:3]] = -100
    return ids, mask, labels


def oracle_loss(logits, labels, num_items_in_batch=None):
    """Position t predicts token t + 1, in float64 (the shift done here, independently of both implementations)."""
    z, y = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(z, y, ignore_index=-100)
    return F.cross_entropy(z, y, ignore_index=-100, reduction="sum") / num_items_in_batch


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same(got, ref, tol, what):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert rel(loss.double(), ref_loss.double()) <= tol, (what, loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), (what, name)
        if g is not None:
            assert rel(g, ref_grads[name]) <= tol, (what, name, rel(g, ref_grads[name]))


def check_against_both(model, ids, mask, labels, num_items_in_batch=None):
    """The patched copy against the exact float64 oracle and against the model's native labelled loss."""
    native, patched = copy.deepcopy(model), lce_hf.apply(copy.deepcopy(model), options=F64)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

    def ours(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        assert out.logits is None
        return out.loss

    got = loss_and_grads(patched, ours)
    exact = loss_and_grads(
        native, lambda m: oracle_loss(m(input_ids=ids, attention_mask=mask).logits, labels, num_items_in_batch)
    )
    assert_same(got, exact, EXACT, "exact")
    hf = loss_and_grads(native, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss)
    assert_same(got, hf, NATIVE, "native")
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_native(family):
    ids, mask, labels = batch()
    check_against_both(make(family), ids, mask, labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_num_items_in_batch(family):
    """Gradient accumulation: sum over tokens / num_items_in_batch (here not the batch's own count)."""
    ids, mask, labels = batch(2)
    check_against_both(make(family), ids, mask, labels, num_items_in_batch=torch.tensor(57))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_labels_returns_native_logits(family):
    model = make(family)
    patched = lce_hf.apply(copy.deepcopy(model))
    ids, mask, _ = batch()
    with torch.no_grad():
        ref, out = model(input_ids=ids, attention_mask=mask), patched(input_ids=ids, attention_mask=mask)
    assert out.loss is None and torch.equal(out.logits, ref.logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_embeddings(family):
    """GPT-2 ties by default; Llama with tie_word_embeddings=True. The tied weight's gradient has both uses."""
    model = make(family, **({"tie_word_embeddings": True} if family == "llama" else {}))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    patched = lce_hf.apply(copy.deepcopy(model), options=F64)
    assert patched.get_output_embeddings().weight is patched.get_input_embeddings().weight
    check_against_both(model, *batch(3))


def test_untied_llama_has_separate_gradients():
    model = make("llama")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    _, grads = check_against_both(model, *batch(3))
    assert grads["lm_head.weight"] is not None and grads["model.embed_tokens.weight"] is not None


def test_lm_head_bias():
    """A head with a bias (none of the stock families has one) is passed as linear_bias."""
    model = make("llama")
    torch.manual_seed(5)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(V, dtype=torch.float64))
    check_against_both(model, *batch(4))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_final_logit_softcapping(family):
    """Gemma-2 style c·tanh(z/c) on the final logits, passed as logit_softcap= (refused where unsupported)."""
    model = make(family, final_logit_softcapping=2.0)  # small cap: it bends logits of order 1
    if not HAS_SOFTCAP:
        with pytest.raises(NotImplementedError, match="logit_softcap"):
            lce_hf.apply(copy.deepcopy(model))
        return
    ids, mask, labels = batch(5)
    check_against_both(model, ids, mask, labels)
    check_against_both(model, ids, mask, labels, num_items_in_batch=torch.tensor(40))


def test_softcap_refused_without_support(monkeypatch):
    """A linear_cross_entropy without logit_softcap: soft-capped models are refused, others still work."""

    def without_softcap(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                        ignore_index=None, label_smoothing=0.0, options=None):  # fmt: skip
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, reduction=reduction,
                                    ignore_index=ignore_index, options=options)  # fmt: skip

    monkeypatch.setattr(lce_hf, "linear_cross_entropy", without_softcap)
    with pytest.raises(NotImplementedError, match=r"final_logit_softcapping=30\.0.*no logit_softcap"):
        lce_hf.apply(make("gemma2", final_logit_softcapping=30.0))
    check_against_both(make("gemma2"), *batch(5))  # final_logit_softcapping=None


def test_shift_labels_keyword():
    """transformers accepts already shifted labels as shift_labels= (used as given, with labels present)."""
    model = make("qwen2")
    ids, mask, labels = batch(6)
    shifted = torch.roll(labels, 3, dims=1)  # anything: it is used as is
    native, patched = copy.deepcopy(model), lce_hf.apply(copy.deepcopy(model), options=F64)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
    ref = native(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
    logits = native(input_ids=ids, attention_mask=mask).logits
    exact = F.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1), ignore_index=-100)
    assert rel(got, exact) <= EXACT and rel(got, ref.double()) <= NATIVE


def test_default_options_float32_loss():
    """Default options: the float32 loss transformers returns, on a float32 model, within float32 rounding."""
    model = make("mistral", dtype=torch.float32)
    ids, mask, labels = batch(7)
    patched = lce_hf.apply(copy.deepcopy(model))
    got = loss_and_grads(patched, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    ref = loss_and_grads(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert got[0].dtype == torch.float32
    assert_same(got, ref, NATIVE, "float32")
    bf16 = lce_hf.apply(make("mistral", dtype=torch.bfloat16))
    assert bf16(input_ids=ids, labels=labels).loss.dtype == torch.float32


def test_return_dict_false_and_signature():
    model = lce_hf.apply(make("gpt2"), options=F64)
    ids, mask, labels = batch()
    out = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0  # (loss, past_key_values): logits None, left out
    assert isinstance(model(ids, return_dict=False)[0], torch.Tensor)  # logits
    # Trainer keeps the dataset columns named in forward's signature and passes num_items_in_batch to **kwargs
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "kwargs"} <= params.keys()


def test_apply_twice_remove_and_deepcopy():
    model = make("llama")
    assert lce_hf.apply(model) is model and lce_hf.is_applied(model)
    lce_hf.apply(model, options=F64)  # only replaces the options
    ids, mask, labels = batch()
    assert model(input_ids=ids, labels=labels).loss.dtype == torch.float64
    clone = copy.deepcopy(model)
    assert lce_hf.is_applied(clone) and clone.forward.__self__ is clone
    assert clone(input_ids=ids, labels=labels).logits is None
    lce_hf.remove(model)
    assert not lce_hf.is_applied(model) and model(input_ids=ids, labels=labels).logits is not None


def test_generate_unchanged():
    model = make("llama")
    patched = lce_hf.apply(copy.deepcopy(model))
    ids = batch()[0][:1, :5]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), model.generate(ids, **kw))


def test_refusals():
    cfg = transformers.LlamaConfig(**_COMMON)
    with pytest.raises(ValueError, match="not supported"):
        lce_hf.apply(transformers.LlamaForSequenceClassification(cfg))
    model = make("llama")
    model.loss_function = lambda *a, **k: None
    with pytest.raises(ValueError, match="custom loss"):
        lce_hf.apply(model)


def test_refuses_a_forward_already_replaced():
    model = make("llama")
    model.forward = torch.compile(model.forward, backend="eager")  # any instance-level replacement
    with pytest.raises(ValueError, match="already replaced"):
        lce_hf.apply(model)


def test_trainer_with_gradient_accumulation(tmp_path):
    """Trainer passes num_items_in_batch (it reads forward's signature): logged losses equal the native model's."""
    pytest.importorskip("accelerate")  # Trainer needs it; not part of the transformers extra
    model = make("llama", dtype=torch.float32).train()
    ids = torch.randint(1, V, (8, 16), generator=torch.Generator().manual_seed(8))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def train(m):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=m, args=args, train_dataset=dataset)
        trainer.train()
        return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    native, native_losses = train(copy.deepcopy(model))
    patched, losses = train(lce_hf.apply(copy.deepcopy(model)))
    assert patched.model_accepts_loss_kwargs and native.model_accepts_loss_kwargs
    assert len(losses) == len(native_losses) == 2
    for got, ref in zip(losses, native_losses):
        assert abs(got - ref) <= NATIVE * abs(ref)


def test_every_supported_class_is_tested():
    assert {type(make(family)).__name__ for family in FAMILIES} == set(lce_hf.SUPPORTED_CLASSES)
