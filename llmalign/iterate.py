"""Iterative DPO and APO: R rounds of on-policy pairs then DPO, each round's policy the next round's reference.

    llmalign iterate --config configs/llm/arith_iterate.yaml                      # iterative DPO (momentum 0)
    llmalign iterate --config configs/llm/arith_iterate.yaml iterate.momentum=0.3     # APO
    llmalign iterate --config configs/llm/arith_iterate.yaml --resume             # continue, even mid-round

Round t = 1..R, starting from pi_{t-1} (pi_0 = model.path):
  1. pairs: data.prompts_per_round prompts (the t-th block of an epoch-wise seeded permutation of data.train),
     pairs.group_size completions each sampled from pi_{t-1} and ranked as `llmalign pairs` ranks them
     (llmalign/pairs.py); written to round-t/pairs.jsonl;
  2. DPO (`llmalign dpo`'s trainer, llmalign/dpo.py) on those pairs, started from pi_{t-1} with pi_{t-1} as the
     reference (its log-probs precomputed and cached in round-t/dpo/, as DPO does), a fresh AdamW and
     learning-rate warm-up every round (train.* applies per round); its result is theta'_t;
  3. extrapolation (APO, He et al. 2024, "Accelerated Preference Optimization for Large Language Model
     Alignment", arXiv 2410.06293: the Nesterov momentum step of its iterated proximal-point algorithm, here in
     parameter space; the equation number is not given, see Sources below):

         theta_t = theta'_t + alpha (theta'_t - theta'_{t-1}),        theta'_0 = theta_0 (the initial model)

     over the trainable weights (the full model: iterate refuses LoRA, whose reference would be the base model),
     alpha = iterate.momentum; alpha = 0 (the default) is iterative DPO (the formula then returns theta'_t
     exactly); 0.3, this project's APO example, is not a value taken from the paper (see Sources). theta'_{t-1}
     is the previous round's DPO result, not its extrapolation (Nesterov: the momentum is the difference of the
     proximal steps). pi_t = pi_{theta_t}, written to round-t/policy/, is what round t+1 samples from, starts
     from and uses as its reference; the held-out accuracy (greedy and sampled at T = 1, as `llmalign dpo`
     evaluates) of pi_0 and of every pi_t is logged in metrics.jsonl (`round`, eval/...).
  A round whose prompts give no pair (every completion at one level) trains nothing: theta'_t = theta_{t-1}.

Sources: the update and its place (before the next round's sampling, the extrapolated policy as the next
reference) are written from our reading of the paper; only its abstract was at hand when this was written, so
these details were not checked against its full text. Its experiments' alpha could not be checked either (issue 23:
the full text was not reachable and no official code is listed), so the default stays 0 and 0.3 is only an example.
Notation, here and in the config help: theta'_t is round t's DPO result, theta_t the extrapolated weights of pi_t.

Resume (--resume) works at any point, and ends with the same final weights as an uninterrupted run: the run
directory holds a checkpoint (shared.checkpoint, through shared.run.Run) after every phase of every round,
numbered 3 (t - 1) + phase (pairs 1, DPO 2, extrapolation 3); its trainer state names the round and phase, and
the extrapolation's checkpoint holds theta'_t as safetensors ("momentum") for the next round's momentum. A kill
inside a phase redoes that phase: the sampling is seeded per batch, the pairs file and policy directory are
written atomically, and a DPO round resumes from its own checkpoints (`llmalign dpo --resume`, bit-identical).
Every round's models are read back from disk in both cases, so a resumed round sees the same bytes.

The rounds run through the loop (shared.loop, `IterateRecipe`): one iteration a round, pairs as its rollout,
DPO and extrapolation as its update.

Processes: alone, or under `accelerate launch` on W processes (configs/accelerate/cpu_2proc.yaml on the CPU):

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml --num_cpu_threads_per_process 1 \
        -m llmalign iterate --config configs/llm/arith_iterate.yaml

  - pairs: rank r samples the batches r, r + W, ... of the round's prompts (`sample_completions`, as `llmalign
    pairs` does: a batch seeded by its index, or under vLLM each completion by its batch, row and sample, never
    the rank), gathered in batch order, so every rank ranks the same completions; the main process writes
    pairs.jsonl, which every rank's DPO then reads;
  - DPO: `llmalign dpo`'s own multi-process path (train.batch_size, a global count, divides by W). Its Run opens
    inside this one: accelerate's state is per process, so it joins the same process group, and leaves it open
    when it closes (shared.run.Run.close);
  - extrapolation: every rank computes it from the same files (and keeps theta'_t for the next round); the main
    process writes round-t/policy, every rank reads it back;
  - held-out evaluation: split over the ranks and gathered (`llmalign.evaluate.accuracy_on`);
  - checkpoints, logs, resume: as every trainer's (the main process writes; each rank's RNG state is kept).
  The result does not depend on W: tested on 2 CPU processes against 1 (tests/test_llm_iterate.py, and
  tests/test_vllm_engine.py with rollout.engine=vllm), two tiny rounds with one pair per DPO micro-batch write the
  same pairs files, DPO results, policies and metrics bit for bit; a 2-process run SIGKILLed inside round 1's DPO
  resumes on 2 processes to those weights. With several pairs per micro-batch the weights differ slightly, as
  DPO's do (1 process forwards pairs padded together that 2 processes forward apart; measured on those rounds
  with 2 pairs per micro-batch alone: 7e-6 at most after round 1, 1.6e-4 after round 2, the same pairs files and
  metrics), so a later round may sample other completions.
rollout.engine=vllm: one vLLM engine per process (beside a launcher, vLLM's external_launcher backend over its
process group, as GRPO's), which samples the rank's share of every round's pairs and held-out completions, the
round's policy pushed to it first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from llmalign import dpo
from llmalign.data import iteration_rows, load_train_test, write_rows
from llmalign.dpo_config import DPOConfig, DPODataConfig
from llmalign.engines import engine_for_rows, require_vllm
from llmalign.evaluate import HeldOut
from llmalign.iterate_config import IterateConfig
from llmalign.pairs import level_table, make_pairs, sample_completions
from llmalign.policy import load_policy
from llmalign.toy import resolve_embedded
from shared.checkpoint import latest_checkpoint, point_symlink, replaced_atomically
from shared.config import to_dict
from shared.loop import Plan, eval_metrics, open_run, run_loop
from shared.run import Run
from shared.sections import LogSection

PHASES = ("pairs", "dpo", "extrapolate")


def extrapolate(current: dict[str, Tensor], previous: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """APO's momentum step (module docstring): theta'_t + alpha (theta'_t - theta'_{t-1}) per named weight, in
    float32 at least (a bfloat16 difference would round away small steps), returned in each weight's dtype."""
    out = {}
    for name, value in current.items():
        wide = value.to(torch.promote_types(value.dtype, torch.float32))  # [*] one weight
        out[name] = (wide + alpha * (wide - previous[name].to(wide.dtype))).to(value.dtype)
    return out


