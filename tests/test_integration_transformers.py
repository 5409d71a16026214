"""``integrations.transformers.apply``: a patched causal LM's loss and gradients equal the model's own.

Every family is a tiny randomly initialised model built here (no hub download) in float64. Two yardsticks:

- **exact**: the unpatched model's own logits (its forward without labels, soft-cap included), shifted and reduced
  here with ``F.cross_entropy`` in float64 — the patch must agree to ``EXACT`` = 1e-10 relative (float64 rounding
  of differently ordered sums; measured: 1.2e-15 at worst over all families, loss and gradients);
- **native**: the unpatched model called with ``labels`` (transformers' ``ForCausalLMLoss``: its label shift,
  ``ignore_index``, ``num_items_in_batch``). That path upcasts/downcasts the logits to float32 (``logits.float()``)
  even for a float64 model, so it is only float32-accurate: ``NATIVE`` = 2**-24 · 128 ≈ 7.6e-6 relative (float32's
  unit roundoff times a margin for the V-term sums; measured: 3.3e-7 at worst).

The families are those of ``SUPPORTED_CLASSES`` (``FAMILIES`` here, one parity test over all of them): Llama,
Mistral, Qwen2, Qwen3, Gemma 1/2/3, Phi, Phi-3, OLMo2, Cohere, Cohere2, Granite (logit scale), Mixtral, Qwen2-MoE,
Qwen3-MoE (router auxiliary loss on), GPT-NeoX, GPT-2, and the language heads of Qwen2-VL, Qwen2.5-VL, Llava and
Gemma 3 (multimodal) with image inputs. Models are in training mode (the patched path) with dropout off.
``Trainer`` training with gradient accumulation and ``Trainer.evaluate`` with ``compute_metrics`` are checked where
``accelerate`` is installed.

Gradients are compared per parameter as ``‖g − g_ref‖ ≤ tol · ‖g_ref‖``; a gradient that is zero in exact
arithmetic (below ``tol`` times the norm of all gradients, e.g. an attention key bias's) is rounding noise on both
sides and is held to ``tol`` times that norm instead. A parameter without a gradient on one side must have none on
the other.
"""

from __future__ import annotations

import copy
import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

transformers = pytest.importorskip("transformers")

from linear_cross_entropy import LinearCrossEntropyOptions  # noqa: E402
from linear_cross_entropy.integrations import transformers as lce_hf  # noqa: E402

EXACT = 1e-10
NATIVE = 2.0**-24 * 128
V = 97
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
    bos_token_id=None,
    eos_token_id=None,
    attn_implementation="eager",
)
_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3, experts_implementation="eager")
_MROPE = dict(_COMMON, head_dim=8, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
_QWEN_VL_TOKENS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8)
_QWEN_VL_VISION = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def _config(name: str, **kw):
    return getattr(transformers, name)(**kw)


