"""`llmalign dpo` and `llmalign pairs` on a tiny Qwen2 built in the test.

- shared/token_weights: TGDPO weights and the weighted sigmoid loss by hand, and equal to plain DPO at alpha 0;
- every loss path of the trainer (micro-batched, padded) equals the shared loss on log-probs from an
  unpadded one-pair-at-a-time forward; precomputed reference log-probs equal a live reference model;
  the reference cache is reused and rebuilt when its fingerprint changes;
- 2-step smoke runs (full fine-tuning and LoRA) change the trainable parameters and reload with
  from_pretrained / PeftModel.from_pretrained; simpo loads no reference; TGDPO caches guidance log-probs;
  resume is bit-identical; config and data errors exit with code 2;
- pairs: TRPA levels of hand-written completions, pair selection on hand-built levels, and a CLI run.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llmalign import toy
from llmalign.cli import main
from llmalign.data import load_rows, write_rows
from llmalign.dpo import (
    CachedLogprobs,
    cache_fingerprint,
    cached_logprobs,
    compute_token_logprobs,
    encode_pairs,
    live_reference,
    load_guidance_model,
    micro_batch_terms,
    precomputed_reference,
    train_step,
)
from llmalign.dpo_config import DPOConfig
from llmalign.data import micro_batches
from llmalign.pairs import make_pairs, preference_level, sample_completions, select_pairs
from llmalign.policy import load_policy
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config
from shared.run import Run
from shared.preference import PREFERENCE_LOSSES
from shared.token_weights import tgdpo_token_weights, weighted_dpo_sigmoid_loss

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


def pair_rows():
    """6 pairs: a worked solution against a wrong answer or no answer; one prompt as chat messages."""
    rows = []
    for i, problem in enumerate(toy.make_split(6, 3)):
        wrong = str(int(problem["answer"]) + 1 + i)
        rejected = (
            "I do not know"
            if i % 3 == 2
            else f"<think>{problem['steps'].split(' ')[0]}</think><answer>{wrong}</answer>"
        )
        prompt = [{"role": "user", "content": problem["prompt"]}] if i == 1 else problem["prompt"]
        rows.append(
            {
                "prompt": prompt,
                "chosen": toy.solution(problem, with_check=i % 2 == 0),
                "rejected": rejected,
                "answer": problem["answer"],
            }
        )
    return rows


def perturbed(model_dir, seed, scale=0.05):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen2-dpo")
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    write_rows(directory / "pairs.jsonl", pair_rows())
    write_rows(directory / "test.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in toy.make_split(4, 1)])
    guide = perturbed(directory / "model", seed=7)  # TGDPO's guidance: any model other than the reference
    guide.save_pretrained(directory / "guide")
    tokenizer.save_pretrained(directory / "guide")
    return directory


def overrides(tiny, out_dir, *extra):
    return [
        f"model.path={tiny / 'model'}",
        f"data.train={tiny / 'pairs.jsonl'}",
        f"data.test={tiny / 'test.jsonl'}",
        "data.eval_size=4",
        "data.eval_max_new_tokens=12",
        "train.steps=2",
        "train.batch_size=4",
        "memory.micro_batch_size=3",
        "train.learning_rate=1e-2",
        f"log.output_dir={out_dir}",
        "log.checkpoint_every=1",
        *extra,
    ]


@pytest.fixture
def one_process(tmp_path):
    """A Run of this process alone (world size 1), for calling the trainer's parts directly."""
    return Run(tmp_path / "one_process", resume=False, tag="[test]")


def config_for(tiny, *extra):
    return load_config(DPOConfig, None, overrides(tiny, "unused", *extra))


# ----------------------------------------------------------------------------- independent log-probs


def direct_token_logps(model, tokenizer, prompt, completion):
    """Token log-probs of completion + end-of-text after the prompt: one unpadded sequence, default positions."""
    text = (
        prompt
        if isinstance(prompt, str)
        else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0]  # [P+C, V]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(p) - 1 : -1]  # [C, V] position j scores token j+1
    return logp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)  # [C]


def direct_pairs(model, tokenizer, rows):
    """[(chosen token log-probs, rejected token log-probs)] per row."""
    return [
        (
            direct_token_logps(model, tokenizer, r["prompt"], r["chosen"]),
            direct_token_logps(model, tokenizer, r["prompt"], r["rejected"]),
        )
        for r in rows
    ]


# ----------------------------------------------------------------------------- shared/token_weights