def trainable_weights(model) -> dict[str, Tensor]:
    """The weights DPO trains (every parameter that requires grad), by name, detached copies."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def round_dir(config: IterateConfig, t: int) -> Path:
    return Path(config.log.output_dir) / f"round-{t}"


def start_model(config: IterateConfig, t: int) -> str:
    """pi_{t-1}: model.path for round 1, else round t-1's policy directory."""
    return config.model.path if t == 1 else str(round_dir(config, t - 1) / "policy")


def round_dpo_config(config: IterateConfig, t: int) -> DPOConfig:
    """The `llmalign dpo` config of round t: from pi_{t-1} (its reference too) on round t's pairs; no held-out
    evaluation inside (the round's is done once, after the extrapolation), no trackers (the iterate run logs)."""
    d, log = config.data, config.log
    return DPOConfig(
        model=dataclasses.replace(config.model, path=start_model(config, t)),
        data=DPODataConfig(
            train=str(round_dir(config, t) / "pairs.jsonl"),
            test=None,
            system_prompt=None,  # the pairs' prompts are already formatted (data.system_prompt, prompt_template)
            prompt_template=None,
            max_prompt_length=d.max_prompt_length,
            max_completion_length=d.max_completion_length,
            overlong_prompts=d.overlong_prompts,
            overlong_completions=d.overlong_completions,
        ),
        algorithm=config.algorithm,
        train=config.train,
        memory=config.memory,
        budget=config.budget,
        log=LogSection(
            output_dir=str(round_dir(config, t) / "dpo"),
            eval_every=0,
            checkpoint_every=log.checkpoint_every,
            keep_last=log.keep_last,
        ),
    )


def load_model(config: IterateConfig, path: str, device):
    return load_policy(dataclasses.replace(config.model, path=path, lora=False), device)


