"""DPO-family preference training of any transformers causal LM on prompt/chosen/rejected pairs.

    llmalign pairs --model embedded:arith --data embedded:arith/train.jsonl --out runs/arith_pairs.jsonl
    llmalign dpo --config configs/llm/arith_dpo.yaml                     # DPO on those on-policy pairs
    llmalign dpo --config configs/llm/arith_dpo.yaml algorithm.loss=ipo train.learning_rate=1e-5
    llmalign dpo --config configs/llm/arith_dpo.yaml --resume            # continue the run
    llmalign dpo data.train=p.jsonl algorithm.loss=modpo 'algorithm.modpo_weights=[0.7,0.3]' data.margin_column=margin
    llmalign dpo --config configs/llm/arith_srpo.yaml                    # SRPO: also learns to revise into y_w
    accelerate launch --multi_gpu --num_processes 2 -m llmalign dpo --config configs/llm/arith_dpo.yaml

Setup: every pair is tokenized once (prompt left-padded as the policy saw it; chosen and rejected each get
the end-of-text token, so stopping is trained too). The reference log-probs are computed once, by the
initial model (full fine-tuning) or the model with its LoRA adapter disabled, and cached per row in
`output_dir/reference_logprobs.safetensors`; a JSON sidecar holds a fingerprint of the data file, the
tokens and the model, so a stale cache is rebuilt. No reference model stays in memory (with
algorithm.reference=live a frozen copy does, or the adapter is switched off per batch). TGDPO's guidance
log-probs are cached the same way and the guidance model is dropped after that one pass.

SRPO (Choi et al., 2024, arXiv 2406.01660; shared.preference.srpo_loss) needs six sequences a pair: chosen and
rejected given the prompt x (as DPO), and both again given each revision prompt (x, rejected) and (x, chosen):
data.revision_template filled with x and that completion's text, tokenized whole and held to
max_prompt_length + max_completion_length tokens. The six share one padded forward per micro-batch, and their
reference log-probs go into the same cache (the template is in its fingerprint, through the tokens and by name).
Only the offline objective on the given pairs is trained; the held-out evaluation generates from x alone (no
revision pass at inference).

Each step: batch_size pairs (epochs of a seeded permutation, so the data position is a function of the
step alone), split into micro-batches whose chosen and rejected completions (srpo: all six) share one forward;
sequence log-prob = sum of completion token log-probs (ipo and simpo divide by the length inside the
shared loss); the loss is shared.preference's (or shared.token_weights' for TGDPO), averaged over the
step's pairs; clip, AdamW step, log, checkpoint. Dropout is off (`disable_dropout`), as in TRL's DPO: with
dropout the policy would differ from its own reference at step 0.

Over W processes (`shared.run.Run`): train.batch_size counts pairs over all of them; rank r takes the r-th
contiguous block of each step's pairs, and its share of the loss is its pairs' sum over the global batch size,
so the step equals one process's. The reference (and guidance) pass is split over the ranks by micro-batch,
gathered into one cache that the main process writes; every micro-batch is the same whatever W, so the cache is
too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from llmalign.data import DataError, load_train_test, micro_batches, render_prompt, tokenize_prompts
from llmalign.dpo_config import DPOAlgorithmConfig, DPOConfig, DPODataConfig
from llmalign.evaluate import HeldOut, pad_left
from llmalign.logprobs import completion_logprobs
from llmalign.policy import (
    disable_dropout,
    enable_gradient_checkpointing,
    load_policy,
    outputs_line,
    reference_policy,
    restore_policy,
    save_policy_checkpoint,
    step_batch,
    step_record,
)
from llmalign.toy import resolve_embedded
from shared.config import ConfigError
from shared.preference import PREFERENCE_LOSSES, chosen_nll_loss, srpo_loss
from shared.loop import Plan, run_recipe
from shared.run import Run
from shared.token_weights import tgdpo_token_weights, weighted_dpo_sigmoid_loss

CACHE_VERSION = 1  # bump when the cached values' meaning changes, so old caches are rebuilt

# ----------------------------------------------------------------------------- data


# The sequences of a pair, block by block in a batch, as (prompt, completion): DPO's generation of chosen and
# rejected from the prompt x, then srpo's four revisions, of either completion into chosen or rejected, starting
# from (x, rejected) and from (x, chosen): the order of shared.preference.srpo_loss's arguments.
SEQUENCES = {
    "chosen": ("prompts", "chosen"),
    "rejected": ("prompts", "rejected"),
    "chosen_given_rejected": ("given_rejected", "chosen"),
    "rejected_given_rejected": ("given_rejected", "rejected"),
    "chosen_given_chosen": ("given_chosen", "chosen"),
    "rejected_given_chosen": ("given_chosen", "rejected"),
}


@dataclass
class EncodedPairs:
    """Token ids of every pair: the prompt, and chosen / rejected completions ending in end-of-text; for modpo
    also each pair's reward margins of the other objectives; for srpo the revision prompts (x, rejected) and
    (x, chosen)."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated_prompts: int = 0
    truncated_completions: int = 0
    margins: Tensor | None = None  # [N, K] r_k(chosen) - r_k(rejected) of K other objectives (modpo), else None
    given_rejected: list[list[int]] | None = None  # srpo: the revision prompt filled with x and the rejected text
    given_chosen: list[list[int]] | None = None  # srpo: ... with x and the chosen text
    truncated_revisions: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def names(self) -> tuple[str, ...]:
        """The sequences of each pair (keys of SEQUENCES): 2, or 6 with srpo's revisions."""
        return tuple(SEQUENCES)[: 6 if self.given_rejected is not None else 2]

    def sequence(self, name: str, i: int) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of pair i's sequence `name`."""
        prompts, completions = SEQUENCES[name]
        return getattr(self, prompts)[i], getattr(self, completions)[i]

    def digest(self) -> str:
        """sha256 of all the ids: a cache keyed on it follows any change of data, tokenizer, truncation or
        revision template."""
        ids = [self.prompts, self.chosen, self.rejected]
        if self.given_rejected is not None:
            ids += [self.given_rejected, self.given_chosen]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def fit_length(ids: list[list[int]], limit: int, overlong: str, keep_last: bool, problem: Callable[[int, int], str]):
    """(ids, how many were cut) with every row at most `limit` long: a longer row raises DataError with
    `problem(index, length)` (overlong="error"), or keeps its last or first `limit` ids (overlong="truncate")."""
    cut = 0
    for index, row in enumerate(ids):
        if len(row) <= limit:
            continue
        if overlong == "error":
            raise DataError(problem(index, len(row)))
        ids[index] = row[-limit:] if keep_last else row[:limit]
        cut += 1
    return ids, cut


