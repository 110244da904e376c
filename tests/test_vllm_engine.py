"""The rollout engines (llmalign.engines) on the embedded arithmetic toy: vLLM's generation, its per-token log-probs
against the trainer's, seeds, and weight pushes.

The vLLM tests need the vllm package (bash scripts/setup.sh --vllm). Without it they skip, unless
the environment was made by setup.sh --vllm (it leaves a marker, flowalign-vllm, in the venv; CI's is) or
FLOWALIGN_REQUIRE_VLLM=1: then a missing package fails the run, so CI never
passes with them skipped. The engine runs in this process with the one torch thread tests/conftest.py sets.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from llmalign.engines import HFEngine, VLLMEngine, check_kv_cache, policy_weights, require_vllm
from llmalign.evaluate import generate
from llmalign.logprobs import completion_logprobs
from llmalign.rollout import completion_seeds
from llmalign.toy import ensure_arith_model
from shared.config import ConfigError

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# bash scripts/setup.sh --vllm marks its environment; FLOWALIGN_REQUIRE_VLLM=1 asks the same of any other
REQUIRED = os.environ.get("FLOWALIGN_REQUIRE_VLLM") == "1" or (Path(sys.prefix) / "flowalign-vllm").exists()
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM and not REQUIRED, reason="vllm not installed (bash scripts/setup.sh --vllm)"
)
PROBLEMS = ["Compute 8+5-7.\n", "Compute 3-4+9.\n", "Compute 1+2+3.\n", "Compute 9-9-9.\n"]
MAX_NEW = 40
MAX_MODEL_LEN = 64  # the toy's prompts are 15 tokens
LOGPROB_TOLERANCE = 1e-4  # engine vs trainer, float32 on CPU; measured max |delta| ~1e-5


def test_ci_has_vllm_when_it_must():
    """CI (FLOWALIGN_REQUIRE_VLLM=1) installs vllm: a missing package is a failure there, not a skip."""
    if REQUIRED:
        assert HAVE_VLLM, "FLOWALIGN_REQUIRE_VLLM=1 but vllm is not installed: bash scripts/setup.sh --vllm"


@pytest.fixture(scope="module")
def toy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_arith_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROBLEMS]
    return path, model, tokenizer, prompts


@pytest.fixture(scope="module")
def engine(toy):
    path, _, tokenizer, _ = toy
    engine = VLLMEngine(path, tokenizer, max_model_len=MAX_MODEL_LEN, kv_cache_mib=4, dtype="float32", seed=0)
    yield engine
    engine.close()


def trainer_logprobs(model, rollout, group_size, temperature=1.0):
    with torch.no_grad():
        logp = completion_logprobs(
            model,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            group_size,
            temperature=temperature,
        )  # [B*G, C]
    return logp * rollout.completion_mask


# ----------------------------------------------------------------------------- without vllm


def test_a_missing_vllm_is_one_config_line(monkeypatch, toy):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError) as caught:
        require_vllm()
    message = str(caught.value)
    assert "\n" not in message and "rollout.engine" in message and "setup.sh --vllm" in message
    with pytest.raises(ConfigError, match="rollout.engine"):
        VLLMEngine(toy[0], toy[2], max_model_len=MAX_MODEL_LEN)


def test_a_kv_cache_too_small_for_one_sequence_is_refused_before_vllm_starts(tmp_path):
    config = {"num_attention_heads": 16, "num_key_value_heads": 8, "hidden_size": 2048, "num_hidden_layers": 28}
    (tmp_path / "config.json").write_text(json.dumps(config))
    # 2 * 28 layers * 8 heads * 128 dims * 2 bytes = 112 KiB a token: 1 MiB holds no 128-token block
    with pytest.raises(ConfigError, match=r"rollout.vllm_kv_cache_mib': 1 MiB holds 0 tokens.*use at least 28$"):
        check_kv_cache(str(tmp_path), torch.bfloat16, 1, 200)
    check_kv_cache(str(tmp_path), torch.bfloat16, 28, 200)  # two blocks of 128 tokens fit in 28 MiB
    with pytest.raises(ConfigError, match="vllm_kv_cache_mib"):
        VLLMEngine(str(tmp_path), None, max_model_len=4096, kv_cache_mib=64, dtype="bfloat16")


def test_the_hf_engine_is_the_trainers_generate(toy):
    _, model, tokenizer, prompts = toy
    torch.manual_seed(3)
    expected = generate(model, tokenizer, prompts, 2, MAX_NEW, temperature=0.9)
    torch.manual_seed(3)
    got = HFEngine(model, tokenizer).generate(prompts, 2, MAX_NEW, temperature=0.9, seeds=[1] * 8)
    assert torch.equal(got.completion_ids, expected.completion_ids) and got.texts == expected.texts
    assert got.sampling_logprobs is None


# ----------------------------------------------------------------------------- vLLM on the toy


@needs_vllm
def test_vllm_generates_completions_in_the_trainers_layout(toy, engine):
    _, _, tokenizer, prompts = toy
    G = 3
    state = torch.get_rng_state()
    rollout = engine.generate(prompts, G, MAX_NEW, seeds=completion_seeds(0, 0, 0, 0, len(prompts), G))
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's RNG stream is left alone
    assert torch.get_num_threads() == 1  # tests/conftest.py's one thread, kept through vLLM's start
    assert rollout.completion_ids.shape[0] == len(prompts) * G and rollout.prompt_ids.shape[0] == len(prompts)
    lengths, eos = rollout.lengths, tokenizer.eos_token_id
    assert bool((lengths >= 1).all())
    for i, n in enumerate(lengths.tolist()):
        ids = rollout.completion_ids[i]
        assert bool(rollout.truncated[i]) == (int(ids[n - 1]) != eos)  # EOS ends a finished one, kept in the mask
        assert rollout.texts[i] == tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
    assert sum("<answer>" in text for text in rollout.texts) >= len(rollout.texts) // 2  # the toy's format
    logp = rollout.sampling_logprobs
    assert logp.shape == rollout.completion_ids.shape and bool((logp <= 0).all())
    assert bool((logp[rollout.completion_mask == 0] == 0).all())


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_the_trainers(toy, engine, temperature):
    _, model, _, prompts = toy
    G = 4
    rollout = engine.generate(prompts, G, MAX_NEW, temperature, seeds=completion_seeds(1, 0, 0, 0, len(prompts), G))
    expected = trainer_logprobs(model, rollout, G, temperature)
    delta = (rollout.sampling_logprobs - expected).abs().max().item()
    print(f"T={temperature}: max |engine - trainer| log-prob over {int(rollout.lengths.sum())} tokens: {delta:.2e}")
    assert delta < LOGPROB_TOLERANCE


@needs_vllm
def test_vllm_seeds_repeat_and_do_not_depend_on_the_batch(toy, engine):
    """The same seeds give the same completions; half the prompts with their own seeds (another rank's share
    under 2 processes) give the same completions as the whole batch."""
    _, _, _, prompts = toy
    G = 3
    seeds = completion_seeds(7, 2, 0, 0, len(prompts), G)
    first = engine.generate(prompts, G, MAX_NEW, seeds=seeds)
    again = engine.generate(prompts, G, MAX_NEW, seeds=seeds)
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(
        first.sampling_logprobs, again.sampling_logprobs
    )
    half = len(prompts) // 2
    low = engine.generate(prompts[:half], G, MAX_NEW, seeds=completion_seeds(7, 2, 0, 0, half, G))
    high = engine.generate(prompts[half:], G, MAX_NEW, seeds=completion_seeds(7, 2, 0, half, half, G))
    split = [t for part in (low, high) for t in part.token_lists()]
    assert split == first.token_lists()
    other = engine.generate(prompts, G, MAX_NEW, seeds=completion_seeds(8, 2, 0, 0, len(prompts), G))
    assert other.token_lists() != first.token_lists()


def engine_completion_logprobs(engine, prompt, completion):
    """vLLM's log-prob of each token of a fixed `completion` after `prompt` (its prompt log-probs, T = 1)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    output = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt + completion)], params, use_tqdm=False)[0]
    steps = output.prompt_logprobs[len(prompt) :]
    return torch.tensor([step[token].logprob for step, token in zip(steps, completion)])  # [C]


