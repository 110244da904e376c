"""The config dataclass of the text DPO recipe (`llmalign dpo`, `llmalign/dpo.py`).

Sections: model, data, algorithm, train, budget, memory, log. The model section is GRPO's (`LMModelConfig`), budget,
memory and log are shared.sections'; every other field is documented once, here; `llmalign dpo --describe` prints
them all.
"""

from __future__ import annotations

import dataclasses
import string
import typing
from typing import Literal, Optional

from llmalign.config import EMBEDDED_MODEL, LMDataSourceConfig, LMModelConfig, lm_log
from shared.config import need, option, section
from shared.sections import BudgetSection, LogSection, MemorySection, check_optimizer, check_sections

REFERENCE_FREE_LOSSES = ("simpo",)
# srpo's revision prompt "x, y" when data.revision_template is null: the arith toy's prompts end in a newline and
# its completions follow them directly, so the revised answer starts on a new line as a first answer does
DEFAULT_REVISION_TEMPLATE = "{prompt}{completion}\nRevised answer:\n"
REVISION_PLACEHOLDERS = ("prompt", "completion")


def template_problem(template: str) -> str | None:
    """Why `template` is not a revision template (exactly the placeholders {prompt} and {completion}, each at least
    once, nothing else between braces), or None."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)]
    except ValueError as error:
        return f"cannot be filled ({error}); write a literal brace as {{{{ or }}}}"
    names = [name for name, _, _ in fields if name is not None]
    unknown = sorted({repr("{" + name + "}") for name in names if name not in REVISION_PLACEHOLDERS})
    if unknown:
        return f"has the unknown placeholder(s) {', '.join(unknown)}; only {{prompt}} and {{completion}} are filled"
    if any(spec or conversion for name, spec, conversion in fields if name is not None):
        return "has a placeholder with a format spec or conversion; write them plain, {prompt} and {completion}"
    missing = [f"{{{name}}}" for name in REVISION_PLACEHOLDERS if name not in names]
    if missing:
        return f"lacks {' and '.join(missing)}; e.g. {DEFAULT_REVISION_TEMPLATE!r}"
    return None


@dataclasses.dataclass
class DPODataConfig(LMDataSourceConfig):
    train: Optional[str] = option(
        None,
        "preference pairs with columns prompt, chosen, rejected (.jsonl/.json/.csv/.parquet or a datasets "
        "directory); make on-policy pairs with `llmalign pairs`",
    )
    test: Optional[str] = option(
        EMBEDDED_MODEL + "/test.jsonl", "prompt/answer data for held-out accuracy before/after (null = none)"
    )
    split: Optional[str] = option(
        None, "the training split: of data.path, or of a DatasetDict directory in data.train (null = 'train')"
    )
    chosen_column: str = option("chosen", "column holding the preferred completion of a pair")
    rejected_column: str = option("rejected", "column holding the dispreferred completion of a pair")
    margin_column: Optional[str] = option(
        None,
        "modpo: column holding each pair's reward margin r(chosen) - r(rejected) under the other objectives: a "
        "number, or a list with one per weight after w_0 of algorithm.modpo_weights (null = none; other losses)",
    )
    eval_size: int = option(200, "held-out rows evaluated (greedy) at start, every log.eval_every and at the end")
    eval_max_new_tokens: int = option(64, "completion budget of the held-out evaluation")
    eval_samples: int = option(1, "completions sampled (T = 1) per held-out row for the sampled accuracy (their mean)")
    max_prompt_length: int = option(256, "prompt tokens allowed")
    max_completion_length: int = option(256, "tokens allowed in a chosen/rejected completion, end-of-text included")
    overlong_prompts: Literal["error", "truncate"] = option(
        "error", "a longer prompt stops with its row (error) or keeps its last tokens and is counted (truncate)"
    )
    overlong_completions: Literal["error", "truncate"] = option(
        "error", "a longer completion stops with its row (error) or keeps its first tokens and is counted (truncate)"
    )
    revision_template: Optional[str] = option(
        None,
        "srpo: the revision prompt (x, y) under which the policy revises completion y into y': the text with "
        "{prompt} (the prompt as the policy sees it, chat messages through the chat template) and {completion} "
        "(y's text) filled in, tokenized whole. It may hold data.max_prompt_length + data.max_completion_length "
        "tokens; a longer one follows data.overlong_prompts (error, or keep its last tokens) and is counted "
        "(quote it as a YAML string on the command line: unquoted braces read as a mapping) "
        f"(null: {DEFAULT_REVISION_TEMPLATE!r}; other losses: leave null)",
    )

    def check(self) -> None:
        need(
            self.train is not None or self.path is not None,
            "data.train",
            "not set; give a file of "
            "prompt/chosen/rejected rows, e.g. made with `llmalign pairs --model ... --data ... --out pairs.jsonl`, "
            "or a dataset as data.path",
        )
        self.check_source(None, EMBEDDED_MODEL + "/test.jsonl")
        need(self.eval_size >= 1, "data.eval_size", f"{self.eval_size}; use at least 1")
        need(self.eval_samples >= 1, "data.eval_samples", f"{self.eval_samples}; use at least 1")
        need(self.eval_max_new_tokens >= 1, "data.eval_max_new_tokens", f"{self.eval_max_new_tokens}; use at least 1")
        need(self.max_prompt_length >= 1, "data.max_prompt_length", f"{self.max_prompt_length}; use at least 1")
        need(
            self.max_completion_length >= 1,
            "data.max_completion_length",
            f"{self.max_completion_length}; use at least 1",
        )
        if self.revision_template is not None:
            problem = template_problem(self.revision_template)
            need(problem is None, "data.revision_template", f"{self.revision_template!r} {problem}")


@dataclasses.dataclass
class DPOAlgorithmConfig:
    loss: Literal["sigmoid", "dpop", "ipo", "robust", "hinge", "simpo", "modpo", "srpo"] = option(
        "sigmoid",
        "preference loss of shared.preference: sigmoid (DPO), dpop (DPO-Positive: the chosen answer may "
        "not fall below the reference), ipo, robust (noisy labels), hinge (SLiC), simpo (reference-free, "
        "length-normalised), modpo (multi-objective DPO: the margin of other objectives' rewards from "
        "data.margin_column, weighted by algorithm.modpo_weights), srpo (self-improving robust: also trains the "
        "revision of either completion into the chosen one under data.revision_template; six sequences a pair, "
        "so a micro-batch of m pairs is one forward of 6 m sequences)",
    )
    beta: Optional[float] = option(
        None,
        "beta of the loss (IPO's tau) (null: 2.0 for simpo as in its paper, else 0.1; for srpo 0.1 is "
        "shared.preference.srpo_loss's default, not a value checked against the paper)",
    )
    label_smoothing: float = option(
        0.0, "sigmoid: label smoothing e of cDPO; robust: the assumed label flip rate e (in [0, 0.5))"
    )
    simpo_gamma: float = option(0.5, "simpo: target reward margin gamma")
    dpop_lambda: float = option(50.0, "dpop: weight lambda of the penalty max(0, log pi_ref(chosen) - log pi(chosen))")
    modpo_weights: Optional[list[float]] = option(
        None,
        "modpo: objective weights [w_0, w_1, ..., w_K] summing to 1, w_0 > 0: w_0 for the preference the pairs "
        "hold, w_k for the k-th margin of data.margin_column; the logit is (beta D - sum_k w_k margin_k) / w_0",
    )
    srpo_alpha: Optional[float] = option(
        None,
        "srpo: weight alpha in [0, 1] of the two revision-only squares; 1 - alpha weighs the generation-plus-"
        "revision square (null: 0.8, the value given with the loss; other losses: leave null)",
    )
    nll_weight: float = option(
        0.0,
        "alpha of iterative RPO: adds alpha * (-logp(chosen) / |chosen|) to each pair's "
        "loss (0 = off; Pang et al. use 1)",
    )
    reference: Literal["precompute", "live"] = option(
        "precompute",
        "reference log-probs computed once before training and cached in log.output_dir (precompute), "
        "or by a reference model kept in memory (live: a frozen copy, or the LoRA-disabled model); simpo uses none",
    )
    tgdpo_alpha: float = option(
        0.0,
        "TGDPO: per-token weights beta (1 +- alpha beta rhat_t) from algorithm."
        "guidance_model (0 = plain DPO); needs loss=sigmoid",
    )
    guidance_model: Optional[str] = option(
        None,
        "TGDPO: a model directory (or a LoRA adapter directory on top of model.path) whose per-token "
        "log-ratio to the reference is rhat_t, e.g. a DPO-trained run's final/; same tokenizer as model.path",
    )

    def check(self) -> None:
        need(self.beta is None or self.beta > 0, "algorithm.beta", f"{self.beta} must be positive, e.g. 0.1")
        need(
            0 <= self.label_smoothing < 0.5,
            "algorithm.label_smoothing",
            f"{self.label_smoothing} must be in [0, 0.5); at 0.5 the labels carry no information",
        )
        need(
            self.label_smoothing == 0 or self.loss in ("sigmoid", "robust"),
            "algorithm.label_smoothing",
            f"{self.label_smoothing} has no effect with loss={self.loss}; it applies to sigmoid and robust only",
        )
        need(self.simpo_gamma >= 0, "algorithm.simpo_gamma", f"{self.simpo_gamma} must be >= 0, e.g. 0.5")
        need(self.dpop_lambda >= 0, "algorithm.dpop_lambda", f"{self.dpop_lambda} must be >= 0, e.g. 50")
        self.check_modpo_weights()
        if self.loss != "srpo":
            need(
                self.srpo_alpha is None,
                "algorithm.srpo_alpha",
                f"{self.srpo_alpha} is set but algorithm.loss={self.loss} does not use it; set loss=srpo or "
                f"srpo_alpha=null",
            )
        need(
            self.srpo_alpha is None or 0 <= self.srpo_alpha <= 1,
            "algorithm.srpo_alpha",
            f"{self.srpo_alpha} must be in [0, 1], e.g. 0.8",
        )
        need(self.nll_weight >= 0, "algorithm.nll_weight", f"{self.nll_weight} must be >= 0 (0 = off), e.g. 1.0")
        need(self.tgdpo_alpha >= 0, "algorithm.tgdpo_alpha", f"{self.tgdpo_alpha} must be >= 0 (0 = off)")
        if self.tgdpo_alpha > 0:
            need(
                self.guidance_model is not None,
                "algorithm.guidance_model",
                f"not set, but algorithm.tgdpo_alpha={self.tgdpo_alpha} needs a guidance model (a directory "
                f"other than model.path: the initial model's log-ratio is 0 everywhere)",
            )
            need(
                self.loss == "sigmoid",
                "algorithm.tgdpo_alpha",
                f"TGDPO weights the sigmoid DPO loss, but algorithm.loss={self.loss}; set loss=sigmoid or "
                f"tgdpo_alpha=0",
            )
        else:
            need(
                self.guidance_model is None,
                "algorithm.guidance_model",
                f"{self.guidance_model!r} is set but algorithm.tgdpo_alpha=0 does not use it; set tgdpo_alpha > 0 "
                f"or guidance_model=null",
            )

    def check_modpo_weights(self) -> None:
        w = self.modpo_weights
        if self.loss != "modpo":
            need(
                w is None,
                "algorithm.modpo_weights",
                f"{w} is set but algorithm.loss={self.loss} does not use it; set loss=modpo or modpo_weights=null",
            )
            return
        need(
            w is not None and len(w) >= 2,
            "algorithm.modpo_weights",
            f"{w} but loss=modpo needs [w_0, w_1, ...]: w_0 for the pairs' preference and one weight per margin "
            f"of data.margin_column, summing to 1, e.g. [0.5, 0.5]",
        )
        need(w[0] > 0, "algorithm.modpo_weights", f"{w}: w_0 = {w[0]} must be > 0 (the loss divides by it)")
        need(min(w) >= 0, "algorithm.modpo_weights", f"{w}: the weights must be >= 0 (a point of the simplex)")
        need(
            abs(sum(w) - 1) <= 1e-6,
            "algorithm.modpo_weights",
            f"{w} sums to {sum(w):g}; the weights must sum to 1, e.g. {[round(x / sum(w), 4) for x in w]}",
        )

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.loss == "simpo" else 0.1)

    @property
    def effective_srpo_alpha(self) -> float:
        return self.srpo_alpha if self.srpo_alpha is not None else 0.8

    @property
    def uses_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE_LOSSES


@dataclasses.dataclass
class DPOTrainConfig:
    epochs: float = option(1.0, "passes over the pairs (sets the step count unless train.steps is given)")
    steps: Optional[int] = option(None, "optimizer steps (null: ceil(epochs * pairs / batch_size))")
    batch_size: int = option(
        32, "preference pairs per optimizer step, over all processes (each takes batch_size / processes of them)"
    )
    learning_rate: float = option(1e-6, "AdamW learning rate")
    warmup_steps: int = option(0, "linear learning-rate warm-up over this many steps (0 = constant)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "seed for the pair order")

    def check(self) -> None:
        need(self.epochs > 0, "train.epochs", f"{self.epochs} must be positive, e.g. 1")
        need(self.steps is None or self.steps >= 0, "train.steps", f"{self.steps} is negative")
        need(self.batch_size >= 1, "train.batch_size", f"{self.batch_size}; use at least 1")
        need(self.warmup_steps >= 0, "train.warmup_steps", f"{self.warmup_steps} must be >= 0")
        check_optimizer(self, "1e-6")


@dataclasses.dataclass
class DPOConfig:
    RECIPE: typing.ClassVar[str] = "dpo"  # the YAML's top-level `recipe:` key (shared.config.check_recipe)
    model: LMModelConfig = dataclasses.field(default_factory=LMModelConfig)
    data: DPODataConfig = dataclasses.field(default_factory=DPODataConfig)
    algorithm: DPOAlgorithmConfig = dataclasses.field(default_factory=DPOAlgorithmConfig)
    train: DPOTrainConfig = dataclasses.field(default_factory=DPOTrainConfig)
    budget: BudgetSection = dataclasses.field(default_factory=BudgetSection)
    memory: MemorySection = section(MemorySection, micro_batch_size=8)
    log: LogSection = lm_log("runs/llm_dpo")

    def validate(self) -> None:
        """Each section's own checks, then the ones across sections; before any model loads."""
        check_sections(self)
        self.budget.refuse_token_budget(self.RECIPE)
        self.log.refuse_ratio_check(self.RECIPE, "has no importance ratio to check")
        a = self.algorithm
        need(
            a.loss != "modpo" or self.data.margin_column is not None,
            "data.margin_column",
            "not set, but algorithm.loss=modpo needs each pair's reward margin of the other objectives; name the "
            "column that holds r(chosen) - r(rejected) (a number, or a list of them)",
        )
        need(
            a.loss == "modpo" or self.data.margin_column is None,
            "data.margin_column",
            f"{self.data.margin_column!r} is set but algorithm.loss={a.loss} does not use it; set loss=modpo or "
            f"margin_column=null",
        )
        need(
            a.loss == "srpo" or self.data.revision_template is None,
            "data.revision_template",
            f"{self.data.revision_template!r} is set but algorithm.loss={a.loss} does not use it; set loss=srpo or "
            f"revision_template=null",
        )
        if a.guidance_model is not None:
            need(
                a.guidance_model != self.model.path,
                "algorithm.guidance_model",
                f"{a.guidance_model!r} is model.path, the reference itself: its log-ratio is 0 and TGDPO would be "
                f"plain DPO; give another model, e.g. a DPO-trained run's final/",
            )

    @property
    def revision_template(self) -> str | None:
        """srpo: the revision template in force (data.revision_template, or the default); other losses: None."""
        if self.algorithm.loss != "srpo":
            return None
        return self.data.revision_template if self.data.revision_template is not None else DEFAULT_REVISION_TEMPLATE