def encode_revisions(tokenizer, texts: list[str], rows: list[dict], data: DPODataConfig, template: str):
    """srpo's revision prompts: `template` filled with each rendered prompt and its rejected / chosen text,
    tokenized whole; at most max_prompt_length + max_completion_length tokens each, the end kept when truncated.
    Returns (given rejected, given chosen, how many were truncated)."""
    limit = data.max_prompt_length + data.max_completion_length
    encoded, truncated = {}, 0
    for column in ("rejected", "chosen"):
        filled = [template.format(prompt=text, completion=row[column]) for text, row in zip(texts, rows)]
        ids = [list(r) for r in tokenizer(filled, add_special_tokens=False)["input_ids"]]
        encoded[column], cut = fit_length(
            ids,
            limit,
            data.overlong_prompts,
            keep_last=True,  # as prompts: the end, the part the revision follows, matters most
            problem=lambda index, length: (
                f"row {index}: the revision prompt of data.revision_template given its {column} completion is "
                f"{length} tokens, longer than data.max_prompt_length + data.max_completion_length = {limit}; "
                f"raise them or set data.overlong_prompts=truncate to keep its last tokens"
            ),
        )
        truncated += cut
    return encoded["rejected"], encoded["chosen"], truncated


def encode_pairs(
    tokenizer, rows: list[dict], data: DPODataConfig, revision_template: str | None = None, end_of_text: bool = True
) -> EncodedPairs:
    """Prompts rendered (chat template for messages) and tokenized with the length check of
    `tokenize_prompts`; completions tokenized without special tokens, then end-of-text appended (unless
    `end_of_text=False`: the reward model scores the completion's own last token); with a revision template
    (srpo) also the revision prompts (`encode_revisions`)."""
    eos = tokenizer.eos_token_id
    if eos is None and end_of_text:
        raise DataError(
            "the tokenizer of model.path has no end-of-text token (eos_token); DPO appends it to every "
            "completion, so use a tokenizer that defines one"
        )
    for index, row in enumerate(rows):
        for column in ("chosen", "rejected"):
            if not isinstance(row[column], str):
                raise DataError(
                    f"row {index} has a {column!r} of type {type(row[column]).__name__}; chosen and "
                    f"rejected are completion texts (what follows the prompt)"
                )
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    prompts, truncated_prompts = tokenize_prompts(tokenizer, texts, data.max_prompt_length, data.overlong_prompts)
    encoded = {}
    truncated = 0
    for column in ("chosen", "rejected"):
        ids = tokenizer([row[column] for row in rows], add_special_tokens=False)["input_ids"]
        encoded[column], cut = fit_length(
            [list(row) + ([eos] if end_of_text else []) for row in ids],
            data.max_completion_length,
            data.overlong_completions,
            keep_last=False,
            problem=lambda index, length: (
                f"row {index}: the {column} completion is {length} tokens"
                f"{' (end-of-text included)' if end_of_text else ''}, "
                f"longer than data.max_completion_length={data.max_completion_length}; raise it or "
                f"set data.overlong_completions=truncate to keep its first tokens"
            ),
        )
        truncated += cut
    margins = pair_margins(rows, data.margin_column) if data.margin_column is not None else None
    revisions = (
        encode_revisions(tokenizer, texts, rows, data, revision_template)
        if revision_template is not None
        else (None, None, 0)
    )
    return EncodedPairs(
        prompts, encoded["chosen"], encoded["rejected"], truncated_prompts, truncated, margins, *revisions
    )