@needs_vllm
def test_pushed_weights_move_the_engine_to_the_trainer_and_back_exactly(toy, engine):
    path, model, tokenizer, prompts = toy
    completion = tokenizer("<think>8+5=13 13-7=6</think><answer>6</answer>", add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    before = engine_completion_logprobs(engine, prompts[0], completion)
    greedy = engine.generate(prompts, 1, MAX_NEW, greedy=True)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    perturbed = {name: t + 0.02 * torch.randn(t.shape, generator=generator) for name, t in original.items()}
    try:
        model.load_state_dict(perturbed)
        engine.push_weights(policy_weights(model))
        moved = engine_completion_logprobs(engine, prompts[0], completion)
        ids = torch.tensor([prompts[0] + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompts[0]) - 1 : -1]  # [C, V]
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]  # [C]
        assert (moved - before).abs().max() > 100 * LOGPROB_TOLERANCE  # the push changed the engine
        delta = (moved - expected).abs().max().item()
        print(f"after a push: max |engine - trainer| log-prob of the fixed completion: {delta:.2e}")
        assert delta < LOGPROB_TOLERANCE
    finally:
        model.load_state_dict(original)
    engine.push_weights(policy_weights(model))
    assert torch.equal(engine_completion_logprobs(engine, prompts[0], completion), before)  # bit for bit
    back = engine.generate(prompts, 1, MAX_NEW, greedy=True)
    assert torch.equal(back.completion_ids, greedy.completion_ids) and torch.equal(
        back.sampling_logprobs, greedy.sampling_logprobs
    )
    print(f"push_weights: {engine.push_seconds / engine.pushes * 1000:.1f} ms per push of the toy")


