"""The config dataclass of the text GRPO recipe (`llmalign grpo`, `llmalign/grpo.py`).

Sections: model, data, sampling, rollout, algorithm, environment, replay, train, reward, eval, budget, memory, log. The reward, eval,
budget, memory and log sections are shared.sections' (declared once for both front ends); every other field is
documented once, here; `llmalign grpo --describe` prints them all.
"""

from __future__ import annotations

import dataclasses
import typing
import math
from typing import Any, Literal, Optional, Union

from shared.config import SAMPLES_PER_ITERATION_LIMIT, ConfigError, import_path_problem, need, option, section
from shared.sections import (
    BudgetSection,
    EvalSection,
    LogSection,
    MemorySection,
    RewardSection,
    check_optimizer,
    check_sections,
)

EMBEDDED_MODEL = "embedded:arith"  # the project's own tiny Qwen2 arithmetic model, built and cached on first use
ENVIRONMENT_ALGORITHMS = ("gigpo", "episode_grpo")  # algorithm.name values that play the environment section
CRITIC_ALGORITHMS = ("ppo", "t_ppo")  # algorithm.name values that train a critic (the critic section)


@dataclasses.dataclass
class LMModelConfig:
    path: str = option(EMBEDDED_MODEL, "causal LM: local directory, hub id, or 'embedded:arith'")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the model weights")
    lora: bool = option(False, "train a LoRA adapter (true) or the full model (false)")
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_targets: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names LoRA wraps"
    )
    allow_remote_code: bool = option(False, "pass trust_remote_code to from_pretrained (off: never run hub code)")

    def check(self) -> None:
        need(self.lora_rank >= 1, "model.lora_rank", f"{self.lora_rank}; use at least 1")
        need(self.lora_alpha >= 1, "model.lora_alpha", f"{self.lora_alpha}; use at least 1")
        need(bool(self.lora_targets) or not self.lora, "model.lora_targets", "empty; name the modules LoRA wraps")


@dataclasses.dataclass
class LMDataSourceConfig:
    """The data fields of both recipes (GRPO's and DPO's data sections): a datasets source, column names, and
    how plain problems are rendered. Listed first in each data section."""

    path: Optional[str] = option(
        None,
        "a datasets hub id or a local dataset (a directory of data files, or one file), read with "
        "datasets.load_dataset; the training rows are its split data.split, the held-out rows its split "
        "data.test_split, and data.train/data.test stay unset (null = read data.train and data.test)",
    )
    subset: Optional[str] = option(None, "the configuration of data.path (load_dataset's name), e.g. 'main'")
    test_split: Optional[str] = option("test", "split of data.path holding the held-out rows (null = none)")
    prompt_column: str = option("prompt", "column holding the prompt (text, or chat messages)")
    answer_column: str = option(
        "answer", "column holding the reference answer, for the rewards and the held-out accuracy"
    )
    system_prompt: Optional[str] = option(
        None,
        "system message put before every prompt, which then goes through the tokenizer's chat template (null = none)",
    )
    prompt_template: Optional[str] = option(
        None,
        "text each plain-text prompt becomes, '{prompt}' replaced by it (no other placeholder, so braces need "
        "no escaping), e.g. '{prompt} Put the final answer in \\boxed{}.' (null = the prompt as it is)",
    )

    def check_source(self, train_default: Optional[str], test_default: Optional[str]) -> None:
        """The source fields; data.train/data.test, at train_default/test_default, are the subclass's."""
        if self.path is not None:
            need(bool(self.path.strip()), "data.path", "empty; give a hub id, a local dataset, or null")
            need(
                self.train == train_default,
                "data.train",
                f"{self.train!r} is set beside data.path={self.path!r}; "
                "training rows come from one of them: unset data.path or data.train",
            )
            need(
                self.test in (test_default, None),
                "data.test",
                f"{self.test!r} is set beside data.path="
                f"{self.path!r}, whose split data.test_split holds the held-out rows; unset data.test",
            )
        need(
            self.subset is None or self.path is not None,
            "data.subset",
            f"{self.subset!r} names a configuration of data.path, which is not set; set data.path or unset it",
        )
        for field in ("prompt_column", "answer_column", "chosen_column", "rejected_column"):
            value = getattr(self, field, "-")
            need(bool(value.strip()), f"data.{field}", "empty; name the column")
        need(
            self.prompt_template is None or "{prompt}" in self.prompt_template,
            "data.prompt_template",
            f"{self.prompt_template!r} has no '{{prompt}}'; put {{prompt}} where the problem goes",
        )


@dataclasses.dataclass
class LMDataConfig(LMDataSourceConfig):
    train: str = option(
        EMBEDDED_MODEL + "/train.jsonl", "training data: .jsonl/.json/.csv/.parquet or a datasets directory"
    )
    test: Optional[str] = option(
        EMBEDDED_MODEL + "/test.jsonl", "held-out data for accuracy before/after (null = none)"
    )
    split: Optional[str] = option(
        None, "the training split: of data.path, or of a DatasetDict directory in data.train (null = 'train')"
    )
    eval_size: int = option(200, "held-out rows evaluated (greedy) at start, every log.eval_every and at the end")
    eval_samples: int = option(1, "completions sampled per held-out row for the sampled accuracy (its mean over them)")
    max_prompt_length: int = option(256, "prompt tokens allowed")
    overlong_prompts: Literal["error", "truncate"] = option(
        "error", "a longer prompt stops with its row (error) or keeps its last tokens and is counted (truncate)"
    )

    def check(self) -> None:
        self.check_source(EMBEDDED_MODEL + "/train.jsonl", EMBEDDED_MODEL + "/test.jsonl")
        need(self.eval_size >= 1, "data.eval_size", f"{self.eval_size}; use at least 1")
        need(self.eval_samples >= 1, "data.eval_samples", f"{self.eval_samples}; use at least 1")
        need(self.max_prompt_length >= 1, "data.max_prompt_length", f"{self.max_prompt_length}; use at least 1")


@dataclasses.dataclass
class LMSamplingConfig:
    max_new_tokens: int = option(64, "completion budget L_max in tokens")
    temperature: float = option(1.0, "sampling temperature (log-probs are computed at the same temperature)")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")

    def check(self) -> None:
        need(self.max_new_tokens >= 1, "sampling.max_new_tokens", f"{self.max_new_tokens}; use at least 1")
        need(self.temperature > 0, "sampling.temperature", f"{self.temperature} must be positive, e.g. 1.0")
        need(0 < self.top_p <= 1, "sampling.top_p", f"{self.top_p} must be in (0, 1]")