FAMILIES = {
    "llama": lambda **kw: transformers.LlamaForCausalLM(_config("LlamaConfig", **{**_COMMON, **kw})),
    "mistral": lambda **kw: transformers.MistralForCausalLM(_config("MistralConfig", **{**_COMMON, **kw})),
    "qwen2": lambda **kw: transformers.Qwen2ForCausalLM(_config("Qwen2Config", **{**_COMMON, **kw})),
    "qwen3": lambda **kw: transformers.Qwen3ForCausalLM(_config("Qwen3Config", **{**_COMMON, "head_dim": 8, **kw})),
    "gemma": lambda **kw: transformers.GemmaForCausalLM(_config("GemmaConfig", **{**_COMMON, "head_dim": 8, **kw})),
    "gemma2": lambda **kw: transformers.Gemma2ForCausalLM(
        _config("Gemma2Config", **{**_COMMON, "head_dim": 8, "final_logit_softcapping": None, **kw})
    ),
    "gemma3": lambda **kw: transformers.Gemma3ForCausalLM(
        _config("Gemma3TextConfig", **{**_COMMON, "head_dim": 8, **kw})
    ),
    "phi3": lambda **kw: transformers.Phi3ForCausalLM(_config("Phi3Config", **{**_COMMON, **kw})),
    "phi": lambda **kw: transformers.PhiForCausalLM(_config("PhiConfig", **{**_COMMON, **kw})),  # lm_head has a bias
    "olmo2": lambda **kw: transformers.Olmo2ForCausalLM(_config("Olmo2Config", **{**_COMMON, **kw})),
    "cohere": lambda **kw: transformers.CohereForCausalLM(
        _config("CohereConfig", **{**_COMMON, "logit_scale": 0.5, **kw})  # logits · 0.5
    ),
    "cohere2": lambda **kw: transformers.Cohere2ForCausalLM(
        _config("Cohere2Config", **{**_COMMON, "logit_scale": 0.5, **kw})
    ),
    "granite": lambda **kw: transformers.GraniteForCausalLM(
        _config("GraniteConfig", **{**_COMMON, "logits_scaling": 4.0, **kw})  # logits / 4
    ),
    "mixtral": lambda **kw: transformers.MixtralForCausalLM(
        _config("MixtralConfig", **{**_COMMON, **_MOE, "num_local_experts": 4, **kw})
    ),
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeForCausalLM(
        _config(
            "Qwen2MoeConfig",
            **{
                **_COMMON,
                **_MOE,
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                **kw,
            },
        )
    ),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeForCausalLM(
        _config(
            "Qwen3MoeConfig", **{**_COMMON, **_MOE, "head_dim": 8, "num_experts": 4, "moe_intermediate_size": 32, **kw}
        )
    ),
    "gpt_neox": lambda **kw: transformers.GPTNeoXForCausalLM(_config("GPTNeoXConfig", **{**_COMMON, **kw})),
    "gpt2": lambda **kw: transformers.GPT2LMHeadModel(
        _config(
            "GPT2Config",
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=0.2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            **kw,
        )
    ),
    # vision-language models: the language head after the base model merged the image features (VISION_INPUTS)
    "qwen2_vl": lambda **kw: transformers.Qwen2VLForConditionalGeneration(
        _config(
            "Qwen2VLConfig",
            text_config=_MROPE,
            **_QWEN_VL_TOKENS,
            attn_implementation="eager",
            vision_config=dict(_QWEN_VL_VISION, embed_dim=16, hidden_size=32, mlp_ratio=2),
            **kw,
        )
    ),
    "qwen2_5_vl": lambda **kw: transformers.Qwen2_5_VLForConditionalGeneration(
        _config(
            "Qwen2_5_VLConfig",
            text_config=_MROPE,
            **_QWEN_VL_TOKENS,
            attn_implementation="eager",
            vision_config=dict(
                _QWEN_VL_VISION,
                hidden_size=16,
                out_hidden_size=32,
                intermediate_size=32,
                window_size=4,
                fullatt_block_indexes=[0],
            ),
            **kw,
        )
    ),
    "llava": lambda **kw: transformers.LlavaForConditionalGeneration(
        _config(
            "LlavaConfig",
            text_config=dict(_COMMON, model_type="llama"),
            image_token_index=5,
            vision_config=dict(_VISION, model_type="clip_vision_model", patch_size=4),
            vision_feature_layer=-1,
            attn_implementation="eager",
            **kw,
        )
    ),
    "gemma3_vl": lambda **kw: transformers.Gemma3ForConditionalGeneration(
        _config(
            "Gemma3Config",
            text_config=dict(_COMMON, head_dim=8, model_type="gemma3_text"),
            image_token_index=5,
            vision_config=dict(_VISION, model_type="siglip_vision_model", patch_size=2),
            mm_tokens_per_image=4,
            boi_token_index=7,
            eoi_token_index=8,
            attn_implementation="eager",
            **kw,
        )
    ),
}


def _qwen_vl_images(ids, g):
    """Per row one 8×8 image: a 4×4 grid of 2×2 patches (temporal 2), merged 2×2 into 4 image tokens."""
    ids[:, 1], ids[:, 2:6], ids[:, 6] = 7, 5, 8
    pixels = torch.randn(ids.shape[0] * 16, 3 * 2 * 2 * 2, generator=g, dtype=torch.float64)
    grid = torch.tensor([[1, 4, 4]] * ids.shape[0])
    return dict(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == 5).int())


def _square_images(ids, g, token_type_ids=False):
    """Per row one 3×8×8 image whose features fill 4 image tokens (Llava: 4 patches; Gemma 3: pooled to 4)."""
    ids[:, 2:6] = 5
    extra = dict(pixel_values=torch.randn(ids.shape[0], 3, 8, 8, generator=g, dtype=torch.float64))
    return {**extra, "token_type_ids": (ids == 5).long()} if token_type_ids else extra