def _margin_number(value) -> float | None:
    """A finite float from a JSON number or a CSV cell's text, else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def pair_margins(rows: list[dict], column: str) -> Tensor:
    """MODPO's per-pair margins [N, K] from the rows' 'margin' (data.margin_column, mapped on loading): a number
    (K = 1) or a list of K numbers, the same K in every row."""
    margins = []
    for index, row in enumerate(rows):
        value = row.get("margin")
        items = value if isinstance(value, (list, tuple)) else [value]
        numbers = [_margin_number(item) for item in items]
        if not numbers or None in numbers:
            raise DataError(
                f"row {index}: data.margin_column={column!r} holds {value!r}; give the pair's reward margin "
                f"r(chosen) - r(rejected) under the other objective(s): a finite number or a list of them"
            )
        if margins and len(numbers) != len(margins[0]):
            raise DataError(
                f"row {index}: data.margin_column={column!r} holds {len(numbers)} margin(s) but row 0 holds "
                f"{len(margins[0])}; give every pair one margin per weight after w_0 of algorithm.modpo_weights"
            )
        margins.append(numbers)
    return torch.tensor(margins, dtype=torch.float64)  # [N, K]


@dataclass
class PairBatch:
    """n pairs as k n sequences (k = len(names): 2, or 6 for srpo), block by block in the order of `names`: rows
    0..n-1 the chosen completions, rows n..2n-1 the rejected ones, then srpo's revisions; each row with its own
    copy of its prompt (group_size 1)."""

    rows: list[int]  # [n] pair indices
    prompt_ids: Tensor  # [k n, P] left-padded
    prompt_mask: Tensor  # [k n, P]
    completion_ids: Tensor  # [k n, C] right-padded, end-of-text included
    completion_mask: Tensor  # [k n, C]
    names: tuple[str, ...] = ("chosen", "rejected")  # the blocks, keys of SEQUENCES


def pair_batch(encoded: EncodedPairs, rows: list[int], pad_id: int, device: torch.device | str = "cpu") -> PairBatch:
    """All sequences of the pairs `rows` in one padded batch: srpo's six per pair share one forward."""
    sequences = [encoded.sequence(name, i) for name in encoded.names for i in rows]
    prompt_ids, prompt_mask = pad_left([prompt for prompt, _ in sequences], pad_id)  # [k n, P]
    completions = [completion for _, completion in sequences]
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in completions], dtype=torch.long)  # [k n, C]
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], dtype=torch.long)
    return PairBatch(
        list(rows),
        prompt_ids.to(device),
        prompt_mask.to(device),
        completion_ids.to(device),
        completion_mask.to(device),
        encoded.names,
    )


def batch_token_logprobs(model, batch: PairBatch) -> Tensor:
    """log pi(y_t | x, y_<t) per completion token, [k n, C], 0 at padding."""
    logp = completion_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, group_size=1
    )  # [k n, C]
    return logp.where(batch.completion_mask.bool(), 0.0)


# ----------------------------------------------------------------------------- reference and guidance log-probs