# The rollout engine's fields, in GRPO's rollout section (LMRolloutConfig) and as iterate's rollout section
# (RolloutEngineConfig): declared in both, documented here once.
ENGINE_DOCS = {
    "engine": (
        "what generates the completions (GRPO's rollouts, iterate's pairs, the held-out evaluation): hf "
        "(transformers generate on the policy; sampling from torch's seeded RNG) or vllm (a vLLM engine in this process, llmalign.engines.VLLMEngine: one seed per completion, the "
        "trainer's weights pushed to it before each rollout, one engine per process; install it with "
        "bash scripts/setup.sh --vllm on CPU, pip install 'flowalign[vllm]' on GPU)"
    ),
    "vllm_kv_cache_mib": (
        "rollout.engine=vllm: the KV cache in MiB (vLLM's kv_cache_memory_bytes); it must hold one sequence of "
        "the longest prompt + the completion budget (GRPO's sampling.max_new_tokens). 0: vLLM sizes it as "
        "rollout.vllm_gpu_memory_utilization of the GPU's memory (on CPU that fraction of host memory is reserved)"
    ),
    "vllm_gpu_memory_utilization": (
        "rollout.engine=vllm with rollout.vllm_kv_cache_mib=0: the fraction of device memory vLLM may take for "
        "weights, activations and KV cache (the trainer shares the device: keep it well below 1)"
    ),
}


def check_engine_fields(section) -> None:
    """The checks of the rollout engine's fields, in whichever section holds them."""
    need(
        section.vllm_kv_cache_mib >= 0,
        "rollout.vllm_kv_cache_mib",
        f"{section.vllm_kv_cache_mib} is negative; give MiB such as 64, or 0 to size it by the memory fraction",
    )
    need(
        0 < section.vllm_gpu_memory_utilization <= 1,
        "rollout.vllm_gpu_memory_utilization",
        f"{section.vllm_gpu_memory_utilization} is outside (0, 1]; use a fraction such as 0.3",
    )


@dataclasses.dataclass
class RolloutEngineConfig:
    """The rollout engine alone: iterate's rollout section (GRPO's holds the same fields among its own)."""

    engine: Literal["hf", "vllm"] = option("hf", ENGINE_DOCS["engine"])
    vllm_kv_cache_mib: int = option(64, ENGINE_DOCS["vllm_kv_cache_mib"])
    vllm_gpu_memory_utilization: float = option(0.3, ENGINE_DOCS["vllm_gpu_memory_utilization"])

    def check(self) -> None:
        check_engine_fields(self)


@dataclasses.dataclass
class LMRolloutConfig:
    """Where the rollouts of an iteration go (issue 16): a second sampling stage on the batch's own prompts
    (DARS, GVM; groups then have unequal sizes) and Forced Rethinking. Every field is off by default."""

    schedule: Literal["none", "dars_et", "dars_hw", "gvm"] = option(
        "none",
        "none (G rollouts per prompt); dars_et / dars_hw: after the first G, prompts whose pass rate is below "
        "rollout.dars_threshold get extra rollouts in a second stage, equal-treatment or hardness-weighted "
        "(DARS, shared.allocation.dars_extra_rollouts); gvm: a first stage of rollout.gvm_first_stage per "
        "prompt, then rollout.extra_budget's rollouts spread to minimise the gradient variance from each "
        "prompt's first-stage pass rate and gradient-norm estimate (GVM, shared.allocation.gvm_allocation). "
        "Extra rollouts join their prompt's group before the advantages",
    )
    dars_threshold: float = option(
        0.5,
        "dars_*: a prompt is hard, and gets extra rollouts, when its first-stage pass rate is below this; at most "
        "0.5, the official DARS code's fixed bound (schedule_ET / schedule_HW add none at a pass rate >= 1/2, and "
        "ET's target is symmetric about 1/2), so a lower value keeps the extra rollouts for harder prompts only",
    )
    extra_budget: float = option(
        0.5,
        "second-stage rollouts per iteration as a fraction of train.prompts_per_iteration * train.group_size, "
        "rounded to a whole number: dars_* spend at most this many, gvm exactly this many",
    )
    max_rollouts_per_prompt: Optional[int] = option(
        None,
        "the most rollouts one prompt may get, first stage included (null: dars_et 4 G, dars_hw 8 G, the DARS "
        "README's n_max; gvm no cap)",
    )
    min_rollouts_per_prompt: int = option(1, "gvm: second-stage rollouts every prompt gets at least")
    gvm_first_stage: int = option(
        2, "gvm: rollouts per prompt in the first stage, which estimates the pass rate and gradient norm"
    )
    rethink_trigger: str = option(
        "Wait, let me check.",
        "Forced Rethinking under rollout.rethink_style=continue only: text appended to a finished rollout, from "
        "which generation continues (vl_rethinker uses VL-Rethinker's four triggers)",
    )
    rethink_fraction: float = option(
        0.0,
        "Forced Rethinking: fraction of each rank's eligible first-stage rollouts (ended by EOS, room left) that "
        "get a trigger appended and are continued (0 = off; VL-Rethinker's code continues each with probability "
        "0.65); see rollout.rethink_style for which continuations are kept",
    )
    rethink_style: Literal["vl_rethinker", "continue"] = option(
        "vl_rethinker",
        "Forced Rethinking: vl_rethinker (VL-Rethinker's code, llmalign.rollout.forced_rethinking): half the "
        "time cut the rollout before its answer, append one of its four 'Wait' triggers, and keep a continuation "
        "only if it is correct (algorithm.correct_reward), finished within sampling.max_new_tokens, longer than "
        "rollout.rethink_min_tokens and at most 2 per prompt; continue: append rollout.rethink_trigger to the "
        "whole rollout and keep every continuation, right or wrong, for rewards without a correctness check",
    )
    rethink_min_tokens: int = option(
        30,
        "Forced Rethinking, vl_rethinker: a continuation (after the trigger, EOS included) is kept only when it "
        "is longer than this many tokens (VL-Rethinker's 30, set for 2048-token budgets)",
    )

    engine: Literal["hf", "vllm"] = option("hf", ENGINE_DOCS["engine"])
    vllm_kv_cache_mib: int = option(64, ENGINE_DOCS["vllm_kv_cache_mib"])
    vllm_gpu_memory_utilization: float = option(0.3, ENGINE_DOCS["vllm_gpu_memory_utilization"])

    def check(self) -> None:
        for field in ("dars_threshold", "rethink_fraction"):
            value = getattr(self, field)
            need(0 <= value <= 1, f"rollout.{field}", f"{value} is outside [0, 1]; use a fraction such as 0.5")
        need(
            self.extra_budget >= 0,
            "rollout.extra_budget",
            f"{self.extra_budget} is negative; use a fraction of the base rollouts such as 0.5",
        )
        need(
            self.min_rollouts_per_prompt >= 1,
            "rollout.min_rollouts_per_prompt",
            f"{self.min_rollouts_per_prompt}; every prompt gets at least 1 rollout in the second stage",
        )
        need(
            self.gvm_first_stage >= 2,
            "rollout.gvm_first_stage",
            f"{self.gvm_first_stage}; a pass rate and a group advantage need at least 2 rollouts per prompt",
        )
        check_engine_fields(self)
        need(
            self.rethink_fraction == 0 or bool(self.rethink_trigger.strip()),
            "rollout.rethink_trigger",
            "empty while rollout.rethink_fraction > 0; give the text to append, e.g. 'Wait, let me check.'",
        )

    @property
    def two_stage(self) -> bool:
        return self.schedule != "none"

    def first_stage_size(self, group_size: int) -> int:
        """Rollouts per prompt in the first stage: gvm's cheap one, else train.group_size."""
        return self.gvm_first_stage if self.schedule == "gvm" else group_size

    def extra_rollouts(self, prompts: int, group_size: int) -> int:
        """The second stage's budget in rollouts: extra_budget * prompts * group_size, rounded half up."""
        return math.floor(self.extra_budget * prompts * group_size + 0.5)

    def max_total(self, group_size: int) -> Optional[int]:
        """The per-prompt cap on all its rollouts (None: gvm without a cap)."""
        if self.max_rollouts_per_prompt is not None:
            return self.max_rollouts_per_prompt
        if self.schedule in ("dars_et", "dars_hw"):
            from shared.allocation import DARS_DEFAULT_MAX_ROLLOUTS_PER_GROUP

            return DARS_DEFAULT_MAX_ROLLOUTS_PER_GROUP[self.schedule[-2:]] * group_size
        return None


