"""Verifiable rewards for text GRPO: answer checking, format, and length shaping.

Every reward has TRL's signature

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

with one score per completion (None: this reward does not apply to that sample, e.g. its
reference answer is None). The trainer passes as keyword arguments every data column other than
the prompt (a list aligned with completions, e.g. `answer`), plus `completion_ids` (token ids of
each completion, EOS excluded), `group_size` (completions of prompt g are at [g*G, (g+1)*G)),
`step` (0-based training iteration) and `max_completion_length`. Unknown kwargs are ignored.
Rewards with parameters come from factories `make_...(**kwargs)`; config files name them
through `BUILTIN_REWARDS` / `build_reward`, with the factory's arguments in `reward.kwargs`.

    reward_fn = build_reward("cosine_length", {"max_length": 512})
    scores = reward_fn(prompts, completions, answer=answers, completion_ids=ids)

Formulas (L = completion length in tokens, "correct" = answers_match(extract_answer(c), answer)):
- accuracy:      r = 1 if correct else 0.
- format:        r = 1 if the completion is `<think>...</think> <answer>...</answer>` and nothing else.
- cosine_length (open-rs, but counting tokens, not characters), L clamped to L_max:
                 r = v_min + 0.5 (v_max - v_min)(1 + cos(pi L / L_max)),
                 correct: (v_min, v_max) = (0.5, 1.0), so shorter is better (L=0 -> 1.0, L=L_max -> 0.5);
                 wrong:   (v_min, v_max) = (-0.5, -1.0), so longer is better (L=0 -> -1.0, L=L_max -> -0.5).
- soft_overlong (DAPO): r = 0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache if
                 L_max - L_cache < L <= L_max; -1 beyond.
- grpo_lambda:   groups ranked by correctness ratio (ties: lower group index first); the top
                 ceil(lambda * num_groups) groups get r = 1 - alpha * sigmoid((L - mean L_c) / std L_c)
                 if correct (mean and population std over that group's correct members; z = 0 when
                 std = 0), 0 if wrong; the other groups get r = 1 if correct else 0.
- length_budget ("Train Long, Think Short" curriculum): r = 1 if correct and L <= B(step) else 0, with
                 B(t) = max(B_min, B0 * decay^floor(t / period))                  (exponential)
                 B(t) = B0 - (B0 - B_min) * min(t / total_steps, 1)                (linear).
- level_length (TLDR, length by level; our reading of arXiv:2505.07961, see make_level_length_reward):
                 r = 1[correct] - alpha |L - T_level| / L_max, T_level the target of the prompt's `level` column.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the loader imports torch; llmalign.config reads BUILTIN_REWARDS without it
    from shared.reward_calls import TextRewardFn

__all__ = [
    "BUILTIN_REWARDS",
    "accuracy_reward",
    "answers_match",
    "build_reward",
    "extract_answer",
    "format_reward",
    "last_answer_tag",
    "length_budget",
    "make_cosine_length_reward",
    "make_grpo_lambda_reward",
    "make_length_budget_reward",
    "make_level_length_reward",
    "make_pairwise_win_rate_reward",
    "make_soft_overlong_reward",
]

# ----------------------------------------------------------------------------------------------
# Answer extraction and matching
# ----------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_PHRASE = re.compile(r"answer\s+is|answer\s*:", re.IGNORECASE)
_PHRASE_LEAD = " \t:*_"  # after "answer is": a colon, markdown bold/italics (** __ * _), spaces
_PHRASE_TRAIL = " \t:*_.,;!?"  # closing bold/italics and sentence punctuation after the answer
# A number: "1,000,000.5" (thousands groups of exactly 3), "-12.5", ".5", "3/4". The minus sign
# counts only when not glued to a word or digit, so "x-5" and "3-5" end in the number 5, not -5.
_NUMBER = re.compile(
    r"(?:(?<![\w.)])-)?(?<![\w.])"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:/\d+)?|\.\d+)"
    r"(?![\d])"
)


MAX_ANSWER_SCAN_CHARS = 200_000
"""extract_answer reads only the last this-many characters of a completion: a final answer comes at its end, and the
cap bounds the time of one call whatever the policy writes (each step of the extraction is one linear scan). 200,000
characters are about 50,000 tokens, six times the longest completion any recipe here samples (8,192 tokens); on
shorter texts the cap changes nothing."""

_BRACE = re.compile(r"[{}]")


def _brace_pairs(text: str, start: int = 0) -> dict[int, int]:
    """{index of '{': index of its matching '}'} for every closed '{' at or after `start`, by one scan with a stack
    (a '}' with nothing open is skipped). The match of a '{' is the first '}' after it where the count of '{'
    minus '}' from it returns to 0."""
    pairs, stack = {}, []
    for brace in _BRACE.finditer(text, start):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            pairs[stack.pop()] = brace.start()
    return pairs


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty `\\boxed{...}`, by start position: for nested
    `\\boxed{\\boxed{3}}` the inner one starts last, so "3"; an unclosed last box falls back to the one before."""
    opens = [match.end() - 1 for match in _BOXED.finditer(text)]  # index of each box's '{'
    if not opens:
        return None
    closes = _brace_pairs(text, opens[0])  # braces before the first box match nothing after it
    for open_index in reversed(opens):
        close_index = closes.get(open_index)
        if close_index is not None and (content := text[open_index + 1 : close_index].strip()):
            return content  # contents passed over are blank, so they hold no braces and never overlap: linear
    return None


