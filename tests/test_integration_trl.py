"""TRL's ``SFTTrainer`` with ``integrations.trl.apply``: our kernel runs in place of TRL's fused LM head, and gives
what TRL's own head gives.

TRL 1.x's ``SFTTrainer`` computes its loss through its own logits-free head (``add_fused_lm_head``, a
``FusedCausalLMOutput`` with per-token ``log_probs``, ``entropy``, ``is_top1``). Checked here, on a tiny random
Llama built in the test, a word-level tokenizer built in memory and an in-memory prompt/completion dataset
(completion-only loss), CPU, no hub access:

- a 2-step ``train()`` after ``apply`` calls ``linear_cross_entropy`` once per step and TRL's kernel never, and logs
  finite ``loss``, ``entropy`` and ``mean_token_accuracy``;
- a model patched by ``transformers.apply`` and then given to ``SFTTrainer`` warns once that TRL's head runs instead;
- parity: on the same batch and weights, ``compute_loss`` (loss, every parameter gradient, the logged entropy and
  token accuracy; ``nll`` with ``num_items_in_batch`` and ``dft`` without) and ``evaluate()`` agree between TRL's
  head and ours. Both are held to a float64 oracle (the float64 model's logits, TRL's formulas) within twice the
  error of the plain float32 computation (the float32 model's logits through the same formulas) plus one float32
  rounding; token accuracy must equal the oracle's.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from helpers import assert_within_plain

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

import trl.trainer.utils as trl_utils  # noqa: E402
from test_integration_transformers import V, make  # noqa: E402

from linear_cross_entropy import LinearCrossEntropyOptions  # noqa: E402
from linear_cross_entropy.integrations import transformers as lce_hf  # noqa: E402
from linear_cross_entropy.integrations import trl as lce_trl  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]


def tokenizer():
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def dataset(rows: int = 8):
    g = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    return datasets.Dataset.from_dict(
        {
            "prompt": [sentence(3 + i % 4) for i in range(rows)],
            "completion": [" " + sentence(2 + i % 5) for i in range(rows)],
        }
    )


def llama():
    return make("llama", torch.float32)  # seeded, training mode


def sft_trainer(model, tmp_path, peft_config=None, **config):
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        **config,
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(4),
        processing_class=tokenizer(),
        peft_config=peft_config,
    )


@pytest.fixture
def calls(monkeypatch):
    """Counts of our kernel's calls (the name the integration calls) and of TRL's fused-head kernel."""
    counts = {"ours": 0, "trl": 0}
    ours, theirs = lce_hf.linear_cross_entropy, trl_utils._ChunkedLogProbFunction

    def counting_ours(*args, **kwargs):
        counts["ours"] += 1
        return ours(*args, **kwargs)

    def counting_theirs(*args):
        counts["trl"] += 1
        return theirs.apply(*args)

    monkeypatch.setattr(lce_hf, "linear_cross_entropy", counting_ours)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=counting_theirs))
    return counts


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_sft_trainer_trains_with_our_kernel(tmp_path, calls, adapter):
    config = {}
    if adapter:  # SFTTrainer wraps the model in a PeftModel; TRL's head (and ours) sit on its base model
        peft = pytest.importorskip("peft")
        config["peft_config"] = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = lce_trl.apply(sft_trainer(llama(), tmp_path, max_steps=2, **config))  # SFTConfig's defaults: bf16
    assert lce_trl.is_applied(trainer.model) and lce_hf.is_applied(trainer.model)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter == all("lora_" in n for n in trainable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "TRL's fused LM head replaced" in str(w.message)]  # ours ran: no false alarm
    for n, p in trainer.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"{n} was not trained"
    assert calls == {"ours": 2, "trl": 0}
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert len(steps) == 2
    for log in steps:
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert torch.isfinite(torch.tensor(log[key])), (key, log)
        assert 0.5 < log["entropy"] < torch.log(torch.tensor(float(V))).item()
    with torch.no_grad():  # generation (no labels) runs the model's own forward
        ids = trainer.model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False)
    assert ids.shape == (1, 5)
    assert calls["ours"] == 2


def test_transformers_apply_before_sft_trainer_warns_once(tmp_path, calls):
    model = lce_hf.apply(llama())
    trainer = sft_trainer(model, tmp_path, max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [w for w in caught if "TRL's fused LM head replaced" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "linear_cross_entropy.integrations.trl.apply(trainer)" in str(ours[0].message)
    assert calls == {"ours": 0, "trl": 2}  # what the warning says: TRL's kernel ran

    with pytest.raises(ValueError, match="before train"):  # accelerate's bf16 wrapper now sits on TRL's head
        lce_trl.apply(trainer)


def test_apply_keeps_an_earlier_transformers_apply_choices(tmp_path):
    options = LinearCrossEntropyOptions(loss_dtype=torch.float32, backend="chunked")
    model = lce_hf.apply(llama(), options=options, eval_without_logits=True)
    lce_trl.apply(sft_trainer(model, tmp_path, max_steps=1))
    state = getattr(model, lce_hf._STATE)
    assert state.options == options and state.eval_without_logits


def test_apply_refuses_a_model_without_trl_head():
    with pytest.raises(ValueError, match="not TRL's fused LM head"):
        lce_trl.apply(types.SimpleNamespace(model=llama()))


def _oracle(model, inputs, loss_type, num_items):
    """TRL's loss, mean entropy and token accuracy from ``model``'s logits (dtype of the model) and the parameter
    gradients of the loss."""
    model.zero_grad(set_to_none=True)
    moe = hasattr(model.config, "output_router_logits")  # TRL adds router_aux_loss_coef × the router loss
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_router_logits=moe)
    logits = out.logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    mask = labels != -100
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    per_token = -log_probs * (log_probs.exp().detach() if loss_type == "dft" else 1)
    loss = per_token.sum() / (mask.sum() if num_items is None else num_items)
    if moe:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    loss.backward()
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)[mask].mean()
    accuracy = (logits.argmax(-1) == labels)[mask].float().mean()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, entropy.detach(), accuracy


def _trainer_step(trainer, inputs, num_items):
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    metrics = trainer._metrics["train"]
    return loss.detach(), grads, metrics["entropy"][0], metrics["mean_token_accuracy"][0]


@pytest.mark.parametrize(
    "family, loss_type, with_num_items", [("llama", "nll", True), ("llama", "dft", False), ("qwen3_moe", "nll", False)]
)
def test_parity_with_trl_own_head(tmp_path, calls, family, loss_type, with_num_items):
    base = make(family, torch.float32)
    theirs = sft_trainer(copy.deepcopy(base), tmp_path / "trl", bf16=False, loss_type=loss_type)
    ours = lce_trl.apply(sft_trainer(copy.deepcopy(base), tmp_path / "ours", bf16=False, loss_type=loss_type))
    theirs.model.train(), ours.model.train()
    inputs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    assert (inputs["labels"] == -100).any() and (inputs["labels"] != -100).any()  # completion-only, padded
    valid = int((inputs["labels"][:, 1:] != -100).sum())
    num_items = torch.tensor(valid + 5) if with_num_items else None  # a count that differs from this batch's

    exact = _oracle(copy.deepcopy(base).double().train(), inputs, loss_type, num_items)
    plain = _oracle(copy.deepcopy(base).train(), inputs, loss_type, num_items)
    got = {"trl": _trainer_step(theirs, inputs, num_items)}
    before = calls["ours"]
    got["ours"] = _trainer_step(ours, inputs, num_items)
    assert calls["ours"] == before + 1

    def check(what, actual, plain_value, expected):  # float32 results (tensors or metrics' floats)
        actual, plain_value = (torch.as_tensor(v, dtype=torch.float32) for v in (actual, plain_value))
        expected = torch.as_tensor(expected, dtype=torch.float64)
        assert_within_plain((actual,), (plain_value,), (expected,), torch.float32, names=(what,))

    for who, (loss, grads, entropy, accuracy) in got.items():
        check(f"{who} loss", loss, plain[0], exact[0])
        check(f"{who} entropy", entropy, plain[2], exact[2])
        assert accuracy == pytest.approx(exact[3].item(), abs=1e-7), who
        assert grads.keys() == exact[1].keys()
        for name, g in grads.items():
            check(f"{who} grad {name}", g, plain[1][name], exact[1][name])

    # the output's own fields: TRL's shapes and mask; its loss (the NLL, read under sequence parallelism)
    with torch.no_grad():
        fused = {
            who: trainer.model(**inputs, fused_lm_head=True, num_items_in_batch=num_items)
            for who, trainer in (("trl", theirs), ("ours", ours))
        }
    for field in ("log_probs", "entropy", "is_top1", "label_mask"):
        assert fused["ours"][field].shape == fused["trl"][field].shape, field
        assert fused["ours"][field].dtype == fused["trl"][field].dtype, field
    assert torch.equal(fused["ours"].label_mask, fused["trl"].label_mask)
    assert (fused["ours"].aux_loss is None) == (fused["trl"].aux_loss is None) == (family != "qwen3_moe")
    if loss_type == "nll":
        for who, out in fused.items():
            check(f"{who} FusedCausalLMOutput.loss", out.loss, plain[0], exact[0])

    # evaluate(): TRL's eval loop through each head, against the oracle on the (single) eval batch
    eval_inputs = theirs._prepare_inputs(next(iter(theirs.get_eval_dataloader())))
    exact = _oracle(copy.deepcopy(base).double().eval(), eval_inputs, loss_type, None)
    plain = _oracle(copy.deepcopy(base).eval(), eval_inputs, loss_type, None)
    for who, trainer in (("trl", theirs), ("ours", ours)):
        metrics = trainer.evaluate()
        check(f"{who} eval_loss", metrics["eval_loss"], plain[0], exact[0])
        check(f"{who} eval_entropy", metrics["eval_entropy"], plain[2], exact[2])
        assert metrics["eval_mean_token_accuracy"] == pytest.approx(exact[3].item(), abs=1e-7), who