@needs_vllm
def test_after_an_optimizer_step_the_engine_holds_the_trainers_weights(toy, engine):
    """One SGD step of the trainer raising the log-likelihood of a fixed completion, then a push: the engine's
    log-probs of that completion move with the trainer's (up, and equal to them to LOGPROB_TOLERANCE)."""
    import copy

    _, model, tokenizer, prompts = toy
    completion = tokenizer("<think>3-4=-1 -1+9=8</think><answer>8</answer>", add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    ids = torch.tensor([prompts[1] + completion])  # [1, P + C]
    target = torch.tensor(completion)[:, None]  # [C, 1]

    def trainer(policy):
        logits = policy(ids).logits[0, len(prompts[1]) - 1 : -1]  # [C, V]
        return torch.log_softmax(logits, dim=-1).gather(1, target)[:, 0]  # [C]

    policy = copy.deepcopy(model)  # eval mode, as the fixture's: no dropout in the step
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-4)  # its gradient norm is 460: small steps
    before = engine_completion_logprobs(engine, prompts[1], completion)
    (-trainer(policy).sum()).backward()
    optimizer.step()
    try:
        engine.push_weights(policy_weights(policy))
        after = engine_completion_logprobs(engine, prompts[1], completion)
        with torch.no_grad():
            expected = trainer(policy)
        assert (
            after.sum() > before.sum() + 1
        )  # -7.84 -> -5.90: the step raised the completion's likelihood, in the engine too
        assert (after - before).abs().max() > 100 * LOGPROB_TOLERANCE
        assert (after - expected).abs().max() < LOGPROB_TOLERANCE
    finally:
        engine.push_weights(policy_weights(model))


@needs_vllm
def test_a_lora_policy_pushes_its_merged_weights(toy, engine):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path, model, _, prompts = toy
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    policy = get_peft_model(base, lora).eval()
    names = {name for name, _ in policy_weights(policy)}
    assert names == set(model.state_dict())  # the base model's checkpoint names, no adapter tensors
    G = 2
    try:
        engine.push_weights(policy_weights(policy))
        rollout = engine.generate(prompts, G, MAX_NEW, seeds=completion_seeds(3, 0, 0, 0, len(prompts), G))
        delta = (rollout.sampling_logprobs - trainer_logprobs(policy, rollout, G)).abs().max().item()
        away = (rollout.sampling_logprobs - trainer_logprobs(model, rollout, G)).abs().max().item()
        assert delta < LOGPROB_TOLERANCE < away  # the engine samples from the LoRA policy, not the base model
    finally:
        engine.push_weights(policy_weights(model))


