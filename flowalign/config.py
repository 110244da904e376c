"""The config dataclasses of the flow recipes: flow GRPO (`flowalign/train.py`) and flow preference
(`flowalign/preference.py`).

Sections: model, sampling, algorithm, train, reward, data, eval, budget, memory, log. The last five are
shared.sections' (declared once for both front ends); every other field is documented once, here;
`flowalign train CONFIG --describe` prints them all. Batch sizes are global (per iteration, over all processes), so
a config trains the same way on 1 or N processes; memory.micro_batch_size is a per-process memory knob.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Optional

from shared.config import SAMPLES_PER_ITERATION_LIMIT, import_path_problem, need, option, section
from shared.sections import (
    BudgetSection,
    EvalSection,
    LogSection,
    MemorySection,
    RewardSection,
    check_optimizer,
    check_sections,
)

EMBEDDED_MODEL = "embedded:digits"  # the project's own tiny SD3 pipeline, built and cached on first use
WAN_TEMPORAL_FACTOR = 4  # AutoencoderKLWan's scale_factor_temporal (Wan 2.1 and 2.2)


@dataclasses.dataclass
class ModelConfig:
    path: str = option(EMBEDDED_MODEL, "diffusers pipeline: local directory, hub id, or 'embedded:digits'")
    pipeline: Literal["sd3", "flux", "qwenimage", "wan"] = option(
        "sd3", "pipeline family: sd3 (SD3, SD3.5), flux (FLUX.1), qwenimage (Qwen-Image) or wan (Wan 2.1 text-to-video)"
    )
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

    def check(self) -> None:
        need(self.lora_rank >= 1, "model.lora_rank", f"{self.lora_rank}; use at least 1")
        need(self.lora_alpha >= 1, "model.lora_alpha", f"{self.lora_alpha}; use at least 1")


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
    num_frames: Optional[int] = option(
        None,
        "video frames per sample, model.pipeline=wan only: 4k + 1 (the Wan VAE packs 4 frames into one latent frame "
        "after the first; null: the pipeline's 81)",
    )

    def check(self) -> None:
        need(self.num_steps >= 1, "sampling.num_steps", f"{self.num_steps}; use at least 1")
        need(self.eval_num_steps >= 1, "sampling.eval_num_steps", f"{self.eval_num_steps}; use at least 1")
        need(
            self.guidance_scale >= 0,
            "sampling.guidance_scale",
            f"{self.guidance_scale} must be >= 0 (1 = no guidance)",
        )
        for field, value in (("sampling.height", self.height), ("sampling.width", self.width)):
            need(value is None or value > 0, field, f"{value} must be positive or null (the pipeline's default)")
        need(
            self.num_frames is None or (self.num_frames >= 1 and (self.num_frames - 1) % WAN_TEMPORAL_FACTOR == 0),
            "sampling.num_frames",
            f"{self.num_frames} is not 4k + 1 (the Wan VAE's temporal compression is 4); use e.g. 81, 49, 17 or 5",
        )

    def check_against_model(self, transformer: typing.Mapping, vae: typing.Mapping) -> None:
        """height and width against the transformer's position embedding (its and the VAE's config.json). SD3 crops
        a fixed grid of pos_embed_max_size^2 patch positions: diffusers' PatchEmbed.cropped_pos_embed refuses
        (size // VAE factor) // patch_size > pos_embed_max_size, so the largest size is their product. FLUX's
        rotary positions have no such limit (no pos_embed_max_size)."""
        temporal = vae.get("scale_factor_temporal")
        if self.num_frames is not None and temporal:
            need(
                (self.num_frames - 1) % temporal == 0,
                "sampling.num_frames",
                f"{self.num_frames} is not {temporal}k + 1 (this VAE's temporal compression is {temporal})",
            )
        limit = transformer.get("pos_embed_max_size")
        if limit is None:
            return
        patch, factor = transformer["patch_size"], 2 ** (len(vae["block_out_channels"]) - 1)  # as the SD3 pipeline
        largest = limit * patch * factor
        for field, value in (("sampling.height", self.height), ("sampling.width", self.width)):
            need(
                value is None or value // factor // patch <= limit,
                field,
                f"{value} is over the model's position embedding ({limit} patches x patch size {patch} x VAE factor "
                f"{factor} = {largest} pixels); use at most {largest}",
            )

    def check_sde(self) -> None:
        """The SDE's noise level, for recipes that train on SDE steps (flow GRPO; preference samples by ODE)."""
        need(
            0 <= self.noise_level <= 1.5,
            "sampling.noise_level",
            f"{self.noise_level} is outside [0, 1.5]; Flow-GRPO uses 0.7",
        )
        need(
            self.noise_level > 0,
            "sampling.noise_level",
            "0 gives deterministic steps with no log-prob to train; use 0.7",
        )
        need(
            self.sde_kind != "cps" or self.noise_level <= 1,
            "sampling.noise_level",
            f"{self.noise_level} > 1 with sampling.sde_kind=cps; CPS defines a in [0, 1] (its mean uses |cos(a pi/2)|)",
        )


@dataclasses.dataclass
class AlgorithmConfig:
    name: Literal["flow_grpo", "mixgrpo", "tempflow", "diffusion_nft"] = option(
        "flow_grpo", "which rollout/training scheme (flowalign/train.py's ALGORITHMS)"
    )
    clip_range: float = option(1e-4, "PPO clip epsilon on the per-step ratio (Flow-GRPO: 1e-4); llmalign's too")
    kl_beta: float = option(
        0.01,
        "weight of the Gaussian-mean KL to the reference (LoRA disabled), in algorithm.kl_form's units; 0 = off. "
        "diffusion_nft: weight of the mean squared velocity gap to the reference (official 1e-4)",
    )
    kl_form: Literal["flow_grpo", "exact_step"] = option(
        "flow_grpo",
        "KL per step: ||mean - mean_ref||^2 / (2 sigma_t^2) as the official code (flow_grpo; Flow-GRPO "
        "paper betas carry over), or / (2 sigma_t^2 (-dt)), the exact one-step KL (exact_step: 3.7-25x "
        "stronger on SD3's 10-step schedule)",
    )
    advantage_scale: Literal["group", "batch", "none", "per_prompt"] = option(
        "batch",
        "std for advantages: per group, whole batch (Flow-GRPO's global_std), none, or per_prompt: mean and "
        "std of each prompt's rewards, pooled by prompt text over the gathered batch and, with "
        "algorithm.per_prompt_history, over past iterations (Flow-GRPO's PerPromptStatTracker)",
    )
    advantage_clip: float = option(5.0, "clip advantages to +-this")
    per_prompt_history: int = option(
        0,
        "algorithm.advantage_scale=per_prompt: rewards of a prompt kept across iterations for its mean and std: 0 = "
        "this iteration's only (Flow-GRPO clears its tracker every epoch), N = its last N rewards, never fewer than "
        "this iteration's (ddpo-pytorch's per-prompt buffer); kept in checkpoints",
    )
    updates_per_pass: int = option(
        2,
        "optimizer steps per iteration (flow GRPO makes one pass over each rollout): the global batch of (sample, "
        "step) rows is split in this many parts, the same split whatever the number of processes",
    )
    train_fraction: float = option(
        1.0,
        "flow_grpo: fraction of the SDE steps trained each iteration (random subset); diffusion_nft: each sample is "
        "trained at int(fraction x sampling.num_steps) of the schedule's noise levels, its own random subset "
        "(official 0.99: 9 of 10)",
    )
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
    nft_beta: float = option(
        1.0,
        "diffusion_nft: beta of the implicit policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - "
        "beta v, in (0, 1] (official: 1.0; 0.1 for OCR and multi-reward)",
    )
    nft_adaptive_weighting: bool = option(
        True, "diffusion_nft: divide each row's x0 error by its detached mean absolute error (official: on)"
    )
    nft_old_decay_rate: float = option(
        0.001,
        "diffusion_nft: after each iteration the sampling (old) policy becomes d old + (1 - d) current with "
        "d = min(rate x (optimizer steps - start), max), 0 before start (official decay_type 1: 0.001, 0.5, 0; "
        "type 2: 0.0075, 0.999, 75; type 0: max 0, always on-policy)",
    )
    nft_old_decay_max: float = option(0.5, "diffusion_nft: the old policy's decay d is at most this, in [0, 1)")
    nft_old_decay_start: int = option(0, "diffusion_nft: optimizer steps before the old policy's decay starts")
    noise_aware_normalization: Literal["schedule", "trained_steps"] = option(
        "schedule",
        "noise-aware weights divided by the mean noise scale of the schedule's noisy steps (schedule: fixed, "
        "as TempFlow's released code) or of this iteration's trained steps (trained_steps: first form)",
    )

    guard: bool = option(
        False,
        "flow_grpo, mixgrpo: GRPO-Guard (arXiv 2510.22319): RatioNorm (each step's log-ratio re-centred by its bias "
        "||mu - mu_old||^2 / (2 s^2) and scaled by the step's std s) and each step's loss divided by its dt",
    )
    guard_average: Literal["before_ratio", "after_ratio"] = option(
        "before_ratio",
        "algorithm.guard: average the log-ratio over the latent elements before forming one ratio per step (the "
        "official code) or form, clip and average a ratio per latent element (after_ratio; flow_grpo issue #223)",
    )

    def check(self) -> None:
        need(self.clip_range > 0, "algorithm.clip_range", f"{self.clip_range} must be positive, e.g. 1e-4")
        need(
            not self.guard or self.name in ("flow_grpo", "mixgrpo"),
            "algorithm.guard",
            f"GRPO-Guard applies to flow_grpo and mixgrpo, not {self.name} (its branch rows keep no old step "
            "mean); set algorithm.guard=false",
        )
        need(
            self.guard or self.guard_average == "before_ratio",
            "algorithm.guard_average",
            f"{self.guard_average} is read only with algorithm.guard=true; set that, or leave guard_average alone",
        )
        need(self.kl_beta >= 0, "algorithm.kl_beta", f"{self.kl_beta} must be >= 0")
        need(self.advantage_clip > 0, "algorithm.advantage_clip", f"{self.advantage_clip} must be positive, e.g. 5.0")
        need(
            self.per_prompt_history >= 0,
            "algorithm.per_prompt_history",
            f"{self.per_prompt_history} must be >= 0 (0 = this iteration's rewards only)",
        )
        need(
            self.per_prompt_history == 0 or self.advantage_scale == "per_prompt",
            "algorithm.per_prompt_history",
            f"{self.per_prompt_history} is used by algorithm.advantage_scale=per_prompt only (it is "
            f"{self.advantage_scale}); set that, or per_prompt_history=0",
        )
        need(
            self.advantage_scale != "per_prompt" or self.name != "tempflow",
            "algorithm.advantage_scale",
            "per_prompt pools by prompt, but tempflow's groups are a prompt's branches at one step; use group or batch",
        )
        need(self.updates_per_pass >= 1, "algorithm.updates_per_pass", f"{self.updates_per_pass}; use at least 1")
        need(0 < self.train_fraction <= 1, "algorithm.train_fraction", f"{self.train_fraction} must be in (0, 1]")
        if self.flash_ratio is not None:
            need(
                self.name == "mixgrpo",
                "algorithm.flash_ratio",
                "only MixGRPO has a Flash variant; set algorithm.name=mixgrpo",
            )
            need(
                0 < self.flash_ratio <= 1,
                "algorithm.flash_ratio",
                f"{self.flash_ratio} must be in (0, 1], e.g. 0.4",
            )
        if self.name == "diffusion_nft":
            self.check_nft()
        if self.name == "tempflow":
            need(self.num_branches >= 2, "algorithm.num_branches", f"{self.num_branches} < 2; branches form the groups")
            need(
                self.branch_steps != "subset" or bool(self.branch_subset),
                "algorithm.branch_subset",
                "empty; list step indices or use branch_steps=all",
            )

    def check_nft(self) -> None:
        need(0 < self.nft_beta <= 1, "algorithm.nft_beta", f"{self.nft_beta} is outside (0, 1]; the official uses 1.0")
        need(self.nft_old_decay_rate >= 0, "algorithm.nft_old_decay_rate", f"{self.nft_old_decay_rate} must be >= 0")
        need(
            0 <= self.nft_old_decay_max < 1,
            "algorithm.nft_old_decay_max",
            f"{self.nft_old_decay_max} is outside [0, 1); 1 would freeze the sampling policy (official: 0.5)",
        )
        need(self.nft_old_decay_start >= 0, "algorithm.nft_old_decay_start", f"{self.nft_old_decay_start} is negative")
        need(
            not self.noise_aware_weighting,
            "algorithm.noise_aware_weighting",
            "weighs SDE steps; diffusion_nft trains on noised clean samples, not on steps; set it false",
        )

    def check_steps(self, trainable_steps: int) -> None:
        """The window and the branch steps must fit in the schedule's noisy steps (sampling.num_steps - 1)."""
        if self.name == "mixgrpo" or self.branch_steps == "window":
            need(
                1 <= self.window_size <= trainable_steps,
                "algorithm.window_size",
                f"{self.window_size} does not fit in {trainable_steps} noisy steps (sampling.num_steps - 1); lower it",
            )
            need(self.window_stride >= 1, "algorithm.window_stride", f"{self.window_stride}; use at least 1")
            need(self.window_interval >= 1, "algorithm.window_interval", f"{self.window_interval}; use at least 1")
        if self.name == "tempflow" and self.branch_steps == "subset":
            bad = [k for k in self.branch_subset if not 0 <= k < trainable_steps]
            need(not bad, "algorithm.branch_subset", f"{bad} outside 0..{trainable_steps - 1}")


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
    async_scoring: bool = option(False, "score each rollout chunk in a worker thread while the next chunk samples")
    learning_rate: float = option(3e-4, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    ema_decay: Optional[float] = option(None, "keep an EMA of the trained weights for evaluation (e.g. 0.9)")
    seed: int = option(0, "seed for prompts, noise and initialisation")

    def check(self) -> None:
        need(
            self.group_size >= 2,
            "train.group_size",
            f"{self.group_size} < 2; group advantages need at least 2 samples per prompt",
        )
        need(
            self.prompts_per_iteration >= 1,
            "train.prompts_per_iteration",
            f"{self.prompts_per_iteration}; use at least 1",
        )
        need(self.iterations >= 0, "train.iterations", f"{self.iterations} is negative")
        need(self.rollout_chunks >= 1, "train.rollout_chunks", f"{self.rollout_chunks}; use at least 1")
        check_optimizer(self, "3e-4")
        need(
            self.ema_decay is None or 0 < self.ema_decay < 1,
            "train.ema_decay",
            f"{self.ema_decay} must be in (0, 1) or null",
        )


def check_frames(model: ModelConfig, sampling: SamplingConfig) -> None:
    """sampling.num_frames belongs to the video family only."""
    need(
        sampling.num_frames is None or model.pipeline == "wan",
        "sampling.num_frames",
        f"{sampling.num_frames} is for videos (model.pipeline=wan), but model.pipeline is {model.pipeline}; unset it",
    )


def check_reward_paths(reward: RewardSection, evaluation: EvalSection) -> None:
    """flowalign names every reward by its import path 'module:name' (no builtin names)."""
    for path in [*reward.weights, *reward.kwargs]:
        problem = import_path_problem(path)
        need(problem is None, "reward.weights", problem or "")
    for path in evaluation.rewards:
        problem = import_path_problem(path)
        need(problem is None, "eval.rewards", problem or "")
    evaluation.check_against(reward)


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
    pairs_file: Optional[str] = option(
        None,
        "flow_preference: offline pairs instead of on-policy ones: a jsonl of {prompt, winner, loser}, the images' "
        "paths relative to the file (null: on-policy pairs from the current model)",
    )

    def check(self) -> None:
        need(self.eval_seeds >= 1, "data.eval_seeds", f"{self.eval_seeds}; use at least 1")
        need(
            not (self.prompts_dataset and self.prompts_file),
            "data.prompts_dataset",
            "set together with data.prompts_file; keep one source of training prompts",
        )
        need(
            self.eval_split is None or bool(self.prompts_dataset),
            "data.eval_split",
            "names a split of data.prompts_dataset, which is not set; set it or use data.eval_prompts",
        )
        eval_sources = [
            name
            for name, value in (
                ("data.eval_split", self.eval_split),
                ("data.eval_prompts_file", self.eval_prompts_file),
                ("data.eval_prompts", self.eval_prompts),
            )
            if value
        ]
        need(
            len(eval_sources) <= 1,
            eval_sources[-1] if eval_sources else "data.eval_split",
            f"set together with {eval_sources[0] if eval_sources else ''}; keep one source of evaluation prompts",
        )
        for field, value in (("data.prompts_column", self.prompts_column), ("data.prompts_split", self.prompts_split)):
            need(bool(value.strip()), field, "empty; name a column or split of data.prompts_dataset")


def flow_reward() -> Any:
    return section(RewardSection, weights={"flowalign.rewards:digit_classifier_reward": 1.0})


@dataclasses.dataclass
class FlowGRPOConfig:
    RECIPE: typing.ClassVar[str] = "flow_grpo"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    RENAMED: typing.ClassVar[dict[str, str]] = {"train.updates_per_iteration": "algorithm.updates_per_pass"}
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reward: RewardSection = flow_reward()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    budget: BudgetSection = dataclasses.field(default_factory=BudgetSection)
    memory: MemorySection = section(MemorySection, micro_batch_size=32)
    log: LogSection = section(LogSection, output_dir="runs/flow_grpo", eval_every=10, checkpoint_every=10)

    def validate(self) -> None:
        """Each section's own checks, then the ones across sections; before any model loads."""
        check_sections(self)
        s, a, t = self.sampling, self.algorithm, self.train
        need(s.num_steps >= 2, "sampling.num_steps", f"{s.num_steps} is too few; use at least 2")
        if a.name != "diffusion_nft":  # diffusion_nft samples by ODE: no SDE noise level
            s.check_sde()
        check_frames(self.model, s)
        a.check_steps(s.num_steps - 1)  # the last step lands on sigma = 0 and has no noise
        need(
            not a.guard or s.sde_kind == "flow_grpo",
            "algorithm.guard",
            "GRPO-Guard's RatioNorm and 1/dt reweighting are derived for the Flow-GRPO SDE step; set "
            "sampling.sde_kind=flow_grpo or algorithm.guard=false",
        )
        check_reward_paths(self.reward, self.eval)
        self.budget.refuse_token_budget(self.RECIPE)
        self.log.refuse_ratio_check(
            self.RECIPE, "checks the ratio every iteration at no cost (the sampler gives the old log-probs)"
        )
        need(
            self.data.pairs_file is None,
            "data.pairs_file",
            "offline pairs train the flow_preference recipe; unset it, or run configs/flow/diffusion_dpo.yaml",
        )
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
    num_iterations: int = option(
        1, "optimizer steps per iteration, each over all the iteration's pairs with fresh (t, noise)"
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

    def check(self) -> None:
        need(self.beta > 0, "algorithm.beta", f"{self.beta} must be > 0, e.g. 500")
        need(self.num_iterations >= 1, "algorithm.num_iterations", f"{self.num_iterations}; use at least 1")
        need(
            self.label_temperature > 0,
            "algorithm.label_temperature",
            f"{self.label_temperature} must be > 0, e.g. 0.2",
        )
        need(self.gamma > 0, "algorithm.gamma", f"{self.gamma} must be > 0 (the paper's code: 1)")
        need(self.min_reward_gap >= 0, "algorithm.min_reward_gap", f"{self.min_reward_gap} must be >= 0")
        need(
            0 <= self.t_min < self.t_max <= 1,
            "algorithm.t_min",
            f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}",
        )
        need(
            self.name != "smpo" or self.t_min > 0,
            "algorithm.t_min",
            "0 with smpo: the inverted latent's implied noise divides by t; use e.g. 0.02",
        )
        need(self.inversion_steps >= 1, "algorithm.inversion_steps", f"{self.inversion_steps}; use at least 1")
        need(
            self.renoise_iterations >= 0,
            "algorithm.renoise_iterations",
            f"{self.renoise_iterations} must be >= 0",
        )


@dataclasses.dataclass
class PreferenceTrainConfig:
    iterations: int = option(100, "iterations (on-policy: sample + score + pair + update; file: draw pairs + update)")
    prompts_per_iteration: int = option(
        8,
        "on-policy: distinct prompts per iteration over all processes (a multiple of the number of processes); "
        "data.pairs_file: pairs drawn per iteration",
    )
    group_size: int = option(8, "on-policy: samples per prompt G, ranked by the rewards to form pairs")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "seed for prompts, noise, loss times and initialisation")
    save_pairs: bool = option(
        False,
        "write each iteration's first-update batch (winner/loser latents, t, noise, label, per-pair loss) to "
        "pairs/iter-N.safetensors, for checking the loss offline",
    )

    def check(self) -> None:
        need(self.iterations >= 0, "train.iterations", f"{self.iterations} is negative")
        need(
            self.prompts_per_iteration >= 1,
            "train.prompts_per_iteration",
            f"{self.prompts_per_iteration}; use at least 1",
        )
        need(self.group_size >= 2, "train.group_size", f"{self.group_size} < 2; a pair needs two samples of a prompt")
        check_optimizer(self, "1e-4")
        need(
            self.prompts_per_iteration * self.group_size <= SAMPLES_PER_ITERATION_LIMIT,
            "train.group_size",
            f"{self.group_size} x {self.prompts_per_iteration} prompts is over the limit of 2**20 samples; lower it",
        )


@dataclasses.dataclass
class FlowPreferenceConfig:
    RECIPE: typing.ClassVar[str] = "flow_preference"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    RENAMED: typing.ClassVar[dict[str, str]] = {"train.updates_per_iteration": "algorithm.num_iterations"}
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    algorithm: PreferenceAlgorithmConfig = dataclasses.field(default_factory=PreferenceAlgorithmConfig)
    train: PreferenceTrainConfig = dataclasses.field(default_factory=PreferenceTrainConfig)
    reward: RewardSection = flow_reward()
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    budget: BudgetSection = dataclasses.field(default_factory=BudgetSection)
    memory: MemorySection = section(MemorySection, micro_batch_size=16)
    log: LogSection = section(LogSection, output_dir="runs/diffusion_dpo", eval_every=10, checkpoint_every=10)

    def validate(self) -> None:
        """Each section's own checks, then the ones across sections; before any model loads (sampling.noise_level
        and sde_kind are unused: on-policy samples are ODE samples)."""
        check_sections(self)
        check_reward_paths(self.reward, self.eval)
        need(
            self.model.pipeline != "wan",
            "model.pipeline",
            "wan (video) is not supported by the preference recipe (its VAE encoding and pairs are images); use the "
            "flow_grpo recipe",
        )
        self.budget.refuse_token_budget(self.RECIPE)
        self.log.refuse_ratio_check(self.RECIPE, "has no importance ratio to check")
