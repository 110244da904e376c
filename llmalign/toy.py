"""The embedded default: a tiny but real transformers `Qwen2ForCausalLM` that does arithmetic.

Everything is built in-process (no hub access): a byte-level `Qwen2Tokenizer` (256 byte tokens,
no merges, plus <|endoftext|>, <|im_start|>, <|im_end|> and a chat template), a small Qwen2
model, and a generated task: add and subtract three one-digit numbers, with a short worked answer

    prompt:      "Compute 8+5-7.\\n"
    completion:  "<think>8+5=13 13-7=6</think><answer>6</answer><|endoftext|>"

The supervised answers come in three styles, all correct: worked (as above), worked with a
redundant check ("check 6+7=13") inside the think block, and direct ("<think></think><answer>6</answer>",
no steps). On held-out problems the three are about equally accurate (greedy 0.77 / 0.80 / 0.73 for
direct / checked / worked in the v3 build), so completions vary in length at equal accuracy and the
length rewards (GRPO-lambda, the length curriculum) have something to shorten. The model is
supervised briefly, so it is right on most held-out problems and wrong on some (mostly off by one
on negative partial sums), and RL has room to help.

The full build is shipped in `llmalign/embedded/arith-qwen2-v3` (its digest is SHIPPED_DIGEST); `embedded:arith`
loads it, and builds into the cache only when the shipped copy is missing or differs (and again when a cached
build's files no longer have the digest the build recorded in digest.txt).

    python -m llmalign.toy build                 # ~/.cache/flowalign/arith-qwen2-v3 (what is shipped)
    python -m llmalign.toy build --quick         # the same model supervised briefly; reaches QUALITY_BAR
    python -m llmalign.toy build --smoke         # smaller, a few steps: for plumbing tests only
    python -m llmalign.toy digest [DIR]          # the digest of a build (default: the shipped one)
    FLOWALIGN_CACHE=/tmp/fa python -m llmalign.toy build

Layout of a build directory: config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja (all loadable with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`), sft.jsonl (the
supervised problems), train.jsonl (RL prompts never supervised on) and test.jsonl (prompt, answer), and llmalign.json (the build report, written last: its presence
marks a complete build).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.checkpoint import replaced_atomically
from shared.embedded import MISSING, build_threads, cache_problem, directory_digest, record_digest, shipped_or_none

CACHE_NAME = "arith-qwen2-v3"
EMBEDDED_MODEL = "embedded:arith"
"""The model.path (and data.train/test prefix) that stands for this toy in configs."""
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_OPERAND = 9
DIRECT_FRACTION = 0.5  # share of SFT answers given without steps
CHECK_FRACTION = 0.5  # share of the worked SFT answers that carry the redundant check step
TRAIN_PROBLEMS, TEST_PROBLEMS = 1500, 200  # of the 4000 distinct problems
BUILD_SIZES = {
    "full": {"sft_steps": 600, "batch_size": 64, "hidden": 128, "layers": 4},
    # the same model on 500 steps instead of 600: reaches QUALITY_BAR (the test of the build recipe). Shorter does
    # not: held-out greedy accuracy read 0.06, 0.33, 0.23 and 0.62 after 200, 400, 450 and 500 steps (the
    # answers fall into place late in the cosine schedule), and 0.05-0.06 at 300 steps with 2-3x the learning rate
    "quick": {"sft_steps": 500, "batch_size": 64, "hidden": 128, "layers": 4},
    # a smaller model, a few steps: right files and shapes, untrained; for tests of the plumbing only
    "smoke": {"sft_steps": 20, "batch_size": 16, "hidden": 32, "layers": 2},
}
QUALITY_BAR = {"test_greedy_accuracy": 0.5}
"""What a build must reach to stand in for the shipped toy (the shipped full build: 0.76 held-out greedy)."""


# ----------------------------------------------------------------------------- tokenizer


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's scheme): printable bytes stand for
    themselves, the others are shifted to code points 256+n, so every byte is one visible char."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def build_tokenizer():
    """A byte-level Qwen2Tokenizer: one token per byte, no merges, the three special tokens and a
    chat template. Built this way (vocab dict + empty merges) it saves and reloads identically
    with AutoTokenizer, which in transformers 5 rebuilds a Qwen2Tokenizer from the saved vocab."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(byte_alphabet())}
    vocab[SPECIAL_TOKENS[0]] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0]
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # prompts are left-padded for generation
    return tokenizer