def test_tgdpo_weights_and_weighted_loss_by_hand():
    # beta 0.5, alpha 2: w = 0.5 (1 +- 2*0.5*rhat) = 0.5 (1 +- rhat)
    # chosen: pc - rc = [-1 - -1.5, -2 - -1.5] = [0.5, -0.5], rhat_w = [1, -1] -> w_w = [1.0, 0.0]
    # rejected: pr - rr = [-3 - -2] = [-1] (+ a padded token), rhat_l = [0.5] -> w_l = 0.5 * 0.5 = 0.25
    # z = 1.0 * 0.5 + 0.0 * -0.5 - 0.25 * -1 = 0.75; loss = -log s(0.75) = log(1 + e^-0.75)
    w_c, w_r = tgdpo_token_weights(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 123.0]]), beta=0.5, alpha=2.0)
    assert_close(w_c, torch.tensor([[1.0, 0.0]]))
    assert_close(w_r[:, 0], torch.tensor([0.25]))
    losses, chosen, rejected = weighted_dpo_sigmoid_loss(
        torch.tensor([[-1.0, -2.0]]),
        torch.tensor([[-3.0, 55.0]]),
        torch.tensor([[-1.5, -1.5]]),
        torch.tensor([[-2.0, -9.0]]),
        torch.ones(1, 2),
        torch.tensor([[1.0, 0.0]]),
        w_c,
        w_r,
    )
    assert_close(losses, torch.tensor([math.log1p(math.exp(-0.75))]))
    assert_close(chosen, torch.tensor([0.5]))  # sum w_w (pc - rc)
    assert_close(rejected, torch.tensor([-0.25]))  # sum w_l (pr - rr)
    # label smoothing e = 0.2: 0.8 * log(1 + e^-0.75) + 0.2 * log(1 + e^0.75)
    smoothed, _, _ = weighted_dpo_sigmoid_loss(
        torch.tensor([[-1.0, -2.0]]),
        torch.tensor([[-3.0, 55.0]]),
        torch.tensor([[-1.5, -1.5]]),
        torch.tensor([[-2.0, -9.0]]),
        torch.ones(1, 2),
        torch.tensor([[1.0, 0.0]]),
        w_c,
        w_r,
        label_smoothing=0.2,
    )
    assert_close(smoothed, torch.tensor([0.8 * math.log1p(math.exp(-0.75)) + 0.2 * math.log1p(math.exp(0.75))]))


def test_weighted_loss_with_alpha_zero_is_dpo_sigmoid():
    g = torch.Generator().manual_seed(0)
    pc, rc, gc = (torch.randn(3, 5, generator=g) for _ in range(3))
    pr, rr, gr = (torch.randn(3, 4, generator=g) for _ in range(3))
    mc = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mr = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    w_c, w_r = tgdpo_token_weights(gc, gr, beta=0.3, alpha=0.0)
    got = weighted_dpo_sigmoid_loss(pc, pr, rc, rr, mc, mr, w_c, w_r, label_smoothing=0.1)
    total = lambda x, m: (x * m).sum(-1)
    expected = PREFERENCE_LOSSES["sigmoid"](
        total(pc, mc), total(pr, mr), total(rc, mc), total(rr, mr), beta=0.3, label_smoothing=0.1
    )
    for a, b in zip(got, expected):
        assert_close(a, b)


# ----------------------------------------------------------------------------- trainer loss paths


LOSS_CASES = [
    ("sigmoid", ["algorithm.label_smoothing=0.1"]),
    ("dpop", ["algorithm.loss=dpop", "algorithm.beta=0.5", "algorithm.dpop_lambda=5.0"]),
    ("ipo", ["algorithm.loss=ipo", "algorithm.beta=0.5"]),
    ("robust", ["algorithm.loss=robust", "algorithm.label_smoothing=0.2"]),
    ("hinge", ["algorithm.loss=hinge", "algorithm.beta=2.0"]),
    ("simpo", ["algorithm.loss=simpo", "algorithm.simpo_gamma=0.3"]),
    ("tgdpo", ["algorithm.tgdpo_alpha=3.0", "algorithm.beta=0.5"]),
    ("rpo", ["algorithm.nll_weight=0.7"]),
]