@needs_vllm
def test_held_out_greedy_with_vllm_is_the_trainers_greedy(toy, engine):
    """accuracy_on with the engine (the module's: before the recipe tests below, whose engines tear vLLM's process
    groups down when they close): greedy completions equal transformers' greedy ones (measured: all 200 of the
    first 200 held-out rows at 64 new tokens, accuracy 0.76 both; float ties could flip a rare token, hence the
    tolerance of one row); sampled ones draw from other seeds (measured: 0.575 vs 0.565 on those rows)."""
    from llmalign.data import load_rows
    from llmalign.evaluate import accuracy_on
    from llmalign.toy import resolve_embedded

    _, model, tokenizer, _ = toy
    rows = load_rows(resolve_embedded("embedded:arith/test.jsonl"))[:24]
    hf = accuracy_on(model, tokenizer, rows, MAX_NEW)
    vllm = accuracy_on(model, tokenizer, rows, MAX_NEW, engine=engine)
    differing = sum(a != b for a, b in zip(hf["samples"], vllm["samples"]))
    assert differing <= 1 and abs(hf["accuracy"] - vllm["accuracy"]) <= 1 / len(rows)
    sampled = accuracy_on(model, tokenizer, rows, MAX_NEW, greedy=False, seed=3, engine=engine)
    again = accuracy_on(model, tokenizer, rows, MAX_NEW, greedy=False, seed=3, engine=engine)
    assert sampled["samples"] == again["samples"]  # seeded per row


def grpo_args(out, *more):
    return [
        "grpo",
        "--config",
        "configs/llm/arith.yaml",
        "rollout.engine=vllm",
        "rollout.vllm_kv_cache_mib=4",
        "train.iterations=2",
        "train.prompts_per_iteration=4",
        "train.group_size=4",
        f"sampling.max_new_tokens={MAX_NEW}",
        "data.eval_size=8",
        "data.eval_samples=1",
        "log.eval_every=0",
        "log.checkpoint_every=0",
        "budget.max_seconds=null",
        f"log.output_dir={out}",
        *more,
    ]


def exit_line(capsys, argv) -> str:
    """Run `llmalign` and return its one stderr line, asserting exit code 2 (a config error)."""
    from llmalign.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error")]
    assert len(lines) == 1
    return lines[0]


def test_engine_vllm_without_the_package_exits_2_before_the_run_directory(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    line = exit_line(capsys, grpo_args(tmp_path / "run"))
    assert "rollout.engine" in line and "setup.sh --vllm" in line
    assert not (tmp_path / "run").exists()


def test_a_kv_cache_too_small_for_max_new_tokens_exits_2(monkeypatch, tmp_path, capsys):
    """A toy Qwen2 with wide heads (2 * 4 layers * 2 heads * 1024 dims * 4 bytes = 64 KiB of KV a token, 8 MiB a
    128-token block): 4 MiB cannot hold one sequence. Refused before vLLM is imported (so without it too)."""
    import llmalign.rollout
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = ensure_arith_model()
    config = Qwen2Config(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, head_dim=1024, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "wide")
    monkeypatch.setattr(llmalign.rollout, "require_vllm", lambda: None)  # the check comes first where vllm is missing
    line = exit_line(capsys, grpo_args(tmp_path / "run", f"model.path={tmp_path / 'wide'}", "data.test=null"))
    assert "rollout.vllm_kv_cache_mib': 4 MiB holds 0 tokens" in line and "use at least 8" in line


@needs_vllm
def test_an_architecture_vllm_does_not_support_exits_2(toy, tmp_path, capsys):
    path = toy[0]
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["ArithmeticNotInVLLMForCausalLM"]  # transformers loads it by model_type: qwen2
    (copy / "config.json").write_text(json.dumps(config))
    line = exit_line(capsys, grpo_args(tmp_path / "run", f"model.path={copy}", "data.test=null"))
    assert "'model.path'" in line and "ArithmeticNotInVLLMForCausalLM" in line and "rollout.engine=hf" in line


@needs_vllm
def test_grpo_trains_on_vllm_rollouts_with_weights_pushed_each_iteration(toy, tmp_path):
    """Two GRPO iterations with rollout.engine=vllm (refill and a DARS second stage, so every generation path
    goes through the engine): the policy changes, each iteration pushes its weights first."""
    from llmalign.cli import main

    out = tmp_path / "run"
    more = ("algorithm.filter_zero_std=refill", "algorithm.max_refill_rounds=1", "rollout.schedule=dars_et")
    main(grpo_args(out, *more))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["iteration"] > 0]
    assert len(trained) == 2 and all(r["time/weight_push"] > 0 for r in trained)
    assert all(r["train/generated_tokens"] > 0 for r in trained)
    from safetensors.torch import load_file

    final = load_file(out / "final" / "model.safetensors")
    start = toy[1].state_dict()
    assert any(not torch.equal(final[name], start[name]) for name in final)