def make_round_pairs(run: Run, config: IterateConfig, t: int, rows: list[dict], engine=None) -> dict:
    """Phase 1: sample from pi_{t-1} (with `engine`, rollout.engine=vllm: pi_{t-1}'s weights are pushed to it and
    it samples), rank, write round-t/pairs.jsonl (atomically); returns the level summary."""
    p, seed = config.pairs, config.train.seed
    prompts = iteration_rows(rows, t - 1, config.data.prompts_per_round, seed)
    model, tokenizer = load_model(config, start_model(config, t), run.device)
    if engine is not None:
        engine.push_policy(model)
    completions = sample_completions(
        model.eval(),
        tokenizer,
        prompts,
        p.group_size,
        p.max_new_tokens,
        temperature=p.temperature,
        seed=seed + t,  # another draw every round
        batch_size=p.batch_size,
        run=run,
        engine=engine,
    )
    pairs, summary = make_pairs(prompts, completions, p.pairs_per_prompt, p.format_check)
    run.main_only(lambda: write_rows(round_dir(config, t) / "pairs.jsonl", pairs))
    run.print(f"round {t} pairs from {start_model(config, t)}:\n{level_table(summary)}")
    return summary


def trained_model(config: IterateConfig, t: int) -> Path:
    """theta'_t's model directory: round t's DPO result, or pi_{t-1}'s when the round has no pair."""
    if (round_dir(config, t) / "pairs.jsonl").stat().st_size == 0:
        return Path(resolve_embedded(start_model(config, t)))
    return round_dir(config, t) / "dpo" / "final"


def train_round(config: IterateConfig, t: int, resume: bool, allow_config_change: bool) -> None:
    """Phase 2: DPO of round t, resumed from its own checkpoint when it has one; nothing when it has no pair."""
    if (round_dir(config, t) / "pairs.jsonl").stat().st_size == 0:
        return
    dpo_config = round_dpo_config(config, t)
    dpo_config.validate()
    again = latest_checkpoint(Path(dpo_config.log.output_dir) / "checkpoints") is not None
    dpo.train(dpo_config, resume=again, allow_config_change=again and resume and allow_config_change)


def extrapolate_round(run: Run, config: IterateConfig, t: int, trained: Path, previous: dict[str, Tensor] | None):
    """Phase 3: write pi_t = theta'_t + alpha (theta'_t - theta'_{t-1}) to round-t/policy (atomically); returns
    theta'_t (the next round's theta'_{t-1}). Every rank computes it from the same files, the main process writes
    it, and every rank leaves once it is in place."""
    model, tokenizer = load_model(config, str(trained), "cpu")
    current = trainable_weights(model)
    if previous is None:  # round 1: theta'_0 = theta_0, the initial model
        previous = trainable_weights(load_model(config, config.model.path, "cpu")[0])
    moved = extrapolate(current, previous, config.iterate.momentum)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in moved.items():
            parameters[name].copy_(value)

    def write() -> None:
        with replaced_atomically(round_dir(config, t) / "policy") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    run.main_only(write)
    return current