VISION_INPUTS = {
    "qwen2_vl": _qwen_vl_images,
    "qwen2_5_vl": _qwen_vl_images,
    "llava": _square_images,
    "gemma3_vl": lambda ids, g: _square_images(ids, g, token_type_ids=True),
}
TEXT_FAMILIES = [family for family in FAMILIES if family not in VISION_INPUTS]


def make(family: str, dtype=torch.float64, **config) -> torch.nn.Module:
    """Training mode (the patched path), with every dropout probability 0 (the configs' defaults, GPT-2's set)."""
    torch.manual_seed(0)
    return FAMILIES[family](**config).to(dtype).train()


def batch(seed: int = 1, family: str | None = None):
    """3 sequences of 16 tokens: row 1 right-padded (mask 0, labels -100), a few prompt tokens masked to -100, and
    for a vision-language family the image inputs (image tokens labelled -100). Returns ids, mask, labels, extra."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (3, 16), generator=g)
    extra = VISION_INPUTS[family](ids, g) if family in VISION_INPUTS else {}
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.clone()
    labels[1, 11:] = -100
    labels[0, :4] = -100
    labels[2, torch.randperm(16, generator=g)[:3]] = -100
    labels[ids == 5] = -100
    return ids, mask, labels, extra


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


def assert_same(got, ref, tol, what):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert rel_err(loss.double(), ref_loss.double()) <= tol, (what, loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    total = torch.stack([g.norm() for g in ref_grads.values() if g is not None] or [torch.zeros(())]).norm()
    for name, g in grads.items():
        assert (g is None) == (ref_grads[name] is None), (what, name)
        if g is not None:
            ref_norm, error = ref_grads[name].norm(), (g - ref_grads[name]).norm()
            bound = tol * (ref_norm if ref_norm >= tol * total else total)  # zero in exact math: rounding noise
            assert error <= bound, (what, name, error.item(), ref_norm.item())


def oracle(model, ids, mask, labels, num_items_in_batch=None, **extra):
    """The unpatched model's own logits (no labels) → float64 cross entropy here, + its router loss if it has one."""
    out = model(input_ids=ids, attention_mask=mask, **extra)
    loss = oracle_loss(out.logits, labels, num_items_in_batch)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.router_aux_loss_coef * out.aux_loss
    return loss