# Metrics of a 2-process run that are sums over processes in another order than 1 process's: equal to float
# rounding only (measured on the test below: grad_norm 1e-7 relative, mismatch/* within 1e-6 absolute)
REDUCED = ("train/grad_norm", "mismatch/")


@needs_vllm
def test_grpo_on_two_processes_samples_and_trains_as_one_process(tmp_path):
    """rollout.engine=vllm under accelerate launch on 2 processes (gloo): each rank holds its own engine over the
    launcher's process group (vLLM's external_launcher) and samples its half of the prompts with the global
    per-completion seeds, so the completions are the ones 1 process samples: every logged metric is equal, but
    for sums over processes (REDUCED) equal to float rounding."""
    from tests.multiproc import run_processes

    records = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        done = run_processes(world, ["-m", "llmalign", *grpo_args(out)], timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]  # nor at exit (vLLM's finalizers)
        records[world] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records[1]) == len(records[2]) == 3
    for one, two in zip(records[1], records[2]):
        assert one.keys() == two.keys()
        for key in one:
            if key.startswith("time/") or key == "tokens_per_second":
                continue
            if key.startswith(REDUCED):
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key
            else:
                assert two[key] == one[key], key
    assert records[2][1]["train/generated_tokens"] > 0 and records[2][2]["time/weight_push"] > 0


# ----------------------------------------------------------------------------- pairs, iterate, eval with vLLM


@needs_vllm
def test_pairs_with_vllm_writes_valid_pairs(toy, tmp_path):
    """llmalign pairs --engine vllm: chosen above rejected by level, both from the prompt's samples, and the same
    file again from the same seed."""
    from llmalign.cli import main
    from llmalign.data import load_rows

    written = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        main(
            [
                "pairs", "--model", "embedded:arith", "--data", "embedded:arith/train.jsonl", "--out", str(out),
                "--limit", "8", "--group-size", "4", "--max-new-tokens", str(MAX_NEW), "--engine", "vllm",
                "--vllm-kv-cache-mib", "4", "--seed", "5",
            ]
        )  # fmt: skip
        written.append(out.read_text())
    pairs = load_rows(str(tmp_path / "a.jsonl"))
    assert pairs and written[0] == written[1]
    assert all(p["chosen_level"] > p["rejected_level"] and p["chosen"] != p["rejected"] for p in pairs)