def expected_losses(name, config, policy, ref, guide):
    """The shared loss on summed log-probs of the unpadded forwards (TGDPO: its formula written out)."""
    a = config.algorithm
    beta = a.effective_beta
    if name == "tgdpo":
        out = []
        for (pc, pr), (rc, rr), (gc, gr) in zip(policy, ref, guide):
            w_c = beta * (1 + a.tgdpo_alpha * beta * (gc - rc))  # [Lc]
            w_r = beta * (1 - a.tgdpo_alpha * beta * (gr - rr))  # [Lr]
            out.append(-F.logsigmoid((w_c * (pc - rc)).sum() - (w_r * (pr - rr)).sum()))
        return torch.stack(out)
    pc, pr = (torch.stack([p[k].sum() for p in policy]) for k in (0, 1))
    lc, lr = (torch.tensor([float(len(p[k])) for p in policy]) for k in (0, 1))
    if name == "rpo":  # sigmoid DPO plus alpha times the chosen answer's mean token NLL, written out
        rc, rr = (torch.stack([r[k].sum() for r in ref]) for k in (0, 1))
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))) - a.nll_weight * pc / lc
    if name == "dpop":  # DPO with the chosen answer's fall below the reference subtracted lambda-fold, written out
        rc, rr = (torch.stack([r[k].sum() for r in ref]) for k in (0, 1))
        return -F.logsigmoid(beta * ((pc - rc) - (pr - rr) - a.dpop_lambda * (rc - pc).clamp(min=0)))
    if name == "simpo":
        return PREFERENCE_LOSSES["simpo"](pc, pr, lc, lr, beta=beta, gamma=a.simpo_gamma)[0]
    rc, rr = (torch.stack([r[k].sum() for r in ref]) for k in (0, 1))
    kwargs = {
        "sigmoid": {"label_smoothing": a.label_smoothing},
        "robust": {"flip_rate": a.label_smoothing},
        "hinge": {},
        "ipo": {},
    }[name]
    lengths = (lc, lr) if name == "ipo" else ()
    return PREFERENCE_LOSSES[name](pc, pr, rc, rr, *lengths, beta=beta, **kwargs)[0]