@dataclasses.dataclass
class LMAlgorithmConfig:
    name: Literal["grpo", "spo_chain", "spo_tree", "gigpo", "episode_grpo", "ppo", "t_ppo", "coupled_grpo"] = option(
        "grpo",
        "the recipe's stages, from llmalign.grpo.ALGORITHMS: grpo (one group-relative advantage per completion, "
        "the update's loss from algorithm.loss); spo_chain (SPO, arXiv:2505.23564: segments cut at low-probability "
        "tokens, each valued by Monte Carlo continuations, per-token segment advantages; llmalign.spo); "
        "spo_tree (SPO's tree: per prompt a tree of fixed-length segments whose leaves are the group, edge "
        "advantages; llmalign.spo_tree); gigpo (multi-turn episodes in the environment section, one row "
        "per turn, episode + step-group advantages, llmalign.gigpo); episode_grpo (the same episodes, the episode "
        "advantage alone: gigpo with environment.step_weight 0); ppo (a critic (the critic section) and GAE per "
        "token, llmalign.ppo); t_ppo (Truncated PPO: generation in windows of algorithm.window_tokens, EGAE on "
        "unfinished responses, llmalign.t_ppo); coupled_grpo (DiffuCoder, arXiv 2506.20639: a masked-diffusion LM, "
        "rollouts by unmasking, leave-one-out advantages, the coupled log-prob estimate; llmalign.coupled_grpo)",
    )
    loss: Literal["grpo", "dr_grpo", "dapo", "disco", "gspo", "sppo"] = option(
        "grpo",
        "grpo (sequence mean), dr_grpo (sum / (B*L_max), no std), dapo (token mean, clip-higher), disco, gspo "
        "(sequence-level ratio; the paper clips at clip_range=3e-4, clip_range_high=4e-4), sppo (SPPO's squared "
        "loss on the sequence log-ratio, target (reward - group mean) / algorithm.sppo_beta: with a groupwise "
        "win-rate reward such as a GPM's, GPO); llmalign.objectives",
    )
    advantage_scale: Optional[Literal["group", "batch", "none"]] = option(
        None, "advantage std: per group, batch or none (null: 'none' for dr_grpo and sppo, else 'group')"
    )
    sppo_beta: float = option(
        1e-3,
        "sppo: beta = 1 / eta of the target (P - 1/2) / beta (1e-3: the official SPPO pipeline's; a larger value "
        "asks for a smaller move per iteration)",
    )
    clip_range: float = option(
        0.2,
        "PPO clip epsilon of the ratio below 1 (and above 1 unless clip_range_high is set); flowalign's too",
    )
    clip_range_high: Optional[float] = option(
        None, "clip epsilon of the ratio above 1, DAPO's clip-higher (null: 0.28 for dapo, else clip_range)"
    )
    kl_beta: float = option(0.0, "weight of the k3 KL to the reference model (0 = no reference kept); flowalign's too")
    num_iterations: int = option(1, "mu: passes over each rollout (>1 reuses it with the clipped ratio)")
    updates_per_pass: int = option(
        1,
        "optimizer steps per pass U: step p trains on the completions (whole groups "
        "for disco and shared_prefix) whose index in the rollout is p modulo U",
    )
    full_batch_epochs: Optional[int] = option(
        None,
        "DARS-B's full-batch updates: this many passes over each rollout, each one optimizer step on the whole "
        "batch (in place of num_iterations and updates_per_pass, which must stay 1; null = off)",
    )
    mask_truncated: Optional[bool] = option(
        None, "leave completions that hit L_max out of the loss (null: true for dapo)"
    )
    filter_zero_std: Union[bool, Literal["drop", "refill"]] = option(
        False,
        "groups whose rewards are all equal: kept (false), left out of the loss (true or 'drop', DAPO's filter; the "
        "batch shrinks), or 'refill': left out and replaced by informative groups from more sampling rounds on new "
        "prompts, up to algorithm.max_refill_rounds (DAPO dynamic sampling)",
    )
    max_refill_rounds: int = option(
        4,
        "filter_zero_std=refill: sampling rounds after the first, each on about as many new prompts as should give "
        "the missing informative groups (at most train.prompts_per_iteration), until the batch holds "
        "prompts_per_iteration informative groups; when they run out it trains on those found (0 = as 'drop')",
    )
    replay: Literal["none", "ssr"] = option(
        "none",
        "ssr: Selective Sample Replay (VL-Rethinker): keep recent samples with non-zero advantage (replay.size) and, "
        "when a batch has fewer than replay.min_informative of them, add samples drawn from that buffer in "
        "proportion to |advantage|^replay.alpha (their stored advantage; their old log-probs are the current "
        "policy's); none: off",
    )
    shared_prefix: bool = option(False, "Prefix Grouper: encode each prompt once per group in the training forward")
    disco_tau: float = option(10.0, "disco: temperature of the log-sum-exp over wrong answers")
    disco_delta: float = option(
        1e-4,
        "disco: budget of the trust region KL(old || new), the token mean of logp_old - "
        "logp over every kept completion of an optimizer step",
    )
    disco_penalty: float = option(1e3, "disco: weight beta of the squared hinge (beta/2) max(KL - delta, 0)^2")
    disco_score: Literal["log_likelihood", "likelihood_ratio"] = option(
        "log_likelihood", "disco: score of a completion, mean token log-prob or mean token ratio"
    )
    correct_reward: str = option(
        "accuracy",
        "disco and rollout.schedule: the reward (a name in reward.weights) that says whether a completion is "
        "correct (disco's o+, or counted in a prompt's pass rate) or wrong (o-)",
    )
    correct_threshold: float = option(
        0.5, "disco and rollout.schedule: a completion is correct when its correct_reward exceeds this"
    )
    rollout_correction: Literal["none", "tis", "mis"] = option(
        "none",
        "correct for the engine/trainer mismatch with rho_t = p_train / p_engine of each sampled token (the "
        "trainer's old log-prob over the engine's sampling log-prob; shared.rollout_correction), which multiplies "
        "the token's policy-gradient term, the loss normaliser unchanged: tis, truncated importance sampling, "
        "min(rho_t, C); mis, masked importance sampling, rho * 1[1/C <= rho <= C] per token or per sequence "
        "(algorithm.rollout_correction_level); none: off (the mismatch is logged as mismatch/* either way). For "
        "the per-token losses grpo, dr_grpo and dapo",
    )
    rollout_correction_cap: float = option(
        2.0,
        "the cap C > 1 of algorithm.rollout_correction: tis weights are at most C, mis keeps ratios in [1/C, C] "
        "(2: the TIS blog's verl example, and verl's mask threshold)",
    )
    gamma: float = option(
        1.0,
        "ppo, t_ppo: GAE's discount (1: an outcome reward at the end of a text is not discounted over its length, "
        "as OpenRLHF's and VC-PPO's (arXiv:2503.01491) PPO for LLMs)",
    )
    gae_lambda: float = option(
        0.95,
        "ppo, t_ppo: GAE's lambda for the policy's advantages and the critic's returns (0.95: OpenRLHF's default "
        "and VC-PPO's actor lambda; 1 gives Monte Carlo returns)",
    )
    whiten_advantages: bool = option(
        True,
        "ppo, t_ppo: shift and scale the per-token advantages to mean 0, std 1 over the kept tokens of the global "
        "batch (as OpenRLHF and TRL's PPO); false: GAE's values as they are",
    )
    window_tokens: Optional[int] = option(
        None,
        "t_ppo: W, the tokens each in-flight response grows by per iteration (at most sampling.max_new_tokens; "
        "null: sampling.max_new_tokens, every response finishes in one window and t_ppo trains as ppo)",
    )
    spo_cut_every: int = option(
        5,
        "spo_chain: every k-th low-probability token (p < spo_prob_threshold), from the first, starts a segment "
        "(the official interval; 1 = cut at every one)",
    )
    spo_continuations: int = option(
        4, "spo_chain: continuations N sampled from each cut's prefix; its value is their mean reward"
    )
    spo_prob_threshold: float = option(
        0.9, "spo_chain: a token is low-probability when the policy's p < this; only those enter the loss"
    )
    spo_max_cuts: Optional[int] = option(
        None,
        "spo_chain: keep at most this many cuts per completion, the first ones (null: all; the official cap is "
        "10, commented out)",
    )
    spo_whiten: bool = option(
        True,
        "spo_chain, spo_tree: whiten the token advantages over the batch's kept tokens, all ranks (the official "
        "trainer)",
    )
    spo_tree_branching: list[int] = option(
        [4, 2],
        "spo_tree: children of each node, level by level from the prompt; their product is the number of leaves, "
        "which must equal train.group_size (official 6-6-6)",
    )
    spo_tree_segment_tokens: int = option(
        32,
        "spo_tree: tokens M of each segment but the last level's, which runs to sampling.max_new_tokens (official 600)",
    )
    spo_tree_advantage: Literal["rloo", "grpo"] = option(
        "rloo",
        "spo_tree: an edge's advantage V(child) - V(parent) (rloo, official default), or that over the std of the "
        "parent's children's values + 1e-8 (grpo); shared.spo.spo_tree_advantages",
    )
    diffusion_steps: int = option(
        20,
        "coupled_grpo: unmasking steps of the sampler over the sampling.max_new_tokens completion positions, an "
        "equal number committed per step (the remainder on the first steps); at most max_new_tokens",
    )
    diffusion_confidence: Literal["max_prob", "neg_entropy"] = option(
        "max_prob",
        "coupled_grpo: which masked positions the sampler commits first: the highest probability of their "
        "distribution, or the lowest entropy",
    )
    diffusion_masks: Literal["coupled", "single"] = option(
        "coupled",
        "coupled_grpo: coupled (the paper: the fully masked pass plus two complementary masks, every completion "
        "token scored) or single (the paper's ablation: one random mask, its tokens scored with weight 1/t, the "
        "others left out of the loss)",
    )
    rollout_correction_level: Literal["token", "sequence"] = option(
        "token",
        "mis: mask and weight each token by its own ratio (token) or whole completions by the product of their "
        "token ratios (sequence); tis is per token",
    )

    def check(self) -> None:
        need(0 <= self.clip_range < 1, "algorithm.clip_range", f"{self.clip_range} must be in [0, 1), e.g. 0.2")
        need(
            self.clip_range_high is None or self.clip_range_high >= 0,
            "algorithm.clip_range_high",
            f"{self.clip_range_high} must be >= 0",
        )
        need(self.kl_beta >= 0, "algorithm.kl_beta", f"{self.kl_beta} must be >= 0 (0 = no KL)")
        need(self.disco_tau > 0, "algorithm.disco_tau", f"{self.disco_tau} must be positive, e.g. 10")
        self.check_sppo()
        need(self.disco_delta >= 0, "algorithm.disco_delta", f"{self.disco_delta} must be >= 0")
        need(self.disco_penalty >= 0, "algorithm.disco_penalty", f"{self.disco_penalty} must be >= 0")
        need(
            self.max_refill_rounds >= 0,
            "algorithm.max_refill_rounds",
            f"{self.max_refill_rounds} is negative; use 0 or more extra sampling rounds",
        )
        need(
            math.isfinite(self.rollout_correction_cap) and self.rollout_correction_cap > 1,
            "algorithm.rollout_correction_cap",
            f"{self.rollout_correction_cap} must be a finite number > 1 (the trust interval is [1/C, C]), e.g. 2.0",
        )
        need(
            self.rollout_correction_level == "token" or self.rollout_correction == "mis",
            "algorithm.rollout_correction_level",
            f"{self.rollout_correction_level} is for algorithm.rollout_correction=mis; "
            f"{self.rollout_correction} is per token: set the level to token",
        )
        need(
            self.rollout_correction == "none" or self.loss in ("grpo", "dr_grpo", "dapo"),
            "algorithm.rollout_correction",
            f"{self.rollout_correction} weights per-token policy-gradient terms, which algorithm.loss={self.loss} "
            "does not have; use grpo, dr_grpo or dapo, or algorithm.rollout_correction=none",
        )
        need(0 <= self.gamma <= 1, "algorithm.gamma", f"{self.gamma} must be in [0, 1], e.g. 1.0")
        need(0 <= self.gae_lambda <= 1, "algorithm.gae_lambda", f"{self.gae_lambda} must be in [0, 1], e.g. 0.95")
        need(
            self.window_tokens is None or self.window_tokens >= 1,
            "algorithm.window_tokens",
            f"{self.window_tokens}; use at least 1 token per window",
        )
        need(
            isinstance(self.spo_cut_every, int) and self.spo_cut_every >= 1,
            "algorithm.spo_cut_every",
            f"{self.spo_cut_every}; use an integer >= 1 (1 = cut at every low-probability token; official 5)",
        )
        need(
            self.spo_continuations >= 1,
            "algorithm.spo_continuations",
            f"{self.spo_continuations}; use at least 1 continuation per cut (official 4)",
        )
        need(
            0 < self.spo_prob_threshold <= 1,
            "algorithm.spo_prob_threshold",
            f"{self.spo_prob_threshold} must be in (0, 1], e.g. 0.9",
        )
        need(
            self.spo_max_cuts is None or self.spo_max_cuts >= 1,
            "algorithm.spo_max_cuts",
            f"{self.spo_max_cuts}; use at least 1, or null for no cap",
        )
        need(
            len(self.spo_tree_branching) >= 1 and all(b >= 1 for b in self.spo_tree_branching),
            "algorithm.spo_tree_branching",
            f"{self.spo_tree_branching}; give at least one level, each with 1 or more children, e.g. [4, 2]",
        )
        need(
            self.spo_tree_segment_tokens >= 1,
            "algorithm.spo_tree_segment_tokens",
            f"{self.spo_tree_segment_tokens}; use at least 1 token per segment",
        )
        need(
            not self.name.startswith("spo") or self.loss in ("grpo", "dr_grpo", "dapo"),
            "algorithm.loss",
            f"{self.loss} does not train on per-token advantages, which algorithm.name={self.name} gives; use "
            "grpo, dr_grpo or dapo (PPO-clip)",
        )
        need(self.num_iterations >= 1, "algorithm.num_iterations", f"{self.num_iterations}; use at least 1")
        need(self.updates_per_pass >= 1, "algorithm.updates_per_pass", f"{self.updates_per_pass}; use at least 1")
        if self.full_batch_epochs is not None:
            need(
                self.full_batch_epochs >= 1,
                "algorithm.full_batch_epochs",
                f"{self.full_batch_epochs}; use at least 1",
            )
            for field in ("num_iterations", "updates_per_pass"):
                need(
                    getattr(self, field) == 1,
                    f"algorithm.{field}",
                    f"{getattr(self, field)} beside algorithm.full_batch_epochs={self.full_batch_epochs}, whose "
                    "passes are one full-batch step each; set it to 1 or unset algorithm.full_batch_epochs",
                )

    @property
    def passes(self) -> int:
        """Passes over each rollout: full_batch_epochs when set, else num_iterations."""
        return self.full_batch_epochs or self.num_iterations

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps on each rollout: passes x updates_per_pass (full_batch_epochs: one step per pass)."""
        return self.passes * self.updates_per_pass

    @property
    def scale(self) -> str:
        return self.advantage_scale or ("none" if self.loss in ("dr_grpo", "sppo") else "group")

    def check_sppo(self) -> None:
        need(self.sppo_beta > 0, "algorithm.sppo_beta", f"{self.sppo_beta} must be positive, e.g. 1e-3")
        need(
            self.loss == "sppo" or self.sppo_beta == 1e-3,
            "algorithm.sppo_beta",
            f"{self.sppo_beta} is set but algorithm.loss={self.loss} does not use it; set loss=sppo or leave it",
        )
        need(
            self.loss != "sppo" or self.scale == "none",
            "algorithm.advantage_scale",
            f"{self.advantage_scale}: sppo's target is the reward minus its group mean (P - 1/2 for a win rate), "
            "unscaled; set advantage_scale=none or null",
        )

    @property
    def effective_clip_range_high(self) -> float:
        if self.clip_range_high is not None:
            return self.clip_range_high
        return 0.28 if self.loss == "dapo" else self.clip_range

    @property
    def drops_zero_std(self) -> bool:
        """Zero-variance groups train on nothing (filter_zero_std true, 'drop' or 'refill')."""
        return self.filter_zero_std is not False

    @property
    def refill_rounds(self) -> int:
        """Sampling rounds allowed after the first: max_refill_rounds under 'refill', else none."""
        return self.max_refill_rounds if self.filter_zero_std == "refill" else 0

    @property
    def whole_groups(self) -> bool:
        """The update splits the rollout by whole groups: the shared prompt (Prefix Grouper) or the contrast
        within a group (DisCO) needs all of a group's completions together."""
        return self.shared_prefix or self.loss == "disco"

    @property
    def mask_overlong(self) -> bool:
        return self.mask_truncated if self.mask_truncated is not None else self.loss == "dapo"


