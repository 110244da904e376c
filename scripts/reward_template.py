"""A custom reward to copy: rename, edit `score_images`, and name it in your config.

    reward:
      weights: {my_rewards:my_reward: 1.0}        # after copying this file to my_rewards.py on your PYTHONPATH
      kwargs:  {my_rewards:my_reward: {target_brightness: 0.4}}

The trainer calls the factory once with the kwargs, then calls the returned function with a batch of
decoded images [B, 3, H, W] (float, in [0, 1]), the B prompts and B metadata dicts, and expects B floats.
It checks the signature and the output length on a small batch before training starts.
"""

import torch


def my_reward(target_brightness: float = 0.5):
    # load heavy models here, or lazily inside `score_images` on the first call

    @torch.no_grad()
    def score_images(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        brightness = images.mean(dim=(1, 2, 3))  # [B]
        return -(brightness - target_brightness).abs()  # higher is better

    return score_images
