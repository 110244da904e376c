"""The config dataclass of the reward-model recipe (`llmalign rm`, `llmalign/reward_model.py`).

Sections: model, data, algorithm, train, budget, memory, log. The model section is GRPO's (`LMModelConfig`), the
train section DPO's (`DPOTrainConfig`, with this recipe's learning rate), budget, memory and log are
shared.sections'; every other field is documented once, here; `llmalign rm --describe` prints them all.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional

from llmalign.config import LMDataSourceConfig, LMModelConfig, lm_log
from llmalign.dpo_config import DPOTrainConfig
from shared.config import need, option, section
from shared.sections import BudgetSection, LogSection, MemorySection, check_sections


@dataclasses.dataclass
class RMDataConfig(LMDataSourceConfig):
    train: Optional[str] = option(
        None,
        "preference pairs with columns prompt, chosen, rejected (.jsonl/.json/.csv/.parquet or a datasets "
        "directory), e.g. embedded:arith/rm/answers_train.jsonl or pairs made with `llmalign pairs`",
    )
    test: Optional[str] = option(
        None, "held-out preference pairs (the same columns) for the pair accuracy before/after (null = none)"
    )
    split: Optional[str] = option(
        None, "the training split: of data.path, or of a DatasetDict directory in data.train (null = 'train')"
    )
    chosen_column: str = option("chosen", "column holding the preferred completion of a pair")
    rejected_column: str = option("rejected", "column holding the dispreferred completion of a pair")
    eval_size: int = option(1000, "held-out pairs scored at start, every log.eval_every and at the end")
    max_prompt_length: int = option(256, "prompt tokens allowed")
    max_completion_length: int = option(256, "tokens allowed in a chosen/rejected completion")
    overlong_prompts: Literal["error", "truncate"] = option(
        "error", "a longer prompt stops with its row (error) or keeps its last tokens and is counted (truncate)"
    )
    overlong_completions: Literal["error", "truncate"] = option(
        "error", "a longer completion stops with its row (error) or keeps its first tokens and is counted (truncate)"
    )
    margin_column: typing.ClassVar[None] = None  # not a field: the DPO pair encoder asks for it (modpo only)

    def check(self) -> None:
        need(
            self.train is not None or self.path is not None,
            "data.train",
            "not set; give a file of prompt/chosen/rejected rows (e.g. embedded:arith/rm/answers_train.jsonl, or "
            "`llmalign pairs --model ... --data ... --out pairs.jsonl`), or a dataset as data.path",
        )
        self.check_source(None, None)
        need(self.eval_size >= 1, "data.eval_size", f"{self.eval_size}; use at least 1")
        need(self.max_prompt_length >= 1, "data.max_prompt_length", f"{self.max_prompt_length}; use at least 1")
        need(
            self.max_completion_length >= 1,
            "data.max_completion_length",
            f"{self.max_completion_length}; use at least 1",
        )


RM_DEFAULTS = {"gpm_dim": 2, "tau": 0.1, "normalize": False}  # the GPM-only fields' defaults


@dataclasses.dataclass
class RMAlgorithmConfig:
    kind: Literal["bt", "gpm"] = option(
        "bt",
        "bt: a scalar reward r(x, y) trained with -log sigmoid(r_w - r_l) (Bradley-Terry, as TRL's RewardTrainer); "
        "gpm: a 2k-dim embedding v(x, y) with P(y_i > y_j) = sigmoid(<R v_i, v_j> / tau) (General Preference "
        "Model, arXiv 2410.02197), which can hold cyclic preferences",
    )
    gpm_dim: int = option(2, "gpm: the embedding size 2k (even, >= 2; k rotation blocks)")
    tau: float = option(0.1, "gpm: the temperature tau of the score (the official code's default 0.1)")
    normalize: bool = option(
        False,
        "gpm: scale each embedding to unit L2 norm before scoring (false as the official training code; its "
        "ranking reward model normalises)",
    )
    head_learning_rate: Optional[float] = option(
        None,
        "learning rate of the new linear head, warmed up with the rest (null = train.learning_rate); the head "
        "starts from small random weights and a backbone rate would move it slowly",
    )

    def check(self) -> None:
        need(
            self.gpm_dim >= 2 and self.gpm_dim % 2 == 0,
            "algorithm.gpm_dim",
            f"{self.gpm_dim} must be even and >= 2 (2k: k rotation blocks of 2), e.g. {max(2, self.gpm_dim + 1)}",
        )
        need(self.tau > 0, "algorithm.tau", f"{self.tau} must be positive, e.g. 0.1")
        need(
            self.head_learning_rate is None or self.head_learning_rate > 0,
            "algorithm.head_learning_rate",
            f"{self.head_learning_rate} must be positive, or null for train.learning_rate",
        )
        if self.kind == "bt":
            for name, default in RM_DEFAULTS.items():
                value = getattr(self, name)
                need(
                    value == default,
                    f"algorithm.{name}",
                    f"{value} is set but algorithm.kind=bt does not use it; set kind=gpm or {name}={default}",
                )

    @property
    def head_size(self) -> int:
        """Outputs of the value head: 1 (bt) or 2k (gpm)."""
        return 1 if self.kind == "bt" else self.gpm_dim


@dataclasses.dataclass
class RMConfig:
    RECIPE: typing.ClassVar[str] = "rm"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    model: LMModelConfig = dataclasses.field(default_factory=LMModelConfig)
    data: RMDataConfig = dataclasses.field(default_factory=RMDataConfig)
    algorithm: RMAlgorithmConfig = dataclasses.field(default_factory=RMAlgorithmConfig)
    train: DPOTrainConfig = section(DPOTrainConfig, learning_rate=1e-5)
    budget: BudgetSection = dataclasses.field(default_factory=BudgetSection)
    memory: MemorySection = section(MemorySection, micro_batch_size=8)
    log: LogSection = lm_log("runs/llm_rm")

    def validate(self) -> None:
        """Each section's own checks, then the ones across sections; before any model loads."""
        check_sections(self)
        self.budget.refuse_token_budget(self.RECIPE)
        self.log.refuse_ratio_check(self.RECIPE, "has no importance ratio to check")
        need(
            not self.model.lora,
            "model.lora",
            "true, but the rm recipe trains the whole backbone and its head (no LoRA); set model.lora=false",
        )
        need(
            not self.model.allow_remote_code,
            "model.allow_remote_code",
            "true, but a reward model loads with transformers' own classes only; set it to false",
        )