@pytest.mark.parametrize("name, extra", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_each_loss_path_equals_the_shared_loss_on_unpadded_logprobs(tiny, one_process, name, extra):
    config = config_for(tiny, *extra, *([f"algorithm.guidance_model={tiny / 'guide'}"] if name == "tgdpo" else []))
    reference_model, tokenizer = load_policy(config.model)
    policy = perturbed(tiny / "model", seed=1)
    rows = pair_rows()
    encoded = encode_pairs(tokenizer, rows, config.data)
    pad = tokenizer.pad_token_id
    reference = (
        CachedLogprobs(compute_token_logprobs(one_process, reference_model, encoded, pad, micro_batch_size=4))
        if config.algorithm.uses_reference
        else None
    )
    guidance = None
    if name == "tgdpo":
        guide_model = perturbed(tiny / "model", seed=7)
        guidance = CachedLogprobs(compute_token_logprobs(one_process, guide_model, encoded, pad, 4))
    order = [4, 0, 3, 1, 5, 2]  # micro-batches of 2 in a shuffled order: padding and index lookups differ
    got = torch.cat(
        [
            micro_batch_terms(config.algorithm, policy, encoded, rows_, pad, reference, guidance)["losses"]
            for rows_ in micro_batches(order, 2)
        ]
    ).detach()
    direct = direct_pairs(policy, tokenizer, [rows[i] for i in order])
    ref = direct_pairs(reference_model, tokenizer, [rows[i] for i in order]) if reference is not None else None
    guide = direct_pairs(perturbed(tiny / "model", seed=7), tokenizer, [rows[i] for i in order]) if guidance else None
    expected = expected_losses(name, config, direct, ref, guide)
    assert_close(got, expected, atol=2e-5, rtol=1e-5)
    if name != "simpo":  # policy and reference differ, so the test is not of D = 0
        assert (got - expected_losses(name, config, ref, ref, ref if guide else None)).abs().max() > 1e-3


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_equals_live_reference(tiny, one_process, lora):
    config = config_for(tiny, f"model.lora={str(lora).lower()}", "model.lora_rank=4")
    model, tokenizer = load_policy(config.model)
    encoded = encode_pairs(tokenizer, pair_rows(), config.data)
    pad = tokenizer.pad_token_id
    precomputed, _ = precomputed_reference(one_process, config, model, encoded, str(tiny / "pairs.jsonl"), pad)
    live, _ = live_reference(one_process, config, model, encoded, str(tiny / "pairs.jsonl"), pad)
    with torch.no_grad():  # now the policy moves away from its reference
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    for rows in ([0, 1, 2], [5, 3], [4]):
        with_cache = micro_batch_terms(config.algorithm, model, encoded, rows, pad, precomputed, None)
        with_live = micro_batch_terms(config.algorithm, model, encoded, rows, pad, live, None)
        assert_close(with_cache["losses"], with_live["losses"], atol=1e-6, rtol=0)
        assert_close(with_cache["chosen_rewards"], with_live["chosen_rewards"], atol=1e-6, rtol=0)
        assert (with_cache["losses"] - math.log(2)).abs().max() > 1e-3  # the reference is not the moved policy


@pytest.mark.parametrize("loss", ["sigmoid", "simpo", "srpo"])
def test_gradient_accumulation_equals_one_big_batch(tiny, one_process, loss):
    import copy

    config = config_for(tiny, f"algorithm.loss={loss}", "train.max_grad_norm=1e9")
    model, tokenizer = load_policy(config.model)
    encoded = encode_pairs(tokenizer, pair_rows(), config.data, config.revision_template)
    pad = tokenizer.pad_token_id
    reference = CachedLogprobs(compute_token_logprobs(one_process, model, encoded, pad, 6)) if loss != "simpo" else None
    policy = perturbed(tiny / "model", seed=2).requires_grad_(True)  # D != 0, so the sigmoid gradient is not at 0
    results = []
    for micro in (6, 4, 2):  # 4: micro-batches of unequal size (4 + 2)
        trained = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
        config.memory.micro_batch_size = micro
        metrics = train_step(one_process, config, trained, optimizer, encoded, [3, 1, 4, 0, 5, 2], pad, reference, None)
        results.append((dict(trained.named_parameters()), metrics))
    (big, big_metrics), *smaller = results
    for params, metrics in smaller:
        for name, value in big.items():
            assert_close(params[name], value, atol=1e-6, rtol=1e-5, msg=name)
        assert metrics.keys() == big_metrics.keys()
        for key, value in big_metrics.items():  # srpo's margins too
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert any(not torch.equal(v, dict(policy.named_parameters())[k]) for k, v in big.items())


def test_reference_cache_is_reused_and_rebuilt_when_stale(tiny, tmp_path, one_process):
    calls = []

    def compute():
        calls.append(1)
        return {"chosen.0": torch.tensor([float(len(calls))])}

    path = tmp_path / "reference_logprobs.safetensors"
    first, hit = cached_logprobs(one_process, path, {"data_sha256": "a"}, compute)
    assert not hit and len(calls) == 1
    again, hit = cached_logprobs(one_process, path, {"data_sha256": "a"}, compute)
    assert hit and len(calls) == 1 and torch.equal(again["chosen.0"], torch.tensor([1.0]))
    rebuilt, hit = cached_logprobs(one_process, path, {"data_sha256": "b"}, compute)
    assert not hit and torch.equal(rebuilt["chosen.0"], torch.tensor([2.0]))
    assert json.loads(path.with_suffix(".json").read_text()) == {"data_sha256": "b"}
    # the fingerprint follows the data file's bytes, even when the tokens stay the same
    config = config_for(tiny)
    _, tokenizer = load_policy(config.model)
    rows = pair_rows()
    encoded = encode_pairs(tokenizer, rows, config.data)
    data = tmp_path / "pairs.jsonl"
    write_rows(data, rows)
    before = cache_fingerprint(config, str(data), encoded, [config.model.path])
    write_rows(data, [{**row, "answer": "changed"} for row in rows])
    after = cache_fingerprint(config, str(data), encoded, [config.model.path])
    assert before["tokens_sha256"] == after["tokens_sha256"] and before["data_sha256"] != after["data_sha256"]


# ----------------------------------------------------------------------------- command line


def records_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_two_steps_full_finetune_changes_weights_and_reloads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    main(["dpo", *overrides(tiny, tmp_path)])
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    before = AutoModelForCausalLM.from_pretrained(tiny / "model").state_dict()
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before), f"unchanged: {sorted(set(before) - set(changed))}"
    state = load_state(latest_checkpoint(tmp_path / "checkpoints"), "trainable")
    for name, value in trained.named_parameters():
        assert torch.equal(state[name], value), name
    records = records_of(tmp_path)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    # step 1 is scored before its update: policy = reference, so D = 0 and the sigmoid loss is log 2
    assert records[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["train/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert records[2]["train/loss"] != pytest.approx(math.log(2), abs=1e-4)
    for key in (
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/accuracy",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/grad_norm",
        "train/lr",
    ):
        assert key in records[2], key
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[2]
    assert (tmp_path / "dpo_curves.png").stat().st_size > 0
    sidecar = json.loads((tmp_path / "reference_logprobs.json").read_text())
    assert sidecar["tokens_sha256"] and sidecar["data_sha256"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "reference_logprobs.safetensors"))
    assert len(tensors) == 2 * len(pair_rows())
    reference_model, tokenizer = load_policy(config_for(tiny).model)
    rc, rr = direct_pairs(reference_model, tokenizer, pair_rows()[1:2])[0]  # the chat-prompt row
    assert_close(tensors["chosen.1"], rc, atol=1e-5, rtol=1e-5)
    assert_close(tensors["rejected.1"], rr, atol=1e-5, rtol=1e-5)


def test_cli_two_steps_lora_live_reference_saves_a_peft_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    main(
        [
            "dpo",
            *overrides(
                tiny,
                tmp_path,
                "model.lora=true",
                "model.lora_rank=4",
                "algorithm.reference=live",
                "algorithm.loss=hinge",
                "data.test=null",
            ),
        ]
    )
    state = load_state(latest_checkpoint(tmp_path / "checkpoints"), "trainable")
    assert state and all("lora_" in name for name in state)
    assert any(name.endswith("lora_B.default.weight") and value.abs().sum() > 0 for name, value in state.items())
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny / "model"), tmp_path / "final")
    params = dict(reloaded.named_parameters())
    for name, value in state.items():
        assert torch.equal(params[name], value), name
    assert not (tmp_path / "reference_logprobs.safetensors").exists()  # live: nothing cached
    assert records_of(tmp_path)[1]["train/loss"] == pytest.approx(1.0, abs=1e-6)  # hinge relu(1 - beta*0) = 1