def check_against_both(model, ids, mask, labels, extra=None, num_items_in_batch=None, **apply_kwargs):
    """The patched copy against the exact float64 oracle and against the model's native labelled loss."""
    native, patched = copy.deepcopy(model), lce_hf.apply(copy.deepcopy(model), options=F64, **apply_kwargs)
    extra = dict(extra or {})
    if num_items_in_batch is not None:
        extra["num_items_in_batch"] = num_items_in_batch

    def ours(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        assert out.logits is None
        return out.loss

    got = loss_and_grads(patched, ours)
    exact = loss_and_grads(native, lambda m: oracle(m, ids, mask, labels, **extra))
    assert_same(got, exact, EXACT, "exact")
    hf = loss_and_grads(native, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss)
    assert_same(got, hf, NATIVE, "native")
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_native(family):
    ids, mask, labels, extra = batch(family=family)
    check_against_both(make(family), ids, mask, labels, extra)


@pytest.mark.parametrize("family", ["llama", "gpt2", "granite", "qwen3_moe", "llava"])
def test_num_items_in_batch(family):
    """Gradient accumulation: sum over tokens / num_items_in_batch (here not the batch's own count)."""
    ids, mask, labels, extra = batch(2, family)
    check_against_both(make(family), ids, mask, labels, extra, num_items_in_batch=torch.tensor(57))


def test_router_aux_loss_returned_and_switchable():
    """MoE: aux_loss returned as the model returns it; output_router_logits=False (argument) leaves it out."""
    model = make("mixtral")
    ids, mask, labels, _ = batch(3)
    patched = lce_hf.apply(copy.deepcopy(model), options=F64)
    ours, ref = patched(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert rel_err(ours.aux_loss, ref.aux_loss) <= EXACT and len(ours.router_logits) == len(ref.router_logits)
    off = dict(input_ids=ids, labels=labels, output_router_logits=False)
    ours, ref = patched(**off), model(**off)
    assert ours.aux_loss is None and rel_err(ours.loss, ref.loss.double()) <= NATIVE


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_vl"])
def test_no_labels_returns_native_logits(family):
    model = make(family)
    patched = lce_hf.apply(copy.deepcopy(model))
    ids, mask, _, extra = batch(family=family)
    with torch.no_grad():
        ref, out = (
            model(input_ids=ids, attention_mask=mask, **extra),
            patched(input_ids=ids, attention_mask=mask, **extra),
        )
    assert out.loss is None and torch.equal(out.logits, ref.logits)


def test_eval_mode_runs_the_native_forward():
    """Outside training a labelled call returns the model's own logits and loss; eval_without_logits keeps ours."""
    model = make("llama").eval()
    ids, mask, labels, _ = batch(4)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
        out = lce_hf.apply(copy.deepcopy(model))(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        lean = lce_hf.apply(copy.deepcopy(model), options=F64, eval_without_logits=True)
        out = lean(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and rel_err(out.loss, oracle(model, ids, mask, labels)) <= EXACT


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
    """A head with a bias (Phi has one; here added to Llama) is passed as linear_bias."""
    model = make("llama")
    torch.manual_seed(5)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(V, dtype=torch.float64))
    check_against_both(model, *batch(4))


@pytest.mark.parametrize(("family", "num_items_in_batch"), [("gemma2", None), ("gemma3", 40)])
def test_final_logit_softcapping(family, num_items_in_batch):
    """Gemma-2 style c·tanh(z/c) on the final logits, passed as logit_softcap=."""
    model = make(family, final_logit_softcapping=2.0)  # small cap: it bends logits of order 1
    ids, mask, labels, _ = batch(5)
    items = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    check_against_both(model, ids, mask, labels, num_items_in_batch=items)


def test_shift_labels_keyword():
    """transformers accepts already shifted labels as shift_labels= (used as given, with labels present)."""
    model = make("qwen2")
    ids, mask, labels, _ = batch(6)
    shifted = torch.roll(labels, 3, dims=1)  # anything: it is used as is
    native, patched = copy.deepcopy(model), lce_hf.apply(copy.deepcopy(model), options=F64)
    got = patched(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
    ref = native(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted).loss
    logits = native(input_ids=ids, attention_mask=mask).logits
    exact = F.cross_entropy(logits.reshape(-1, V), shifted.reshape(-1), ignore_index=-100)
    assert rel_err(got, exact) <= EXACT and rel_err(got, ref.double()) <= NATIVE


def test_default_options_float32_loss():
    """Default options: the float32 loss transformers returns, on a float32 model, within float32 rounding."""
    model = make("mistral", dtype=torch.float32)
    ids, mask, labels, _ = batch(7)
    patched = lce_hf.apply(copy.deepcopy(model))
    got = loss_and_grads(patched, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    ref = loss_and_grads(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert got[0].dtype == torch.float32
    assert_same(got, ref, NATIVE, "float32")
    bf16 = lce_hf.apply(make("mistral", dtype=torch.bfloat16))
    assert bf16(input_ids=ids, labels=labels).loss.dtype == torch.float32


def test_return_dict_false_and_signature():
    model = lce_hf.apply(make("gpt2"), options=F64)
    ids, mask, labels, _ = batch()
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
    ids, mask, labels, _ = batch()
    assert model(input_ids=ids, labels=labels).loss.dtype == torch.float64
    clone = copy.deepcopy(model)
    assert lce_hf.is_applied(clone) and clone.forward.__self__ is clone
    assert clone(input_ids=ids, labels=labels).logits is None
    lce_hf.remove(model)
    assert not lce_hf.is_applied(model) and model(input_ids=ids, labels=labels).logits is not None


def test_generate_unchanged():
    model = make("llama").eval()
    patched = lce_hf.apply(copy.deepcopy(model))
    ids = batch()[0][:1, :5]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), model.generate(ids, **kw))


def _fsdp_class(model):
    """What ``fully_shard`` does to the root's class (without a process group): a ``FSDP<Name>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    model.__class__ = type(f"FSDP{cls.__name__}", (FSDPModule, cls), {})
    return model


def test_recognised_through_fsdp_and_plain_subclasses():
    """Recognition by isinstance + the class's own forward: FSDP2's dynamic subclass in either order, a user
    subclass that keeps forward; the forward never looks the class up by name."""
    model = make("llama")
    ids, mask, labels, _ = batch(8)
    exact = loss_and_grads(model, lambda m: oracle(m, ids, mask, labels))
    apply_then_shard = _fsdp_class(lce_hf.apply(copy.deepcopy(model), options=F64))
    shard_then_apply = lce_hf.apply(_fsdp_class(copy.deepcopy(model)), options=F64)
    for patched in (apply_then_shard, shard_then_apply):
        assert type(patched).__name__ == "FSDPLlamaForCausalLM"
        got = loss_and_grads(patched, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
        assert_same(got, exact, EXACT, "fsdp")

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    mine = copy.deepcopy(model)
    mine.__class__ = MyLlama
    loss = lce_hf.apply(mine, options=F64)(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(loss, exact[0]) <= EXACT


def test_compiled_model():
    """torch.compile'd before apply (apply patches the module inside) and after: the same loss, no logits."""
    model = make("llama")
    ids, mask, labels, _ = batch(9)
    ref = oracle(model, ids, mask, labels)
    compiled_then_applied = lce_hf.apply(torch.compile(copy.deepcopy(model), backend="eager"), options=F64)
    applied_then_compiled = torch.compile(lce_hf.apply(copy.deepcopy(model), options=F64), backend="eager")
    for m in (compiled_then_applied, applied_then_compiled):
        assert lce_hf.is_applied(m)
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None and rel_err(out.loss, ref) <= EXACT


def test_refusals():
    cfg = transformers.LlamaConfig(**_COMMON)
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification.*model_type='llama'.*supported: Llama"):
        lce_hf.apply(transformers.LlamaForSequenceClassification(cfg))
    model = make("llama")
    model.loss_function = lambda *a, **k: None
    with pytest.raises(ValueError, match="custom loss"):
        lce_hf.apply(model)

    class OwnForward(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = make("llama")
    model.__class__ = OwnForward
    with pytest.raises(ValueError, match="OwnForward subclasses LlamaForCausalLM but overrides forward"):
        lce_hf.apply(model)


def test_refuses_a_forward_already_replaced():
    model = make("llama")
    model.forward = torch.compile(model.forward, backend="eager")  # any instance-level replacement
    with pytest.raises(ValueError, match="already replaced"):
        lce_hf.apply(model)


class _PackedLinear(torch.nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: a Linear subclass whose forward is not x·weightᵀ."""

    def forward(self, x):
        return super().forward(x) * 2


def test_head_that_cannot_be_read_is_refused():
    """Quantized (a Linear subclass with its own forward), non-Linear, hooked: refused at apply and at the call."""
    ids, _, labels, _ = batch(10)
    for head, match in (
        (_PackedLinear(32, V, bias=False, dtype=torch.float64), "_PackedLinear; its output is not x·weight"),
        (torch.nn.Sequential(torch.nn.Linear(32, V, dtype=torch.float64)), "Sequential; its output is not"),
    ):
        model = make("llama")
        model.lm_head = head
        with pytest.raises(ValueError, match=match):
            lce_hf.apply(model)
        model = lce_hf.apply(make("llama"))
        model.lm_head = head  # replaced after apply: refused at the call
        with pytest.raises(ValueError, match=match):
            model(input_ids=ids, labels=labels)

    model = lce_hf.apply(make("llama"))
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match=r"lm_head \(Linear\) has forward hooks.*would silently not run"):
        model(input_ids=ids, labels=labels)
    handle.remove()
    model.lm_head.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="forward pre-hooks"):
        model(input_ids=ids, labels=labels)


class _GatheredParameters:
    """Stands in for ``deepspeed.zero.GatheredParameters``: full data inside, the empty placeholder after."""

    calls = []

    def __init__(self, params, modifier_rank=None):
        self.params = params

    def __enter__(self):
        type(self).calls.append(len(self.params))
        for p in self.params:
            p.data, p.ds_status = p.ds_full, "AVAILABLE"

    def __exit__(self, *exc):
        for p in self.params:
            p.data, p.ds_status = torch.empty(0, dtype=p.dtype), "NOT_AVAILABLE"


def _partition(param):
    """A ZeRO-3 partitioned parameter as DeepSpeed leaves it outside its module's forward (empty data)."""
    param.ds_id, param.ds_full = 7, param.data
    param.data, param.ds_status = torch.empty(0, dtype=param.dtype), "NOT_AVAILABLE"


def test_zero3_partitioned_head_is_gathered(monkeypatch):
    """A head weight carrying ds_id (stand-in DeepSpeed): registered as an external parameter of the model, gathered
    for the call, released after it; loss and gradients exact (upstream gradient 3: precomputed, then scaled)."""
    model = make("llama")  # before the stand-in: transformers' imports probe deepspeed
    registered = []
    deepspeed = types.ModuleType("deepspeed")
    deepspeed.zero = types.SimpleNamespace(
        GatheredParameters=_GatheredParameters,
        register_external_parameter=lambda module, param: registered.append((module, param)),
    )
    monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
    ids, mask, labels, _ = batch(11)
    # the same upstream gradient on both sides (Llama's RMSNorm computes in float32 even in a float64 model)
    exact = loss_and_grads(model, lambda m: 3 * oracle(m, ids, mask, labels, num_items_in_batch=30))
    patched = lce_hf.apply(copy.deepcopy(model), options=F64)
    weight = patched.lm_head.weight
    _partition(weight)

    def zero3_hook(module, args):  # ZeRO-3 hooks every module; the head's are replaced by the gather
        pass

    zero3_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"
    patched.lm_head.register_forward_pre_hook(zero3_hook)
    _GatheredParameters.calls.clear()
    patched.zero_grad(set_to_none=True)
    loss = 3 * patched(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=30).loss
    assert _GatheredParameters.calls == [1] and weight.numel() == 0  # released after the call
    assert registered == [(patched, weight)]
    with _GatheredParameters([weight]):  # what ZeRO-3 does for the model's (now external) parameters in backward
        loss.backward()
    assert_same((loss.detach(), {n: p.grad for n, p in patched.named_parameters()}), exact, EXACT, "zero3")

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not importable
    with pytest.raises(RuntimeError, match="partitioned by DeepSpeed ZeRO-3.*cannot be imported"):
        patched(input_ids=ids, labels=labels)


def test_trainer_with_gradient_accumulation(tmp_path):
    """Trainer passes num_items_in_batch (it reads forward's signature): logged losses equal the native model's."""
    pytest.importorskip("accelerate")  # Trainer needs it; not part of the transformers extra
    model = make("llama", dtype=torch.float32)
    ids = torch.randint(1, V, (8, 16), generator=torch.Generator().manual_seed(8))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def train(m):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
        )
        trainer = transformers.Trainer(model=m, args=args, train_dataset=dataset)
        trainer.train()
        return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    native, native_losses = train(copy.deepcopy(model))
    patched, losses = train(lce_hf.apply(copy.deepcopy(model)))
    assert patched.model_accepts_loss_kwargs and native.model_accepts_loss_kwargs
    assert len(losses) == len(native_losses) == 2
    for got, ref in zip(losses, native_losses):
        assert abs(got - ref) <= NATIVE * abs(ref)


def test_trainer_evaluate_with_compute_metrics(tmp_path):
    """Trainer.evaluate on a patched model: compute_metrics gets every prediction, eval loss = the native one."""
    pytest.importorskip("accelerate")
    model = make("llama", dtype=torch.float32)
    ids = torch.randint(1, V, (6, 16), generator=torch.Generator().manual_seed(12))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def evaluate(m):
        seen = []

        def compute_metrics(prediction):
            seen.append(prediction.predictions.shape)
            accuracy = (prediction.predictions[:, :-1].argmax(-1) == prediction.label_ids[:, 1:]).mean()
            return {"accuracy": float(accuracy)}

        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True
        )
        trainer = transformers.Trainer(model=m, args=args, eval_dataset=dataset, compute_metrics=compute_metrics)
        return trainer.evaluate(), seen

    native, native_seen = evaluate(copy.deepcopy(model))
    patched, seen = evaluate(lce_hf.apply(copy.deepcopy(model)))
    assert seen == native_seen == [(6, 16, V)]
    assert patched["eval_accuracy"] == native["eval_accuracy"]
    assert abs(patched["eval_loss"] - native["eval_loss"]) <= NATIVE * abs(native["eval_loss"])


def test_every_supported_class_is_tested():
    assert {type(make(family)).__name__ for family in FAMILIES} == set(lce_hf.SUPPORTED_CLASSES)