@dataclasses.dataclass
class LMCriticConfig:
    """The value model of algorithm.name ppo and t_ppo (llmalign.critic); unused by grpo."""

    path: Optional[str] = option(
        None,
        "the critic's model: a directory or hub id whose architecture transformers can load as "
        "AutoModelForTokenClassification (a backbone; the value head is new, initialised to 0); null: model.path",
    )
    learning_rate: float = option(1e-5, "the critic's AdamW learning rate")
    weight_decay: float = option(0.0, "the critic's AdamW weight decay")
    max_grad_norm: float = option(1.0, "the critic's gradient clipping norm")
    value_clip: Optional[float] = option(
        0.2,
        "eps of the clipped value loss max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) / 2 (OpenAI "
        "baselines' ppo2, OpenRLHF's value_clip, TRL's cliprange_value: 0.2); null: (V - R)^2 / 2",
    )

    def check(self) -> None:
        need(
            self.value_clip is None or self.value_clip > 0,
            "critic.value_clip",
            f"{self.value_clip} must be positive, e.g. 0.2 (null: no clipping)",
        )
        need(self.learning_rate > 0, "critic.learning_rate", f"{self.learning_rate} must be positive, e.g. 1e-5")
        need(self.weight_decay >= 0, "critic.weight_decay", f"{self.weight_decay} must be >= 0")
        need(self.max_grad_norm > 0, "critic.max_grad_norm", f"{self.max_grad_norm} must be positive, e.g. 1.0")


