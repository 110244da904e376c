"""Coupled-GRPO (`algorithm.name: coupled_grpo`) on a tiny BertForMaskedLM built in the test: the unmasking sampler,
the recipe's masks and estimator against a brute-force computation, the same masks across an iteration's updates,
1 process == 2 processes, SIGKILL + --resume bit-identical, and both model-kind refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from llmalign import coupled_grpo, diffusion_toy, toy
from llmalign.cli import main
from llmalign.config import GRPOConfig
from llmalign.coupled_grpo import rollout_masks
from llmalign.diffusion import DiffusionMasks, DiffusionSampler, masked_token_logps, transfer_counts, unmask
from llmalign.evaluate import Rollout
from shared.checkpoint import latest_checkpoint, load_state
from tests.multiproc import run_processes
from tests.test_llm_grpo import tiny_lm_dir  # noqa: F401  (fixture: a tiny causal model)

ROOT = Path(__file__).resolve().parents[1]
L = 8  # completion positions in these tests


@pytest.fixture(scope="module")
def tiny_mdm_dir(tmp_path_factory):
    """A randomly initialised tiny BertForMaskedLM with the toy's tokenizer (+ mask token) and a few problems."""
    directory = tmp_path_factory.mktemp("tiny-mdm")
    tokenizer = diffusion_toy.build_mdm_tokenizer()
    diffusion_toy.build_model(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name, seed, n in (("train.jsonl", 0, 40), ("test.jsonl", 1, 4)):
        with open(directory / name, "w") as f:
            for p in toy.make_split(n, seed):
                f.write(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n")
    return directory


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_mdm_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForMaskedLM.from_pretrained(tiny_mdm_dir).eval()
    with torch.no_grad():  # a sharper random model: its draws and confidences differ visibly between positions
        model.cls.predictions.decoder.weight.mul_(20)
    return model, AutoTokenizer.from_pretrained(tiny_mdm_dir)


def overrides(model_dir, out_dir, *extra):
    return [
        "--config",
        str(ROOT / "configs/llm/arith_coupled_grpo.yaml"),
        f"model.path={model_dir}",
        f"data.train={model_dir}/train.jsonl",
        f"data.test={model_dir}/test.jsonl",
        "data.eval_size=4",
        f"sampling.max_new_tokens={L}",
        "algorithm.diffusion_steps=4",
        "train.iterations=2",
        "train.prompts_per_iteration=2",
        "train.group_size=4",
        "memory.micro_batch_size=4",
        "train.learning_rate=1e-2",
        "budget.max_seconds=null",
        "algorithm.mask_truncated=false",  # the random model rarely ends within L: train on cut completions too
        "reward.weights={accuracy: 1.0, tests.test_llm_grpo:char_count_reward: 1.0}",  # dense: the random model learns
        f"log.output_dir={out_dir}",
        "log.eval_every=0",
        "log.checkpoint_every=1",
        *extra,
    ]


def prompts(tokenizer, n):
    return [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in toy.make_split(n, 3)]


# ----------------------------------------------------------------------------- the sampler


def test_transfer_counts_by_hand():
    assert transfer_counts(40, 20) == [2] * 20
    assert transfer_counts(10, 4) == [3, 3, 2, 2]  # the remainder on the first steps (LLaDA)
    assert transfer_counts(5, 5) == [1] * 5
    with pytest.raises(ValueError, match="steps=6"):
        transfer_counts(5, 6)


@pytest.mark.parametrize("confidence", ["max_prob", "neg_entropy"])
def test_sampler_commits_the_configured_counts_and_leaves_no_mask(model_and_tokenizer, confidence):
    model, tokenizer = model_and_tokenizer
    ids = torch.tensor(prompts(tokenizer, 3))  # [3, P] the toy's prompts have one length
    mask = torch.ones_like(ids)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    completion, step_of = unmask(model, ids, mask, 10, 4, tokenizer.mask_token_id, confidence, 1.0, gens)
    assert completion.shape == (3, 10) and not (completion == tokenizer.mask_token_id).any()
    for row in step_of:  # every position committed once, 3, 3, 2, 2 of them at steps 0..3
        assert torch.bincount(row, minlength=4).tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize("confidence", ["max_prob", "neg_entropy"])
def test_greedy_commits_the_most_confident_position_first(model_and_tokenizer, confidence):
    model, tokenizer = model_and_tokenizer
    ids = torch.tensor(prompts(tokenizer, 2))
    mask = torch.ones_like(ids)
    _, step_of = unmask(model, ids, mask, L, L, tokenizer.mask_token_id, confidence)  # one token per step
    masked = torch.cat([ids, torch.full((2, L), tokenizer.mask_token_id)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=masked).logits[:, ids.shape[1] :]  # [2, L, V] the first step's view
    keep = torch.arange(logits.shape[-1]) != tokenizer.mask_token_id
    probs = logits[..., keep].softmax(-1)  # [2, L, V-1] the mask token is never predicted
    if confidence == "max_prob":
        score = probs.max(-1).values
    else:  # the entropy by hand, over the tokens that can be predicted
        score = (probs * probs.log()).sum(-1)
    assert score.isfinite().all()
    first = score.argmax(dim=1)  # [2] the most confident position
    assert step_of[torch.arange(2), first].tolist() == [0, 0]


def test_greedy_is_deterministic_and_sampling_follows_the_seeds(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    sampler = DiffusionSampler(tokenizer, 4, "max_prob", model)
    batch = prompts(tokenizer, 3)
    one, two = (sampler.generate(batch, 2, L, greedy=True) for _ in range(2))
    assert torch.equal(one.completion_ids, two.completion_ids) and one.texts == two.texts
    seeds = list(range(6))
    a, b = (sampler.generate(batch, 2, L, seeds=seeds) for _ in range(2))
    assert torch.equal(a.completion_ids, b.completion_ids)
    # a completion depends on its own seed alone: the last prompt's completions alone, from their seeds, agree
    alone = sampler.generate(batch[2:], 2, L, seeds=seeds[4:])
    assert torch.equal(alone.completion_ids, a.completion_ids[4:])
    other = sampler.generate(batch, 2, L, seeds=[s + 100 for s in seeds])
    assert not torch.equal(other.completion_ids, a.completion_ids)


# ----------------------------------------------------------------------------- masks and estimator


def small_rollout(model, tokenizer):
    sampler = DiffusionSampler(tokenizer, 4, "max_prob", model)
    rollout = sampler.generate(prompts(tokenizer, 2), 2, L, seeds=[5, 6, 7, 8])  # [4, L]
    # completions of different lengths (EOS placed by hand), so padding is exercised
    ids = rollout.completion_ids.clone()
    eos = tokenizer.eos_token_id
    ids[ids == eos] = 40  # no early EOS from the random model
    lengths = [L, 5, 3, 7]  # tokens with EOS
    for row, n in enumerate(lengths):
        ids[row, n - 1] = eos
        ids[row, n:] = tokenizer.pad_token_id
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()  # [4, L]
    return Rollout(rollout.prompt_ids, rollout.prompt_mask, ids, mask, torch.zeros(4, dtype=torch.bool), [""] * 4)


class Recorder(torch.nn.Module):
    """The model, recording every input_ids it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kwargs)


def test_recipe_masks_cover_every_completion_token_exactly_once(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rollout = small_rollout(model, tokenizer)
    config = GRPOConfig()
    masks = rollout_masks(config, 3, 0, rollout.completion_mask, torch.ones(4, dtype=torch.bool))
    recorder = Recorder(model)
    masked_token_logps(recorder, rollout, [0, 1, 2, 3], 2, masks, tokenizer.mask_token_id, 1.0)
    (passes,) = recorder.calls  # one batched forward of the three passes
    P = rollout.prompt_ids.shape[1]
    masked = passes[:, P:].view(3, 4, L) == tokenizer.mask_token_id  # [3, 4, L]
    completion = rollout.completion_mask.bool()
    assert not (passes[:, :P] == tokenizer.mask_token_id).any()  # the prompt never
    assert torch.equal(masked[0], completion)  # the fully masked pass
    assert not (masked[1] & masked[2]).any()  # A and B never both
    assert torch.equal(masked[1] | masked[2], completion)  # every completion token once, padding never
    assert masked[1].any() and masked[2].any()


@pytest.mark.parametrize("mode", ["coupled", "single"])
def test_estimator_equals_a_brute_force_loop_over_tokens(model_and_tokenizer, mode):
    model, tokenizer = model_and_tokenizer
    rollout = small_rollout(model, tokenizer)
    t = 0.4
    mask_a = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8])
    mask_a = mask_a.bool() & rollout.completion_mask.bool()
    masks = DiffusionMasks(t, mask_a, mode)
    rows = [1, 3, 0, 2]  # any order of rows
    estimate = masked_token_logps(model, rollout, rows, 2, masks, tokenizer.mask_token_id, 1.0)  # [4, L]
    mask_id = tokenizer.mask_token_id
    for k, row in enumerate(rows):
        prompt = rollout.prompt_ids[row // 2].tolist()
        completion = rollout.completion_ids[row].tolist()
        n = int(rollout.completion_mask[row].sum())

        def logp(masked_positions, j):  # one forward of this row with those completion positions masked
            seq = prompt + [mask_id if i in masked_positions else c for i, c in enumerate(completion)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[0, len(prompt) + j]
            return torch.log_softmax(logits.float(), -1)[completion[j]].item()

        in_a = {i for i in range(n) if mask_a[row, i]}
        in_b = set(range(n)) - in_a
        for j in range(L):
            if j >= n:
                expected = 0.0  # padding carries no estimate
            elif mode == "coupled":
                weighted = logp(in_a, j) / t if j in in_a else logp(in_b, j) / (1 - t)
                expected = (logp(set(range(n)), j) + weighted) / 2
            else:
                expected = logp(in_a, j) / t if j in in_a else 0.0
            assert estimate[k, j].item() == pytest.approx(expected, abs=2e-5), (row, j)
    if mode == "single":
        assert torch.equal(masks.loss_mask(), mask_a)  # the loss keeps pass A's tokens only
    else:
        assert masks.loss_mask() is None


# ----------------------------------------------------------------------------- the recipe


def test_masks_are_drawn_once_per_rollout_and_reused_by_every_update(tiny_mdm_dir, tmp_path, monkeypatch):
    calls = []  # (iteration, t, mask_a, rows, grad enabled, the estimate)
    real = coupled_grpo.masked_token_logps

    def recording(model, rollout, rows, group_size, masks, mask_id, temperature):
        out = real(model, rollout, rows, group_size, masks, mask_id, temperature)
        calls.append((masks.t, masks.mask_a.clone(), list(rows), torch.is_grad_enabled(), out.detach().clone()))
        return out

    monkeypatch.setattr(coupled_grpo, "masked_token_logps", recording)
    torch.set_num_threads(1)
    extra = ("algorithm.kl_beta=0.05", "algorithm.num_iterations=2", "memory.micro_batch_size=8")
    main(["grpo", *overrides(tiny_mdm_dir, tmp_path / "run", *extra)])
    # per iteration, on one micro-batch of all 8 rows: old (no grad), reference (no grad), update 1, update 2
    assert len(calls) == 8
    for first in (0, 4):
        t, mask_a = calls[first][0], calls[first][1]
        for later in calls[first : first + 4]:
            assert later[0] == t and torch.equal(later[1], mask_a) and later[2] == list(range(8))
        assert [c[3] for c in calls[first : first + 4]] == [False, False, True, True]
        old, update_1, update_2 = calls[first][4], calls[first + 2][4], calls[first + 3][4]
        assert torch.equal(update_1, old)  # update 1 at the rollout's weights, under the rollout's masks: ratio 1
        assert not torch.equal(update_2, old)  # update 2 after a step: new weights, the same masks
    assert calls[0][0] != calls[4][0] and not torch.equal(calls[0][1], calls[4][1])  # a new rollout, new masks
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/mask_ratio"] for r in records[1:]] == [calls[0][0], calls[4][0]]
    assert all(0.2 <= r["train/mask_ratio"] <= 0.8 for r in records[1:])


def trainable(out):
    return load_state(latest_checkpoint(out / "checkpoints"), "trainable")


def test_one_process_equals_two_processes(tiny_mdm_dir, tmp_path):
    args = ["-m", "llmalign", "grpo"]
    extra = ("algorithm.kl_beta=0.05", "algorithm.num_iterations=2")
    one = run_processes(1, [*args, *overrides(tiny_mdm_dir, tmp_path / "one", *extra)])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_processes(2, [*args, *overrides(tiny_mdm_dir, tmp_path / "two", *extra)])
    assert two.returncode == 0, two.stderr[-2000:]
    assert "over 2 process(es)" in two.stdout
    one_w, two_w = trainable(tmp_path / "one"), trainable(tmp_path / "two")
    records = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    for a, b in zip(*records):  # the same rollouts, rewards and masks
        for key in ("reward/total/mean", "completion/mean_length", "train/mask_ratio"):
            assert a.get(key) == b.get(key), key
    assert one_w.keys() == two_w.keys()
    for name in one_w:
        assert_close(two_w[name], one_w[name], rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_is_bit_identical(tiny_mdm_dir, tmp_path):
    extra = ("train.iterations=4", "algorithm.kl_beta=0.05", "algorithm.num_iterations=2")
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_mdm_dir, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "grpo", *overrides(tiny_mdm_dir, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = latest_checkpoint(out / "checkpoints")
        if checkpoint is not None and checkpoint.name >= "step-000002":
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    main(["grpo", *overrides(tiny_mdm_dir, out, *extra), "--resume"])
    straight, resumed = trainable(tmp_path / "straight"), trainable(out)
    assert latest_checkpoint(out / "checkpoints").name == "step-000004"
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_a_lora_run_changes_the_adapter_and_saves_it(tiny_mdm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    torch.set_num_threads(1)
    lora = ("model.lora=true", "model.lora_targets=[query, value]", "train.iterations=1", "algorithm.kl_beta=0.05")
    main(["grpo", *overrides(tiny_mdm_dir, tmp_path / "run", *lora)])
    state = trainable(tmp_path / "run")
    assert state and all("lora_" in name for name in state)
    assert any(value.abs().sum() > 0 for name, value in state.items() if "lora_B" in name)  # B starts at 0
    base = AutoModelForMaskedLM.from_pretrained(tiny_mdm_dir)
    PeftModel.from_pretrained(base, tmp_path / "run" / "final")  # the adapter reloads


def test_the_two_model_kinds_refuse_each_other(tiny_mdm_dir, tiny_lm_dir, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as refused:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path / "causal")])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and "is a causal LM (Qwen2ForCausalLM)" in err[0]
    assert "coupled_grpo trains masked-diffusion LMs" in err[0]
    grpo = [f"model.path={tiny_mdm_dir}", f"data.train={tiny_mdm_dir}/train.jsonl", f"log.output_dir={tmp_path}/m"]
    with pytest.raises(SystemExit) as refused:
        main(["grpo", "--config", str(ROOT / "configs/llm/arith.yaml"), *grpo])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a masked-diffusion LM (BertForMaskedLM)" in err[0]
    assert "this recipe trains causal LMs" in err[0]


@pytest.mark.parametrize(
    "config, model, message",
    [
        ("arith_coupled_grpo.yaml", "embedded:arith", "is a causal LM (Qwen2ForCausalLM)"),
        ("arith.yaml", "embedded:arith-mdm", "is a masked-diffusion LM (BertForMaskedLM)"),
        ("arith_sft.yaml", "embedded:arith-mdm", "is a masked-diffusion LM (BertForMaskedLM)"),
    ],
)
def test_the_dry_run_refuses_the_other_model_kind(config, model, message, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["train", str(ROOT / "configs/llm" / config), f"model.path={model}", "--dry-run"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and message in err[0]
