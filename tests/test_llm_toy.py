"""The embedded arithmetic model: a tokenizer that reloads identically, problems with the right
answers, disjoint splits, and a quick build that transformers loads back."""

import json
import random

from llmalign import toy
from llmalign.rewards import accuracy_reward


def test_tokenizer_saves_and_reloads_identically(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = toy.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nCompute 12+7-3.\n<|im_end|> é ünïcode <think>12+7=19</think><|endoftext|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(reloaded) == len(tokenizer) == 259  # 256 bytes + 3 special tokens
    assert reloaded.decode(tokenizer("Compute 3-19+4.\n")["input_ids"]) == "Compute 3-19+4.\n"
    assert reloaded.eos_token_id == reloaded.pad_token_id == 256
    messages = [{"role": "user", "content": "Compute 1+2+3."}]
    assert (
        reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\nCompute 1+2+3.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_problems_are_right_and_their_solutions_score_one():
    rng = random.Random(3)
    problems = [toy.make_problem(rng) for _ in range(50)]
    for p in problems:
        expression = p["prompt"].removeprefix("Compute ").removesuffix(".\n")
        assert int(p["answer"]) == eval(expression)  # an independent evaluation of "a+b-c"
    completions = [toy.solution(p, with_check=i % 2 == 0) for i, p in enumerate(problems)]
    assert (
        accuracy_reward([p["prompt"] for p in problems], completions, answer=[p["answer"] for p in problems])
        == [1.0] * 50
    )
    assert toy.solution(toy.make_problem(random.Random(0)), True).count("check") == 1


def test_quick_build_reloads_and_splits_are_disjoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = toy.build_arith_model(tmp_path / "arith", quick=True, progress=False)
    out = tmp_path / "arith"
    assert toy.is_complete(out) and json.loads((out / "llmalign.json").read_text())["quick"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and report["parameters"] == model.num_parameters()
    assert (
        AutoTokenizer.from_pretrained(out)("Compute 1+1-1.\n")["input_ids"]
        == toy.build_tokenizer()("Compute 1+1-1.\n")["input_ids"]
    )
    splits = {
        name: {json.loads(line)["prompt"] for line in (out / f"{name}.jsonl").read_text().splitlines()}
        for name in ("sft", "train", "test")
    }
    assert [len(splits[n]) for n in ("sft", "train", "test")] == [1500, 1500, 200]
    assert (
        not (splits["sft"] & splits["train"])
        and not (splits["sft"] & splits["test"])
        and not (splits["train"] & splits["test"])
    )
    assert not list(tmp_path.glob(".arith.tmp-*"))