@dataclasses.dataclass
class LMReplayConfig:
    """algorithm.replay=ssr's buffer (shared.replay.ReplayBuffer), saved in every checkpoint."""

    size: int = option(256, "samples the buffer keeps, the oldest evicted first")
    min_informative: int = option(
        16,
        "a batch with fewer samples of non-zero advantage (after the zero-variance and overlong masks) gets "
        "that many minus its own from the buffer, as many as it holds",
    )
    alpha: float = option(1.0, "replay probability proportional to |advantage|^alpha (0 = uniform)")

    def check(self) -> None:
        need(self.min_informative >= 0, "replay.min_informative", f"{self.min_informative} is negative")
        need(
            math.isfinite(self.alpha) and self.alpha >= 0,
            "replay.alpha",
            f"{self.alpha}; use a finite exponent >= 0 (1 = in proportion to |advantage|)",
        )


@dataclasses.dataclass
class LMTrainConfig:
    iterations: int = option(100, "GRPO iterations (rollout + updates)")
    prompts_per_iteration: int = option(
        8,
        "distinct prompts per iteration B, over all processes (each process "
        "samples a block of B / processes whole groups)",
    )
    group_size: int = option(8, "completions per prompt G")
    learning_rate: float = option(1e-5, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "seed for prompt order, sampling and initialisation")

    def check(self) -> None:
        need(self.iterations >= 0, "train.iterations", f"{self.iterations} is negative")
        need(self.group_size >= 1, "train.group_size", f"{self.group_size}; use at least 1 completion per prompt")
        need(
            self.prompts_per_iteration >= 1,
            "train.prompts_per_iteration",
            f"{self.prompts_per_iteration}; use at least 1",
        )
        rollout = self.prompts_per_iteration * self.group_size
        need(
            rollout <= SAMPLES_PER_ITERATION_LIMIT,
            "train.group_size",
            f"{self.group_size} completions per prompt x "
            f"{self.prompts_per_iteration} prompts = {rollout} per iteration, over the limit of 2**20; lower it",
        )
        check_optimizer(self, "1e-5")