def last_answer_tag(text: str) -> str | None:
    """Content of the last closed `<answer>...</answer>` (each `<answer>` closed by the first `</answer>` after it,
    as `re.findall(r"<answer>(.*?)</answer>")` pairs them), or None; found with str.find in one pass: once an
    `<answer>` has no `</answer>` after it, no later one has either."""
    last, position = None, 0
    while (start := text.find("<answer>", position)) != -1:
        end = text.find("</answer>", start + len("<answer>"))
        if end == -1:
            break
        last, position = (start + len("<answer>"), end), end + len("</answer>")
    return None if last is None else text[last[0] : last[1]]


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, tried in this order:

    1. the last complete `\\boxed{...}` (nested braces kept: `\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`);
    2. the content of the last closed `<answer>...</answer>`;
    3. the text after the last "answer is" / "answer:" (any case), up to the end of that line or
       the first ". " (sentence end), without the ':', markdown bold or italics ('*', '_') and spaces
       around it, nor trailing punctuation ('.', ',', ';', ':', '!', '?'): "The answer is: **7**." -> "7";
    4. the last number in the text ("-3", "2.5", "1,000" -> "1000", "3/4").

    Empty candidates are skipped. Returns None when nothing is found. Only the last MAX_ANSWER_SCAN_CHARS
    characters are read.
    """
    if not text:
        return None
    text = text[-MAX_ANSWER_SCAN_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    tagged = last_answer_tag(text)
    if tagged is not None and tagged.strip():
        return tagged.strip()
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        rest = text[phrases[-1].end() :].split("\n", 1)[0]
        rest = re.split(r"\.\s", rest, maxsplit=1)[0]
        rest = rest.lstrip(_PHRASE_LEAD).rstrip(_PHRASE_TRAIL)  # "is: **7**." -> "7"
        if rest:
            return rest
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


_LATEX_NOISE = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\displaystyle")
_WRAPPER_OPENINGS = tuple(f"\\{name}{{" for name in ("boxed", "text", "textbf", "mathrm", "mbox"))
_PLAIN_NUMBER = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?$")  # exponent capped: 1e999999999 would hang
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")
_FRAC = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\frac(\d)(\d)$")  # \frac12


def _strip_wrappers(s: str) -> str:
    """s without the `\\boxed{}`/`\\text{}` (`\\textbf`, `\\mathrm`, `\\mbox`) wrappers that enclose all of it,
    outermost first: `\\text{\\boxed{5}}` -> `5`; `\\text{a}+\\text{b}` is kept. One brace scan however deep the
    nesting: the braces inside a wrapper are balanced, so they pair inside it as they do in s."""
    closes: dict[int, int] | None = None
    start, end = 0, len(s)  # the unwrapped part is s[start:end]
    while opening := next((o for o in _WRAPPER_OPENINGS if s.startswith(o, start, end)), None):
        open_index = start + len(opening) - 1
        closes = _brace_pairs(s) if closes is None else closes
        if closes.get(open_index) != end - 1:  # its '}' is not the last character: not a wrapper of all of it
            break
        start, end = open_index + 1, end - 1
    return s[start:end]


def _normalise(value: Any) -> str:
    """Canonical string form: no whitespace, no `$` or `\\( \\)` delimiters, no `\\boxed{}`/`\\text{}`
    wrapper, `\\dfrac`/`\\tfrac` -> `\\frac`, no trailing period, no leading '+'."""
    s = str(value).strip()
    for noise in _LATEX_NOISE:
        s = s.replace(noise, " ")
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace(r"\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    for left, right in ((r"\(", r"\)"), (r"\[", r"\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    s = _strip_wrappers(s)
    s = s.rstrip(".")
    return s[1:] if s.startswith("+") else s


def _plain_fraction(s: str) -> Fraction | None:
    """'16', '-2.5', '.5', '1e3', '1,000' -> Fraction; anything else -> None."""
    s = s[1:] if s.startswith("+") else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.match(s):
        return None
    try:
        return Fraction(s)
    except ValueError:  # e.g. more digits than int() converts (sys.get_int_max_str_digits)
        return None


def _to_fraction(s: str) -> Fraction | None:
    """A normalised answer as an exact number: plain numbers, `\\frac{a}{b}`, `\\frac12`, `a/b`; else None."""
    frac = _FRAC.match(s) or _FRAC_SHORT.match(s)
    if frac:
        sign, num, den = frac.group(1), _plain_fraction(frac.group(2)), _plain_fraction(frac.group(3))
    elif s.count("/") == 1:
        numerator, denominator = s.split("/")
        sign, num, den = "", _plain_fraction(numerator), _plain_fraction(denominator)
    else:
        return _plain_fraction(s)
    if num is None or den is None or den == 0:
        return None
    return -num / den if sign else num / den


def _exact_match(pred: str, ref: str) -> bool:
    """The exact checks: equal as fractions.Fraction when both are plain numbers (thousands separators,
    decimals, `a/b`, `\\frac{a}{b}`), else equal as normalised strings, case-insensitively."""
    pred_num, ref_num = _to_fraction(pred), _to_fraction(ref)
    if pred_num is not None and ref_num is not None:
        return pred_num == ref_num
    return pred.lower() == ref.lower()


VERIFY_TIMEOUT_S = 5
"""Seconds math-verify may spend parsing one answer or comparing one pair (its own default); past it the pair does
not match. An int: math-verify's timeout is signal.alarm, which counts whole seconds."""

