"""`llmalign rm` (Bradley-Terry and GPM reward models) and its reward plug-ins, on a tiny Qwen2 built in the test.

- the recipe's pair terms: BT by hand (a zero head: every loss log 2) and against an independent one-sequence
  forward; GPM's score table from the head equals the explicit R matmul of shared.gpm's formula;
- micro-batched == whole batch; 1 process == 2 processes; SIGKILL + --resume bit-identical;
- bad input: one line, exit 2;
- the plug-ins return what the loaded model gives on its own; the groupwise GPM reward makes one forward per group
  and equals the pairwise preferences;
- the cyclic pair data: every prompt's three pairs form a cycle, train and held-out prompts are disjoint, and a
  scalar reward orders at most 2 of each 3 right.
"""

import copy
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from llmalign import reward_model as rm_module
from llmalign import toy
from llmalign.cli import main
from llmalign.data import write_rows
from llmalign.dpo import encode_pairs
from llmalign.reward_model import (
    gpm_preference,
    load_reward_backbone,
    load_reward_model,
    make_bt_reward,
    make_gpm_reward,
    pair_terms,
    train_step,
)
from llmalign.rm_config import RMConfig
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config
from shared.run import Run
from tests.multiproc import run_processes

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def pair_rows(count: int, seed: int) -> list[dict]:
    """Correct worked solutions over wrong answers; row 1's prompt is chat messages."""
    rows = toy.answer_pairs([p["prompt"] for p in toy.make_split(count, seed)], seed)
    rows[1] = {**rows[1], "prompt": [{"role": "user", "content": rows[1]["prompt"]}]}
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen2-rm")
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    write_rows(directory / "pairs.jsonl", pair_rows(8, 3))
    write_rows(directory / "test.jsonl", pair_rows(5, 4))
    return directory


def overrides(tiny, out_dir, *extra):
    return [
        f"model.path={tiny / 'model'}",
        f"data.train={tiny / 'pairs.jsonl'}",
        f"data.test={tiny / 'test.jsonl'}",
        "train.steps=3",
        "train.batch_size=4",
        "memory.micro_batch_size=3",
        "train.learning_rate=1e-2",
        f"log.output_dir={out_dir}",
        "log.checkpoint_every=1",
        *extra,
    ]


def config_for(tiny, *extra) -> RMConfig:
    return load_config(RMConfig, None, overrides(tiny, "unused", *extra))


@pytest.fixture
def one_process(tmp_path):
    return Run(tmp_path / "one_process", resume=False, tag="[test]")


def loaded(tiny, *extra):
    """(config, model with a head seeded as the recipe seeds it, tokenizer, encoded pairs)."""
    config = config_for(tiny, *extra)
    torch.manual_seed(0)
    model, tokenizer = load_reward_backbone(config.model, config.algorithm.head_size)
    encoded = encode_pairs(tokenizer, pair_rows(8, 3), config.data, end_of_text=False)
    return config, model, tokenizer, encoded


def alone(model, tokenizer, prompt, completion) -> torch.Tensor:
    """Independent reference: the head at the last token of one unpadded sequence, default positions [D]."""
    text = (
        prompt
        if isinstance(prompt, str)
        else tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )
    ids = (
        tokenizer(text, add_special_tokens=False)["input_ids"]
        + tokenizer(completion, add_special_tokens=False)["input_ids"]
    )
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]  # [H]
        return (model.score.weight @ hidden).float()  # [D]


def explicit_gpm_score(v_i, v_j, tau):
    """<R v_i, v_j> / tau with R the explicit block-diagonal [[0, -1], [1, 0]] matrix (the official code's R)."""
    k = v_i.shape[-1] // 2
    R = torch.zeros(2 * k, 2 * k, dtype=v_i.dtype)
    for b in range(k):
        R[2 * b, 2 * b + 1], R[2 * b + 1, 2 * b] = -1.0, 1.0
    return (R @ v_i) @ v_j / tau


# ----------------------------------------------------------------------------- the recipe's terms