def test_cli_simpo_loads_no_reference(tiny, tmp_path, monkeypatch):
    import llmalign.dpo as dpo

    def forbidden(*args, **kwargs):
        raise AssertionError("simpo must not build a reference")

    monkeypatch.setattr(dpo, "reference_policy", forbidden)
    monkeypatch.setattr(dpo, "compute_token_logprobs", forbidden)
    # all 6 pairs in the one step, so its logged loss is the mean over the data at the initial weights
    main(
        [
            "dpo",
            *overrides(
                tiny,
                tmp_path,
                "algorithm.loss=simpo",
                "train.steps=1",
                "train.batch_size=6",
                "memory.micro_batch_size=4",
                "data.test=null",
            ),
        ]
    )
    assert not (tmp_path / "reference_logprobs.safetensors").exists()
    model, tokenizer = load_policy(config_for(tiny).model)
    direct = direct_pairs(model, tokenizer, pair_rows())
    expected = expected_losses("simpo", config_for(tiny, "algorithm.loss=simpo"), direct, None, None).mean()
    assert records_of(tmp_path)[1]["train/loss"] == pytest.approx(float(expected), abs=2e-5)


def test_cli_tgdpo_caches_the_guidance_logprobs(tiny, tmp_path):
    from safetensors.torch import load_file

    main(
        [
            "dpo",
            *overrides(
                tiny,
                tmp_path,
                "train.steps=1",
                "data.test=null",
                "algorithm.tgdpo_alpha=1.0",
                f"algorithm.guidance_model={tiny / 'guide'}",
            ),
        ]
    )
    guidance = load_file(str(tmp_path / "guidance_logprobs.safetensors"))
    _, tokenizer = load_policy(config_for(tiny).model)
    gc, gr = direct_pairs(perturbed(tiny / "model", seed=7), tokenizer, pair_rows()[3:4])[0]
    assert_close(guidance["chosen.3"], gc, atol=1e-5, rtol=1e-5)
    assert_close(guidance["rejected.3"], gr, atol=1e-5, rtol=1e-5)
    models = json.loads((tmp_path / "guidance_logprobs.json").read_text())["models"]
    assert models[1][0] == str((tiny / "guide").resolve())