@dataclasses.dataclass
class LMEnvironmentConfig:
    """The multi-turn environment of algorithm.name gigpo and episode_grpo (llmalign.environments, llmalign.gigpo):
    train.prompts_per_iteration tasks per iteration, train.group_size trajectories per task. GiGPO's defaults
    (Feng et al. 2025, arXiv:2505.10978, official runs): gamma 0.95, step_weight 1, mean_norm, penalty 0.1."""

    name: str = option(
        "arith_chain",
        "an embedded environment (arith_chain: carry a running total through embedded:arith's 'Compute a+b-c.' "
        "turns) or the import path 'module:Factory' of a callable returning a fresh environment",
    )
    kwargs: dict[str, Any] = option({}, "keyword arguments the environment's factory is called with")
    max_turns: int = option(
        5, "turns per trajectory at most (one generate call each); an episode not done by then ends"
    )
    gamma: float = option(0.95, "discount of the step returns G_t = r_t + gamma G_{t+1} (GiGPO Eq. 5)")
    step_weight: float = option(1.0, "omega: the weight of the step advantage, A = A^E + omega A^S (GiGPO Eq. 8)")
    mode: Literal["mean_norm", "mean_std_norm"] = option(
        "mean_norm",
        "normalisation of both advantages: mean_norm (x - mean) or mean_std_norm ((x - mean) / (std + eps))",
    )
    episode_statistics: Literal["rows", "trajectories"] = option(
        "rows",
        "the episode mean and std over every step row of the group (rows, the official code) or over one score "
        "per trajectory (trajectories, Eq. 3 as written)",
    )
    invalid_penalty: float = option(
        0.1, "subtracted from a row's episode score and step return when its action was invalid (info valid=False)"
    )
    eval_tasks: int = option(
        16, "held-out tasks played greedily at start, every log.eval_every and at the end (0 = none)"
    )

    def check(self) -> None:
        need(bool(self.name.strip()), "environment.name", "empty; name an embedded environment or 'module:Factory'")
        need(self.max_turns >= 1, "environment.max_turns", f"{self.max_turns}; use at least 1")
        need(0 <= self.gamma <= 1, "environment.gamma", f"{self.gamma} is outside [0, 1]; GiGPO uses 0.95")
        need(math.isfinite(self.step_weight), "environment.step_weight", f"{self.step_weight}; give a finite number")
        need(
            math.isfinite(self.invalid_penalty) and self.invalid_penalty >= 0,
            "environment.invalid_penalty",
            f"{self.invalid_penalty}; use a finite number >= 0 (GiGPO: 0.1)",
        )
        need(self.eval_tasks >= 0, "environment.eval_tasks", f"{self.eval_tasks} is negative")


SPO_ALGORITHMS = ("spo_chain", "spo_tree")
# algorithm fields and sections only some algorithm.name values read: set under another, they would do nothing
ALGORITHM_OWNED = {
    "algorithm.spo_cut_every": ("spo_chain",),
    "algorithm.spo_continuations": ("spo_chain",),
    "algorithm.spo_prob_threshold": ("spo_chain",),
    "algorithm.spo_max_cuts": ("spo_chain",),
    "algorithm.spo_whiten": SPO_ALGORITHMS,
    "algorithm.spo_tree_branching": ("spo_tree",),
    "algorithm.spo_tree_segment_tokens": ("spo_tree",),
    "algorithm.spo_tree_advantage": ("spo_tree",),
    "algorithm.gamma": ("ppo", "t_ppo"),
    "algorithm.gae_lambda": ("ppo", "t_ppo"),
    "algorithm.whiten_advantages": ("ppo", "t_ppo"),
    "algorithm.window_tokens": ("t_ppo",),
    "environment.step_weight": ("gigpo",),  # episode_grpo is gigpo with the step weight 0
    "environment": ("gigpo", "episode_grpo"),
    "critic": ("ppo", "t_ppo"),
    "algorithm.diffusion_steps": ("coupled_grpo",),
    "algorithm.diffusion_confidence": ("coupled_grpo",),
    "algorithm.diffusion_masks": ("coupled_grpo",),
}


def check_algorithm_owned_fields(config: "GRPOConfig") -> None:
    """A field (or a whole section) that algorithm.name does not read is refused when it differs from its default,
    naming the algorithms that read it: set under another algorithm it would silently do nothing."""
    name = config.algorithm.name
    defaults = type(config)()
    for path, owners in ALGORITHM_OWNED.items():
        if name in owners:
            continue
        value, default = config, defaults
        for part in path.split("."):
            value, default = getattr(value, part), getattr(default, part)
        need(
            value == default,
            path,
            f"is read by algorithm.name {' or '.join(owners)} only, and this run is {name}; leave it at its "
            f"default or choose one of those algorithms",
        )


def check_environment_recipe(config: "GRPOConfig") -> None:
    """What the environment recipes do not do, refused before any model loads (one line, exit 2)."""
    a, r = config.algorithm, config.rollout
    why = f"algorithm.name={a.name} plays multi-turn episodes"
    need(a.loss != "disco", "algorithm.loss", f"disco needs correct/wrong labels, which {why} has not; use grpo")
    need(not a.shared_prefix, "algorithm.shared_prefix", f"true: every row of {why} has its own prompt; set false")
    need(a.replay == "none", "algorithm.replay", f"{a.replay} is GRPO's; {why}: set none")
    need(a.filter_zero_std is False, "algorithm.filter_zero_std", f"{a.filter_zero_std} is GRPO's; {why}: set false")
    need(not r.two_stage, "rollout.schedule", f"{r.schedule} is GRPO's; {why}: set none")
    need(r.rethink_fraction == 0, "rollout.rethink_fraction", f"{r.rethink_fraction} is GRPO's; {why}: set 0")
    need(
        a.updates_per_pass == 1 and a.full_batch_epochs is None,
        "algorithm.updates_per_pass",
        f"{a.updates_per_pass}: ranks hold unequal numbers of turns under {why}; use 1 (and no full_batch_epochs)",
    )