# ----------------------------------------------------------------------------- task


def make_problem(rng: random.Random) -> dict:
    """One problem: a o1 b o2 c with operands in [0, MAX_OPERAND] and o in {+, -}."""
    a, b, c = (rng.randint(0, MAX_OPERAND) for _ in range(3))
    o1, o2 = rng.choice("+-"), rng.choice("+-")
    return problem_of(a, o1, b, o2, c)


PROMPT_PATTERN = re.compile(r"Compute (\d)([+-])(\d)([+-])(\d)\.\n")


def problem_from_prompt(prompt: str) -> dict:
    """The problem of a prompt `make_problem` wrote ("Compute 8+5-7.\\n"), its steps and answer worked out again."""
    match = PROMPT_PATTERN.fullmatch(prompt)
    if match is None:
        raise ValueError(f"{prompt!r} is not a prompt of the arithmetic toy ('Compute a+b-c.\\n')")
    a, o1, b, o2, c = match.groups()
    return problem_of(int(a), o1, int(b), o2, int(c))


def problem_of(a: int, o1: str, b: int, o2: str, c: int) -> dict:
    """The problem a o1 b o2 c: its prompt, answer, worked steps and the redundant check step."""
    partial = a + b if o1 == "+" else a - b
    answer = partial + c if o2 == "+" else partial - c
    return {
        "prompt": f"Compute {a}{o1}{b}{o2}{c}.\n",
        "answer": str(answer),
        "steps": f"{a}{o1}{b}={partial} {partial}{o2}{c}={answer}",
        "check": f" check {answer}{'-' if o2 == '+' else '+'}{c}={partial}",
    }


def solution(problem: dict, with_check: bool, direct: bool = False) -> str:
    """The supervised completion (without the end-of-text token): worked, worked and checked, or
    direct (an empty think block; `with_check` is then ignored)."""
    if direct:
        return f"<think></think><answer>{problem['answer']}</answer>"
    check = problem["check"] if with_check else ""
    return f"<think>{problem['steps']}{check}</think><answer>{problem['answer']}</answer>"


def supervised_style(rng: random.Random) -> dict[str, bool]:
    """The keyword arguments of `solution` for one supervised example, drawn by the fractions above."""
    return {"direct": rng.random() < DIRECT_FRACTION, "with_check": rng.random() < CHECK_FRACTION}


def make_split(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct problems (by prompt), none of whose prompts is in `exclude`."""
    rng = random.Random(seed)
    problems, seen = [], set(exclude)
    while len(problems) < n:
        problem = make_problem(rng)
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            problems.append(problem)
    return problems


# ----------------------------------------------------------------------------- model


def build_model(tokenizer, hidden: int = 128, layers: int = 4, seed: int = 0):
    """A small Qwen2ForCausalLM sized for the byte-level vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def sft_batch(tokenizer, problems: list[dict], rng: random.Random) -> dict[str, torch.Tensor]:
    """Right-padded prompt+solution+EOS ids with labels only on the solution and EOS."""
    rows, labels = [], []
    for problem in problems:
        prompt = tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(solution(problem, **supervised_style(rng)), add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)  # the loss is on the completion only
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # [N, L]
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # [N, L]
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])  # [N, L]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


def supervised_finetune(
    model,
    tokenizer,
    problems: list[dict],
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 50 steps."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="sft", disable=not progress, mininterval=2):
        batch = sft_batch(tokenizer, rng.sample(problems, batch_size), rng)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------- build and cache


SHIPPED_DIR = Path(__file__).parent / "embedded" / CACHE_NAME
SHIPPED_DIGEST = "sha256:886694350cea9b23de17974c29c9c2d56f761d18d8cd7881d6165e224c3420bb"
"""`shared.embedded.directory_digest` of the shipped build (`python -m llmalign.toy digest`); docs/results.md names it."""


def below_quality_bar(report: dict) -> list[str]:
    """The QUALITY_BAR measures a build report misses, as 'name value < bar' (empty: it passes)."""
    return [f"{name} {report[name]:.3f} < {bar}" for name, bar in QUALITY_BAR.items() if report[name] < bar]


def default_cache_dir(mode: str = "full") -> Path:
    """$FLOWALIGN_CACHE/arith-qwen2-v3 (FLOWALIGN_CACHE defaults to ~/.cache/flowalign); quick and smoke
    builds go to separate ...-quick / ...-smoke directories so they never stand in for the full model."""
    root = Path(os.environ.get("FLOWALIGN_CACHE") or Path.home() / ".cache" / "flowalign")
    return root / (CACHE_NAME + ("" if mode == "full" else f"-{mode}"))


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / "llmalign.json").is_file()