def test_bt_terms_by_hand_and_against_one_sequence_forwards(tiny):
    config, model, tokenizer, encoded = loaded(tiny)
    rows, pad = [0, 1, 2, 5], tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.zero_()  # r = 0 for every sequence: each loss is -log sigmoid(0) = log 2, no pair right
        losses, scores = pair_terms(config.algorithm, model, encoded, rows, pad)
    assert_close(losses, torch.full((4,), math.log(2)))
    assert torch.equal(scores, torch.zeros(4))
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(1)))
        losses, scores = pair_terms(config.algorithm, model, encoded, rows, pad)
    data = pair_rows(8, 3)
    for k, i in enumerate(rows):
        r_w = alone(model, tokenizer, data[i]["prompt"], data[i]["chosen"])[0]
        r_l = alone(model, tokenizer, data[i]["prompt"], data[i]["rejected"])[0]
        assert_close(scores[k], r_w - r_l, atol=1e-5, rtol=1e-5)
        assert_close(losses[k], math.log1p(math.exp(-(r_w - r_l).item())) * torch.ones(()), atol=1e-5, rtol=1e-5)


def test_gpm_head_gives_the_explicit_score_table(tiny):
    config, model, tokenizer, encoded = loaded(tiny, "algorithm.kind=gpm", "algorithm.gpm_dim=4", "algorithm.tau=0.5")
    data = pair_rows(8, 3)
    rows = [0, 2, 3]
    losses, scores = pair_terms(config.algorithm, model, encoded, rows, tokenizer.pad_token_id)
    for k, i in enumerate(rows):
        v_w = alone(model, tokenizer, data[i]["prompt"], data[i]["chosen"])
        v_l = alone(model, tokenizer, data[i]["prompt"], data[i]["rejected"])
        s = explicit_gpm_score(v_w, v_l, 0.5)
        assert_close(scores[k], s, atol=1e-5, rtol=1e-5)
        assert_close(losses[k], -torch.nn.functional.logsigmoid(s), atol=1e-5, rtol=1e-5)
    assert scores.abs().min() > 1e-4  # not the trivial all-zero table


@pytest.mark.parametrize("kind", ["bt", "gpm"])
def test_micro_batches_equal_one_big_batch(tiny, one_process, kind):
    config, model, tokenizer, encoded = loaded(tiny, f"algorithm.kind={kind}", "train.max_grad_norm=1e9")
    results = []
    for micro in (6, 4, 1):  # 4: micro-batches of unequal size (4 + 2)
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
        config.memory.micro_batch_size = micro
        metrics = train_step(
            one_process, config, trained, optimizer, encoded, [3, 1, 4, 0, 7, 2], tokenizer.pad_token_id
        )
        results.append((dict(trained.named_parameters()), metrics))
    (big, big_metrics), *smaller = results
    for params, metrics in smaller:
        for name, value in big.items():
            assert_close(params[name], value, atol=1e-6, rtol=1e-5, msg=name)
        for key in ("loss", "accuracy", "margin"):
            assert metrics[key] == pytest.approx(big_metrics[key], abs=1e-6)
    assert not torch.equal(big["score.weight"], dict(model.named_parameters())["score.weight"])


# ----------------------------------------------------------------------------- runs


def records_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def trained_weights(out):
    return load_state(latest_checkpoint(out / "checkpoints"), "trainable")


