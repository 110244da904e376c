"""GPO in `llmalign grpo`: algorithm.loss=sppo (SPPO's squared loss, shared.losses.sppo_policy_loss) on a groupwise
win-rate reward. The target is the reward minus its group mean over sppo_beta: for win rates, (P - 1/2) / beta.
The update on 1 and 2 processes is tests/test_llm_scale.py's probe case sppo_two_steps_kl."""

import json

import pytest
import torch

from llmalign.cli import main
from llmalign.config import GRPOConfig
from llmalign.grpo import ALGORITHMS
from shared.checkpoint import latest_checkpoint, load_state
from shared.config import load_config
from shared.reward_calls import groupwise
from shared.run import Run
from tests.multiproc import kill_at_checkpoint
from tests.test_llm_grpo import overrides, tiny_lm_dir  # noqa: F401  (fixture)


@groupwise
def text_win_rate(prompt, completions, **columns):
    """A win rate of a group: P(i > j) = 1 if i sorts after j, 1/2 on a tie, 0 before; the mean over the group, self
    included (its 1/2), as shared.gpm.gpm_win_rates averages a preference table."""
    return [sum(1.0 if a > b else 0.5 if a == b else 0.0 for b in completions) / len(completions) for a in completions]


GPO = ["algorithm.loss=sppo", "algorithm.sppo_beta=0.5", "reward.weights={tests.test_gpo:text_win_rate: 1.0}"]


def test_the_sppo_target_of_a_win_rate_is_p_minus_one_half_over_beta(tiny_lm_dir, tmp_path):  # noqa: F811
    """One iteration's stages by hand: the advantage stage hands the update P - 1/2 (a win rate's group mean is
    exactly 1/2, and sppo takes no std), so the loss's target is (P - 1/2) / beta."""
    torch.set_num_threads(1)
    config = load_config(GRPOConfig, None, overrides(tiny_lm_dir, tmp_path / "run", *GPO))
    recipe = ALGORITHMS["grpo"](config)
    recipe.setup(Run(tmp_path / "run", resume=False, tag="[test]"))
    sampled = recipe.rollout(0)
    batch = recipe.advantage(sampled)
    texts = sampled.batch.rollout.texts
    expected = torch.tensor(
        [p - 0.5 for g in range(0, len(texts), 3) for p in text_win_rate("", texts[g : g + 3])]
    )  # [B*G]
    assert expected.abs().sum() > 0, "every group tied: nothing tested"
    assert torch.allclose(batch.advantages[:, 0], expected, atol=1e-6)
    assert torch.allclose(batch.advantages, batch.advantages[:, :1].expand_as(batch.advantages))


def test_gpo_sigkill_then_resume_is_bit_identical(tiny_lm_dir, tmp_path):  # noqa: F811
    torch.set_num_threads(1)
    extra = (*GPO, "train.iterations=3", "algorithm.kl_beta=0.05", "log.eval_every=0")
    main(["grpo", *overrides(tiny_lm_dir, tmp_path / "straight", *extra)])
    out = tmp_path / "killed"
    kill_at_checkpoint(1, ["-m", "llmalign", "grpo", *overrides(tiny_lm_dir, out, *extra)], out / "checkpoints")
    main(["grpo", *overrides(tiny_lm_dir, out, *extra), "--resume"])
    straight = load_state(latest_checkpoint(tmp_path / "straight" / "checkpoints"), "trainable")
    resumed = load_state(latest_checkpoint(out / "checkpoints"), "trainable")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("train/log_ratio_mean" in r for r in records[1:])


@pytest.mark.parametrize(
    "extra, field",
    [
        (["algorithm.sppo_beta=0.1"], "algorithm.sppo_beta"),  # set under loss=grpo
        (["algorithm.loss=sppo", "algorithm.sppo_beta=0"], "algorithm.sppo_beta"),
        (["algorithm.loss=sppo", "algorithm.advantage_scale=group"], "algorithm.advantage_scale"),
    ],
)
def test_bad_sppo_settings_are_one_line(tiny_lm_dir, tmp_path, capsys, extra, field):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", *overrides(tiny_lm_dir, tmp_path, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], err