def check_coupled_grpo(config: "GRPOConfig") -> None:
    """What coupled_grpo (a masked-diffusion LM, llmalign.coupled_grpo) does not do, refused before any model loads."""
    a, r, s = config.algorithm, config.rollout, config.sampling
    why = "coupled_grpo samples by unmasking (llmalign.diffusion)"
    need(
        a.loss in ("grpo", "dr_grpo", "dapo"),
        "algorithm.loss",
        f"{a.loss}: coupled_grpo trains per-token estimates with grpo, dr_grpo or dapo (the paper: dapo's token mean)",
    )
    need(r.engine == "hf", "rollout.engine", f"{r.engine}: {why}, not with an engine; set hf")
    need(s.top_p == 1.0, "sampling.top_p", f"{s.top_p}: {why} from the full distribution; set 1.0")
    need(not a.shared_prefix, "algorithm.shared_prefix", f"true: a causal LM's prefix sharing; {why}: set false")
    need(a.replay == "none", "algorithm.replay", f"{a.replay} is GRPO's; {why}: set none")
    need(not r.two_stage, "rollout.schedule", f"{r.schedule} is GRPO's; {why}: set none")
    need(r.rethink_fraction == 0, "rollout.rethink_fraction", f"{r.rethink_fraction} is GRPO's; {why}: set 0")
    need(
        a.rollout_correction == "none",
        "algorithm.rollout_correction",
        f"{a.rollout_correction}: {why}, which records no sampling log-probs; set none",
    )
    need(
        1 <= a.diffusion_steps <= s.max_new_tokens,
        "algorithm.diffusion_steps",
        f"{a.diffusion_steps}: use 1 to sampling.max_new_tokens={s.max_new_tokens} (at least one token per step)",
    )


def check_reward_names(reward: RewardSection, evaluation: EvalSection) -> None:
    """llmalign's reward names: a builtin (llmalign.rewards.BUILTIN_REWARDS) or an import path 'module:name'; an
    eval reward may not take the name of a metric the held-out evaluation logs itself."""
    from llmalign.rewards import BUILTIN_REWARDS  # standard library only: config loading stays light

    unknown = [name for name in reward.weights if name not in BUILTIN_REWARDS and ":" not in name]
    need(
        not unknown,
        "reward.weights",
        f"unknown reward {unknown[0]!r} (no builtin of that name, and not an import "
        f"path 'module:name'); use one of {sorted(BUILTIN_REWARDS)} or a path such as mypkg.rewards:score"
        if unknown
        else "",
    )
    for name in reward.weights:
        module_name, colon, attribute = name.partition(":")
        need(
            not colon or import_path_problem(name) is None,  # no colon: a builtin, checked above
            "reward.weights",
            f"{name!r} has module name {module_name!r} and name {attribute!r}; an import path "
            "is an absolute dotted module and a name, e.g. mypkg.rewards:score",
        )
    for name in evaluation.rewards:
        need(
            name in BUILTIN_REWARDS or import_path_problem(name) is None,
            "eval.rewards",
            f"{name!r} is no builtin reward and no import path 'module:name'; use one of "
            f"{sorted(BUILTIN_REWARDS)} or a path such as mypkg.rewards:score",
        )
        need(
            name not in HELD_OUT_METRICS,
            "eval.rewards",
            f"{name!r}: the held-out evaluation logs eval/{name} "
            "already (greedy accuracy, sampled accuracy, mean length); remove it",
        )


HELD_OUT_METRICS = ("accuracy", "sampled_accuracy", "mean_length")  # eval/<name> the held-out evaluation logs


def lm_log(output_dir: str) -> Any:
    """The log section of an llmalign recipe: held-out evaluation at start and end, a checkpoint every 20."""
    return section(LogSection, output_dir=output_dir, eval_every=0, checkpoint_every=20)


