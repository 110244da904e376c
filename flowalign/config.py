"""The one config dataclass of the flow GRPO recipe (`flowalign/train.py`).

Sections: model, sampling, algorithm, train, reward, data, eval, log. Every field is documented once,
here; `python flowalign/train.py --describe` prints them all. Batch sizes are global (per iteration, over all
processes), so a config trains the same way on 1 or N processes; micro_batch_size is a per-process memory knob.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Optional

from shared.config import (
    SAMPLES_PER_ITERATION_LIMIT,
    SEED_LIMIT,
    import_path_problem,
    need,
    option,
    output_dir_problem,
)
from shared.trackers import TrackerName, report_to_problem

EMBEDDED_MODEL = "embedded:digits"  # the project's own tiny SD3 pipeline, built and cached on first use


@dataclasses.dataclass
class ModelConfig:
    path: str = option(EMBEDDED_MODEL, "diffusers pipeline: local directory, hub id, or 'embedded:digits'")
    pipeline: Literal["sd3", "flux"] = option("sd3", "pipeline family: sd3 (SD3, SD3.5) or flux (FLUX.1)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the transformer and frozen parts")
    lora: bool = option(True, "train a LoRA adapter (true) or the full transformer (false)")
    lora_rank: int = option(32, "LoRA rank r")
    lora_alpha: int = option(64, "LoRA alpha")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "module names LoRA wraps")
    allow_remote_code: bool = option(False, "pass trust_remote_code to from_pretrained (off: never run hub code)")
    offload_text_encoders: bool = option(
        False,
        "encode every training and eval prompt once at start, cache the embeddings on the CPU and move the "
        "text encoders off the device (frees SD3.5/FLUX's T5 for the run)",
    )


@dataclasses.dataclass
class SamplingConfig:
    num_steps: int = option(10, "denoising steps per rollout (Flow-GRPO trains with 10)")
    eval_num_steps: int = option(20, "ODE steps for evaluation samples and image grids")
    guidance_scale: float = option(4.5, "classifier-free guidance during rollout and training (1 = off)")
    noise_level: float = option(0.7, "SDE noise level a; 0 makes the SDE step the ODE step (CPS: at most 1)")
    sde_kind: Literal["flow_grpo", "cps"] = option("flow_grpo", "SDE step: Flow-GRPO or coefficients-preserving (CPS)")
    sigma_one: Literal["flow_grpo", "next_sigma"] = option(
        "flow_grpo",
        "Flow-GRPO step from sigma = 1: sigma_t = a sqrt(1/(1 - sigma_1)) as the official code (flow_grpo), "
        "or a sqrt(sigma_1/(1 - sigma_1)) (next_sigma, this project's first form)",
    )
    cps_log_prob: Literal["flow_grpo", "gaussian"] = option(
        "flow_grpo",
        "CPS log-prob: -(x' - mean)^2 averaged, as the official code (flow_grpo), or the full Gaussian "
        "density (gaussian: log-ratios 1/(2 std^2) larger, 7900x on SD3's last noisy step)",
    )
    same_noise_per_group: bool = option(False, "members of a group share their initial noise (TempFlow seed groups)")
    height: Optional[int] = option(
        None, "image height in pixels for rollouts and evaluation (null: the pipeline's default)"
    )
    width: Optional[int] = option(
        None, "image width in pixels for rollouts and evaluation (null: the pipeline's default)"
    )


@dataclasses.dataclass
class AlgorithmConfig:
    name: Literal["flow_grpo", "mixgrpo", "tempflow"] = option("flow_grpo", "which rollout/training scheme")
    train_fraction: float = option(1.0, "flow_grpo: fraction of the SDE steps trained each iteration (random subset)")
    window_size: int = option(4, "mixgrpo: SDE window length w")
    window_stride: int = option(1, "mixgrpo: window moves by s steps ...")
    window_interval: int = option(25, "mixgrpo: ... every tau iterations")
    window_mode: Literal["progressive", "frozen", "random"] = option("progressive", "mixgrpo: window schedule")
    flash_ratio: Optional[float] = option(
        None, "mixgrpo-flash: compress post-window ODE steps by this ratio (2nd order)"
    )
    branch_steps: Literal["all", "subset", "window"] = option("all", "tempflow: where trajectories branch")
    branch_subset: list[int] = option([], "tempflow: branch step indices when branch_steps = subset")
    num_branches: int = option(4, "tempflow: SDE samples K drawn at each branch step")
    noise_aware_weighting: bool = option(False, "scale each step's loss by its noise scale (TempFlow-GRPO)")
    noise_aware_normalization: Literal["schedule", "trained_steps"] = option(
        "schedule",
        "noise-aware weights divided by the mean noise scale of the schedule's noisy steps (schedule: fixed, "
        "as TempFlow's released code) or of this iteration's trained steps (trained_steps: first form)",
    )


@dataclasses.dataclass
class TrainConfig:
    iterations: int = option(100, "GRPO iterations (rollout + update)")
    prompts_per_iteration: int = option(
        10,
        "distinct prompts per iteration, over all processes (a multiple of the number of processes: each takes "
        "a block of whole groups)",
    )
    group_size: int = option(8, "samples per prompt G (a group never straddles processes)")
    rollout_chunks: int = option(
        1, "each process samples its prompts in this many sequential batches (memory; async scoring)"
    )
    updates_per_iteration: int = option(
        2,
        "optimizer steps per iteration: the global batch of (sample, step) rows is split in this many parts, "
        "the same split whatever the number of processes",
    )
    micro_batch_size: int = option(
        32, "rows per forward pass in the update, per process (a memory knob: gradient accumulation)"
    )
    gradient_checkpointing: bool = option(
        False, "recompute the transformer's activations in the backward pass (memory for time)"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast through accelerate; the trainable weights (LoRA or full) stay float32. fp16 needs a GPU"
    )
    learning_rate: float = option(3e-4, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    clip_range: float = option(1e-4, "PPO clip epsilon on the per-step ratio (Flow-GRPO: 1e-4)")
    advantage_clip: float = option(5.0, "clip advantages to +-this")
    advantage_scale: Literal["group", "batch", "none", "per_prompt"] = option(
        "batch",
        "std for advantages: per group, whole batch (Flow-GRPO's global_std), none, or per_prompt: mean and "
        "std of each prompt's rewards, pooled by prompt text over the gathered batch and, with "
        "train.per_prompt_history, over past iterations (Flow-GRPO's PerPromptStatTracker)",
    )
    per_prompt_history: int = option(
        0,
        "train.advantage_scale=per_prompt: rewards of a prompt kept across iterations for its mean and std: 0 = "
        "this iteration's only (Flow-GRPO clears its tracker every epoch), N = its last N rewards, never fewer than "
        "this iteration's (ddpo-pytorch's per-prompt buffer); kept in checkpoints",
    )
    kl_beta: float = option(
        0.01, "weight of the Gaussian-mean KL to the reference (LoRA disabled), in train.kl_form's units; 0 = off"
    )
    kl_form: Literal["flow_grpo", "exact_step"] = option(
        "flow_grpo",
        "KL per step: ||mean - mean_ref||^2 / (2 sigma_t^2) as the official code (flow_grpo; Flow-GRPO "
        "paper betas carry over), or / (2 sigma_t^2 (-dt)), the exact one-step KL (exact_step: 3.7-25x "
        "stronger on SD3's 10-step schedule)",
    )
    ema_decay: Optional[float] = option(None, "keep an EMA of the trained weights for evaluation (e.g. 0.9)")
    seed: int = option(0, "seed for prompts, noise and initialisation")
    max_seconds: Optional[float] = option(None, "stop after this many seconds of training (then evaluate and save)")


@dataclasses.dataclass
class RewardConfig:
    weights: dict[str, float] = option(
        {"flowalign.rewards:digit_classifier_reward": 1.0},
        "reward import path 'module:name' -> weight; the name is a reward fn or a factory taking no arguments",
    )
    kwargs: dict[str, dict[str, Any]] = option({}, "reward import path -> keyword arguments for its factory")
    async_scoring: bool = option(False, "score each rollout chunk in a worker thread while the next chunk samples")
    on_bad_score: Literal["stop", "drop"] = option(
        "stop",
        "a NaN/inf score stops the run naming the reward (stop), or its sample gets advantage 0 and is counted (drop)",
    )
    composition: Literal["sum_then_normalize", "normalize_then_sum"] = option(
        "sum_then_normalize", "weighted sum then normalise, or normalise each reward then sum (MixGRPO)"
    )
    timeout_s: Optional[float] = option(
        None,
        "seconds one reward call may take (the first includes loading its model); past it the run stops "
        "naming the reward, or under on_bad_score=drop the batch is dropped; the hung call is abandoned, not killed "
        "(null = no limit)",
    )


@dataclasses.dataclass
class DataConfig:
    prompts: list[str] = option(
        [f"the digit {w}" for w in "zero one two three four five six seven eight nine".split()], "training prompts"
    )
    prompts_file: Optional[str] = option(None, "text file with one prompt per line (replaces prompts)")
    prompts_dataset: Optional[str] = option(
        None,
        "a dataset read with datasets.load_dataset (replaces prompts): a hub id, a dataset directory, or a "
        ".parquet/.json/.jsonl/.csv file; its prompts come from data.prompts_column of data.prompts_split",
    )
    prompts_column: str = option("prompt", "data.prompts_dataset: the column holding the prompt text")
    prompts_split: str = option("train", "data.prompts_dataset: the split of the training prompts")
    eval_split: Optional[str] = option(
        None, "data.prompts_dataset: a split whose prompts are the evaluation prompts (null: data.eval_prompts)"
    )
    eval_prompts: list[str] = option([], "evaluation prompts (default: the training prompts)")
    eval_prompts_file: Optional[str] = option(
        None, "text file with one evaluation prompt per line (replaces eval_prompts)"
    )
    eval_seeds: int = option(4, "held-out noise seeds per eval prompt (fixed, never used in training)")


@dataclasses.dataclass
class EvalConfig:
    rewards: dict[str, dict[str, Any]] = option(
        {},
        "rewards scored on the evaluation samples only, next to the training rewards: import path 'module:name' "
        "-> keyword arguments for its factory ({} for none); logged as eval/<path> (e.g. a held-out reward model)",
    )


@dataclasses.dataclass
class LogConfig:
    output_dir: str = option("runs/flow_grpo", "where metrics, images, plots and checkpoints go")
    eval_every: int = option(10, "evaluate and write an image grid every N iterations (0 = only at start and end)")
    checkpoint_every: int = option(10, "checkpoint every N iterations (0 = only at the end)")
    keep_last: int = option(2, "checkpoints kept on disk")
    report_to: list[TrackerName] = option(
        [],
        "experiment trackers the main process also logs to (metrics, images, sample tables; docs/scaling.md, Trackers), "
        "each a pip extra imported only when named: tensorboard (the tested one), wandb, trackio, mlflow; e.g. "
        "[tensorboard] after pip install 'flowalign[tensorboard]'. [] (default): metrics.jsonl alone",
    )


@dataclasses.dataclass
class FlowGRPOConfig:
    RECIPE: typing.ClassVar[str] = "flow_grpo"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def validate(self) -> None:
        """Cross-field checks, before any model loads."""
        s, a, t = self.sampling, self.algorithm, self.train

        need(s.num_steps >= 2, "sampling.num_steps", f"{s.num_steps} is too few; use at least 2")
        need(s.eval_num_steps >= 1, "sampling.eval_num_steps", f"{s.eval_num_steps}; use at least 1")
        need(
            0 <= s.noise_level <= 1.5,
            "sampling.noise_level",
            f"{s.noise_level} is outside [0, 1.5]; Flow-GRPO uses 0.7",
        )
        need(
            s.noise_level > 0, "sampling.noise_level", "0 gives deterministic steps with no log-prob to train; use 0.7"
        )
        need(
            s.sde_kind != "cps" or s.noise_level <= 1,
            "sampling.noise_level",
            f"{s.noise_level} > 1 with sampling.sde_kind=cps; CPS defines a in [0, 1] (its mean uses |cos(a pi/2)|)",
        )
        need(
            t.group_size >= 2,
            "train.group_size",
            f"{t.group_size} < 2; group advantages need at least 2 samples per prompt",
        )
        need(t.prompts_per_iteration >= 1, "train.prompts_per_iteration", f"{t.prompts_per_iteration}; use at least 1")
        need(t.iterations >= 0, "train.iterations", f"{t.iterations} is negative")
        need(t.learning_rate > 0, "train.learning_rate", f"{t.learning_rate} must be positive, e.g. 3e-4")
        need(t.rollout_chunks >= 1, "train.rollout_chunks", f"{t.rollout_chunks}; use at least 1")
        need(t.micro_batch_size >= 1, "train.micro_batch_size", f"{t.micro_batch_size}; use at least 1")
        need(t.updates_per_iteration >= 1, "train.updates_per_iteration", f"{t.updates_per_iteration}; use at least 1")
        need(t.clip_range > 0, "train.clip_range", f"{t.clip_range} must be positive, e.g. 1e-4")
        need(t.kl_beta >= 0, "train.kl_beta", f"{t.kl_beta} must be >= 0")
        need(t.max_grad_norm > 0, "train.max_grad_norm", f"{t.max_grad_norm} must be positive, e.g. 1.0")
        need(t.advantage_clip > 0, "train.advantage_clip", f"{t.advantage_clip} must be positive, e.g. 5.0")
        need(t.weight_decay >= 0, "train.weight_decay", f"{t.weight_decay} must be >= 0")
        need(0 <= t.seed < SEED_LIMIT, "train.seed", f"{t.seed} is outside [0, 2**32); use a seed such as 0")
        for field, value in (("sampling.height", s.height), ("sampling.width", s.width)):
            need(value is None or value > 0, field, f"{value} must be positive or null (the pipeline's default)")
        need(
            t.max_seconds is None or t.max_seconds > 0, "train.max_seconds", f"{t.max_seconds} must be positive or null"
        )
        need(s.guidance_scale >= 0, "sampling.guidance_scale", f"{s.guidance_scale} must be >= 0 (1 = no guidance)")
        need(self.log.eval_every >= 0, "log.eval_every", f"{self.log.eval_every} must be >= 0 (0 = start and end only)")
        need(self.log.checkpoint_every >= 0, "log.checkpoint_every", f"{self.log.checkpoint_every} must be >= 0")
        need(self.model.lora_alpha >= 1, "model.lora_alpha", f"{self.model.lora_alpha}; use at least 1")
        need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", f"{t.ema_decay} must be in (0, 1) or null")
        need(0 < a.train_fraction <= 1, "algorithm.train_fraction", f"{a.train_fraction} must be in (0, 1]")
        trainable_steps = s.num_steps - 1  # the last step lands on sigma = 0 and has no noise
        if a.name == "mixgrpo" or a.branch_steps == "window":
            need(
                1 <= a.window_size <= trainable_steps,
                "algorithm.window_size",
                f"{a.window_size} does not fit in {trainable_steps} noisy steps (sampling.num_steps - 1); lower it",
            )
            need(a.window_stride >= 1, "algorithm.window_stride", f"{a.window_stride}; use at least 1")
            need(a.window_interval >= 1, "algorithm.window_interval", f"{a.window_interval}; use at least 1")
        if a.flash_ratio is not None:
            need(
                a.name == "mixgrpo",
                "algorithm.flash_ratio",
                "only MixGRPO has a Flash variant; set algorithm.name=mixgrpo",
            )
            need(0 < a.flash_ratio <= 1, "algorithm.flash_ratio", f"{a.flash_ratio} must be in (0, 1], e.g. 0.4")
        if a.name == "tempflow":
            need(a.num_branches >= 2, "algorithm.num_branches", f"{a.num_branches} < 2; branches form the groups")
            if a.branch_steps == "subset":
                need(
                    bool(a.branch_subset), "algorithm.branch_subset", "empty; list step indices or use branch_steps=all"
                )
                bad = [k for k in a.branch_subset if not 0 <= k < trainable_steps]
                need(not bad, "algorithm.branch_subset", f"{bad} outside 0..{trainable_steps - 1}")
        need(bool(self.reward.weights), "reward.weights", "empty; name at least one reward 'module:name': weight")
        for path in list(self.reward.weights) + list(self.reward.kwargs):
            problem = import_path_problem(path)
            need(problem is None, "reward.weights", problem or "")
        need(
            self.reward.timeout_s is None or self.reward.timeout_s > 0,
            "reward.timeout_s",
            f"{self.reward.timeout_s} must be positive seconds, or null for no limit",
        )
        for path in self.eval.rewards:
            problem = import_path_problem(path)
            need(problem is None, "eval.rewards", problem or "")
        both = sorted(set(self.eval.rewards) & set(self.reward.weights))
        need(
            not both,
            "eval.rewards",
            f"{both} already in reward.weights, whose eval/ metrics are logged anyway; remove them from eval.rewards",
        )
        need(
            t.per_prompt_history >= 0,
            "train.per_prompt_history",
            f"{t.per_prompt_history} must be >= 0 (0 = this iteration's rewards only)",
        )
        need(
            t.per_prompt_history == 0 or t.advantage_scale == "per_prompt",
            "train.per_prompt_history",
            f"{t.per_prompt_history} is used by train.advantage_scale=per_prompt only (it is {t.advantage_scale}); "
            "set that, or per_prompt_history=0",
        )
        need(
            t.advantage_scale != "per_prompt" or a.name != "tempflow",
            "train.advantage_scale",
            "per_prompt pools by prompt, but tempflow's groups are a prompt's branches at one step; use group or batch",
        )
        unknown = set(self.reward.kwargs) - set(self.reward.weights)
        need(not unknown, "reward.kwargs", f"{sorted(unknown)} have no weight in reward.weights; add them there")
        need(self.data.eval_seeds >= 1, "data.eval_seeds", f"{self.data.eval_seeds}; use at least 1")
        d = self.data
        need(
            not (d.prompts_dataset and d.prompts_file),
            "data.prompts_dataset",
            "set together with data.prompts_file; keep one source of training prompts",
        )
        need(
            d.eval_split is None or bool(d.prompts_dataset),
            "data.eval_split",
            "names a split of data.prompts_dataset, which is not set; set it or use data.eval_prompts",
        )
        eval_sources = [
            name
            for name, value in (
                ("data.eval_split", d.eval_split),
                ("data.eval_prompts_file", d.eval_prompts_file),
                ("data.eval_prompts", d.eval_prompts),
            )
            if value
        ]
        need(
            len(eval_sources) <= 1,
            eval_sources[-1] if eval_sources else "data.eval_split",
            f"set together with {eval_sources[0] if eval_sources else ''}; keep one source of evaluation prompts",
        )
        for field, value in (("data.prompts_column", d.prompts_column), ("data.prompts_split", d.prompts_split)):
            need(bool(value.strip()), field, "empty; name a column or split of data.prompts_dataset")
        need(self.log.keep_last >= 1, "log.keep_last", f"{self.log.keep_last}; keep at least 1 checkpoint")
        per_prompt, field = (
            (a.num_branches, "algorithm.num_branches") if a.name == "tempflow" else (t.group_size, "train.group_size")
        )
        samples = t.prompts_per_iteration * per_prompt
        need(
            samples <= SAMPLES_PER_ITERATION_LIMIT,
            field,
            f"{per_prompt} samples per prompt x "
            f"{t.prompts_per_iteration} prompts = {samples} per iteration, over the limit of 2**20; lower it",
        )
        problem = output_dir_problem(self.log.output_dir)
        need(problem is None, "log.output_dir", problem or "")
        problem = report_to_problem(self.log.report_to)
        need(problem is None, "log.report_to", problem or "")
        need(self.model.lora_rank >= 1, "model.lora_rank", f"{self.model.lora_rank}; use at least 1")


# ----------------------------------------------------------------------- preference recipe (flowalign/preference.py)
@dataclasses.dataclass
class PreferenceAlgorithmConfig:
    name: Literal["diffusion_dpo", "smpo"] = option(
        "diffusion_dpo", "preference loss: Diffusion-DPO (binary label) or SmPO-Diffusion (smoothed label, ReNoise)"
    )
    beta: float = option(
        500.0,
        "preference strength beta (> 0) on per-dimension mean squared velocity errors, as Diffusion-DPO's code's "
        "beta_dpo (shared.preference.diffusion_dpo_loss)",
    )
    label_temperature: float = option(
        0.2, "smpo: label = sigmoid((r_w - r_l) / label_temperature) of the weighted reward sum (> 0)"
    )
    gamma: float = option(1.0, "smpo: the paper's sensitivity factor gamma (1 in its code)")
    pairs: Literal["best_worst", "all"] = option(
        "best_worst",
        "on-policy pairs per prompt group: best against worst, or every pair whose reward gap exceeds "
        "algorithm.min_reward_gap",
    )
    min_reward_gap: float = option(0.0, "on-policy: a pair's weighted reward gap must exceed this (>= 0)")
    t_min: float = option(0.02, "noise levels t of the loss are drawn uniformly in [t_min, t_max] (0 = data)")
    t_max: float = option(1.0, "upper end of the loss's noise levels (1 = pure noise)")
    inversion_steps: int = option(2, "smpo: Euler steps of the ReNoise inversion from the clean latent up to t")
    renoise_iterations: int = option(3, "smpo: fixed-point (ReNoise) iterations per inversion step")


@dataclasses.dataclass
class PreferenceTrainConfig:
    iterations: int = option(100, "iterations (on-policy: sample + score + pair + update; file: draw pairs + update)")
    prompts_per_iteration: int = option(
        8,
        "on-policy: distinct prompts per iteration over all processes (a multiple of the number of processes); "
        "data.pairs_file: pairs drawn per iteration",
    )
    group_size: int = option(8, "on-policy: samples per prompt G, ranked by the rewards to form pairs")
    updates_per_iteration: int = option(
        1, "optimizer steps per iteration, each over all the iteration's pairs with fresh (t, noise)"
    )
    micro_batch_size: int = option(16, "pairs per forward pass, per process (a memory knob: gradient accumulation)")
    gradient_checkpointing: bool = option(
        False, "recompute the transformer's activations in the backward pass (memory for time)"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast through accelerate; the trainable weights (LoRA or full) stay float32. fp16 needs a GPU"
    )
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "seed for prompts, noise, loss times and initialisation")
    max_seconds: Optional[float] = option(None, "stop after this many seconds of training (then evaluate and save)")


@dataclasses.dataclass
class PreferenceDataConfig(DataConfig):
    pairs_file: Optional[str] = option(
        None,
        "offline pairs instead of on-policy ones: a jsonl of {prompt, winner, loser}, the images' paths relative "
        "to the file (null: on-policy pairs from the current model)",
    )


@dataclasses.dataclass
class PreferenceLogConfig(LogConfig):
    output_dir: str = option("runs/diffusion_dpo", "where metrics, images, plots and checkpoints go")
    save_pairs: bool = option(
        False,
        "write each iteration's first-update batch (winner/loser latents, t, noise, label, per-pair loss) to "
        "pairs/iter-N.safetensors, for checking the loss offline",
    )


@dataclasses.dataclass
class FlowPreferenceConfig:
    RECIPE: typing.ClassVar[str] = "flow_preference"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    algorithm: PreferenceAlgorithmConfig = dataclasses.field(default_factory=PreferenceAlgorithmConfig)
    train: PreferenceTrainConfig = dataclasses.field(default_factory=PreferenceTrainConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: PreferenceLogConfig = dataclasses.field(default_factory=PreferenceLogConfig)

    def validate(self) -> None:
        """Cross-field checks, before any model loads (sampling.noise_level and sde_kind are unused: on-policy
        samples are ODE samples)."""
        s, a, t = self.sampling, self.algorithm, self.train

        need(a.beta > 0, "algorithm.beta", f"{a.beta} must be > 0, e.g. 500")
        need(a.label_temperature > 0, "algorithm.label_temperature", f"{a.label_temperature} must be > 0, e.g. 0.2")
        need(a.gamma > 0, "algorithm.gamma", f"{a.gamma} must be > 0 (the paper's code: 1)")
        need(a.min_reward_gap >= 0, "algorithm.min_reward_gap", f"{a.min_reward_gap} must be >= 0")
        need(0 <= a.t_min < a.t_max <= 1, "algorithm.t_min", f"need 0 <= t_min < t_max <= 1, got {a.t_min}, {a.t_max}")
        need(
            a.name != "smpo" or a.t_min > 0,
            "algorithm.t_min",
            "0 with smpo: the inverted latent's implied noise divides by t; use e.g. 0.02",
        )
        need(a.inversion_steps >= 1, "algorithm.inversion_steps", f"{a.inversion_steps}; use at least 1")
        need(a.renoise_iterations >= 0, "algorithm.renoise_iterations", f"{a.renoise_iterations} must be >= 0")
        need(s.num_steps >= 1, "sampling.num_steps", f"{s.num_steps}; use at least 1")
        need(s.eval_num_steps >= 1, "sampling.eval_num_steps", f"{s.eval_num_steps}; use at least 1")
        need(s.guidance_scale >= 0, "sampling.guidance_scale", f"{s.guidance_scale} must be >= 0 (1 = no guidance)")
        for field, value in (("sampling.height", s.height), ("sampling.width", s.width)):
            need(value is None or value > 0, field, f"{value} must be positive or null (the pipeline's default)")
        need(t.iterations >= 0, "train.iterations", f"{t.iterations} is negative")
        need(t.prompts_per_iteration >= 1, "train.prompts_per_iteration", f"{t.prompts_per_iteration}; use at least 1")
        need(t.group_size >= 2, "train.group_size", f"{t.group_size} < 2; a pair needs two samples of a prompt")
        need(t.updates_per_iteration >= 1, "train.updates_per_iteration", f"{t.updates_per_iteration}; use at least 1")
        need(t.micro_batch_size >= 1, "train.micro_batch_size", f"{t.micro_batch_size}; use at least 1")
        need(t.learning_rate > 0, "train.learning_rate", f"{t.learning_rate} must be positive, e.g. 1e-4")
        need(t.weight_decay >= 0, "train.weight_decay", f"{t.weight_decay} must be >= 0")
        need(t.max_grad_norm > 0, "train.max_grad_norm", f"{t.max_grad_norm} must be positive, e.g. 1.0")
        need(0 <= t.seed < SEED_LIMIT, "train.seed", f"{t.seed} is outside [0, 2**32); use a seed such as 0")
        need(
            t.max_seconds is None or t.max_seconds > 0, "train.max_seconds", f"{t.max_seconds} must be positive or null"
        )
        need(
            t.prompts_per_iteration * t.group_size <= SAMPLES_PER_ITERATION_LIMIT,
            "train.group_size",
            f"{t.group_size} x {t.prompts_per_iteration} prompts is over the limit of 2**20 samples; lower it",
        )
        need(bool(self.reward.weights), "reward.weights", "empty; name at least one reward 'module:name': weight")
        for path in [*self.reward.weights, *self.reward.kwargs, *self.eval.rewards]:
            problem = import_path_problem(path)
            need(problem is None, "reward.weights", problem or "")
        unknown = set(self.reward.kwargs) - set(self.reward.weights)
        need(not unknown, "reward.kwargs", f"{sorted(unknown)} have no weight in reward.weights; add them there")
        both = sorted(set(self.eval.rewards) & set(self.reward.weights))
        need(not both, "eval.rewards", f"{both} already in reward.weights; remove them from eval.rewards")
        need(
            self.reward.timeout_s is None or self.reward.timeout_s > 0,
            "reward.timeout_s",
            f"{self.reward.timeout_s} must be positive seconds, or null for no limit",
        )
        d = self.data
        need(d.eval_seeds >= 1, "data.eval_seeds", f"{d.eval_seeds}; use at least 1")
        need(
            not (d.prompts_dataset and d.prompts_file),
            "data.prompts_dataset",
            "set together with data.prompts_file; keep one source of training prompts",
        )
        need(
            d.eval_split is None or bool(d.prompts_dataset),
            "data.eval_split",
            "names a split of data.prompts_dataset, which is not set; set it or use data.eval_prompts",
        )
        need(
            sum(bool(v) for v in (d.eval_split, d.eval_prompts_file, d.eval_prompts)) <= 1,
            "data.eval_prompts",
            "more than one of data.eval_split, data.eval_prompts_file, data.eval_prompts; keep one",
        )
        need(self.log.eval_every >= 0, "log.eval_every", f"{self.log.eval_every} must be >= 0 (0 = start and end only)")
        need(self.log.checkpoint_every >= 0, "log.checkpoint_every", f"{self.log.checkpoint_every} must be >= 0")
        need(self.log.keep_last >= 1, "log.keep_last", f"{self.log.keep_last}; keep at least 1 checkpoint")
        need(self.model.lora_rank >= 1, "model.lora_rank", f"{self.model.lora_rank}; use at least 1")
        need(self.model.lora_alpha >= 1, "model.lora_alpha", f"{self.model.lora_alpha}; use at least 1")
        problem = output_dir_problem(self.log.output_dir)
        need(problem is None, "log.output_dir", problem or "")
        problem = report_to_problem(self.log.report_to)
        need(problem is None, "log.report_to", problem or "")