@torch.no_grad()
def compute_token_logprobs(
    run: Run, model, encoded: EncodedPairs, pad_id: int, micro_batch_size: int, desc: str = "reference"
) -> dict[str, Tensor]:
    """One pass over all pairs: {"chosen.i": [len chosen_i], "rejected.i": [len rejected_i]} token log-probs (and
    srpo's revisions, "chosen_given_rejected.i" etc.). Rank r computes micro-batches r, r + W, ... with the plain
    (unwrapped) model, and every rank gets all of them."""
    device = next(model.parameters()).device
    chunks = micro_batches(list(range(len(encoded))), micro_batch_size)
    out = {}
    for rows in tqdm(chunks[run.rank :: run.world], desc=desc, mininterval=2, disable=not run.is_main):
        batch = pair_batch(encoded, rows, pad_id, device)
        logp = batch_token_logprobs(model, batch).float().cpu()  # [k n, C]
        for row, (name, i) in enumerate((name, i) for name in batch.names for i in rows):
            length = len(encoded.sequence(name, i)[1])  # clone: safetensors stores tensors that do not share memory
            out[f"{name}.{i}"] = logp[row, :length].clone()
    return {key: value for part in run.gather_objects([out]) for key, value in part.items()}


class CachedLogprobs:
    """Token log-probs computed once, looked up per batch (`fn(batch) -> [k n, C]`)."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def __call__(self, batch: PairBatch) -> Tensor:
        rows = [self.tensors[f"{name}.{i}"] for name in batch.names for i in batch.rows]
        padded = pad_sequence(rows, batch_first=True)  # [k n, C]: the batch is exactly as wide as its longest row
        return padded.to(batch.completion_ids.device)


class LiveLogprobs:
    """Token log-probs of a reference kept in memory (a frozen copy, or the model under `disable_adapter`)."""

    def __init__(self, model, reference: Callable[[], contextlib.AbstractContextManager]):
        self.model, self.reference = model, reference

    @torch.no_grad()
    def __call__(self, batch: PairBatch) -> Tensor:
        with self.reference() as frozen:  # disable_adapter yields None: the policy itself, adapter off
            return batch_token_logprobs(frozen if frozen is not None else self.model, batch)  # [k n, C]


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and bytes, in sorted order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: str) -> list:
    """[path, [[file, size, mtime_ns], ...]] of a local model directory (hashing the weights would take as
    long as a forward pass over a small dataset); a hub id is named only."""
    directory = Path(path)
    files = sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
    return [
        str(directory.resolve()) if directory.exists() else path,
        [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    ]


def cached_logprobs(
    run: Run, path: Path, fingerprint: dict, compute: Callable[[], dict[str, Tensor]]
) -> tuple[dict, bool]:
    """(tensors, whether the cache was used): the cache at `path` when its sidecar `path.json` holds
    `fingerprint`, else `compute()` (a collective: every rank gets all tensors) written there by the main
    process while the others wait (atomically; the sidecar last, so it never vouches for a half-written or older
    file). Every rank reads the sidecar before any rank can write: `compute` holds them together."""
    sidecar = path.with_suffix(".json")
    fresh = path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == fingerprint
    if not run.any(not fresh):  # decided alike on every rank, so none enters the collective `compute` alone
        return load_file(str(path)), True
    tensors = compute()

    def write() -> None:
        sidecar.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        sidecar.write_text(json.dumps(fingerprint, indent=1))

    run.main_only(write)
    return tensors, False


def cache_fingerprint(config: DPOConfig, data_path: str, encoded: EncodedPairs, models: list[str]) -> dict:
    return {
        "version": CACHE_VERSION,
        "data": str(data_path),  # a hub id has no local file: tokens_sha256 covers it
        "data_sha256": file_digest(data_path) if Path(data_path).exists() else None,
        "tokens_sha256": encoded.digest(),
        "models": [model_fingerprint(resolve_embedded(m)) for m in models],
        "dtype": config.model.dtype,
        # srpo: the revision prompts' tokens are in tokens_sha256 already; the template is named for a reader
        **({"revision_template": config.revision_template} if config.revision_template is not None else {}),
    }


def precomputed_reference(
    run: Run, config: DPOConfig, model, encoded: EncodedPairs, data_path: str, pad_id: int
) -> tuple[CachedLogprobs, str]:
    """Reference = the initial model: computed now, on the plain model before it is wrapped and before any
    update, with the LoRA adapter disabled (its B matrices start at 0, and on --resume it already holds trained
    weights)."""

    def compute() -> dict[str, Tensor]:
        off = model.disable_adapter() if config.model.lora else contextlib.nullcontext()
        with off:
            return compute_token_logprobs(run, model, encoded, pad_id, config.memory.micro_batch_size, "reference")

    fingerprint = cache_fingerprint(config, data_path, encoded, [config.model.path])
    path = run.out / "reference_logprobs.safetensors"
    tensors, hit = cached_logprobs(run, path, fingerprint, compute)
    return CachedLogprobs(tensors), f"precomputed ({'read from' if hit else 'written to'} {path})"


def live_reference(
    run: Run, config: DPOConfig, model, encoded: EncodedPairs, data_path: str, pad_id: int
) -> tuple[LiveLogprobs, str]:
    """A reference kept in memory, called on the plain model (no rank waits on another: it is not a collective)."""
    kind = "the model with its LoRA adapter disabled" if config.model.lora else "a frozen copy of the initial model"
    return LiveLogprobs(model, reference_policy(model, config.model.lora)), f"live ({kind})"


REFERENCE_SOURCES = {"precompute": precomputed_reference, "live": live_reference}


def load_guidance_model(config: DPOConfig, vocab_size: int, device: torch.device | str = "cpu"):
    """The TGDPO guidance model: a full model directory, or a LoRA adapter directory on top of model.path."""
    path = config.algorithm.guidance_model
    if (Path(path) / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_policy(replace(config.model, lora=False), device)
        guide = PeftModel.from_pretrained(base, path)
    else:
        guide, _ = load_policy(replace(config.model, path=path, lora=False), device, field="algorithm.guidance_model")
    size = guide.get_input_embeddings().num_embeddings
    if size != vocab_size:
        raise ConfigError(
            f"config field 'algorithm.guidance_model': {path} has a vocabulary of {size} tokens but "
            f"model.path has {vocab_size}; the guidance model must share the policy's tokenizer"
        )
    return guide.eval().requires_grad_(False)


def guidance_logprobs(
    run: Run, config: DPOConfig, model, encoded: EncodedPairs, data_path: str, pad_id: int
) -> CachedLogprobs | None:
    """TGDPO's guidance token log-probs, computed once (the guidance model is frozen) and cached."""
    if config.algorithm.tgdpo_alpha == 0:
        return None

    def compute() -> dict[str, Tensor]:
        guide = load_guidance_model(config, model.get_input_embeddings().num_embeddings, run.device)
        return compute_token_logprobs(run, guide, encoded, pad_id, config.memory.micro_batch_size, "guidance")

    models = [config.model.path, config.algorithm.guidance_model]
    tensors, _ = cached_logprobs(
        run, run.out / "guidance_logprobs.safetensors", cache_fingerprint(config, data_path, encoded, models), compute
    )
    return CachedLogprobs(tensors)  # the guidance model went out of scope inside compute()


