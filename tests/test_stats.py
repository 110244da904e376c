import math

import torch
from torch.testing import assert_close

from shared.stats import PromptStatTracker

EPS = 1e-4


def test_per_prompt_update_by_hand():
    tracker = PromptStatTracker()
    # prompt a: (1, 3) mean 2 std 1; prompt b: (2, 2) constant -> 0
    advantages = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 2.0, 2.0]))
    assert_close(advantages, torch.tensor([-1 / (1 + EPS), 1 / (1 + EPS), 0.0, 0.0]))


def test_history_across_steps_and_state_round_trip():
    tracker = PromptStatTracker(history=True)
    tracker.update(["a", "a"], torch.tensor([1.0, 3.0]))
    restored = PromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    # pool for a: (1, 3, 5, 5): mean 3.5, variance (6.25 + 0.25 + 2.25 + 2.25) / 4 = 2.75
    advantages = restored.update(["a", "a"], torch.tensor([5.0, 5.0]))
    assert_close(advantages, torch.full((2,), 1.5 / (math.sqrt(2.75) + EPS)))
    assert restored.prompt_stats() == {"prompts": 1, "mean_count": 4.0}
    restored.clear()
    assert restored.prompt_stats() == {"prompts": 0, "mean_count": 0.0}


def test_global_std():
    tracker = PromptStatTracker(global_std=True)
    # batch population std of (1, 3, 2, 2) = sqrt(2 / 4)
    advantages = tracker.update(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 2.0, 2.0]))
    scale = 1 / (math.sqrt(0.5) + EPS)
    assert_close(advantages, torch.tensor([-scale, scale, 0.0, 0.0]))