_WORDS = re.compile(r"[^\W\d_]{2,}")  # "Paris", "NewYork" (normalised): text, not a product of symbols
_BARE_PERCENT = re.compile(r"(?<!\\)%")
_MATH_DELIMITERS = ("$", r"\(", r"\[", r"\boxed")


def _as_latex(answer: str) -> str:
    """An answer math-verify's LaTeX extraction reads: inside `$...$` unless it carries its own delimiters
    (bare `\\{1,2\\}` or `(1,2]` are not found outside math mode), with a bare '%' escaped: in LaTeX it starts
    a comment, so `$12.5%$` would lose its closing '$'."""
    if any(mark in answer for mark in _MATH_DELIMITERS):
        return answer
    return "$" + _BARE_PERCENT.sub(r"\\%", answer) + "$"


def _math_verify_match(reference: str, predicted: str, timeout_s: int | None) -> bool:
    """math_verify.verify(parse(reference), parse(predicted)); False when either side does not parse, or a
    parse or comparison takes more than timeout_s seconds (math-verify's signal.alarm timeout: main thread only;
    None turns it off). math-verify returns [] / False for its own errors; anything that still escapes is False."""
    from math_verify import parse, verify  # imported here: sympy takes a second, and only the checker needs it

    try:
        gold = parse(_as_latex(reference), parsing_timeout=timeout_s)
        guess = parse(_as_latex(predicted), parsing_timeout=timeout_s)
        return bool(gold and guess and verify(gold, guess, timeout_seconds=timeout_s))
    except Exception:  # sympy can raise on exotic input (RecursionError on deep nesting, among others)
        return False


def verifier_main() -> None:
    """The verification child (`python -c "from llmalign.rewards import verifier_main; verifier_main()"`): reads
    JSON lines [reference, predicted, timeout_s] on stdin and writes one JSON line true/false each, running
    math-verify on its own main thread, where its signal timeouts work. Ends when stdin closes."""
    from math_verify import parse  # noqa: F401  (imported before "ready": the parent's per-pair wait excludes it)

    protocol, sys.stdout = sys.stdout, sys.stderr  # a library's print cannot corrupt the answers on stdout
    protocol.write('"ready"\n')
    protocol.flush()
    for line in sys.stdin:
        reference, predicted, timeout_s = json.loads(line)
        protocol.write(json.dumps(_math_verify_match(reference, predicted, timeout_s)) + "\n")
        protocol.flush()