@dataclasses.dataclass
class GRPOConfig:
    RECIPE: typing.ClassVar[str] = "grpo"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    model: LMModelConfig = dataclasses.field(default_factory=LMModelConfig)
    data: LMDataConfig = dataclasses.field(default_factory=LMDataConfig)
    sampling: LMSamplingConfig = dataclasses.field(default_factory=LMSamplingConfig)
    rollout: LMRolloutConfig = dataclasses.field(default_factory=LMRolloutConfig)
    algorithm: LMAlgorithmConfig = dataclasses.field(default_factory=LMAlgorithmConfig)
    environment: LMEnvironmentConfig = dataclasses.field(default_factory=LMEnvironmentConfig)
    replay: LMReplayConfig = dataclasses.field(default_factory=LMReplayConfig)
    train: LMTrainConfig = dataclasses.field(default_factory=LMTrainConfig)
    critic: LMCriticConfig = dataclasses.field(default_factory=LMCriticConfig)
    reward: RewardSection = section(RewardSection, weights={"accuracy": 1.0})
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    budget: BudgetSection = dataclasses.field(default_factory=BudgetSection)
    memory: MemorySection = section(MemorySection, micro_batch_size=16)
    log: LogSection = lm_log("runs/llm_grpo")

    def validate(self) -> None:
        """Each section's own checks, then the ones across sections; before any model loads."""
        check_sections(self)
        check_reward_names(self.reward, self.eval)
        t, a, r = self.train, self.algorithm, self.rollout
        if a.name in CRITIC_ALGORITHMS:
            self.check_critic_algorithm()
        else:
            need(
                t.group_size >= 2,
                "train.group_size",
                f"{t.group_size} < 2; group advantages need at least 2 completions per prompt",
            )
        rollout = t.prompts_per_iteration * t.group_size
        need(
            rollout % a.updates_per_pass == 0,
            "algorithm.updates_per_pass",
            f"the rollout of {rollout} completions (prompts_per_iteration * group_size) does not split into "
            f"{a.updates_per_pass} equal parts; pick a divisor of {rollout}",
        )
        need(
            (a.loss != "disco" and not r.two_stage) or a.correct_reward in self.reward.weights,
            "algorithm.correct_reward",
            f"{a.correct_reward!r} is not among the configured rewards {sorted(self.reward.weights)}; name the one "
            "that scores correctness (a completion is correct when it exceeds algorithm.correct_threshold)",
        )
        self.check_allocation()
        check_algorithm_owned_fields(self)
        if a.name in ENVIRONMENT_ALGORITHMS:
            check_environment_recipe(self)
        if a.name == "coupled_grpo":
            check_coupled_grpo(self)
        if a.name.startswith("spo"):
            self.check_spo()
        if a.replay == "ssr":
            from shared.replay import check_replay_size

            try:
                check_replay_size(self.replay.size)
            except ConfigError as error:
                raise ConfigError(f"config field 'replay.size': {error}") from None
            need(
                a.loss != "disco",
                "algorithm.replay",
                "ssr replays samples by their advantage, which algorithm.loss=disco does not train on; use "
                "another loss or algorithm.replay=none",
            )
        need(
            not (a.shared_prefix and self.memory.gradient_checkpointing),
            "memory.gradient_checkpointing",
            "checkpointed layers drop the KV cache that algorithm.shared_prefix shares; turn one of them off",
        )
        if a.whole_groups:
            why = "algorithm.shared_prefix" if a.shared_prefix else "algorithm.loss=disco"
            need(
                self.memory.micro_batch_size % t.group_size == 0,
                "memory.micro_batch_size",
                f"{self.memory.micro_batch_size} is not a multiple of train.group_size={t.group_size}, which {why} "
                "needs",
            )
            step_rows = t.prompts_per_iteration * t.group_size // a.updates_per_pass
            need(
                step_rows % t.group_size == 0,
                "algorithm.updates_per_pass",
                f"{a.updates_per_pass} splits groups across optimizer steps, which {why} cannot do; use a divisor "
                f"of train.prompts_per_iteration={t.prompts_per_iteration}",
            )

    def check_critic_algorithm(self) -> None:
        """ppo and t_ppo train on per-token GAE advantages: a per-token loss, none of GRPO's group machinery."""
        a, r, s = self.algorithm, self.rollout, self.sampling
        need(
            a.loss in ("grpo", "dr_grpo", "dapo"),
            "algorithm.loss",
            f"{a.loss} under algorithm.name={a.name}; its per-token GAE advantages need grpo, dr_grpo or dapo",
        )
        for field, value, off in (
            ("algorithm.filter_zero_std", a.filter_zero_std, False),
            ("algorithm.replay", a.replay, "none"),
            ("rollout.schedule", r.schedule, "none"),
            ("rollout.rethink_fraction", r.rethink_fraction, 0),
            ("algorithm.full_batch_epochs", a.full_batch_epochs, None),  # the critic steps as num_iterations says
        ):
            need(value == off, field, f"{value!r} is GRPO's, not {a.name}'s; set it to {off!r}")
        if a.name != "t_ppo":  # ppo: algorithm.window_tokens is refused with the other t_ppo fields (ALGORITHM_OWNED)
            return
        need(
            a.window_tokens is None or a.window_tokens <= s.max_new_tokens,
            "algorithm.window_tokens",
            f"{a.window_tokens} is above sampling.max_new_tokens={s.max_new_tokens}; use at most "
            f"{s.max_new_tokens} (a window never outgrows a response)",
        )
        need(
            a.rollout_correction == "none",
            "algorithm.rollout_correction",
            f"{a.rollout_correction}: t_ppo's windows carry no engine log-probs to correct with; set it to none",
        )
        need(
            self.train.group_size == 1,
            "train.group_size",
            f"{self.train.group_size}: t_ppo holds one response per prompt (a freed slot takes one new prompt); set 1",
        )
        need(
            r.engine == "hf",
            "rollout.engine",
            f"{r.engine}: t_ppo generates its windows with hf; set rollout.engine=hf",
        )
        need(not a.shared_prefix, "algorithm.shared_prefix", "t_ppo's windows have their own prefixes; set it false")

    def check_spo(self) -> None:
        """SPO (llmalign.spo) values segments of the first-stage groups with its own continuations: refused beside a
        second stage or replayed samples (rows without measured segments), and beside grpo_lambda (a continuation's
        reward is scored among its cut's continuations, not its group)."""
        a, r = self.algorithm, self.rollout
        need(
            not r.two_stage and a.replay == "none",
            "algorithm.name",
            f"{a.name} values the segments of the first stage's groups; set rollout.schedule=none and "
            "algorithm.replay=none",
        )
        need(
            "grpo_lambda" not in self.reward.weights,
            "reward.weights",
            f"grpo_lambda ranks whole groups, which {a.name}'s continuations are not; drop it",
        )
        if a.name != "spo_tree":
            return
        leaves = math.prod(a.spo_tree_branching)
        need(
            leaves == self.train.group_size,
            "algorithm.spo_tree_branching",
            f"{a.spo_tree_branching} gives {leaves} leaves per prompt, but train.group_size is "
            f"{self.train.group_size}; make their product the group size",
        )
        inner = (len(a.spo_tree_branching) - 1) * a.spo_tree_segment_tokens
        need(
            inner < self.sampling.max_new_tokens,
            "algorithm.spo_tree_segment_tokens",
            f"{a.spo_tree_segment_tokens} x {len(a.spo_tree_branching) - 1} levels before the last = {inner} tokens "
            f"leave none of sampling.max_new_tokens={self.sampling.max_new_tokens} to the last level; shorten them",
        )
        need(
            r.rethink_fraction == 0 and a.filter_zero_std != "refill",
            "algorithm.name",
            "spo_tree samples its own tree per prompt: set rollout.rethink_fraction=0 and leave "
            "algorithm.filter_zero_std off of refill",
        )

    @property
    def uneven_groups(self) -> bool:
        """The trained groups may differ in size: a second stage (rollout.schedule) or replayed samples (groups of
        one), so the update splits the batch by whole groups (`llmalign.grpo.Groups`)."""
        return self.rollout.two_stage or self.algorithm.replay == "ssr"

    def check_allocation(self) -> None:
        """A second stage that cannot fit its budget is refused here, before any model loads: gvm must give every
        prompt min_rollouts_per_prompt and at most max_rollouts_per_prompt (first stage included); a per-prompt cap
        below the first stage; an optimizer-step split that is not by whole groups (groups have unequal sizes)."""
        t, r, a = self.train, self.rollout, self.algorithm
        if not r.two_stage and a.replay == "none":
            return
        need(
            t.prompts_per_iteration % a.updates_per_pass == 0,
            "algorithm.updates_per_pass",
            f"{a.updates_per_pass}: under rollout.schedule or algorithm.replay groups have unequal sizes, so the "
            f"optimizer steps split by whole groups; use a divisor of train.prompts_per_iteration="
            f"{t.prompts_per_iteration}",
        )
        if not r.two_stage:
            return
        need(
            "grpo_lambda" not in self.reward.weights,
            "rollout.schedule",
            f"{r.schedule}: the second stage's rollouts reach the rewards as groups of one, which grpo_lambda (it "
            "ranks whole groups) cannot score; drop grpo_lambda or set rollout.schedule=none",
        )
        first, cap = r.first_stage_size(t.group_size), r.max_total(t.group_size)
        need(
            cap is None or cap >= first,
            "rollout.max_rollouts_per_prompt",
            f"{cap} is below the first stage's {first} rollouts per prompt; raise it",
        )
        if r.schedule == "gvm":
            from shared.allocation import check_budget

            budget = r.extra_rollouts(t.prompts_per_iteration, t.group_size)
            try:
                check_budget(
                    budget,
                    t.prompts_per_iteration,
                    r.min_rollouts_per_prompt,
                    None if cap is None else cap - first,
                    field="rollout.extra_budget",
                )
            except ConfigError as error:
                raise ConfigError(
                    f"config field 'rollout.extra_budget': {r.extra_budget} x {t.prompts_per_iteration} prompts x "
                    f"{t.group_size} = {budget} second-stage rollouts: {error} (rollout.min_rollouts_per_prompt, "
                    f"rollout.max_rollouts_per_prompt less the first stage's {first})"
                ) from None
