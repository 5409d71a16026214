"""``integrations.transformers.apply`` with PEFT: LoRA on ``lm_head``, ``modules_to_save``, refusals.

A LoRA head ``x·Wᵀ + s·B·A·drop(x)`` is computed as ``[x, s·A·drop(x)]·[W, B]ᵀ`` in one call; its loss and every
trainable gradient (``lora_A``/``lora_B`` of the head included) must equal the PEFT model's own, with the yardsticks
and tolerances of ``test_integration_transformers`` (float64 models: the exact oracle to 1e-10, PEFT's labelled
loss to float32 rounding). Tiny random Llama, adapters initialised at random (``init_lora_weights=False``) so that
every adapter gradient is non-zero.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rel_err

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from test_integration_transformers import (  # noqa: E402
    EXACT,
    F64,
    NATIVE,
    assert_same,
    batch,
    loss_and_grads,
    make,
    oracle,
)

from linear_cross_entropy.integrations import transformers as lce_hf  # noqa: E402


def lora(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"], "init_lora_weights": False, **kw}
    )


def peft_model(config: peft.PeftConfig, apply_first: bool = False, **model_kw):
    model = make("llama", **model_kw)
    if apply_first:
        lce_hf.apply(model, options=F64)
    torch.manual_seed(1)  # the adapters' initialisation
    return peft.get_peft_model(model, config)


def check(native, patched, seed=1, rng_seed=None, grads=True):
    """Patched against the exact oracle on the native PEFT model's logits and against PEFT's own labelled loss.
    ``rng_seed``: reseed before each call (adapter dropout draws the same masks in the same order). ``grads=False``
    compares losses only (disabled or merged adapters: no trainable parameter takes part)."""
    ids, mask, labels, _ = batch(seed)

    def call(fn):
        def run(m):
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            return fn(m)

        return run

    def ours(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is None
        return out.loss

    def native_loss(m):
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    if not grads:
        with torch.no_grad():
            got = (call(ours)(patched), {})
            assert_same(got, (call(lambda m: oracle(m, ids, mask, labels))(native), {}), EXACT, "exact")
            assert_same(got, (call(native_loss)(native), {}), NATIVE, "native")
        return {}
    got = loss_and_grads(patched, call(ours))
    assert_same(got, loss_and_grads(native, call(lambda m: oracle(m, ids, mask, labels))), EXACT, "exact")
    assert_same(got, loss_and_grads(native, call(native_loss)), NATIVE, "native")
    return got[1]


@pytest.mark.parametrize("apply_first", [False, True], ids=["peft_then_apply", "apply_then_peft"])
def test_lora_on_lm_head(apply_first):
    """Exact, with gradients reaching the head's lora_A / lora_B; apply(PeftModel) patches the base model."""
    native = peft_model(lora())
    patched = peft_model(lora(), apply_first=apply_first)
    if not apply_first:
        assert lce_hf.apply(patched, options=F64) is patched
    assert lce_hf.is_applied(patched) and lce_hf.is_applied(patched.get_base_model())
    grads = check(native, patched)
    for part in ("lora_A", "lora_B"):
        (name,) = [n for n in grads if f"lm_head.{part}" in n]
        assert grads[name] is not None and grads[name].abs().max() > 0, name


def test_lora_tied_embeddings_and_bias():
    """LoRA on a tied head (the embedding receives both uses) with a LoRA bias (lora_bias=True)."""
    native = peft_model(lora(lora_bias=True), tie_word_embeddings=True)
    with torch.no_grad():  # a non-zero LoRA bias, the same on both sides
        native.base_model.model.lm_head.lora_B["default"].bias.uniform_(-1, 1)
    check(native, lce_hf.apply(copy.deepcopy(native), options=F64))


def test_lora_dropout_in_training():
    """Adapter dropout draws the same masks as PEFT's forward (same RNG order): identical loss and gradients."""
    native = peft_model(lora(lora_dropout=0.3))
    check(native, lce_hf.apply(copy.deepcopy(native), options=F64), rng_seed=7)


def test_several_active_adapters_merged_and_disabled():
    """Two active adapters sum; merged adapters and disabled adapters use the base layer, as PEFT does."""
    native = peft_model(lora())
    torch.manual_seed(2)
    native.add_adapter("second", lora(r=2, lora_alpha=3))
    native.base_model.set_adapter(["default", "second"])
    patched = lce_hf.apply(copy.deepcopy(native), options=F64)
    assert len(patched.base_model.model.lm_head.active_adapters) == 2
    check(native, patched)
    with native.disable_adapter(), patched.disable_adapter():
        check(native, patched, seed=2, grads=False)
    native.merge_adapter()
    patched.merge_adapter()
    check(native, patched, seed=3, grads=False)


def test_modules_to_save_uses_the_active_copy():
    """modules_to_save=['lm_head']: the trained copy (here moved away from the original) is the one used."""
    native = peft_model(peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        native.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    patched = lce_hf.apply(copy.deepcopy(native), options=F64)
    grads = check(native, patched)
    assert grads["base_model.model.lm_head.modules_to_save.default.weight"] is not None
    with native.disable_adapter(), patched.disable_adapter():  # the original module
        check(native, patched, seed=2, grads=False)


def test_refusals():
    """DoRA (a LoRA variant), another tuner on lm_head (IA3), a mixed-adapter batch: refused, saying what to do."""
    ids, _, labels, _ = batch(4)
    with pytest.raises(ValueError, match=r"lm_head: adapter 'default' is a LoRA variant.*DoRA"):
        lce_hf.apply(peft_model(lora(use_dora=True)))
    ia3 = peft.IA3Config(target_modules=["lm_head"], feedforward_modules=[])
    with pytest.raises(ValueError, match=r"lm_head is PEFT's peft\.tuners\.ia3.*target_modules"):
        lce_hf.apply(peft_model(ia3))
    patched = lce_hf.apply(peft_model(lora()), eval_without_logits=True).eval()  # PEFT mixes adapters in eval only
    with pytest.raises(ValueError, match="forward pre-hooks.*mixed-adapter"):
        patched(input_ids=ids, labels=labels, adapter_names=["default"] * ids.shape[0])


def test_lora_bf16_model_with_fp32_adapters():
    """PEFT's default on a bf16 model: fp32 adapters. Ours (adapter terms rounded once to bf16 for the product) is
    within twice PEFT's own error against the same model in float64 (or bf16's unit roundoff), loss and the head
    adapters' gradients."""
    native = peft_model(lora(), dtype=torch.bfloat16)
    head = native.base_model.model.lm_head
    assert head.base_layer.weight.dtype == torch.bfloat16 and head.lora_A["default"].weight.dtype == torch.float32
    patched = lce_hf.apply(copy.deepcopy(native))  # default options: the fp32 loss transformers returns
    truth = copy.deepcopy(native).double()
    ids, mask, labels, _ = batch(5)

    def run(m):
        return loss_and_grads(m, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)

    (loss, grads), (ref_loss, ref_grads), (true_loss, true_grads) = run(patched), run(native), run(truth)
    for name in [n for n in true_grads if "lm_head.lora" in n] + ["loss"]:
        got, ref, true = (
            (loss, ref_loss, true_loss) if name == "loss" else (grads[name], ref_grads[name], true_grads[name])
        )
        bound = max(2 * rel_err(ref.double(), true), 2.0**-8)
        assert rel_err(got.double(), true) <= bound, (name, rel_err(got.double(), true), rel_err(ref.double(), true))