_VERIFIER_START_S = 120.0  # the child imports sympy and math-verify; slow on a busy CPU
_verifier_lock = threading.Lock()
_verifier: list = []  # [Popen, bytes read but not yet consumed] of this process's verification child, once started


def _child_wait_s(timeout_s: int) -> float:
    """How long the parent waits for one pair: two parses and a comparison, each bounded by timeout_s, plus 1 s."""
    return 3 * timeout_s + 1.0


def _read_line(process: subprocess.Popen, pending: list, seconds: float) -> Any:
    """The next JSON line of the child's stdout, or None when none is complete within `seconds` (or it closed)."""
    deadline = time.monotonic() + seconds
    fd = process.stdout.fileno()
    while b"\n" not in pending[0]:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:  # the child exited
            return None
        pending[0] += chunk
    line, pending[0] = pending[0].split(b"\n", 1)
    return json.loads(line)


def _stop_verifier() -> None:
    if _verifier:
        _verifier[0].kill()
        _verifier[0].wait()
        _verifier.clear()


def _verify_in_child(reference: str, predicted: str, timeout_s: int) -> bool:
    """_math_verify_match in a long-lived child process, for callers off the main thread (a reward under
    reward.timeout_s runs in a deadline thread, where signal.alarm is refused). The child runs math-verify's
    signal timeouts on its own main thread; should a pair still not come back within 3 timeouts (two parses and
    a comparison) plus a second, e.g. stuck in C code that no signal interrupts, the child is killed, the pair
    does not match, and the next pair starts a new child. A plain subprocess, not multiprocessing: a daemonic
    multiprocessing worker may not start multiprocessing children, but may start this one."""
    with _verifier_lock:  # one pair at a time through the one pipe
        if not _verifier or _verifier[0].poll() is not None:
            package_root = str(Path(__file__).resolve().parent.parent)  # so the child imports this llmalign
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            }
            process = subprocess.Popen(
                [sys.executable, "-c", "from llmalign.rewards import verifier_main; verifier_main()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            _verifier[:] = [process, [b""]]
            if _read_line(process, _verifier[1], _VERIFIER_START_S) != "ready":
                _stop_verifier()
                raise RuntimeError(f"the answer-verification process did not start within {_VERIFIER_START_S:g} s")
        process, pending = _verifier
        try:
            process.stdin.write((json.dumps([reference, predicted, timeout_s]) + "\n").encode())
            process.stdin.flush()
            verdict = _read_line(process, pending, _child_wait_s(timeout_s))
        except (BrokenPipeError, OSError, ValueError):  # the child died (e.g. out of memory)
            verdict = None
        if verdict is None:
            _stop_verifier()
            return False
        return bool(verdict)


def _verify(reference: str, predicted: str, timeout_s: int | None) -> bool:
    """_math_verify_match with a timeout wherever it is called: math-verify's own on the main thread (also a
    multiprocessing worker's); off it, in the verification child."""
    if timeout_s is None or threading.current_thread() is threading.main_thread():
        return _math_verify_match(reference, predicted, timeout_s)
    return _verify_in_child(reference, predicted, timeout_s)


def answers_match(predicted: str | None, reference: Any, timeout_s: int | None = None) -> bool:
    """Whether a predicted answer equals the reference (int, float or str).

    1. Both sides normalised (spacing, `$...$`, trailing '.', leading '+', `\\boxed{}`/`\\text{}` wrappers):
       equal exact numbers ("0.5" == "1/2" == "\\frac{1}{2}", "16" == "16.0") or equal strings ignoring case
       match without further work.
    2. Otherwise math-verify decides (`math_verify.verify(parse(reference), parse(predicted))`, each side read
       as LaTeX: `$...$` added when it has no delimiters): sets in any order (`\\{1,2\\}` == `\\{2,1\\}`),
       intervals, `50\\%` == 0.5, `\\sqrt{8}` == `2\\sqrt{2}`, `5\\text{ cm}` == 5, decimals rounded to 6
       places. A side that is only words ("Paris", "New York") is not handed to it: math-verify would read
       letters as a product of symbols, so "Sirap" would equal "Paris".
    timeout_s: seconds per math-verify parse or comparison, past which the pair does not match (None: the
    module's VERIFY_TIMEOUT_S). None never matches.
    """
    if predicted is None or reference is None:
        return False
    pred, ref = _normalise(predicted), _normalise(reference)
    if _exact_match(pred, ref):
        return True
    if not pred or not ref or _WORDS.fullmatch(pred) or _WORDS.fullmatch(ref):
        return False
    return _verify(str(reference), str(predicted), VERIFY_TIMEOUT_S if timeout_s is None else timeout_s)


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the rewards
# ----------------------------------------------------------------------------------------------


def _column(kwargs: dict, name: str, n: int, reward: str, hint: str) -> list:
    """kwargs[name] as a list of length n, with an error naming the reward and the fix otherwise."""
    values = kwargs.get(name)
    if values is None:
        given = sorted(k for k, v in kwargs.items() if v is not None) or "no keyword arguments"
        raise ValueError(f"reward '{reward}' needs the keyword argument '{name}' ({hint}); got only {given}")
    if isinstance(values, (str, bytes)):
        raise ValueError(
            f"reward '{reward}': '{name}' must be a list with one entry per completion, got the string {values!r}"
        )
    values = list(values)
    if len(values) != n:
        raise ValueError(
            f"reward '{reward}': '{name}' has {len(values)} entries for {n} completions; "
            "pass one per completion (repeat a prompt's value for each of its completions)"
        )
    return values


def _answers(kwargs: dict, n: int, reward: str) -> list:
    return _column(
        kwargs,
        "answer",
        n,
        reward,
        "the reference answers; the data needs an 'answer' column with one reference per prompt",
    )


def _token_lengths(kwargs: dict, n: int, reward: str) -> list[int]:
    ids = _column(
        kwargs,
        "completion_ids",
        n,
        reward,
        "token ids of each completion, which the trainer passes; pass completion_ids=[...] when calling it by hand",
    )
    return [len(x) for x in ids]


def _max_length(max_length: int | None, kwargs: dict, reward: str) -> int:
    """The length budget L_max: the factory's max_length, else the trainer's max_completion_length."""
    value = max_length if max_length is not None else kwargs.get("max_completion_length")
    if value is None:
        raise ValueError(
            f"reward '{reward}' needs L_max: give the factory max_length=..., or pass "
            "max_completion_length=... (the trainer does)"
        )
    if value <= 0:
        raise ValueError(
            f"reward '{reward}': L_max must be positive, got {value}; set max_length or max_completion_length > 0"
        )
    return value


def _correct(completions: list[str], answers: list) -> list[bool | None]:
    """Per completion: True/False, or None where the reference answer is None (reward does not apply)."""
    return [None if a is None else answers_match(extract_answer(c), a) for c, a in zip(completions, answers)]


def _factory(fn: Callable) -> Callable:
    """Mark a factory so build_reward always calls it, with the config's reward.kwargs (even none: a factory with
    required arguments then fails naming them, instead of passing for a reward)."""
    fn.is_reward_factory = True
    return fn


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


def accuracy_reward(
    prompts: list[str], completions: list[str], answer: list | None = None, **kwargs
) -> list[float | None]:
    """r = 1.0 if answers_match(extract_answer(completion), answer) else 0.0; None where answer is None.
    Needs the data column `answer` (one reference per completion)."""
    answers = _answers({**kwargs, "answer": answer}, len(completions), "accuracy")
    return [None if ok is None else float(ok) for ok in _correct(completions, answers)]


_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """r = 1.0 if the completion is exactly `<think>...</think>`, optional whitespace, then
    `<answer>...</answer>` (whitespace allowed around, newlines allowed inside, each tag exactly
    once, nothing else), else 0.0."""
    # the counts first: with each tag once the regex has one way to match, linear; with many, it retried its tail
    # after every '</think>' (quadratic)
    return [float(all(c.count(tag) == 1 for tag in _FORMAT_TAGS) and bool(_FORMAT.fullmatch(c))) for c in completions]


@_factory
def make_cosine_length_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_length: int | None = None,
) -> TextRewardFn:
    """open-rs cosine-scaled reward, with lengths in tokens (from `completion_ids`):

        R = v_min + 0.5 (v_max - v_min)(1 + cos(pi L / L_max)),  L clamped to L_max,

    correct: (v_min, v_max) = (min_value_correct, max_value_correct): shorter correct scores more;
    wrong: (v_min, v_max) = (max_value_wrong, min_value_wrong): longer wrong scores more (less negative).
    L_max = max_length, else the trainer's max_completion_length. Needs `answer`; None where it is None."""
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive or None (use max_completion_length), got {max_length}")

    def cosine_length(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        n = len(completions)
        l_max = _max_length(max_length, kwargs, "cosine_length")
        lengths = _token_lengths(kwargs, n, "cosine_length")
        scores = []
        for ok, length in zip(_correct(completions, _answers(kwargs, n, "cosine_length")), lengths):
            if ok is None:
                scores.append(None)
                continue
            v_min, v_max = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
            progress = min(length, l_max) / l_max
            scores.append(v_min + 0.5 * (v_max - v_min) * (1.0 + math.cos(math.pi * progress)))
        return scores

    return cosine_length


@_factory
def make_soft_overlong_reward(max_length: int | None = None, cache_length: int | None = None) -> TextRewardFn:
    """DAPO's soft overlong punishment (lengths in tokens, from `completion_ids`):

        r = 0                               if L <= L_max - L_cache
        r = (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max   (0 down to -1)
        r = -1                              if L > L_max

    L_max = max_length, else the trainer's max_completion_length. L_cache = cache_length, in
    (0, L_max]; default round(0.2 * L_max) (DAPO: 4096 of 20480)."""
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be positive or None (use max_completion_length), got {max_length}")

    def cache_for(l_max: int) -> int:
        cache = cache_length if cache_length is not None else max(1, round(0.2 * l_max))
        if not 0 < cache <= l_max:
            raise ValueError(
                f"soft_overlong: cache_length must be in (0, L_max = {l_max}], got {cache}; "
                "it is the soft zone at the end of the budget (DAPO uses 4096 of 20480)"
            )
        return cache

    if max_length is not None:
        cache_for(max_length)  # fail at build time when L_max is known

    def soft_overlong(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        l_max = _max_length(max_length, kwargs, "soft_overlong")
        cache = cache_for(l_max)
        lengths = _token_lengths(kwargs, len(completions), "soft_overlong")
        return [
            0.0 if length <= l_max - cache else (l_max - cache - length) / cache if length <= l_max else -1.0
            for length in lengths
        ]

    return soft_overlong


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # no overflow for very negative z
    return e / (1.0 + e)


@_factory
def make_grpo_lambda_reward(fraction: float = 0.5, alpha: float = 0.5) -> TextRewardFn:
    """GRPO-lambda: length penalty only for the groups that already solve the prompt best.

    Groups are consecutive blocks of `group_size`. Each group's correctness ratio is the fraction of
    its members that are correct (members whose answer is None are left out and score None; a group
    with no reference ranks last). Groups are ranked by ratio, highest first, ties by lower group index;
    the top k = ceil(fraction * num_groups) get (rounding up, so any fraction > 0 penalises at least
    one group; a 1e-9 slack keeps 0.7 * 10 at 7, not 8)

        r = 1 - alpha * sigmoid((L - mean L_c) / std L_c) if correct, 0 if wrong,

    with mean and population std of the token lengths of that group's correct members (z = 0 when
    std = 0, e.g. a single correct member scores 1 - alpha / 2). The other groups get r = 1 / 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"grpo_lambda: fraction must be in [0, 1] (the share of groups to length-penalise), got {fraction}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"grpo_lambda: alpha must be in [0, 1] (the penalty's scale), got {alpha}")

    def grpo_lambda(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        n = len(completions)
        group_size = kwargs.get("group_size")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"reward 'grpo_lambda' needs group_size (a positive int, completions per prompt), "
                f"got {group_size!r}; the trainer passes it"
            )
        if n % group_size:
            raise ValueError(
                f"grpo_lambda: {n} completions is not a multiple of group_size {group_size}; "
                "pass whole groups (completions of one prompt are consecutive)"
            )
        correct = _correct(completions, _answers(kwargs, n, "grpo_lambda"))
        lengths = _token_lengths(kwargs, n, "grpo_lambda")
        num_groups = n // group_size
        groups = [range(g * group_size, (g + 1) * group_size) for g in range(num_groups)]

        def ratio(g: int) -> float:
            judged = [correct[i] for i in groups[g] if correct[i] is not None]
            return sum(judged) / len(judged) if judged else -1.0

        top = set(sorted(range(num_groups), key=lambda g: (-ratio(g), g))[: math.ceil(fraction * num_groups - 1e-9)])
        scores: list[float | None] = [None if ok is None else float(ok) for ok in correct]
        for g in top:
            good = [lengths[i] for i in groups[g] if correct[i]]
            if not good:
                continue  # nothing correct: all 0 either way
            mean = sum(good) / len(good)
            std = math.sqrt(sum((x - mean) ** 2 for x in good) / len(good))  # population std
            for i in groups[g]:
                if correct[i]:
                    z = (lengths[i] - mean) / std if std > 0 else 0.0
                    scores[i] = 1.0 - alpha * _sigmoid(z)
        return scores

    return grpo_lambda


_SCHEDULES = ("exponential", "linear")


def length_budget(
    step: int,
    initial_budget: float,
    min_budget: float,
    schedule: str = "exponential",
    decay: float = 0.9,
    period: int = 10,
    total_steps: int | None = None,
) -> float:
    """The token budget B at training step `step` (0-based):

    exponential: B = max(min_budget, initial_budget * decay ** floor(step / period))
    linear:      B = initial_budget - (initial_budget - min_budget) * min(step / total_steps, 1)"""
    if schedule == "exponential":
        return max(float(min_budget), initial_budget * decay ** (step // period))
    if schedule == "linear":
        if not total_steps or total_steps <= 0:
            raise ValueError(
                f"length_budget: schedule 'linear' needs total_steps > 0 (steps to reach min_budget), "
                f"got {total_steps!r}"
            )
        return initial_budget - (initial_budget - min_budget) * min(step / total_steps, 1.0)
    raise ValueError(f"length_budget: schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")


@_factory
def make_length_budget_reward(
    initial_budget: float,
    min_budget: float,
    schedule: str = "exponential",
    decay: float = 0.9,
    period: int = 10,
    total_steps: int | None = None,
) -> TextRewardFn:
    """Length curriculum ("Train Long, Think Short"): r = 1.0 if the completion is correct and its
    token length L <= B(step), else 0.0 (a correct answer over budget earns 0, and a short wrong one
    earns nothing either). B(step) is `length_budget`; the returned function's `.budget(step)`
    gives it for logging. Needs `answer`, `completion_ids` and `step`; None where answer is None."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"length_budget: schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")
    if not 0 < min_budget <= initial_budget:
        raise ValueError(
            f"length_budget: need 0 < min_budget <= initial_budget, got min_budget={min_budget}, "
            f"initial_budget={initial_budget}"
        )
    if schedule == "exponential" and not 0 < decay <= 1:
        raise ValueError(f"length_budget: decay must be in (0, 1], got {decay}")
    if schedule == "exponential" and (not isinstance(period, int) or period < 1):
        raise ValueError(f"length_budget: period must be a positive int (steps between decays), got {period!r}")
    params = dict(
        initial_budget=initial_budget,
        min_budget=min_budget,
        schedule=schedule,
        decay=decay,
        period=period,
        total_steps=total_steps,
    )
    length_budget(0, **params)  # linear without total_steps fails here, at build time

    def budget(step: int) -> float:
        return length_budget(step, **params)

    def length_budget_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        step = kwargs.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(
                f"reward 'length_budget' needs step (the 0-based training iteration), got {step!r}; "
                "the trainer passes it"
            )
        n = len(completions)
        limit = budget(step)
        lengths = _token_lengths(kwargs, n, "length_budget")
        correct = _correct(completions, _answers(kwargs, n, "length_budget"))
        return [None if ok is None else float(ok and length <= limit) for ok, length in zip(correct, lengths)]

    length_budget_reward.__name__ = "length_budget"
    length_budget_reward.budget = budget
    return length_budget_reward


@_factory
def make_level_length_reward(
    targets: dict[str, float], alpha: float = 1.0, max_length: int | None = None
) -> TextRewardFn:
    """Length by level (TLDR: Zhang et al. 2025, "Making Small Language Models Efficient Reasoners: Intervention,
    Supervision, Reinforcement", arXiv:2505.07961): each prompt carries a level (its `level` column, also written
    in the prompt so the policy can read it), and a completion of token length L is scored

        r = 1[correct] - alpha * |L - T_level| / L_max

    with T_level = targets[level] and L_max the completion budget. Correctness dominates (with alpha <= 1 a correct
    completion never scores below a wrong one), and within each, the length nearest the level's target wins.

    What was not checked: only the paper's abstract was at hand here (a GRPO-based, length-regularised method with
    multi-level control, e.g. short, medium and long reasoning); its exact penalty and the levels' lengths could not
    be read. This form (a distance to a per-level target, as L1's LCPO reward, Aggarwal and Welleck 2025,
    arXiv:2503.04697, here over L_max instead of per token) is our choice: it orders the levels by construction, where a penalty only above a budget
    leaves the longest level unshaped. Needs `answer`, `level` and `completion_ids`; None where answer is None."""
    if not isinstance(targets, dict) or not targets:
        raise ValueError("level_length: targets must map each level to its target length in tokens, e.g. {short: 35}")
    for level, target in targets.items():
        if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
            raise ValueError(f"level_length: targets[{level!r}] must be a positive number of tokens, got {target!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise ValueError(f"level_length: alpha must be a number >= 0, got {alpha!r}")

    def level_length_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
        n = len(completions)
        limit = _max_length(max_length, kwargs, "level_length")
        lengths = _token_lengths(kwargs, n, "level_length")
        levels = _column(
            kwargs, "level", n, "level_length", "the data needs a 'level' column naming each prompt's level"
        )
        unknown = sorted({str(level) for level in levels if level not in targets})
        if unknown:
            raise ValueError(
                f"reward 'level_length': level(s) {unknown} have no target; reward.kwargs.level_length.targets "
                f"gives {sorted(targets)}"
            )
        correct = _correct(completions, _answers(kwargs, n, "level_length"))
        return [
            None if ok is None else float(ok) - alpha * abs(length - targets[level]) / limit
            for ok, length, level in zip(correct, lengths, levels)
        ]

    level_length_reward.__name__ = "level_length"
    return level_length_reward


@_factory
def make_pairwise_win_rate_reward(
    comparator: str | Callable,
    comparator_kwargs: dict | None = None,
    pairing: str = "unordered",
    failed_pair: str = "drop",
    max_workers: int = 1,
) -> TextRewardFn:
    """A GROUPWISE reward fn(prompt, completions, **columns) -> each completion's win rate against the others of
    its group under a pairwise comparator fn(prompt, a, b) -> P(a > b) in [0, 1] or None (no answer): Pref-GRPO's
    reward (arXiv:2508.20751), the same wrapper as flowalign's images (shared.pairwise.win_rate_scorer, where
    pairing, failed_pair and max_workers are described). `comparator` is the callable or its import path, built
    with `comparator_kwargs`."""
    from shared.pairwise import win_rate_scorer  # torch: only when building
    from shared.reward_calls import groupwise

    score = win_rate_scorer(comparator, comparator_kwargs, pairing, failed_pair, max_workers)

    @groupwise
    def pairwise_win_rate_reward(prompt, completions: list[str], **kwargs) -> list[float | None]:
        return score(prompt, completions)

    return pairwise_win_rate_reward


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

BUILTIN_REWARDS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "cosine_length": make_cosine_length_reward,
    "soft_overlong": make_soft_overlong_reward,
    "grpo_lambda": make_grpo_lambda_reward,
    "length_budget": make_length_budget_reward,
    "level_length": make_level_length_reward,
}


def build_reward(name_or_import_path: str, kwargs: dict | None = None) -> TextRewardFn:
    """A reward function from a config entry: a BUILTIN_REWARDS name, or the import path 'module:name' of a user
    reward, built by the factory rule both front ends share (shared.reward_calls.build_callable): called with
    `kwargs` (the config's reward.kwargs entry) when there are any, when marked `is_reward_factory = True` (our
    make_*), or when all its parameters have defaults; the result must accept (prompts, completions), and may
    require data columns (`answer`) by keyword. RewardError
    naming the reward when any of that fails (flowalign's load_reward words it the same)."""
    from shared.reward_calls import RewardError, build_callable, import_reward  # torch: only when building

    name = name_or_import_path
    if name in BUILTIN_REWARDS:
        obj = BUILTIN_REWARDS[name]
    elif ":" in name:
        obj = import_reward(name)
    else:
        raise RewardError(
            f"unknown reward {name!r}; builtins are {sorted(BUILTIN_REWARDS)}, or give a user reward "
            "as an import path 'module:name'"
        )
    return build_callable(name, obj, kwargs, accepts=("prompts", "completions"), keyword_columns=True)