class IterateRecipe:
    """The rounds in the loop's stages (shared.loop), one iteration a round: `rollout` makes the round's pairs,
    `update` trains its DPO (a nested run_loop of llmalign.dpo) and extrapolates. Every phase is checkpointed
    (step 3 (t - 1) + phase), so a run restored after a phase restarts inside its round (`Plan.resumed_inside`),
    and records log at the phase's step (`iteration` of `record`)."""

    def __init__(self, config: IterateConfig, resume: bool, allow_config_change: bool):
        self.config, self.resume, self.allow_config_change = config, resume, allow_config_change

    def setup(self, run: Run) -> Plan:
        config, d = self.config, self.config.data
        self.run = run
        run.require_divisible(config.train.batch_size, "train.batch_size", "pairs")  # each round's DPO splits it
        run.main_first(lambda: [resolve_embedded(p) for p in (config.model.path, d.train, d.test) if p])
        self.rows, test_rows = load_train_test(d, ("prompt", "answer"), resolve_embedded)
        self.held_out = HeldOut(run, test_rows[: d.eval_size], d, config.train.seed)
        # rollout.engine=vllm: one engine for every round's pairs and evaluation, each policy pushed to it first
        self.engine = None
        if config.rollout.engine == "vllm":
            budget = max(config.pairs.max_new_tokens, d.eval_max_new_tokens)
            tokenizer = load_model(config, config.model.path, "cpu")[1]
            rows = self.rows + self.held_out.rows
            path = resolve_embedded(config.model.path)
            self.engine = engine_for_rows(
                path, tokenizer, rows, budget, config.rollout, config.model.dtype, config.train.seed
            )
        self.done = run.restore()  # phases finished: 3 (t - 1) + phase index + 1
        self.previous = run.load("momentum") if run.checkpoint is not None and "momentum" in _states(run) else None
        run.write_config(config)
        a = config.algorithm
        run.print(
            f"iterate: {config.iterate.rounds} rounds of {d.prompts_per_round} prompts x {config.pairs.group_size} "
            f"completions -> pairs -> dpo[{a.loss}] beta {a.effective_beta}, momentum {config.iterate.momentum}; output {run.out}"
        )
        start, phase = divmod(self.done, len(PHASES))
        return Plan(
            start, config.iterate.rounds, "iterate", unit="round", resumed_inside=phase > 0, wrap_nan_stop=False
        )

    def evaluate(self, done: int) -> dict:
        """Held-out metrics of pi_done: model.path before the first round, else round `done`'s policy."""
        path = self.config.model.path if done == 0 else str(round_dir(self.config, done) / "policy")
        model, tokenizer = load_model(self.config, path, self.run.device)
        return self.held_out.metrics(model.eval(), tokenizer, self.engine)

    def before_record(self) -> dict:
        return {"round": 0}

    def report_before(self, before: dict) -> None:
        self.run.print(f"round 0 held-out: {self.describe(before)}")

    def describe(self, result: dict) -> str:
        return self.held_out.describe(result)

    def rollout(self, iteration: int) -> int:
        """Phase 1 of round t = iteration + 1 (unless a restored checkpoint has it); returns t."""
        t, base = iteration + 1, len(PHASES) * iteration
        if self.done <= base:
            summary = make_round_pairs(self.run, self.config, t, self.rows, self.engine)
            self.run.append(
                {
                    "iteration": base + 1,
                    "round": t,
                    "pairs/count": summary["pairs"],
                    "pairs/prompts_without_pair": summary["prompts_without_pair"],
                    **{f"pairs/level_{level}": count for level, count in summary["levels"].items()},
                }
            )
            self.checkpoint(base + 1, t, "pairs")
        return t

    def update(self, t: int) -> dict:
        """Phases 2 (unless a restored checkpoint has it) and 3 of round t."""
        base = len(PHASES) * (t - 1)
        if self.done <= base + 1:
            train_round(self.config, t, self.resume, self.allow_config_change)
            self.checkpoint(base + 2, t, "dpo")
        self.previous = extrapolate_round(self.run, self.config, t, trained_model(self.config, t), self.previous)
        return {}

    def record(self, t: int, metrics: dict) -> dict:
        return {"iteration": len(PHASES) * t, "round": t}  # logged at the extrapolation's step

    def logged(self, done: int, t: int, record: dict) -> None:
        metrics = eval_metrics(record)
        if metrics:
            self.run.print(f"round {t} held-out: {self.describe(metrics)}")

    def save(self, done: int) -> None:
        self.checkpoint(len(PHASES) * done, done, "extrapolate")

    def checkpoint(self, step: int, t: int, phase: str) -> None:
        trainer = {"iteration": step, "round": t, "phase": phase, "config": to_dict(self.config)}
        states = {"momentum": self.previous} if self.previous is not None else {}
        self.run.save_checkpoint(step, {"trainer": trainer, **states}, keep_last=self.config.log.keep_last)

    def finish(self, before: dict, after: dict) -> dict:
        """Returns {"rounds": [held-out metrics of pi_0, pi_1, ..., pi_R]}."""
        run = self.run
        final = round_dir(self.config, self.config.iterate.rounds) / "policy"
        run.main_only(lambda: point_symlink(run.out / "final", final))
        run.print(f"metrics {run.out / 'metrics.jsonl'}, final policy {run.out / 'final'}")
        records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return {"rounds": [r for r in records if "eval/accuracy" in r]}


def train(config: IterateConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    """Run (or resume) the rounds; returns {"rounds": [held-out metrics of pi_0, pi_1, ..., pi_R]}."""
    if config.rollout.engine == "vllm":
        require_vllm()  # before the run directory is written
    run = open_run(config, resume, allow_config_change, tag="[llmalign]")
    recipe = IterateRecipe(config, resume, allow_config_change)
    try:  # every round evaluates and checkpoints (the DPO rounds inside follow log.checkpoint_every)
        return run_loop(recipe, run, eval_every=1, checkpoint_every=1)
    finally:
        if getattr(recipe, "engine", None) is not None:
            recipe.engine.close()


def _states(run: Run) -> set[str]:
    """The state names the starting checkpoint holds."""
    return {path.stem for path in run.checkpoint.glob("*.safetensors")}
