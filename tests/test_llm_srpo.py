"""SRPO in `llmalign dpo` (algorithm.loss=srpo) on the tiny Qwen2 of tests/test_llm_dpo.py.

- a 2-step run: its first logged loss, scored before any update (pi = pi_ref), is (1 - alpha) + alpha / 2 and
  its margins 0; the reference cache holds the six sequences of every pair, a revision one equal to a forward of
  the hand-written revision prompt; after an update the loss moves;
- the gradient of the recipe's step (micro-batched, one padded forward of six sequences per micro-batch) equals
  the gradient of the formula written out here on log-probs of one unpadded forward per sequence;
- a live reference equals the precomputed one; a changed template rebuilds the cache;
- 2 processes equal 1 process; a SIGKILLed run resumes bit-identical (tests/test_llm_kill_resume.py), and so
  does a split one (tests/test_llm_dpo.py::test_resume_ends_bit_identical[srpo]); micro-batched equals
  whole-batch (tests/test_llm_dpo.py::test_gradient_accumulation_equals_one_big_batch[srpo]);
- bad templates, srpo fields under another loss, a bad alpha and an overlong revision prompt exit 2 in one line.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from llmalign.cli import main
from llmalign.data import micro_batches
from llmalign.dpo import (
    CachedLogprobs,
    cache_fingerprint,
    compute_token_logprobs,
    encode_pairs,
    live_reference,
    precomputed_reference,
    train_step,
)
from llmalign.dpo_config import DPOConfig
from llmalign.policy import load_policy
from shared.config import load_config
from tests.multiproc import run_processes
from tests.test_llm_dpo import one_process, overrides, pair_rows, perturbed, records_of, tiny  # noqa: F401

torch.set_num_threads(1)

SRPO = ["algorithm.loss=srpo"]
# the default revision prompt, written out here rather than read from the code
TEMPLATE = "{prompt}{completion}\nRevised answer:\n"


def srpo_config(tiny, *extra):  # noqa: F811
    return load_config(DPOConfig, None, overrides(tiny, "unused", *SRPO, *extra))


# ----------------------------------------------------------------------------- an independent computation


def prompt_text(tokenizer, prompt):
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def sequence_logp(model, tokenizer, prompt: str, completion: str):
    """Summed log-prob of completion + end-of-text after the text `prompt`: one unpadded sequence."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    logits = model(input_ids=torch.tensor([p + c])).logits[0]  # [P+C, V]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(p) - 1 : -1]  # [C, V] position j scores token j+1
    return logp.gather(-1, torch.tensor(c)[:, None]).sum()


def six_logps(model, tokenizer, row, template=TEMPLATE):
    """log p(y_w|x), log p(y_l|x), log p(y_w|x,y_l), log p(y_l|x,y_l), log p(y_w|x,y_w), log p(y_l|x,y_w)."""
    x = prompt_text(tokenizer, row["prompt"])
    given_l = template.replace("{prompt}", x).replace("{completion}", row["rejected"])
    given_w = template.replace("{prompt}", x).replace("{completion}", row["chosen"])
    return [
        sequence_logp(model, tokenizer, prompt, row[column])
        for prompt in (x, given_l, given_w)
        for column in ("chosen", "rejected")
    ]


def hand_loss(policy, reference, beta, alpha):
    """SRPO's per-pair loss written out from its formula (shared/preference.py::srpo_loss's docstring)."""
    r_w, r_l, r_wl, r_ll, r_ww, r_lw = (p - r for p, r in zip(policy, reference))
    generation = beta * (r_wl + r_w - r_lw - r_l)
    return (1 - alpha) * (generation - 1) ** 2 + alpha * (
        (0.5 - beta * (r_wl - r_ll)) ** 2 + (0.5 - beta * (r_ww - r_lw)) ** 2
    )


# ----------------------------------------------------------------------------- the recipe's code path


