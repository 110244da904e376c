"""The embedded masked-diffusion default: a tiny transformers `BertForMaskedLM` that does the arithmetic toy's task.

The task, tokenizer and splits are the causal toy's (llmalign.toy: the byte-level tokenizer, the same sft / train /
test problems for a seed), plus one special token, <|mask|>, the diffusion's mask. A completion is the toy's direct
answer and its end-of-text token, padded with more end-of-text tokens to a fixed COMPLETION_LENGTH L, so the model
learns where the answer ends:

    prompt:      "Compute 8+5-7.\\n"
    completion:  "<think></think><answer>6</answer><|endoftext|><|endoftext|>..."     (L = 40 tokens)

The model is a bidirectional transformer with a masked-LM head, trained with the masked-diffusion objective
(LLaDA, Nie et al. 2025, arXiv 2502.09992, Eq. 3 and its SFT form Eq. 5): per sequence t ~ U(eps, 1], each completion
token masked with probability t, the cross-entropy of the masked tokens weighted 1/t, summed and divided by the
number of completion positions; the prompt is never masked. Only the direct answer style is supervised (the worked
styles of the causal toy would double L and the cost of every rollout and update).

The full build is shipped in `llmalign/embedded/arith-mdm-v1` (its digest is SHIPPED_DIGEST); `embedded:arith-mdm`
loads it, and builds into the cache only when the shipped copy is missing or differs.

    python -m llmalign.diffusion_toy build            # ~/.cache/flowalign/arith-mdm-v1 (what is shipped)
    python -m llmalign.diffusion_toy build --quick    # fewer steps: for tests (~15 s)

Layout of a build directory: config.json, model.safetensors, tokenizer files (loadable with
`AutoModelForMaskedLM.from_pretrained` / `AutoTokenizer.from_pretrained`), sft.jsonl, train.jsonl and test.jsonl as
the causal toy's, llmalign.json (the build report; its presence marks a complete build) and digest.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmalign.toy import (
    TEST_PROBLEMS,
    TRAIN_PROBLEMS,
    _write_jsonl,
    build_tokenizer,
    make_split,
    solution,
)
from shared.checkpoint import replaced_atomically
from shared.embedded import (
    MISSING,
    build_threads,
    cache_problem,
    directory_digest,
    record_digest,
    shipped_or_none,
)

CACHE_NAME = "arith-mdm-v1"
EMBEDDED_MODEL = "embedded:arith-mdm"
"""The model.path (and data.train/test prefix) that stands for this toy in configs."""
MASK_TOKEN = "<|mask|>"
COMPLETION_LENGTH = 40  # L: the longest direct answer is 35 tokens with its EOS
MIN_MASK_RATIO = 1e-3  # LLaDA's eps: t ~ U(eps, 1], so the weight 1/t stays bounded
BUILD_SIZES = {
    "full": {"steps": 1500, "batch_size": 64, "hidden": 128, "layers": 4},
    "quick": {"steps": 150, "batch_size": 32, "hidden": 64, "layers": 2},
}
QUALITY_BAR = {"test_greedy_accuracy": 0.1}
"""What a full build must reach: clearly above 0 (RL needs some right answers in a group), not saturated."""
SAMPLER_STEPS = 20  # the build's own held-out evaluation: greedy, 2 tokens committed per step


def build_mdm_tokenizer():
    """The causal toy's byte-level tokenizer with a mask token (the diffusion's [MASK])."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    tokenizer.chat_template = None  # prompts are plain text
    return tokenizer


def build_model(tokenizer, hidden: int, layers: int, seed: int = 0):
    """A small BertForMaskedLM (absolute positions, bidirectional attention, tied masked-LM head)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,  # no dropout: the RL ratio must be 1 at the rollout's weights in train mode too
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    return BertForMaskedLM(config)


def completion_tokens(tokenizer, text: str, length: int = COMPLETION_LENGTH) -> list[int]:
    """`text`, its EOS and more EOS up to `length` tokens (a text too long for it is an error)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) > length:
        raise ValueError(f"completion {text!r} has {len(ids)} tokens with its EOS, more than L = {length}")
    return ids + [tokenizer.eos_token_id] * (length - len(ids))