@pytest.mark.timeout(180)
def test_two_processes_equal_one_process(tiny, tmp_path):
    args = ["algorithm.kind=gpm", "algorithm.gpm_dim=4", "memory.micro_batch_size=1", "log.eval_every=3"]
    main(["rm", *overrides(tiny, tmp_path / "one"), *args])
    two = run_processes(2, ["-m", "llmalign", "rm", *overrides(tiny, tmp_path / "two"), *args])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 process(es)" in two.stdout + two.stderr
    one_w, two_w = trained_weights(tmp_path / "one"), trained_weights(tmp_path / "two")
    assert one_w.keys() == two_w.keys()
    for name in one_w:
        # the key bias's true gradient is 0 (it adds q.b_k to a whole row of scores, which softmax ignores), so
        # AdamW turns the gradient's rounding noise into lr-sized steps that differ with the reduction order
        if not name.endswith("k_proj.bias"):
            assert_close(two_w[name], one_w[name], atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(records_of(tmp_path / "one"), records_of(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("train/loss", "train/accuracy", "eval/")):
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert "eval/accuracy" in records_of(tmp_path / "two")[3]


@pytest.mark.timeout(180)
def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path):
    extra = ["algorithm.kind=gpm", "train.steps=4", "train.warmup_steps=2", "data.test=null"]
    main(["rm", *overrides(tiny, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "rm", *overrides(tiny, out, *extra)]
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
    main(["rm", *overrides(tiny, out, *extra), "--resume"])
    straight, resumed = trained_weights(tmp_path / "straight"), trained_weights(out)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert [r["iteration"] for r in records_of(out)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.kind=gpm algorithm.gpm_dim=3", "config field 'algorithm.gpm_dim': 3 must be even and >= 2"),
        ("algorithm.kind=gpm algorithm.gpm_dim=0", "algorithm.gpm_dim"),
        ("algorithm.kind=bt algorithm.tau=0.5", "algorithm.tau"),
        ("algorithm.kind=gpm algorithm.tau=0", "algorithm.tau"),
        ("algorithm.kind=rank", "algorithm.kind"),
        ("model.lora=true", "model.lora"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.train=null", "data.train"),
    ],
)
def test_bad_config_exits_2_with_one_line(tiny, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["rm", *overrides(tiny, tmp_path), *override.split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Compute 1+1.\n", "chosen": "2", "rejectd": "3"}, "did you mean 'rejectd'"),
        ({"prompt": "Compute 1+1.\n", "chosen": "2<|endoftext|>", "rejected": "3"}, "ends in the padding token"),
    ],
)
def test_bad_pairs_exit_2_with_one_line(tiny, tmp_path, capsys, row, message):
    data = tmp_path / "bad.jsonl"
    write_rows(data, [row])
    for where in ("data.train", "data.test"):
        with pytest.raises(SystemExit) as exit_info:
            main(["rm", *overrides(tiny, tmp_path / where, f"{where}={data}")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- plug-ins


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """kind -> RUN/final of a 2-step run."""
    out = {}
    for kind, extra in (("bt", []), ("gpm", ["algorithm.gpm_dim=4", "algorithm.tau=0.5"])):
        run = tmp_path_factory.mktemp(f"rm-{kind}")
        main(["rm", *overrides(tiny, run, f"algorithm.kind={kind}", "train.steps=2", "data.test=null", *extra)])
        out[kind] = run / "final"
    return out


def independent(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_saved_model_describes_its_head(saved):
    assert json.loads((saved["gpm"] / "reward_model.json").read_text()) == {
        "kind": "gpm",
        "dim": 4,
        "tau": 0.5,
        "normalize": False,
    }
    assert list(saved["gpm"].glob("*.safetensors")) and not list(saved["gpm"].glob("*.bin"))
    assert load_reward_model(saved["bt"]).kind == "bt"


def test_bt_reward_is_the_loaded_models_scalar(saved):
    rows = pair_rows(3, 9)
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [r[c] for r in rows for c in ("chosen", "rejected")]
    rewards = make_bt_reward(str(saved["bt"]), batch_size=4)(prompts, completions, answer=["x"] * 6)
    model, tokenizer = independent(saved["bt"])
    expected = [alone(model, tokenizer, p, c)[0].item() for p, c in zip(prompts, completions)]
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(round(r, 6) for r in rewards)) > 1


def test_groupwise_gpm_reward_is_one_forward_and_equals_pairwise(saved, monkeypatch):
    prompt = "Compute 3+4-2.\n"
    completions = ["<think>3+4=7 7-2=5</think><answer>5</answer>", "<answer>6</answer>", "5", "I do not know", "x"]
    with pytest.raises(ValueError, match="holds a bt reward model; make_gpm_reward needs a GPM"):
        make_gpm_reward(str(saved["bt"]))  # refused when built, from its reward_model.json (the weights load lazily)
    reward = make_gpm_reward(str(saved["gpm"]))
    assert reward.groupwise is True
    calls = []
    counting = rm_module.head_outputs

    def counted(model, ids, mask):
        calls.append(ids.shape[0])
        return counting(model, ids, mask)

    monkeypatch.setattr(rm_module, "head_outputs", counted)
    win_rates = reward(prompt, completions, answer="5")
    assert calls == [5]  # one forward of the group's K = 5 completions
    model, tokenizer = independent(saved["gpm"])
    v = [alone(model, tokenizer, prompt, c) for c in completions]
    table = torch.tensor([[torch.sigmoid(explicit_gpm_score(a, b, 0.5)).item() for b in v] for a in v])  # [K, K]
    assert win_rates == pytest.approx(table.mean(dim=1).tolist(), abs=1e-5)
    preference = gpm_preference(str(saved["gpm"]), batch_size=3)
    for i, completion in enumerate(completions):  # P(c_i > c_j) pair by pair; its mean over j is the win rate
        pairwise = preference(prompt, [completion] * 5, completions)
        assert pairwise == pytest.approx(table[i].tolist(), abs=1e-5)
        assert sum(pairwise) / 5 == pytest.approx(win_rates[i], abs=1e-5)
    assert max(win_rates) - min(win_rates) > 1e-4
    probabilities = load_reward_model(saved["gpm"]).probability_table(prompt, completions)
    assert_close(probabilities + probabilities.T, torch.ones(5, 5))  # P(i > j) + P(j > i) = 1


# ----------------------------------------------------------------------------- the cyclic data


def test_cyclic_pairs_form_a_cycle_no_scalar_can_order():
    train = [json.loads(line) for line in open(toy.resolve_embedded("embedded:arith/rm/cyclic_train.jsonl"))]
    test = [json.loads(line) for line in open(toy.resolve_embedded("embedded:arith/rm/cyclic_test.jsonl"))]
    assert (len(train), len(test)) == (1200, 300)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}

    def cls(text):
        return toy.answer_class(int(text.rsplit(" ", 1)[1]))

    for rows in (train, test):
        for start in range(0, len(rows), 3):
            triple = rows[start : start + 3]
            assert len({r["prompt"] for r in triple}) == 1
            assert sorted((cls(r["chosen"]), cls(r["rejected"])) for r in triple) == [(0, 2), (1, 0), (2, 1)]
            texts = sorted({r["chosen"] for r in triple})
            for scores in itertools.product(range(3), repeat=3):  # every ordering (ties too) of the three texts
                r = dict(zip(texts, scores))
                assert sum(r[p["chosen"]] > r[p["rejected"]] for p in triple) <= 2


@pytest.mark.timeout(180)
def test_on_cyclic_preferences_gpm_fits_the_cycle_and_bradley_terry_cannot(tiny, tmp_path):
    """The reason GPM exists (arXiv 2410.02197): on the embedded cyclic pairs (held-out prompts), a scalar reward
    ranks at most 2/3 of the pairs right, and its mean loss is at least log 2: each prompt's three pairs are a cycle,
    whose three reward differences sum to 0, so by convexity their softplus losses sum to >= 3 softplus(0) (both
    exact, no tolerance needed). The 2-D GPM head fits the cycle. The tiny random Qwen2 (hidden 32) reads the last
    digit within 25 steps (docs/results.md has the pretrained toy)."""
    accuracy, loss = {}, {}
    for kind in ("gpm", "bt"):
        out = tmp_path / kind
        main(
            [
                "rm",
                "--config",
                str(ROOT / "configs/llm/arith_rm_cyclic_gpm.yaml"),
                f"model.path={tiny / 'model'}",
                f"algorithm.kind={kind}",
                "train.steps=25",
                "train.learning_rate=1e-3",
                "train.warmup_steps=5",
                "log.eval_every=25",
                "log.checkpoint_every=100",
                f"log.output_dir={out}",
            ]
        )
        accuracy[kind], loss[kind] = records_of(out)[-1]["eval/accuracy"], records_of(out)[-1]["eval/loss"]
        assert records_of(out)[0]["eval/accuracy"] < 0.6  # the untrained head is at chance
    assert accuracy["gpm"] >= 0.95 and loss["gpm"] < 0.3, (accuracy, loss)
    assert accuracy["bt"] <= 2 / 3 and loss["bt"] >= math.log(2) - 1e-6, (accuracy, loss)