def test_first_step_at_the_reference_gives_one_minus_alpha_plus_half_alpha(tiny, tmp_path):  # noqa: F811
    # 6 pairs, batch 4 in micro-batches of 3: step 1 is scored before its update, so pi = pi_ref:
    # (1 - 0.8) (0 - 1)^2 + 0.8 (1/4 + 1/4) = 0.6 at the default alpha
    main(["dpo", *overrides(tiny, tmp_path, *SRPO, "data.test=null")])
    records = records_of(tmp_path)
    assert records[0]["revision_prompts_truncated"] == 0
    first, second = records[1], records[2]
    assert first["train/loss"] == pytest.approx(0.6, abs=1e-6)
    for name in ("generation_margin", "revision_margin_given_rejected", "revision_margin_given_chosen"):
        assert first[f"train/srpo/{name}"] == pytest.approx(0.0, abs=1e-6), name
    assert first["train/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert second["train/loss"] != pytest.approx(0.6, abs=1e-4)  # the update moved the policy
    assert "train/rewards/accuracy" in second and "train/srpo/generation_margin" in second
    cache = load_file(str(tmp_path / "reference_logprobs.safetensors"))
    assert len(cache) == 6 * len(pair_rows())
    model, tokenizer = load_policy(srpo_config(tiny).model)
    with torch.no_grad():
        expected = six_logps(model, tokenizer, pair_rows()[1])  # the chat-prompt row
    assert_close(cache["chosen_given_rejected.1"].sum(), expected[2], atol=1e-5, rtol=1e-5)
    assert_close(cache["rejected_given_chosen.1"].sum(), expected[5], atol=1e-5, rtol=1e-5)
    sidecar = json.loads((tmp_path / "reference_logprobs.json").read_text())
    assert sidecar["revision_template"] == TEMPLATE


def test_first_step_follows_alpha(tiny, tmp_path):  # noqa: F811
    # alpha 0.3: 0.7 + 0.3 / 2 = 0.85
    main(["dpo", *overrides(tiny, tmp_path, *SRPO, "algorithm.srpo_alpha=0.3", "data.test=null", "train.steps=1")])
    assert records_of(tmp_path)[1]["train/loss"] == pytest.approx(0.85, abs=1e-6)


def test_gradient_equals_the_formula_on_unpadded_forwards(tiny, one_process):  # noqa: F811
    beta, alpha = 0.5, 0.7
    config = srpo_config(tiny, f"algorithm.beta={beta}", f"algorithm.srpo_alpha={alpha}", "train.max_grad_norm=1e9")
    config.memory.micro_batch_size = 2
    reference_model, tokenizer = load_policy(config.model)
    rows = pair_rows()
    encoded = encode_pairs(tokenizer, rows, config.data, config.revision_template)
    pad = tokenizer.pad_token_id
    reference = CachedLogprobs(compute_token_logprobs(one_process, reference_model, encoded, pad, micro_batch_size=4))
    order = [4, 0, 3, 1, 5]  # micro-batches 2 + 2 + 1, shuffled: padding and lookups differ from the cache's
    policy = perturbed(tiny / "model", seed=1).requires_grad_(True)  # away from pi_ref: the gradient is not at 0
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)  # the step leaves the gradient in .grad
    metrics = train_step(one_process, config, policy, optimizer, encoded, order, pad, reference, None)
    recipe = {name: p.grad.clone() for name, p in policy.named_parameters()}

    policy.zero_grad(set_to_none=True)
    losses = []
    for i in order:
        with torch.no_grad():
            ref = six_logps(reference_model, tokenizer, rows[i])
        losses.append(hand_loss(six_logps(policy, tokenizer, rows[i]), ref, beta, alpha))
    loss = torch.stack(losses).mean()
    loss.backward()
    # float32 sums of six micro-batched log-prob sums against one pair at a time: relative, not absolute
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert loss.item() != pytest.approx(1 - alpha / 2, abs=1e-3)  # not the value at the reference
    for name, p in policy.named_parameters():
        assert_close(recipe[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert sum(g.abs().sum() for g in recipe.values()) > 0


def test_live_reference_equals_precomputed_and_a_new_template_rebuilds_the_cache(tiny, one_process):  # noqa: F811
    config = srpo_config(tiny)
    model, tokenizer = load_policy(config.model)
    encoded = encode_pairs(tokenizer, pair_rows(), config.data, config.revision_template)
    pad, data = tokenizer.pad_token_id, str(tiny / "pairs.jsonl")
    precomputed, _ = precomputed_reference(one_process, config, model, encoded, data, pad)
    live, _ = live_reference(one_process, config, model, encoded, data, pad)
    with torch.no_grad():  # the policy moves away from its reference
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    for rows in micro_batches([5, 0, 2, 1, 4, 3], 4):
        metrics = [
            train_step(
                one_process, config, model, torch.optim.SGD(model.parameters(), lr=0.0), encoded, rows, pad, r, None
            )
            for r in (precomputed, live)
        ]
        assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=1e-6)
        assert metrics[0]["loss"] != pytest.approx(0.6, abs=1e-3)
    other = srpo_config(tiny, "data.revision_template='Fix {completion} for {prompt}:'")
    changed = encode_pairs(tokenizer, pair_rows(), other.data, other.revision_template)
    assert changed.prompts == encoded.prompts and changed.given_chosen != encoded.given_chosen
    before, after = (cache_fingerprint(c, data, e, [c.model.path]) for c, e in ((config, encoded), (other, changed)))
    assert (
        before["tokens_sha256"] != after["tokens_sha256"] and after["revision_template"] == other.data.revision_template
    )
    plain = load_config(DPOConfig, None, overrides(tiny, "unused"))
    assert "revision_template" not in cache_fingerprint(plain, data, encoded, [plain.model.path])


@pytest.mark.timeout(180)
def test_two_processes_equal_one_process(tiny, tmp_path):  # noqa: F811
    args = [*SRPO, "data.test=null", "train.steps=2", "train.batch_size=4", "memory.micro_batch_size=1"]
    main(["dpo", *overrides(tiny, tmp_path / "one", *args)])
    two = run_processes(2, ["-m", "llmalign", "dpo", *overrides(tiny, tmp_path / "two", *args)])
    assert two.returncode == 0, two.stderr[-4000:]
    assert "over 2 process(es)" in two.stdout
    weights = [load_file(str(tmp_path / w / "final" / "model.safetensors")) for w in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=1e-5, msg=name)
    caches = [load_file(str(tmp_path / w / "reference_logprobs.safetensors")) for w in ("one", "two")]
    assert caches[0].keys() == caches[1].keys() and len(caches[0]) == 36
    for key in caches[0]:
        assert torch.equal(caches[0][key], caches[1][key]), key  # the same micro-batches, split over the ranks
    for a, b in zip(records_of(tmp_path / "one"), records_of(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("train/"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-5), key  # logps: sums of ~100 tokens


def test_revision_prompts_are_held_to_the_sum_of_the_limits_and_truncated_from_the_left(tiny):  # noqa: F811
    # the longest prompt is 34 tokens (the chat row), the longest completion 63 with end-of-text: their sum 97
    # passes every prompt and completion, and cuts the one revision prompt over it (row 1 given chosen: 99)
    config = srpo_config(tiny, "data.max_prompt_length=34", "data.max_completion_length=63")
    config.data.overlong_prompts = "truncate"
    _, tokenizer = load_policy(config.model)
    rows = pair_rows()
    encoded = encode_pairs(tokenizer, rows, config.data, config.revision_template)
    assert (encoded.truncated_prompts, encoded.truncated_completions, encoded.truncated_revisions) == (0, 0, 1)
    full = tokenizer(
        TEMPLATE.replace("{prompt}", prompt_text(tokenizer, rows[1]["prompt"])).replace(
            "{completion}", rows[1]["chosen"]
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert len(full) == 99 and encoded.given_chosen[1] == full[-97:]  # the end, "Revised answer:", is kept
    assert max(len(ids) for ids in encoded.given_chosen + encoded.given_rejected) == 97


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["data.revision_template='{prompt} Revised:'"],
            "'data.revision_template': '{prompt} Revised:' lacks {completion}",
        ),
        (["data.revision_template='{completion} again'"], "lacks {prompt}"),
        (["data.revision_template='{prompt}{completion}{answer}'"], "unknown placeholder(s) '{answer}'"),
        (["data.revision_template='{prompt}{completion}{}'"], "unknown placeholder(s) '{}'"),
        (["data.revision_template='{prompt}{completion!r}'"], "format spec or conversion"),
        (["data.revision_template='{prompt}{completion'"], "write a literal brace as {{ or }}"),
        (["algorithm.srpo_alpha=1.5"], "'algorithm.srpo_alpha': 1.5 must be in [0, 1]"),
        (["algorithm.loss=sigmoid", "algorithm.srpo_alpha=0.8"], "does not use it; set loss=srpo or srpo_alpha=null"),
        (
            ["algorithm.loss=ipo", "data.revision_template='{prompt}{completion}'"],
            "does not use it; set loss=srpo or revision_template=null",
        ),
        (
            ["data.max_prompt_length=34", "data.max_completion_length=63"],  # the longest prompt and completion
            "row 1: the revision prompt of data.revision_template given its chosen completion is 99 tokens, longer "
            "than data.max_prompt_length + data.max_completion_length = 97",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny, tmp_path, capsys, extra, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo", *overrides(tiny, tmp_path, *SRPO, *extra)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and "Loading weights" not in line]  # not the loader's progress bar
    assert len(lines) == 1 and message in lines[0], lines  # the data error comes after the model loaded