@needs_vllm
def test_iterate_with_vllm_pushes_each_rounds_policy(toy, tmp_path, monkeypatch):
    """Two rounds of llmalign iterate with rollout.engine=vllm: round t samples its pairs from pi_{t-1}, so the
    engine gets model.path's weights in round 1 and round 1's policy in round 2 before sampling; each held-out
    evaluation pushes the policy it evaluates."""
    from safetensors.torch import load_file

    from llmalign.cli import main
    from tests.test_llm_iterate import overrides

    pushed = []  # one weight of each push
    real = VLLMEngine.push_weights
    name = "model.layers.0.self_attn.q_proj.weight"

    def spy(self, weights):
        weights = list(weights)
        pushed.append(dict(weights)[name].clone())
        real(self, weights)

    monkeypatch.setattr(VLLMEngine, "push_weights", spy)
    out = tmp_path / "run"
    main(["iterate", *overrides(out, "rollout.engine=vllm", "rollout.vllm_kv_cache_mib=4", "data.prompts_per_round=8")])
    start = toy[1].state_dict()[name]
    round_1, round_2 = (load_file(out / f"round-{t}" / "policy" / "model.safetensors")[name] for t in (1, 2))
    # eval pi_0, pairs of round 1 (pi_0), eval pi_1, pairs of round 2 (pi_1), eval pi_2
    expected = [start, start, round_1, round_1, round_2]
    assert len(pushed) == len(expected), len(pushed)
    assert all(torch.equal(a, b) for a, b in zip(pushed, expected))
    assert not torch.equal(start, round_1) and not torch.equal(round_1, round_2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if "eval/accuracy" in r] == [0, 1, 2]
    assert [r["pairs/count"] > 0 for r in records if "pairs/count" in r] == [True, True]


@needs_vllm
def test_iterate_with_vllm_on_two_processes_equals_one(toy, tmp_path):
    """Two rounds of llmalign iterate with rollout.engine=vllm under accelerate launch on 2 processes: one engine per
    rank samples its batches of each round's pairs (seeded per batch, row and sample, never the rank) from the
    round's policy pushed to it, and the DPO rounds run on both processes: the pairs files, DPO results, policies
    and logged metrics are those of 1 process, bit for bit (tests.test_llm_iterate.TWO_PROCESSES: why the weights
    can be equal), and no traceback at exit."""
    from llmalign.cli import main
    from tests.multiproc import run_processes
    from tests.test_llm_iterate import TWO_PROCESSES, assert_same_rounds, overrides

    engine = ("rollout.engine=vllm", "rollout.vllm_kv_cache_mib=4", *TWO_PROCESSES)
    main(["iterate", *overrides(tmp_path / "one", *engine)])
    done = run_processes(2, ["-m", "llmalign", "iterate", *overrides(tmp_path / "two", *engine)], timeout=500)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "over 2 process(es) (1 each" in done.stdout  # each round's DPO ran on both processes
    assert_same_rounds(tmp_path / "one", tmp_path / "two")


@needs_vllm
def test_pairs_and_eval_with_vllm_on_two_processes_equal_one(toy, tmp_path, capsys):
    """llmalign pairs and eval --engine vllm under accelerate launch on 2 processes: the same pairs file (its
    seeds name the batch, row and sample, never the rank) and the same greedy accuracy as 1 process, and no
    traceback at exit (the engine closes before the launcher's group goes)."""
    from llmalign.cli import main
    from tests.multiproc import run_processes

    engine = ["--engine", "vllm", "--vllm-kv-cache-mib", "4"]
    pairs = ["pairs", "--model", "embedded:arith", "--data", "embedded:arith/train.jsonl", "--limit", "8",
             "--group-size", "4", "--max-new-tokens", str(MAX_NEW), "--batch-size", "4", "--seed", "5", *engine]  # fmt: skip
    evaluate = ["eval", "--model", "embedded:arith", "--data", "embedded:arith/test.jsonl", "--limit", "16",
                "--max-new-tokens", str(MAX_NEW), "--show", "0", *engine]  # fmt: skip
    main([*pairs, "--out", str(tmp_path / "one.jsonl")])
    capsys.readouterr()
    main(evaluate)
    one = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy")]
    for argv in ([*pairs, "--out", str(tmp_path / "two.jsonl")], evaluate):
        done = run_processes(2, ["-m", "llmalign", *argv], timeout=400)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert one and one == [line for line in done.stdout.splitlines() if line.startswith("accuracy")]