def _write_jsonl(path: Path, problems: list[dict]) -> None:
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n")


def build_arith_model(out: str | os.PathLike, mode: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Generate the task, SFT the tiny model, measure held-out greedy accuracy, save to `out`
    (replaced if present) through a temporary sibling directory renamed at the end. `mode`: "full" (what is
    shipped), "quick" (the same model supervised briefly; reaches QUALITY_BAR) or "smoke" (smaller, untrained).
    One torch thread, so a build with the same seed, torch version and CPU gives the same weights and files, up
    to the library version stamps the digest leaves out (shared.embedded.VERSION_STAMPS): the same digest."""
    if mode not in BUILD_SIZES:
        raise ValueError(f"mode {mode!r}: use one of {sorted(BUILD_SIZES)}")
    with build_threads():
        return _build(Path(out).expanduser(), mode, seed, progress)


def _build(out: Path, mode: str, seed: int, progress: bool) -> dict:
    from llmalign.evaluate import accuracy_on  # evaluation is shared with `llmalign eval`

    start = time.time()
    sizes = BUILD_SIZES[mode]
    sft = make_split(TRAIN_PROBLEMS, seed)
    test = make_split(TEST_PROBLEMS, seed + 1, exclude={p["prompt"] for p in sft})
    # RL prompts the model was never supervised on: a gain must come from better arithmetic, not recall
    train = make_split(TRAIN_PROBLEMS, seed + 2, exclude={p["prompt"] for p in sft + test})
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, sizes["hidden"], sizes["layers"], seed)
    loss = supervised_finetune(
        model, tokenizer, sft, sizes["sft_steps"], sizes["batch_size"], seed=seed, progress=progress
    )
    greedy = accuracy_on(model, tokenizer, test, max_new_tokens=64, batch_size=100)
    report = {
        "version": 3,
        "mode": mode,
        "seed": seed,
        "torch": torch.__version__.split("+")[0],
        "sizes": sizes,
        "max_operand": MAX_OPERAND,
        "check_fraction": CHECK_FRACTION,
        "direct_fraction": DIRECT_FRACTION,
        "sft_final_loss": loss,
        "test_greedy_accuracy": greedy["accuracy"],
        "test_greedy_mean_length": greedy["mean_length"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # no wall-clock time in it: the files (and their digest) depend on the seed and the code alone
    with replaced_atomically(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_jsonl(tmp / "sft.jsonl", sft)
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        (tmp / "llmalign.json").write_text(json.dumps(report, indent=2))
        record_digest(tmp)  # last: a load checks the files against it
    print(
        f"arith model: {report['parameters']} parameters, sft loss {loss:.4f}, held-out greedy accuracy "
        f"{greedy['accuracy']:.3f}, mean completion {greedy['mean_length']:.1f} tokens; saved to {out} "
        f"in {time.time() - start:.0f} s; digest {directory_digest(out)}"
    )
    missed = below_quality_bar(report)
    print(f"quality bar {QUALITY_BAR}: " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
    return report


def ensure_arith_model(path: str | os.PathLike | None = None, mode: str = "full") -> str:
    """The directory of the pretrained toy: `path` if given, else the shipped copy (full mode, when its digest is
    SHIPPED_DIGEST), else `default_cache_dir(mode)`; a missing or incomplete directory is built first, and so is
    one whose files no longer have the digest its build recorded (shared.embedded.cache_problem: a damaged file)."""
    if path is None and mode == "full":
        shipped = shipped_or_none(SHIPPED_DIR, SHIPPED_DIGEST, is_complete)
        if shipped is not None:
            return str(shipped)
    out = Path(path).expanduser() if path is not None else default_cache_dir(mode)
    problem = cache_problem(out, is_complete)
    if problem is not None:
        why = "" if problem == MISSING else f"the cached toy in {out} {problem}; "  # a damaged cache is rebuilt
        print(f"{why}building the arithmetic toy model into {out} (once; a few minutes on CPU)")
        build_arith_model(out, mode=mode)
    return str(out)


LEVELS = ("short", "medium", "long")  # length levels of the level-tagged task, in order


def level_rows(rows: list[dict]) -> list[dict]:
    """The rows with a length level each (LEVELS in turn, so each level holds a third), written at the start of the
    prompt ("[short] Compute 8+5-7.\n") and kept in a `level` column for the level_length reward."""
    tagged = []
    for index, row in enumerate(rows):
        level = LEVELS[index % len(LEVELS)]
        tagged.append({**row, "prompt": f"[{level}] {row['prompt']}", "level": level})
    return tagged


def level_sft_rows(seed: int = 0) -> list[dict]:
    """The build's supervised problems (make_split(TRAIN_PROBLEMS, seed), the prompts of sft.jsonl) with levels
    (`level_rows`) and a completion each in the supervised styles' mix, drawn whatever the level: SFT on them
    teaches the model to read a tagged prompt (the toy fails on any text it has not seen) without tying a length
    to a level, which is what RL with the level_length reward is then left to learn."""
    rng = random.Random(seed)
    problems = make_split(TRAIN_PROBLEMS, seed)
    rows = [{"prompt": p["prompt"], "completion": solution(p, **supervised_style(rng))} for p in problems]
    return level_rows(rows)


def level_split(root: str, name: str) -> str:
    """`embedded:arith/levels/<name>`: the toy's train.jsonl or test.jsonl with length levels (`level_rows`), or
    sft.jsonl (`level_sft_rows`), written beside the other cached builds (the shipped directory is not written to)
    when missing or stale."""
    if name not in ("train.jsonl", "test.jsonl", "sft.jsonl"):
        raise FileNotFoundError(f"embedded:arith/levels/{name}: the levels are train.jsonl, test.jsonl and sft.jsonl")
    if name == "sft.jsonl":
        rows = level_sft_rows()
    else:
        rows = level_rows([json.loads(line) for line in (Path(root) / name).read_text().splitlines() if line.strip()])
    return _cached_rows(default_cache_dir().parent / "arith-levels" / name, rows)


def _cached_rows(out: Path, rows: list[dict]) -> str:
    """`rows` as JSON lines at `out`, (re)written only when missing or different; returns its path."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if not out.is_file() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, out)  # atomic: another process reading it sees the old or the new file, whole
    return str(out)


# ----------------------------------------------------------------------------- reward-model pairs

CYCLIC_PROMPTS = {"train": 400, "test": 100}  # prompts of the cyclic pair sets (3 pairs each)


def answer_class(answer: int) -> int:
    """The class of a cyclic-preference completion: (last digit of the answer) mod 3, so 0 3 6 9 -> 0, 1 4 7 -> 1,
    2 5 8 -> 2."""
    return (abs(answer) % 10) % 3


def cyclic_pairs(prompts: list[str], seed: int) -> list[dict]:
    """Preference pairs that are cyclic by construction: per prompt, one direct answer of each class
    (`answer_class`) drawn from 0..99, x0, x1, x2, and the three pairs x1 > x0, x2 > x1, x0 > x2 (y_a > y_b iff
    c(a) = c(b) + 1 mod 3). Any scalar reward orders at most two of a prompt's three pairs right (it would need
    r(x1) > r(x0) > r(x2) > r(x1)), so its accuracy on these pairs is at most 2/3 whatever it learned."""
    rng = random.Random(seed)
    by_class = {k: [n for n in range(100) if answer_class(n) == k] for k in range(3)}
    rows = []
    for prompt in prompts:
        x = [f"The answer is {rng.choice(by_class[k])}" for k in range(3)]  # the class digit is the last token
        for winner in range(3):
            loser = (winner - 1) % 3
            rows.append(
                {"prompt": prompt, "chosen": x[winner], "rejected": x[loser], "cycle_edge": f"{winner}>{loser}"}
            )
    return rows


def answer_pairs(prompts: list[str], seed: int) -> list[dict]:
    """Transitive pairs: per prompt, the worked solution (correct) over the same solution with a wrong final answer
    (off by 1 or 2); in half of them the last step's result is changed to the wrong answer too, so the two still
    agree and only the arithmetic tells which is right."""
    rng = random.Random(seed)
    rows = []
    for prompt in prompts:
        problem = problem_from_prompt(prompt)
        wrong = int(problem["answer"]) + rng.choice((-2, -1, 1, 2))
        steps = problem["steps"]
        if rng.random() < 0.5:  # the last step agrees with the wrong answer
            steps = steps[: steps.rindex("=") + 1] + str(wrong)
        rejected = {**problem, "answer": str(wrong), "steps": steps}
        rows.append(
            {"prompt": prompt, "chosen": solution(problem, with_check=False), "rejected": solution(rejected, False)}
        )
    return rows


RM_SPLITS = ("cyclic_train.jsonl", "cyclic_test.jsonl", "answers_train.jsonl", "answers_test.jsonl")


def rm_split(root: str, name: str) -> str:
    """`embedded:arith/rm/<name>`: reward-model pairs on the toy's prompts, training pairs from train.jsonl and
    held-out pairs from test.jsonl (disjoint prompts): cyclic_* (`cyclic_pairs`, the first CYCLIC_PROMPTS prompts)
    or answers_* (`answer_pairs`, every prompt), written beside the other cached builds when missing or stale."""
    if name not in RM_SPLITS:
        raise FileNotFoundError(f"embedded:arith/rm/{name}: the reward-model pair files are {', '.join(RM_SPLITS)}")
    kind, split = name.removesuffix(".jsonl").split("_")
    source = [json.loads(line)["prompt"] for line in (Path(root) / f"{split}.jsonl").read_text().splitlines() if line]
    seed = 0 if split == "train" else 1
    rows = cyclic_pairs(source[: CYCLIC_PROMPTS[split]], seed) if kind == "cyclic" else answer_pairs(source, seed)
    return _cached_rows(default_cache_dir().parent / "arith-rm" / name, rows)


# other embedded toys, by their name: the import path 'module:function' of their resolver (path -> path), imported
# when named (those modules build on this one's tokenizer and task, so importing them here would be a cycle)
OTHER_EMBEDDED = {"embedded:arith-mdm": "llmalign.diffusion_toy:resolve_mdm"}  # the masked-diffusion toy


def resolve_embedded(path: str) -> str:
    """`embedded:arith` -> the cached model directory; `embedded:arith/test.jsonl` -> a file in it;
    `embedded:arith/levels/train.jsonl` (or test.jsonl) -> that file with length levels (`level_split`);
    `embedded:arith/rm/cyclic_train.jsonl` (and the other RM_SPLITS) -> reward-model pairs (`rm_split`);
    `embedded:arith/smoke` -> the smoke build's directory (`ensure_arith_model(mode="smoke")`);
    `embedded:arith-mdm[/file]` -> the masked-diffusion toy's (`OTHER_EMBEDDED`); anything else unchanged (a local
    directory, a file or a hub id)."""
    for name, resolver in OTHER_EMBEDDED.items():
        if path == name or path.startswith(name + "/"):
            module_name, _, attribute = resolver.partition(":")
            return getattr(importlib.import_module(module_name), attribute)(path)
    if path == EMBEDDED_MODEL or path.startswith(EMBEDDED_MODEL + "/"):
        root = ensure_arith_model()
        rest = path[len(EMBEDDED_MODEL) :].lstrip("/")
        if rest.startswith("levels/"):
            return level_split(root, rest[len("levels/") :])
        if rest.startswith("rm/"):
            return rm_split(root, rest[len("rm/") :])
        if rest == "smoke":  # the smoke build (hidden 32, 2 layers, 20 SFT steps), built into the cache once
            return ensure_arith_model(mode="smoke")
        return str(Path(root) / rest) if rest else root
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmalign.toy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="generate the arithmetic task, SFT the tiny model, save to the cache")
    build.add_argument("--out", default=None, help="directory to write (default: the cache directory)")
    size = build.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the same model supervised briefly (about a minute)")
    size.add_argument("--smoke", action="store_true", help="smaller, a few steps only (plumbing tests; untrained)")
    build.add_argument("--seed", type=int, default=0)
    digest = sub.add_parser("digest", help="print the digest of a build directory (default: the shipped one)")
    digest.add_argument("path", nargs="?", default=str(SHIPPED_DIR))
    args = parser.parse_args(argv)
    if args.command == "digest":
        print(directory_digest(args.path))
        return
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    build_arith_model(args.out if args.out is not None else default_cache_dir(mode), mode=mode, seed=args.seed)


if __name__ == "__main__":
    main()