def sft_batch(tokenizer, problems: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids [N, P], completion ids [N, L]); the toy's prompts all have the same length."""
    prompts = [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the toy's prompts must have one length (no padding in the build)")
    completions = [completion_tokens(tokenizer, solution(p, with_check=False, direct=True)) for p in problems]
    return torch.tensor(prompts), torch.tensor(completions)


def masked_diffusion_loss(
    model, prompt: torch.Tensor, completion: torch.Tensor, mask_id: int, generator
) -> torch.Tensor:
    """LLaDA's SFT loss (arXiv 2502.09992, Eq. 5): t ~ U(eps, 1] per sequence, each completion token masked with
    probability t, -sum over masked tokens of log p(token) / t, divided by N * L. prompt [N, P], completion [N, L]."""
    n, length = completion.shape
    t = MIN_MASK_RATIO + (1 - MIN_MASK_RATIO) * torch.rand(n, generator=generator)  # [N]
    masked = torch.rand(n, length, generator=generator) < t[:, None]  # [N, L]
    noisy = torch.where(masked, torch.full_like(completion, mask_id), completion)  # [N, L]
    logits = model(input_ids=torch.cat([prompt, noisy], dim=1)).logits[:, prompt.shape[1] :]  # [N, L, V]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), completion, reduction="none")  # [N, L]
    return (token_loss * masked / t[:, None]).sum() / (n * length)


def pretrain(model, tokenizer, problems: list[dict], steps: int, batch_size: int, seed: int, progress: bool) -> float:
    """AdamW with warm-up and cosine decay on the masked-diffusion loss; the mean loss of the last 50 steps."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="mdm", disable=not progress, mininterval=2):
        prompt, completion = sft_batch(tokenizer, rng.sample(problems, batch_size))
        loss = masked_diffusion_loss(model, prompt, completion, tokenizer.mask_token_id, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


SHIPPED_DIR = Path(__file__).parent / "embedded" / CACHE_NAME
SHIPPED_DIGEST = "sha256:da5bd3f4c2cb37d8aa3d1ce8aa3e93712ea50fef9b6972e68632af19edddfb72"
"""`shared.embedded.directory_digest` of the shipped full build; docs/results.md names it."""


def default_cache_dir(mode: str = "full") -> Path:
    """$FLOWALIGN_CACHE/arith-mdm-v1 (default ~/.cache/flowalign); the quick build in ...-quick."""
    root = Path(os.environ.get("FLOWALIGN_CACHE") or Path.home() / ".cache" / "flowalign")
    return root / (CACHE_NAME + ("" if mode == "full" else f"-{mode}"))


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / "llmalign.json").is_file()


def build_mdm_model(out: str | os.PathLike, mode: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Generate the causal toy's splits, train the masked-diffusion model, measure held-out greedy accuracy with the
    unmasking sampler, save to `out` through a temporary sibling renamed at the end. One torch thread
    (shared.embedded.build_threads), so the same seed gives the same files."""
    if mode not in BUILD_SIZES:
        raise ValueError(f"mode {mode!r}: use one of {sorted(BUILD_SIZES)}")
    with build_threads():
        return _build(Path(out).expanduser(), mode, seed, progress)


def _build(out: Path, mode: str, seed: int, progress: bool) -> dict:
    from llmalign.diffusion import DiffusionSampler
    from llmalign.evaluate import accuracy_on

    start = time.time()
    sizes = BUILD_SIZES[mode]
    sft = make_split(TRAIN_PROBLEMS, seed)
    test = make_split(TEST_PROBLEMS, seed + 1, exclude={p["prompt"] for p in sft})
    train = make_split(TRAIN_PROBLEMS, seed + 2, exclude={p["prompt"] for p in sft + test})
    tokenizer = build_mdm_tokenizer()
    model = build_model(tokenizer, sizes["hidden"], sizes["layers"], seed)
    loss = pretrain(model, tokenizer, sft, sizes["steps"], sizes["batch_size"], seed, progress)
    sampler = DiffusionSampler(tokenizer, SAMPLER_STEPS, "max_prob", model)
    greedy = accuracy_on(model, tokenizer, test, COMPLETION_LENGTH, batch_size=100, engine=sampler)
    report = {
        "version": 1,
        "mode": mode,
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
        "sizes": sizes,
        "completion_length": COMPLETION_LENGTH,
        "sampler_steps": SAMPLER_STEPS,
        "final_loss": loss,
        "test_greedy_accuracy": greedy["accuracy"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with replaced_atomically(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_jsonl(tmp / "sft.jsonl", sft)
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        (tmp / "llmalign.json").write_text(json.dumps(report, indent=2))
        record_digest(tmp)
    print(
        f"arith masked-diffusion model: {report['parameters']} parameters, loss {loss:.4f}, held-out greedy accuracy "
        f"{greedy['accuracy']:.3f} ({SAMPLER_STEPS} sampler steps); saved to {out} in {time.time() - start:.0f} s; "
        f"digest {directory_digest(out)}"
    )
    return report


def ensure_mdm_model(path: str | os.PathLike | None = None, mode: str = "full") -> str:
    """The directory of the trained toy: `path` if given, else the shipped copy (full mode, when its digest is
    SHIPPED_DIGEST), else `default_cache_dir(mode)`, built first when missing, incomplete or damaged
    (shared.embedded.cache_problem)."""
    if path is None and mode == "full":
        shipped = shipped_or_none(SHIPPED_DIR, SHIPPED_DIGEST, is_complete)
        if shipped is not None:
            return str(shipped)
    out = Path(path).expanduser() if path is not None else default_cache_dir(mode)
    problem = cache_problem(out, is_complete)
    if problem is not None:
        why = "" if problem == MISSING else f"the cached toy in {out} {problem}; "
        print(f"{why}building the masked-diffusion arithmetic toy into {out} (once; a few minutes on CPU)")
        build_mdm_model(out, mode=mode)
    return str(out)


def resolve_mdm(path: str) -> str:
    """`embedded:arith-mdm` -> the cached model directory, `embedded:arith-mdm/test.jsonl` -> a file in it (through
    llmalign.toy.resolve_embedded, which every loader calls)."""
    root = ensure_mdm_model()
    rest = path[len(EMBEDDED_MODEL) :].lstrip("/")
    return str(Path(root) / rest) if rest else root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmalign.diffusion_toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train the masked-diffusion arithmetic toy, save to the cache")
    build.add_argument("--out", default=None, help="directory to write (default: the cache directory)")
    build.add_argument("--quick", action="store_true", help="a smaller model, fewer steps (tests; ~15 s)")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    build_mdm_model(args.out if args.out is not None else default_cache_dir(mode), mode=mode, seed=args.seed)


if __name__ == "__main__":
    main()