def test_guidance_model_can_be_a_lora_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny / "model"),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)  # B = 0 would make the adapter a no-op
    adapted.save_pretrained(tmp_path / "adapter")
    config = config_for(tiny, "algorithm.tgdpo_alpha=1.0", f"algorithm.guidance_model={tmp_path / 'adapter'}")
    guide = load_guidance_model(config, vocab_size=adapted.get_input_embeddings().num_embeddings)
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        assert_close(guide(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits)
        with adapted.disable_adapter():
            base = adapted(input_ids=ids).logits
        assert not torch.allclose(guide(input_ids=ids).logits, base)  # the adapter was loaded, not just the base


@pytest.mark.parametrize("loss", ["sigmoid", "srpo"])
def test_resume_ends_bit_identical(tiny, tmp_path, capsys, loss):
    common = ["data.test=null", "train.warmup_steps=2", f"algorithm.loss={loss}"]
    main(["dpo", *overrides(tiny, tmp_path / "straight", "train.steps=3", *common)])
    main(["dpo", *overrides(tiny, tmp_path / "split", "train.steps=1", *common)])
    capsys.readouterr()
    main(["dpo", *overrides(tiny, tmp_path / "split", "train.steps=3", *common), "--resume"])
    assert "reference precomputed (read from" in capsys.readouterr().out  # the cache of the first part
    straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), "trainable")
    resumed = load_state(latest_checkpoint(tmp_path / "split" / "checkpoints"), "trainable")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [r["iteration"] for r in records_of(tmp_path / "split")] == [0, 1, 2, 3]
    assert [r["train/lr"] for r in records_of(tmp_path / "split")[1:]] == [5e-3, 1e-2, 1e-2]  # warm-up 1/2, 2/2


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.loss=kto", "algorithm.loss"),
        ("algorithm.tgdpo_alpha=0.5", "algorithm.guidance_model"),
        ("algorithm.guidance_model=somewhere", "algorithm.guidance_model"),
        ("algorithm.label_smoothing=0.6", "algorithm.label_smoothing"),
        ("algorithm.loss=ipo algorithm.label_smoothing=0.1", "algorithm.label_smoothing"),
        ("train.batch_size=0", "train.batch_size"),
        ("memory.micro_batch_sise=2", "did you mean 'memory.micro_batch_size'"),
        ("data.train=null", "data.train"),
    ],
)
def test_bad_config_exits_2_with_one_line(tiny, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", *overrides(tiny, tmp_path), *override.split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_rejected_column_exits_2(tiny, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Compute 1+1.\\n", "chosen": "2", "rejectd": "3"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", *overrides(tiny, tmp_path, f"data.train={data}")])
    assert exit_info.value.code == 2
    assert "did you mean 'rejectd'" in capsys.readouterr().err


def test_shipped_config_loads_and_describe_lists_fields(capsys):
    config = load_config(DPOConfig, ROOT / "configs" / "llm" / "arith_dpo.yaml")
    assert (config.data.train, config.algorithm.loss, config.algorithm.effective_beta, config.model.lora) == (
        "runs/arith_pairs.jsonl",
        "dpop",
        0.3,
        False,
    )
    main(["dpo", "--describe"])
    out = capsys.readouterr().out
    for field in ("algorithm.tgdpo_alpha", "algorithm.reference", "log.output_dir (str, default 'runs/llm_dpo')"):
        assert field in out


# ----------------------------------------------------------------------------- pairs


def test_preference_levels_of_hand_written_completions():
    cases = [
        ("<think>1+2=3</think><answer>3</answer>", True, 3),  # correct
        ("<think>1+2=4</think> <answer>4</answer>", True, 2),  # wrong answer
        ("<think>1+2=3</think><answer></answer>", True, 1),  # empty answer: the 3 in the reasoning does not count
        ("<think>1+2=3</think><answer>three-ish</answer>", True, 1),  # not a number, the reference is one
        ("the answer is 3", True, 0),  # right, but breaks the format
        ("<answer>3</answer>", True, 0),  # no think block
        ("<think>a</think><answer>3</answer><answer>3</answer>", True, 0),  # two answers
        ("the answer is 3", False, 3),  # without the format check it is judged on its answer
        ("3 apples, no 5", False, 2),  # the last number is the answer
        ("no idea", False, 1),
        ("", False, 1),
        ("<answer>" * 20_000, False, 1),  # unclosed tags: no answer (the tag search rescanned to the end per tag)
        ("<answer>" * 20_000, True, 0),
    ]
    for completion, check, level in cases:
        assert preference_level(completion, "3", format_check=check) == level, completion


def test_select_pairs_on_hand_built_levels():
    texts = ["w1", "c1", "f1", "c2", "u1", "w2"]
    levels = [2, 3, 0, 3, 1, 2]
    # chosen: level 3 -> [1, 3]; rejected, nearest level first: 0 (2), 5 (2), 4 (1), 2 (0)
    assert select_pairs(texts, levels, 1) == [(1, 0)]
    assert select_pairs(texts, levels, 3) == [(1, 0), (3, 5), (1, 4)]
    assert select_pairs(texts, levels, 10) == [(1, 0), (3, 5), (1, 4), (3, 2)]
    # a repeated text is one candidate: "w1" again at index 5
    assert select_pairs(["w1", "c1", "f1", "c2", "u1", "w1"], levels, 10) == [(1, 0), (3, 4), (1, 2)]
    assert select_pairs(["a", "b", "c"], [2, 2, 2], 2) == []  # one level: nothing to prefer
    assert select_pairs(["a", "b"], [1, 0], 3) == [(0, 1)]  # the top level need not be 'correct'


def test_make_pairs_writes_rows_that_dpo_loads(tmp_path):
    rows = [{"prompt": "Compute 1+2.\n", "answer": "3", "id": 7}, {"prompt": "Compute 2+2.\n", "answer": "4", "id": 8}]
    completions = [
        ["<think>x</think><answer>3</answer>", "<think>x</think><answer>5</answer>", "junk"],
        ["junk", "more junk", "junk 2"],
    ]  # the second prompt: all format errors, no pair
    pairs, summary = make_pairs(rows, completions, pairs_per_prompt=2)
    assert summary == {"levels": {3: 1, 2: 1, 1: 0, 0: 4}, "prompts": 2, "prompts_without_pair": 1, "pairs": 2}
    assert [(p["chosen"], p["rejected"], p["chosen_level"], p["rejected_level"], p["id"]) for p in pairs] == [
        ("<think>x</think><answer>3</answer>", "<think>x</think><answer>5</answer>", 3, 2, 7),
        ("<think>x</think><answer>3</answer>", "junk", 3, 0, 7),
    ]
    write_rows(tmp_path / "pairs.jsonl", pairs)
    assert load_rows(tmp_path / "pairs.jsonl", required=("prompt", "chosen", "rejected")) == pairs


def test_cli_pairs_on_the_tiny_model(tiny, tmp_path, capsys):
    # A fake reward situation for an untrained model: each prompt's reference answer is the number that the
    # model's first completion with a number ends in (same seed and batches as the CLI run below), so some
    # completions are 'correct', others wrong or without a number.
    from llmalign.rewards import extract_answer

    model, tokenizer = load_policy(config_for(tiny).model)
    prompts = [{"prompt": p["prompt"]} for p in toy.make_split(6, 11)]
    samples = sample_completions(model, tokenizer, prompts, 4, 10, seed=3, batch_size=4, progress=False)
    answers = [next((a for a in map(extract_answer, texts) if a is not None), "12345") for texts in samples]
    data = tmp_path / "prompts.jsonl"
    write_rows(data, [{**p, "answer": a} for p, a in zip(prompts, answers)])
    out = tmp_path / "pairs.jsonl"
    main(
        [
            "pairs",
            "--model",
            str(tiny / "model"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--group-size",
            "4",
            "--max-new-tokens",
            "10",
            "--seed",
            "3",
            "--batch-size",
            "4",
            "--pairs-per-prompt",
            "2",
            "--no-format-check",
        ]
    )
    printed = capsys.readouterr().out
    expected, summary = make_pairs([{**p, "answer": a} for p, a in zip(prompts, answers)], samples, 2, False)
    assert summary["levels"][3] >= 1 and summary["pairs"] >= 1  # the situation above has something to pair
    written = load_rows(out, required=("prompt", "chosen", "rejected"))
    assert written == expected
    for pair in written:
        assert pair["chosen_level"] > pair["rejected_level"]
        assert preference_level(pair["chosen"], pair["answer"], False) == pair["chosen_level"]
    assert f"{summary['pairs']} pairs" in printed and "3 correct" in printed
    # with the format check every completion of the untrained model is a format error: no pairs
    main(
        [
            "pairs",
            "--model",
            str(tiny / "model"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--group-size",
            "2",
            "--max-new-tokens",
            "4",
            "--limit",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "2 gave none" in printed and out.read_text() == ""
