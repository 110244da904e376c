"""Reward models trained on preference pairs: Bradley-Terry (a scalar head) or GPM (a 2k-dim embedding head), and the
reward plug-ins that load one.

    llmalign rm --config configs/llm/arith_rm_gpm.yaml                      # the transitive judge (correct > wrong)
    llmalign rm --config configs/llm/arith_rm_cyclic_gpm.yaml               # GPM on cyclic preferences
    llmalign rm --config configs/llm/arith_rm_cyclic_gpm.yaml algorithm.kind=bt   # the scalar baseline on them
    llmalign train configs/llm/arith_rm_gpm.yaml --resume                   # continue the run
    accelerate launch --multi_gpu --num_processes 2 -m llmalign rm --config configs/llm/arith_rm_gpm.yaml

The model is the policy's backbone with a linear head on the last token of prompt + completion
(transformers' AutoModelForSequenceClassification, e.g. Qwen2ForSequenceClassification for embedded:arith), with
1 output (algorithm.kind=bt) or 2k outputs (gpm). Per pair with head outputs h_w (chosen) and h_l (rejected):

    bt:  loss = -log sigmoid(r_w - r_l),  r = h[0]          (InstructGPT eq. 1; TRL's RewardTrainer)
    gpm: loss = -log sigmoid(<R v_w, v_l> / tau),  v = h      (arXiv 2410.02197; shared.gpm for R and tau)

and a pair counts as ranked right when the logit (r_w - r_l, or the GPM score) is > 0. Departures from TRL's
RewardTrainer: no end-of-text token is appended to the completion (the head reads the completion's own last token:
with the toy's end-of-text also its padding token, transformers' pooling, the rightmost non-padding token, would skip
an appended one), sequences are left-padded with positions that count real tokens only (so a score does not depend
on the batch it is computed in), and dropout is off (`disable_dropout`), so training is deterministic and resumes
bit-identically. The heads are those of the official GPM training model (general-preference/general-preference-model,
`general_preference/models/rw_model_general_preference.py`, read, not run): a linear layer without bias on the last
token of a left-padded sequence, 1 output (BT) or value_head_dim = 2k (default 2), positions counted over real tokens,
no normalisation in training (algorithm.normalize adds it). Not here: its optional prompt head (a prompt-dependent
R), its learnable tau; its optional head initialisation (std 1 / (hidden + 1)) is replaced by transformers' default
(std = the config's initializer_range).

Each step: train.batch_size pairs (epochs of a seeded permutation, a function of the step alone), rank r takes the
r-th contiguous block and adds its pairs' loss sum over the global batch size, so the step equals one process's
(as `llmalign dpo`). The held-out pairs (data.test) give eval/accuracy before training, every log.eval_every steps
and at the end. The output RUN/final holds the model (save_pretrained, safetensors), the tokenizer and
reward_model.json (kind, dim, tau, normalize); `load_reward_model(RUN/final)` loads it, never with
trust_remote_code.

Plug-ins (import paths; they load the model once, when built):
- `make_bt_reward(path)`: TRL's text reward signature fn(prompts, completions, **kwargs) -> list[float], the scalar r.
- `make_gpm_reward(path)`: a GROUPWISE reward (fn.groupwise = True) fn(prompt, completions, **kwargs) -> list[float]
  for the K completions of one prompt: completion i's mean win probability against the group
  (shared.gpm.gpm_win_rates of the K x K table of ONE forward of the K completions).
- `gpm_preference(path)`: fn(prompt, a, b) -> list[float], P(a_i > b_i) for a GPM (or sigmoid(r_a - r_b) for a BT
  model).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from llmalign.config import LMModelConfig
from llmalign.data import DataError, load_train_test, micro_batches, render_prompt
from llmalign.dpo import EncodedPairs, encode_pairs
from llmalign.evaluate import pad_left
from llmalign.logprobs import real_token_positions
from llmalign.policy import (
    disable_dropout,
    enable_gradient_checkpointing,
    outputs_line,
    restore_policy,
    save_policy_checkpoint,
    step_batch,
    step_record,
)
from llmalign.rm_config import RMAlgorithmConfig, RMConfig
from llmalign.toy import resolve_embedded
from shared.config import ConfigError, local_path_problem
from shared.gpm import bradley_terry_loss, gpm_pair_loss, gpm_probability, gpm_score_table, gpm_win_rates
from shared.loop import Plan, run_recipe
from shared.reward_calls import groupwise
from shared.run import Run

RM_FILE = "reward_model.json"  # beside the saved model: what its head means
PAIR_COLUMNS = ("prompt", "chosen", "rejected")

# ----------------------------------------------------------------------------- model and sequences


def reward_tokenizer(config: LMModelConfig):
    """model.path's tokenizer, left padding, the end-of-text token padding when it has no padding token. A path that
    cannot be loaded is a ConfigError naming model.path."""
    from transformers import AutoTokenizer

    path = resolve_embedded(config.path)
    problem = local_path_problem(path)
    if problem is not None:
        raise ConfigError(f"config field 'model.path': {problem}")
    try:
        return padded_left(AutoTokenizer.from_pretrained(path))
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"config field 'model.path': cannot load {path!r} ({reason}); give a model directory"
        ) from None


def padded_left(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; any id other than a sequence's last will do
    return tokenizer


def load_reward_backbone(config: LMModelConfig, head_size: int, device: torch.device | str = "cpu"):
    """(model, tokenizer): model.path's backbone under a fresh linear head of `head_size` outputs
    (AutoModelForSequenceClassification; a saved reward model keeps its head), on `device`."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = reward_tokenizer(config)
    model = AutoModelForSequenceClassification.from_pretrained(  # it reports score.weight as new: the head is
        resolve_embedded(config.path),
        num_labels=head_size,
        dtype=getattr(torch, config.dtype),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.to(device), tokenizer


def check_sequence_ends(encoded: EncodedPairs, pad_id: int, label: str) -> None:
    """Refuse a pair whose prompt + completion ends in the padding token (see `sequence_batch`), before any forward."""
    for index in range(len(encoded)):
        for column, completion in (("chosen", encoded.chosen[index]), ("rejected", encoded.rejected[index])):
            last = (encoded.prompts[index] + completion)[-1]
            if last == pad_id:
                raise DataError(
                    f"{label} row {index}: the {column} completion ends in the padding token {pad_id}, which the "
                    f"reward head would skip; strip a trailing end-of-text/padding token from the completions"
                )


def sequence_batch(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(ids, mask) [N, L] of prompt + completion token ids, left-padded, so every sequence ends in the last column,
    where the head reads it. A sequence ending in the padding token is refused: transformers' pooling (the
    rightmost non-padding token) would read an earlier token."""
    ids, mask = pad_left([list(p) + list(c) for p, c in zip(prompts, completions)], pad_id)  # [N, L]
    ends_in_pad = (ids[:, -1] == pad_id).nonzero().flatten().tolist()
    if ends_in_pad:
        raise DataError(
            f"sequence {ends_in_pad[0]} of the batch (prompt + completion) ends in the padding token {pad_id}, which "
            f"the reward head would skip; strip a trailing end-of-text/padding token from the completions"
        )
    return ids.to(device), mask.to(device)


def head_outputs(model, ids: Tensor, mask: Tensor) -> Tensor:
    """The head's outputs at each sequence's last token, float32 [N, D]; positions count real tokens only."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=real_token_positions(mask), use_cache=False)
    return out.logits.float()  # [N, D]


def pair_outputs(model, encoded: EncodedPairs, rows: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Head outputs of the chosen and rejected completions of the pairs `rows`, one forward: ([n, D], [n, D])."""
    device = next(model.parameters()).device
    prompts = [encoded.prompts[i] for i in rows] * 2
    completions = [encoded.chosen[i] for i in rows] + [encoded.rejected[i] for i in rows]
    h = head_outputs(model, *sequence_batch(prompts, completions, pad_id, device))  # [2n, D]
    return h[: len(rows)], h[len(rows) :]


# kind -> (chosen [n, D], rejected [n, D], algorithm) -> (losses [n], {"probability", "score"} [n])
PAIR_LOSSES: dict[str, Callable[[Tensor, Tensor, RMAlgorithmConfig], tuple[Tensor, dict[str, Tensor]]]] = {
    "bt": lambda chosen, rejected, a: bradley_terry_loss(chosen[:, 0], rejected[:, 0]),
    "gpm": lambda chosen, rejected, a: gpm_pair_loss(chosen, rejected, tau=a.tau, normalize=a.normalize),
}


def pair_terms(a: RMAlgorithmConfig, model, encoded: EncodedPairs, rows: list[int], pad_id: int):
    """(losses [n], scores [n]) of the pairs `rows`: the loss of algorithm.kind and the logit (> 0: ranked right)."""
    chosen, rejected = pair_outputs(model, encoded, rows, pad_id)  # [n, D] each
    losses, metrics = PAIR_LOSSES[a.kind](chosen, rejected, a)
    return losses, metrics["score"]


# ----------------------------------------------------------------------------- train step and evaluation

STEP_METRICS = ("loss", "accuracy", "margin")


def _sums(losses: Tensor, scores: Tensor) -> Tensor:
    """[3] sums of the loss, the pairs ranked right and the logit (the margin) over some pairs."""
    return torch.stack([losses.detach().sum(), (scores > 0).float().sum(), scores.sum()]).double().cpu()


def train_step(run: Run, config: RMConfig, model, optimizer, encoded: EncodedPairs, indices: list[int], pad_id: int):
    """One optimizer step on the pairs `indices` (the global batch): the mean pair loss. This rank takes its
    contiguous block in micro-batches; each adds its pairs' loss sum over the global batch size, so the synced
    gradient is the global mean's. Gradients sync on the last micro-batch only; a non-finite loss on any rank
    stops every rank before the optimizer step."""
    block = run.block(len(indices))
    micro = micro_batches(indices[block.start : block.stop], config.memory.micro_batch_size)
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(len(STEP_METRICS), dtype=torch.float64)  # this rank's sums over its pairs
    failure = None
    for index, rows in enumerate(micro):
        with run.sync_gradients(model, last=index == len(micro) - 1):
            losses, scores = pair_terms(config.algorithm, model, encoded, rows, pad_id)  # [n] each
            loss = losses.sum() / len(indices)  # this micro-batch's share of the step's global mean
            if failure is None and not torch.isfinite(loss):
                failure = f"the loss is {loss.item()} (pairs {rows[0]}..{rows[-1]} of the data)"
            run.backward(loss)
        sums += _sums(losses, scores)
    failure = run.first_failure(failure)
    if failure is not None:
        raise FloatingPointError(failure)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = run.clip_grad_norm(model, params, config.train.max_grad_norm)
    optimizer.step()
    means = run.sum(sums) / len(indices)  # [3] over the global batch
    return {**dict(zip(STEP_METRICS, means.tolist())), "grad_norm": grad_norm}


@torch.no_grad()
def held_out_accuracy(run: Run, a: RMAlgorithmConfig, model, encoded: EncodedPairs, pad_id: int, micro: int) -> dict:
    """eval/accuracy (pairs ranked right), eval/loss and eval/margin over every held-out pair: rank r scores the
    micro-batches r, r + W, ... with the plain (unwrapped) model, and the sums are added over the ranks."""
    chunks = micro_batches(list(range(len(encoded))), micro)
    sums = torch.zeros(len(STEP_METRICS), dtype=torch.float64)
    for rows in chunks[run.rank :: run.world]:
        sums += _sums(*pair_terms(a, model, encoded, rows, pad_id))
    means = run.sum(sums) / len(encoded)  # [3]
    return {f"eval/{name}": value for name, value in zip(STEP_METRICS, means.tolist())}


# ----------------------------------------------------------------------------- recipe


def model_info(a: RMAlgorithmConfig) -> dict:
    """reward_model.json: what the head's outputs mean, for `load_reward_model`."""
    return {"kind": a.kind, "dim": a.head_size, "tau": a.tau, "normalize": a.normalize}


def reward_optimizer(model, config: RMConfig) -> torch.optim.AdamW:
    """AdamW over the backbone at train.learning_rate and the head (`model.score`) at algorithm.head_learning_rate:
    its parameter group's lr_scale, which `step_batch` applies with the warm-up."""
    t, a = config.train, config.algorithm
    head = [p for p in model.score.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    scale = a.head_learning_rate / t.learning_rate if a.head_learning_rate is not None else 1.0
    groups = [{"params": body, "lr_scale": 1.0}, {"params": head, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


class RMRecipe:
    """Reward-model training in the loop's stages (shared.loop): `update` alone, its pairs drawn from the step."""

    def __init__(self, config: RMConfig):
        self.config = config

    def setup(self, run: Run) -> Plan:
        config, t, a, d = self.config, self.config.train, self.config.algorithm, self.config.data
        self.run = run
        run.require_divisible(t.batch_size, "train.batch_size", "pairs")
        torch.manual_seed(t.seed)  # the head's initial weights, alike on every rank
        random.seed(t.seed)
        data_files = (d.train, d.test) if d.path is None else ()
        run.main_first(lambda: [resolve_embedded(p) for p in (config.model.path, *data_files) if p])
        rows, test_rows = load_train_test(d, PAIR_COLUMNS, resolve_embedded, PAIR_COLUMNS)
        tokenizer = reward_tokenizer(config.model)  # the pairs are checked before the weights load
        self.pad_id = tokenizer.pad_token_id
        self.encoded = encode_pairs(tokenizer, rows, d, end_of_text=False)
        held_out = test_rows[: d.eval_size]
        self.held_out = (
            encode_pairs(tokenizer, held_out, d, end_of_text=False) if held_out else EncodedPairs([], [], [])
        )
        check_sequence_ends(self.encoded, self.pad_id, "data.train")
        check_sequence_ends(self.held_out, self.pad_id, "data.test")
        model, self.tokenizer = load_reward_backbone(config.model, a.head_size, run.device)
        disable_dropout(model)  # deterministic steps (see the module docstring)
        if config.memory.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = reward_optimizer(model, config)
        self.model, self.optimizer = run.prepare(model, optimizer)
        start = restore_policy(run, self.model, self.optimizer)
        run.write_config(config)
        steps = t.steps if t.steps is not None else math.ceil(t.epochs * len(rows) / t.batch_size)
        head = "a scalar" if a.kind == "bt" else f"{a.gpm_dim} outputs, tau {a.tau}, normalize {a.normalize}"
        run.print(
            f"rm[{a.kind}] head {head}: {len(rows)} pairs, {t.batch_size} per step over {run.world} process(es) "
            f"({t.batch_size // run.world} each, in micro-batches of {config.memory.micro_batch_size}) -> {steps} "
            f"steps = {steps * t.batch_size / len(rows):.2f} epochs, {sum(p.numel() for p in params):,} trainable "
            f"parameters, {len(self.held_out)} held-out pairs, {self.encoded.truncated_prompts} prompts and "
            f"{self.encoded.truncated_completions} completions truncated; device {run.device}; output {run.out}"
        )
        self.all_rows = list(range(len(rows)))
        self.model.train()  # dropout is off; transformers checkpoints activations in train mode only
        return Plan(
            start,
            steps,
            f"rm[{a.kind}]",
            config.budget.max_seconds,
            unit="step",
            curves=("train/loss", "train/accuracy", "eval/accuracy"),
            curve_file="rm_curves.png",
            title=f"reward model ({a.kind}) on {config.model.path}",
        )

    def evaluate(self, done: int) -> dict:
        if not len(self.held_out):
            return {}
        model = self.run.unwrap(self.model)  # no collective inside: the ranks score different numbers of chunks
        micro = self.config.memory.micro_batch_size
        return held_out_accuracy(self.run, self.config.algorithm, model, self.held_out, self.pad_id, micro)

    def describe(self, result: dict) -> str:
        return f"pair accuracy {result['eval/accuracy']:.4f} on {len(self.held_out)} held-out pairs"

    def update(self, step: int) -> dict:
        self.clock = time.perf_counter()
        indices = step_batch(self.config, self.optimizer, self.all_rows, step)  # the global batch
        return train_step(self.run, self.config, self.model, self.optimizer, self.encoded, indices, self.pad_id)

    def record(self, step: int, metrics: dict) -> dict:
        return step_record(self.config, step, metrics, self.clock)

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['train/loss']:.4f}", "acc": f"{record['train/accuracy']:.2f}"}

    def save(self, done: int) -> None:
        info = {RM_FILE: json.dumps(model_info(self.config.algorithm), indent=1)}
        save_policy_checkpoint(
            self.run, self.config, self.model, self.tokenizer, self.optimizer, done, model_files=info
        )

    def closing(self) -> str:
        return outputs_line(self.run.out, "rm_curves.png") + f" (load_reward_model; {RM_FILE} beside it)"


def train(config: RMConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    return run_recipe(RMRecipe(config), config, resume, allow_config_change, tag="[llmalign]")


# ----------------------------------------------------------------------------- a trained reward model


@dataclass
class RewardModel:
    """A trained reward model (`load_reward_model`): the model in eval mode, its tokenizer and its head's meaning."""

    model: object
    tokenizer: object
    kind: str  # "bt" or "gpm"
    dim: int  # head outputs: 1 or 2k
    tau: float
    normalize: bool

    @torch.no_grad()
    def outputs(self, prompts: Sequence, completions: Sequence[str]) -> Tensor:
        """Head outputs [N, D] of completion i after prompt i (text, or chat messages), in ONE forward, encoded as
        training encodes them (the prompt rendered and tokenized, then the completion's tokens, no end-of-text)."""
        tokenizer = self.tokenizer
        prompt_ids = tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        device = next(self.model.parameters()).device
        ids, mask = sequence_batch(prompt_ids, completion_ids, tokenizer.pad_token_id, device)
        return head_outputs(self.model, ids, mask).cpu()  # [N, D]

    def batched(self, prompts: Sequence, completions: Sequence[str], batch_size: int) -> Tensor:
        """`outputs` in forwards of at most batch_size sequences: [N, D]."""
        chunks = micro_batches(list(range(len(completions))), batch_size)
        parts = [self.outputs([prompts[i] for i in rows], [completions[i] for i in rows]) for rows in chunks]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def score_table(self, prompt, completions: Sequence[str]) -> Tensor:
        """GPM: the K x K score table S_ij = s(y_i, y_j) of one prompt's K completions, one forward."""
        self.require("gpm", "score_table")
        v = self.outputs([prompt] * len(completions), completions)  # [K, 2k]
        return gpm_score_table(v, self.tau, self.normalize)  # [K, K]

    def probability_table(self, prompt, completions: Sequence[str]) -> Tensor:
        """GPM: P_ij = P(y_i > y_j) = sigmoid(S_ij) [K, K] (the diagonal 1/2), one forward."""
        return torch.sigmoid(self.score_table(prompt, completions))  # [K, K]

    def require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ValueError(f"{what} needs a {kind} reward model, but this one is {self.kind} ({RM_FILE})")


def read_model_info(path: str | Path) -> dict:
    """The kind, dim, tau and normalize `llmalign rm` wrote in `path`'s reward_model.json."""
    info_file = Path(path) / RM_FILE
    if not info_file.is_file():
        raise ValueError(f"{path} has no {RM_FILE}; give the final/ directory of an `llmalign rm` run")
    return json.loads(info_file.read_text())


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """The reward model `llmalign rm` saved in `path` (RUN/final): from_pretrained without remote code, in eval
    mode, with the kind, dim, tau and normalize of its reward_model.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = read_model_info(path)
    tokenizer = padded_left(AutoTokenizer.from_pretrained(path))
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    if model.config.num_labels != info["dim"]:
        raise ValueError(f"{path}: the head has {model.config.num_labels} outputs but {RM_FILE} says {info['dim']}")
    return RewardModel(model, tokenizer, info["kind"], info["dim"], info["tau"], info["normalize"])


def make_bt_reward(path: str, batch_size: int = 32, device: str = "cpu") -> Callable[..., list[float]]:
    """A text reward fn(prompts, completions, **kwargs) -> list[float]: the scalar r(prompt_i, completion_i) of the
    Bradley-Terry reward model in `path`, in forwards of batch_size."""
    rm = load_reward_model(path, device)
    rm.require("bt", "make_bt_reward")

    def bt_reward(prompts: list, completions: list[str], **kwargs) -> list[float]:
        return rm.batched(prompts, completions, batch_size)[:, 0].tolist()

    return bt_reward


make_bt_reward.is_reward_factory = True


def make_gpm_reward(path: str, device: str = "cpu", antisymmetrize: bool = False) -> Callable[..., list[float]]:
    """A GROUPWISE reward (`fn.groupwise = True`) fn(prompt, completions, **kwargs) -> list[float] for the K
    completions of one prompt: completion i's mean win probability (1/K) sum_j sigmoid(S_ij) against the group, self
    included (shared.gpm.gpm_win_rates; antisymmetrize: the official sigmoid(S_ij - S_ji)), from ONE forward of the K
    completions. The model loads at the first call (a dry run builds the reward without its weights); its
    reward_model.json is read at once, so a path that is not a GPM fails before training."""
    kind = read_model_info(path).get("kind")
    if kind != "gpm":
        raise ValueError(f"{path} holds a {kind} reward model; make_gpm_reward needs a GPM (algorithm.kind=gpm)")
    loaded: list[RewardModel] = []

    @groupwise
    def gpm_reward(prompt, completions: list[str], **kwargs) -> list[float]:
        if not loaded:
            loaded.append(load_reward_model(path, device))
        return gpm_win_rates(loaded[0].score_table(prompt, completions), antisymmetrize).tolist()  # [K]

    return gpm_reward


make_gpm_reward.is_reward_factory = True


def gpm_preference(path: str, batch_size: int = 32, device: str = "cpu") -> Callable[..., list[float]]:
    """fn(prompt, a, b) -> list[float]: P(a_i > b_i) after `prompt` (one prompt for all pairs, or a list of them):
    sigmoid(<R v_a, v_b> / tau) for a GPM, sigmoid(r_a - r_b) for a Bradley-Terry model."""
    rm = load_reward_model(path, device)

    def preference(prompt, a: list[str], b: list[str]) -> list[float]:
        if len(a) != len(b):
            raise ValueError(f"a and b must pair up: {len(a)} and {len(b)} completions")
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) and not _is_messages(prompt) else [prompt] * len(a)
        h = rm.batched(prompts * 2, list(a) + list(b), batch_size)  # [2n, D]
        h_a, h_b = h[: len(a)], h[len(a) :]
        if rm.kind == "bt":
            return torch.sigmoid(h_a[:, 0] - h_b[:, 0]).tolist()
        return gpm_probability(h_a, h_b, rm.tau, rm.normalize).tolist()

    return preference


def _is_messages(prompt) -> bool:
    """Whether a list is one chat prompt ([{"role", "content"}, ...]) rather than a list of prompts."""
    return bool(prompt) and all(isinstance(item, dict) for item in prompt)