# ----------------------------------------------------------------------------- loss


class Sequences(NamedTuple):
    """Per-pair sequence log-probs (sums over tokens) and lengths, [n] each."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    margins: Tensor | None = None  # [n, K] modpo's margins of the other objectives


# How each shared loss is called: their signatures differ (ipo and simpo take lengths, simpo no reference,
# modpo margins and weights).
_LOSS_CALLS: dict[str, Callable[[Callable, Sequences, DPOAlgorithmConfig], tuple[Tensor, Tensor, Tensor]]] = {
    "sigmoid": lambda f, s, a: f(
        s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=a.effective_beta, label_smoothing=a.label_smoothing
    ),
    "dpop": lambda f, s, a: f(
        s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=a.effective_beta, lambda_=a.dpop_lambda
    ),
    "ipo": lambda f, s, a: f(
        s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, s.chosen_lengths, s.rejected_lengths, beta=a.effective_beta
    ),
    "robust": lambda f, s, a: f(
        s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=a.effective_beta, flip_rate=a.label_smoothing
    ),
    "hinge": lambda f, s, a: f(s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, beta=a.effective_beta),
    "simpo": lambda f, s, a: f(
        s.chosen, s.rejected, s.chosen_lengths, s.rejected_lengths, beta=a.effective_beta, gamma=a.simpo_gamma
    ),
    "modpo": lambda f, s, a: f(
        s.chosen, s.rejected, s.ref_chosen, s.ref_rejected, s.margins, a.modpo_weights, beta=a.effective_beta
    ),
}


# Per-pair metrics a loss returns besides the implied rewards, logged as train/<name> means.
LOSS_METRICS = {
    "srpo": ("srpo/generation_margin", "srpo/revision_margin_given_rejected", "srpo/revision_margin_given_chosen")
}


def srpo_pair_losses(a: DPOAlgorithmConfig, seq: Tensor, ref_seq: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
    """srpo: (losses [n], chosen_rewards [n], rejected_rewards [n], its three margins [n] each) from the summed
    log-probs [6n] of the policy and the reference, in the blocks of SEQUENCES. The rewards are DPO's implied ones
    of generation, beta (logp - logp_ref) of chosen and rejected given x, so the margin and accuracy curves read
    as DPO's do."""
    n = seq.shape[0] // 6
    policy, reference = seq.view(6, n).unbind(0), ref_seq.view(6, n).unbind(0)  # 6 x [n] each
    beta = a.effective_beta
    losses, margins = srpo_loss(*policy, *reference, beta=beta, alpha=a.effective_srpo_alpha)
    chosen = (beta * (policy[0] - reference[0])).detach()  # [n]
    rejected = (beta * (policy[1] - reference[1])).detach()  # [n]
    return losses, chosen, rejected, {f"srpo/{name}": value for name, value in margins.items()}


def pair_losses(
    a: DPOAlgorithmConfig,
    logp: Tensor,
    mask: Tensor,
    ref: Tensor | None,
    guide: Tensor | None,
    margins: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(losses [n], chosen_rewards [n], rejected_rewards [n], the loss's other per-pair metrics {name: [n]}) of n
    pairs from token log-probs [k n, C] (chosen rows first, then rejected, then srpo's revisions), the reference's
    [k n, C] (None for simpo), the guidance model's (TGDPO) and the margins of the other objectives [n, K]
    (modpo)."""
    keep = mask.bool()
    seq = logp.where(keep, 0.0).sum(-1)  # [k n]
    lengths = mask.sum(-1).to(logp.dtype)  # [k n] end-of-text included
    n = logp.shape[0] // (6 if a.loss == "srpo" else 2)
    extra = {}
    if a.tgdpo_alpha > 0:
        rhat = guide - ref  # [2n, C] the guidance model's per-token log-ratio to the reference
        weights_chosen, weights_rejected = tgdpo_token_weights(rhat[:n], rhat[n:], a.effective_beta, a.tgdpo_alpha)
        losses, chosen, rejected = weighted_dpo_sigmoid_loss(
            logp[:n],
            logp[n:],
            ref[:n],
            ref[n:],
            mask[:n],
            mask[n:],
            weights_chosen,
            weights_rejected,
            label_smoothing=a.label_smoothing,
        )
    elif a.loss == "srpo":
        losses, chosen, rejected, extra = srpo_pair_losses(a, seq, ref.where(keep, 0.0).sum(-1))
    else:
        ref_seq = ref.where(keep, 0.0).sum(-1) if ref is not None else None  # [2n]
        sequences = Sequences(
            seq[:n],
            seq[n:],
            ref_seq[:n] if ref_seq is not None else None,
            ref_seq[n:] if ref_seq is not None else None,
            lengths[:n],
            lengths[n:],
            margins,
        )
        losses, chosen, rejected = _LOSS_CALLS[a.loss](PREFERENCE_LOSSES[a.loss], sequences, a)
    if a.nll_weight > 0:  # iterative RPO
        losses = losses + a.nll_weight * chosen_nll_loss(seq[:n], lengths[:n])  # [n]
    return losses, chosen, rejected, extra


def micro_batch_terms(
    a: DPOAlgorithmConfig,
    model,
    encoded: EncodedPairs,
    rows: list[int],
    pad_id: int,
    reference: Callable | None,
    guidance: Callable | None,
) -> dict[str, Tensor]:
    """Loss terms of the pairs `rows` under the current policy: losses, implied rewards, sequence log-probs [n],
    and the loss's other metrics (srpo's margins) under their names."""
    batch = pair_batch(encoded, rows, pad_id, next(model.parameters()).device)
    ref = reference(batch) if reference is not None else None  # [k n, C]
    guide = guidance(batch) if guidance is not None else None  # [2n, C]
    logp = batch_token_logprobs(model, batch)  # [k n, C] one forward for all sequences of the micro-batch
    margins = encoded.margins[rows].to(logp.device) if encoded.margins is not None else None  # [n, K] modpo
    losses, chosen_rewards, rejected_rewards, extra = pair_losses(a, logp, batch.completion_mask, ref, guide, margins)
    seq = logp.detach().sum(-1)  # [k n] (0 at padding already)
    n = len(rows)
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "chosen_logps": seq[:n],
        "rejected_logps": seq[n : 2 * n],
        **extra,
    }


def train_step(
    run: Run,
    config: DPOConfig,
    model,
    optimizer,
    encoded: EncodedPairs,
    indices: list[int],
    pad_id: int,
    reference: Callable | None,
    guidance: Callable | None,
) -> dict[str, float]:
    """One optimizer step on the pairs `indices` (the global batch): the mean pair loss. This rank takes its
    contiguous block of them in micro-batches; each adds its pairs' loss sum over the global batch size, so the
    synced gradient is that of the global mean. Gradients sync on the last micro-batch only; a non-finite loss on
    any rank stops every rank before the optimizer step."""
    t = config.train
    block = run.block(len(indices))
    micro = micro_batches(indices[block.start : block.stop], config.memory.micro_batch_size)
    optimizer.zero_grad(set_to_none=True)
    names = (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margin",
        "rewards/accuracy",
        "logps/chosen",
        "logps/rejected",
    )
    extra = LOSS_METRICS.get(config.algorithm.loss, ())  # the loss's own per-pair metrics (srpo's margins)
    names += extra
    sums = torch.zeros(len(names), dtype=torch.float64)  # this rank's sums over its pairs
    failure = None
    for index, rows in enumerate(micro):
        with run.sync_gradients(model, last=index == len(micro) - 1):
            terms = micro_batch_terms(config.algorithm, model, encoded, rows, pad_id, reference, guidance)
            loss = terms["losses"].sum() / len(indices)  # this micro-batch's share of the step's global mean
            if failure is None and not torch.isfinite(loss):
                failure = f"the loss is {loss.item()} (pairs {rows[0]}..{rows[-1]} of the data)"
            run.backward(loss)
        chosen, rejected = terms["chosen_rewards"].detach(), terms["rejected_rewards"].detach()
        sums += (
            torch.stack(
                [
                    terms["losses"].detach().sum(),
                    chosen.sum(),
                    rejected.sum(),
                    (chosen - rejected).sum(),
                    (chosen > rejected).float().sum(),
                    terms["chosen_logps"].sum(),
                    terms["rejected_logps"].sum(),
                    *(terms[name].sum() for name in extra),
                ]
            )
            .double()
            .cpu()
        )
    failure = run.first_failure(failure)
    if failure is not None:
        raise FloatingPointError(failure)
    grad_norm = run.clip_grad_norm(model, [p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
    optimizer.step()
    means = run.sum(sums) / len(indices)  # [len(names)] over the global batch
    return {**dict(zip(names, means.tolist())), "grad_norm": grad_norm}


def check_margin_count(a: DPOAlgorithmConfig, margins: Tensor) -> None:
    """modpo: one weight after w_0 per margin the data holds (margins [N, K])."""
    count = margins.shape[1]
    if len(a.modpo_weights) != count + 1:
        raise ConfigError(
            f"config field 'algorithm.modpo_weights': {a.modpo_weights} has {len(a.modpo_weights) - 1} weight(s) "
            f"after w_0 but data.margin_column holds {count} margin(s) per pair; give {count + 1} weights"
        )


# ----------------------------------------------------------------------------- train


def load_pairs(config: DPOConfig) -> tuple[list[dict], list[dict], str]:
    """(training rows, held-out rows, the data path named in the reference cache's fingerprint); modpo's margins
    parsed and matched against the weights before the model loads."""
    a, d = config.algorithm, config.data
    data_path = resolve_embedded(d.train) if d.path is None else d.path
    # modpo: "margin" is read from data.margin_column (renamed on loading, like the other columns)
    columns = ("prompt", "chosen", "rejected") + (("margin",) if d.margin_column is not None else ())
    rows, test_rows = load_train_test(d, columns, resolve_embedded)  # or from data.path
    if a.loss == "modpo":
        check_margin_count(a, pair_margins(rows, d.margin_column))
    return rows, test_rows, data_path


class DPORecipe:
    """DPO-family training in the loop's stages (shared.loop): `update` alone, its pairs drawn from the step."""

    def __init__(self, config: DPOConfig):
        self.config = config

    def setup(self, run: Run) -> Plan:
        config, t, a, d = self.config, self.config.train, self.config.algorithm, self.config.data
        self.run = run
        run.require_divisible(t.batch_size, "train.batch_size", "pairs")
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        # data, model, reference (and guidance) log-probs, optimizer; the main process builds the embedded toy
        # first if a path names it
        data_files = (d.train, d.test) if d.path is None else ()  # beside data.path they are not read
        run.main_first(lambda: [resolve_embedded(p) for p in (config.model.path, *data_files) if p])
        rows, test_rows, data_path = load_pairs(config)
        self.held_out = HeldOut(run, test_rows[: d.eval_size], d, t.seed)
        model, self.tokenizer = load_policy(config.model, run.device)
        disable_dropout(model)  # dropout off for the whole run (see the module docstring)
        if config.memory.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.pad_id = pad_id = self.tokenizer.pad_token_id
        self.encoded = encoded = encode_pairs(self.tokenizer, rows, d, config.revision_template)
        # on the plain model, before any checkpoint is loaded: the reference is the initial model
        self.reference, reference_note = (
            REFERENCE_SOURCES[a.reference](run, config, model, encoded, data_path, pad_id)
            if a.uses_reference
            else (None, "none (reference-free loss)")
        )
        self.guidance = guidance_logprobs(run, config, model, encoded, data_path, pad_id)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.model, self.optimizer = run.prepare(model, optimizer)
        start = restore_policy(run, self.model, self.optimizer)
        run.write_config(config)
        steps = t.steps if t.steps is not None else math.ceil(t.epochs * len(rows) / t.batch_size)
        tgdpo = f", TGDPO alpha {a.tgdpo_alpha} guided by {a.guidance_model}" if self.guidance is not None else ""
        modpo = f", weights {a.modpo_weights} on margins from column {d.margin_column!r}" if a.loss == "modpo" else ""
        srpo = (
            f", alpha {a.effective_srpo_alpha}, revision prompt {config.revision_template!r} "
            f"({encoded.truncated_revisions} truncated)"
            if a.loss == "srpo"
            else ""
        )
        run.print(
            f"dpo[{a.loss}] beta {a.effective_beta}{tgdpo}{modpo}{srpo}: {len(rows)} pairs, {t.batch_size} per step over "
            f"{run.world} process(es) ({t.batch_size // run.world} each, in micro-batches of {config.memory.micro_batch_size}) "
            f"-> {steps} steps = {steps * t.batch_size / len(rows):.2f} epochs, {sum(p.numel() for p in params):,} "
            f"trainable parameters, {encoded.truncated_prompts} prompts and {encoded.truncated_completions} "
            f"completions truncated; reference {reference_note}; device {run.device}, mixed precision "
            f"{config.memory.mixed_precision}; output {run.out}"
        )
        self.all_rows = list(range(len(rows)))
        self.model.train()  # dropout is off; transformers checkpoints activations in train mode only
        return Plan(
            start,
            steps,
            f"dpo[{a.loss}]",
            config.budget.max_seconds,
            unit="step",
            curves=(
                "train/loss",
                "train/rewards/margin",
                "train/rewards/accuracy",
                "train/logps/chosen",
                "train/logps/rejected",
                *(f"train/{name}" for name in LOSS_METRICS.get(a.loss, ())),
                "eval/accuracy",
                "eval/sampled_accuracy",
            ),
            curve_file="dpo_curves.png",
            title=f"DPO ({a.loss}) on {config.model.path}",
        )

    def evaluate(self, done: int) -> dict:
        return self.held_out.metrics(self.model, self.tokenizer)

    def before_record(self) -> dict:
        return {
            "prompts_truncated": self.encoded.truncated_prompts,
            "completions_truncated": self.encoded.truncated_completions,
            **(
                {"revision_prompts_truncated": self.encoded.truncated_revisions}
                if self.config.revision_template
                else {}
            ),
        }

    def report_before(self, before: dict) -> None:
        self.held_out.report_before(before)

    def describe(self, result: dict) -> str:
        return self.held_out.describe(result)

    def update(self, step: int) -> dict:
        self.clock = time.perf_counter()
        indices = step_batch(self.config, self.optimizer, self.all_rows, step)  # the global batch
        return train_step(
            self.run,
            self.config,
            self.model,
            self.optimizer,
            self.encoded,
            indices,
            self.pad_id,
            self.reference,
            self.guidance,
        )

    def record(self, step: int, metrics: dict) -> dict:
        return step_record(self.config, step, metrics, self.clock)

    def postfix(self, record: dict) -> dict:
        return {
            "loss": f"{record['train/loss']:.4f}",
            "margin": f"{record['train/rewards/margin']:.3f}",
            "acc": f"{record['train/rewards/accuracy']:.2f}",
        }

    def save(self, done: int) -> None:
        save_policy_checkpoint(self.run, self.config, self.model, self.tokenizer, self.optimizer, done)

    def closing(self) -> str:
        return outputs_line(self.run.out, "dpo_curves.png")


def train(config: DPOConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    return run_recipe(DPORecipe(config), config, resume, allow_config_change, tag="[llmalign]")
