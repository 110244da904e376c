"""Issue 14's red-team list (item 10): each bad input ends in one line on stderr that names the config field or
flag, and exit code 2: no traceback, nothing half-written, so the corrected command starts cleanly.

At least one case per front end (and per llmalign command family) goes through the real command line in a
subprocess; the others call the entry function the command line runs (`main(argv)`, its SystemExit caught) in
this process, which keeps the file to a few imports of torch instead of one per case.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowalign.cli import flow_grpo_main as flow_main
from llmalign.cli import main as llm_main
from shared.checkpoint import open_output_dir

ROOT = Path(__file__).resolve().parents[1]
FLOW_QUICK = ["train.iterations=0", "data.eval_seeds=1", "sampling.eval_num_steps=2"]
NOT_UTF8 = "r\u00e9glage".encode("latin-1")  # a latin-1 'é' (0xe9) is no UTF-8


def one_line(stderr: str) -> str:
    """The single line a refusal prints (no traceback, no progress bar, nothing else)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def cli(*args: str) -> str:
    """Run a command line (python ARGS) from the repository root; it must exit 2 with one line."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    return one_line(done.stderr)


def refused(main, argv: list[str], capsys) -> str:
    """Call a command line's entry function; it must exit 2 with one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return one_line(capsys.readouterr().err)


def nothing_written(out: Path) -> bool:
    """The refused run left no trace a retry would trip over: no directory at all."""
    return not out.exists()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The embedded default's pipeline directory (what `embedded:digits` resolves to: the shipped build)."""
    from flowalign import toy

    return Path(toy.ensure_digits_pipeline())


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny Qwen2 with its tokenizer and prompt/answer rows, built in a second."""
    from llmalign import toy

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = toy.build_tokenizer()
    toy.build_model(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name, seed, n in (("train.jsonl", 0, 16), ("test.jsonl", 1, 2)):
        rows = [{"prompt": p["prompt"], "answer": p["answer"]} for p in toy.make_split(n, seed)]
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def llm_args(tiny_lm: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={tiny_lm}",
        f"data.train={tiny_lm}/train.jsonl",
        f"data.test={tiny_lm}/test.jsonl",
        "data.eval_size=1",
        "sampling.max_new_tokens=4",
        "train.iterations=0",
        f"log.output_dir={out}",
        *extra,
    ]


# ----------------------------------------------------------------------------- through the real command lines
def test_flow_cli_refuses_flux_on_an_sd3_directory_before_it_loads(digits, tmp_path):
    out = tmp_path / "run"
    line = cli(
        "flowalign/train.py", "model.pipeline=flux", f"model.path={digits}", f"log.output_dir={out}", *FLOW_QUICK
    )
    assert line == (
        f"config error: config field 'model.pipeline': flux, but '{digits}' holds a "
        f"StableDiffusion3Pipeline; set model.pipeline=sd3"
    )
    assert nothing_written(out)


def test_llm_cli_refuses_an_unknown_reward_before_the_model_loads(tmp_path):
    out = tmp_path / "run"
    line = cli(
        "-m", "llmalign", "grpo", "reward.weights={acuracy: 1.0}", "model.path=/no/such/model", f"log.output_dir={out}"
    )  # a model it could not load: the reward is refused first
    assert line.startswith(
        "config error: config field 'reward.weights': unknown reward 'acuracy' (no builtin of "
        "that name, and not an import path 'module:name'); use one of ['accuracy', "
    )
    assert nothing_written(out)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-new-tokens", "0", "argument --max-new-tokens: 0 is below 1"),
        ("--limit", "-1", "argument --limit: -1 is below 1"),  # rows[:-1] used to drop the last row silently
    ],
)
def test_llm_eval_cli_refuses_bad_counts(flag, value, message):
    line = cli(
        "-m", "llmalign", "eval", "--model", "embedded:arith", "--data", "embedded:arith/test.jsonl", flag, value
    )
    assert line == f"llmalign eval: error: {message} (see llmalign eval --help)"


# ------------------------------------------------------------------------------ flow, through flow_main(argv)
@pytest.mark.parametrize(
    "case",
    [
        "yaml_not_utf8",
        "yaml_duplicate_key",
        "prompts_not_utf8",
        "missing_model_path",
        "output_dir_is_a_file",
        "output_dir_empty",
        "output_dir_under_a_file",
        "seed_beyond_2**63",
        "group_size_10**12",
    ],
)
def test_flow_refusals(case, tmp_path, capsys):
    out, afile = tmp_path / "run", tmp_path / "afile"
    afile.write_text("not a directory\n")
    config = tmp_path / "recipe.yaml"
    argv, expect = [f"log.output_dir={out}", *FLOW_QUICK], None
    if case == "yaml_not_utf8":
        config.write_bytes(b"train:\n  seed: 1  # " + NOT_UTF8 + b"\n")
        argv, expect = (
            ["--config", str(config), *argv],
            f"--config {config}: not UTF-8 text (byte 21); save it as UTF-8",
        )
    elif case == "yaml_duplicate_key":
        config.write_text("train:\n  seed: 1\n  group_size: 4\n  seed: 2\n")
        argv, expect = (
            ["--config", str(config), *argv],
            (
                f"--config {config}: not valid YAML (line 4: key 'seed' is given twice (first on line 2); keep one "
                f"(YAML would silently use the last))"
            ),
        )
    elif case == "prompts_not_utf8":
        prompts = tmp_path / "prompts.txt"
        prompts.write_bytes(b"the digit one\nthe digit " + NOT_UTF8 + b"\n")
        argv, expect = (
            [f"data.prompts_file={prompts}", *argv],
            (f"config field 'data.prompts_file': {prompts}: not UTF-8 text (byte 25); save it as UTF-8"),
        )
    elif case == "missing_model_path":
        argv, expect = (
            [f"model.path={tmp_path / 'no_such_pipeline'}", *argv],
            (
                f"config field 'model.path': '{tmp_path / 'no_such_pipeline'}': no such directory; give a model "
                f"directory or a hub id such as org/name"
            ),
        )
    elif case == "output_dir_is_a_file":
        argv, expect = (
            [*argv, f"log.output_dir={afile}"],
            (f"config field 'log.output_dir': '{afile}' is a file, not a directory; choose another path"),
        )
    elif case == "output_dir_under_a_file":
        argv, expect = (
            [*argv, f"log.output_dir={afile}/run"],
            (
                f"config field 'log.output_dir': '{afile}/run' is inside '{afile}', which is a file, not a directory; "
                f"choose another path"
            ),
        )
    elif case == "output_dir_empty":  # Path("") is the current directory: the run would write into the checkout
        argv, expect = (
            [*argv, "log.output_dir="],
            (
                "config field 'log.output_dir': empty; name a directory such as runs/my_run (an empty path would write "
                "into the current directory)"
            ),
        )
    elif case == "seed_beyond_2**63":
        argv, expect = (
            [*argv, f"train.seed={2**63 + 1}"],
            (f"config field 'train.seed': {2**63 + 1} is outside [0, 2**32); use a seed such as 0"),
        )
    elif case == "group_size_10**12":
        argv, expect = (
            [*argv, "train.group_size=1000000000000"],
            (
                "config field 'train.group_size': 1000000000000 samples per prompt x 10 prompts = 10000000000000 per "
                "iteration, over the limit of 2**20; lower it"
            ),
        )
    assert refused(flow_main, argv, capsys) == f"config error: {expect}"
    assert nothing_written(out)


def test_flow_lora_targets_that_match_nothing_are_refused_before_the_weights_load(digits, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        flow_main, [f"model.path={digits}", "model.lora_targets=[to_qq]", f"log.output_dir={out}", *FLOW_QUICK], capsys
    )  # one line: no "Loading pipeline components" bar before it
    assert line.startswith(
        "config error: config field 'model.lora_targets': ['to_qq'] match no module LoRA can "
        "wrap in the transformer (Target modules {'to_qq'} not found"
    )
    assert line.endswith("; list attention projection names such as to_q, to_k, to_v")
    assert nothing_written(out) and open_output_dir(out, resume=False) is None  # a corrected retry starts at 0


# ------------------------------------------------------------------------------ llm, through llm_main(argv)
@pytest.mark.parametrize(
    "case",
    [
        "yaml_not_utf8",
        "yaml_duplicate_key",
        "missing_model_path",
        "output_dir_is_a_file",
        "output_dir_empty",
        "seed_beyond_2**63",
        "group_size_10**12",
        "dpo_seed",
    ],
)
def test_llm_training_refusals(case, tiny_lm, tmp_path, capsys):
    out, afile = tmp_path / "run", tmp_path / "afile"
    afile.write_text("not a directory\n")
    config = tmp_path / "recipe.yaml"
    argv = ["grpo", *llm_args(tiny_lm, out)]
    if case == "yaml_not_utf8":
        config.write_bytes(b"sampling:\n  max_new_tokens: 4  # " + NOT_UTF8 + b"\n")
        argv, expect = (
            [*argv[:1], "--config", str(config), *argv[1:]],
            (f"--config {config}: not UTF-8 text (byte 34); save it as UTF-8"),
        )
    elif case == "yaml_duplicate_key":
        config.write_text("reward:\n  weights: {accuracy: 1.0}\nreward:\n  weights: {format: 1.0}\n")
        argv, expect = (
            [*argv[:1], "--config", str(config), *argv[1:]],
            (
                f"--config {config}: not valid YAML (line 3: key 'reward' is given twice (first on line 1); keep one "
                f"(YAML would silently use the last))"
            ),
        )
    elif case == "missing_model_path":
        argv, expect = (
            [*argv, f"model.path={tmp_path / 'no_such_model'}"],
            (
                f"config field 'model.path': '{tmp_path / 'no_such_model'}': no such directory; give a model directory "
                f"or a hub id such as org/name"
            ),
        )
    elif case == "output_dir_is_a_file":
        argv, expect = (
            [*argv, f"log.output_dir={afile}"],
            (f"config field 'log.output_dir': '{afile}' is a file, not a directory; choose another path"),
        )
    elif case == "output_dir_empty":
        argv, expect = (
            [*argv, "log.output_dir="],
            (
                "config field 'log.output_dir': empty; name a directory such as runs/my_run (an empty path would write "
                "into the current directory)"
            ),
        )
    elif case == "seed_beyond_2**63":
        argv, expect = (
            [*argv, f"train.seed={2**63 + 1}"],
            (f"config field 'train.seed': {2**63 + 1} is outside [0, 2**32); use a seed such as 0"),
        )
    elif case == "group_size_10**12":
        argv, expect = (
            [*argv, "train.group_size=1000000000000"],
            (
                "config field 'train.group_size': 1000000000000 completions per prompt x 8 prompts = 8000000000000 per "
                "iteration, over the limit of 2**20; lower it"
            ),
        )
    elif case == "dpo_seed":
        argv = [
            "dpo",
            f"model.path={tiny_lm}",
            f"data.train={tiny_lm}/train.jsonl",
            f"log.output_dir={out}",
            f"train.seed={2**64}",
        ]
        expect = f"config field 'train.seed': {2**64} is outside [0, 2**32); use a seed such as 0"
    assert refused(llm_main, argv, capsys) == f"config error: {expect}"
    assert nothing_written(out)


def test_llm_lora_targets_that_match_nothing_lose_nothing_and_the_retry_runs(tiny_lm, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(
        llm_main, ["grpo", *llm_args(tiny_lm, out, "model.lora=true", "model.lora_targets=[q_prj]")], capsys
    )  # one line: refused on a weightless copy, before the "Loading weights" bar
    assert line == (
        "config error: config field 'model.lora_targets': ['q_prj']: Target modules {'q_prj'} not found "
        "in the base model. Please check the target modules and try again.; name linear layers such as "
        "q_proj, v_proj"
    )
    assert nothing_written(out)
    llm_main(["grpo", *llm_args(tiny_lm, out, "model.lora=true", "model.lora_targets=[q_proj]")])  # the retry
    assert json.loads((out / "config.json").read_text())["model"]["lora_targets"] == ["q_proj"]


@pytest.mark.parametrize(
    "case",
    ["model_missing", "adapter_missing", "max_new_tokens_0", "limit_-1", "show_not_an_integer", "pairs_seed_2**32"],
)
def test_llm_eval_and_pairs_refusals(case, tiny_lm, tmp_path, capsys):
    data = str(tiny_lm / "test.jsonl")
    missing = tmp_path / "no_such_model"
    argv, expect = {
        "model_missing": (
            ["eval", "--model", str(missing), "--data", data],
            f"config error: --model '{missing}': no such directory; give a model directory or a hub "
            f"id such as org/name",
        ),
        "adapter_missing": (
            [
                "pairs",
                "--model",
                str(tiny_lm),
                "--adapter",
                str(missing),
                "--data",
                data,
                "--out",
                str(tmp_path / "pairs.jsonl"),
            ],
            f"config error: --adapter '{missing}': no such directory; give a model directory or a "
            f"hub id such as org/name",
        ),
        "max_new_tokens_0": (
            ["eval", "--model", str(tiny_lm), "--data", data, "--max-new-tokens", "0"],
            "llmalign eval: error: argument --max-new-tokens: 0 is below 1 (see llmalign eval --help)",
        ),
        "limit_-1": (
            ["eval", "--model", str(tiny_lm), "--data", data, "--limit", "-1"],
            "llmalign eval: error: argument --limit: -1 is below 1 (see llmalign eval --help)",
        ),
        "show_not_an_integer": (
            ["eval", "--model", str(tiny_lm), "--data", data, "--show", "x"],
            "llmalign eval: error: argument --show: invalid integer value: 'x' (see llmalign eval --help)",
        ),
        "pairs_seed_2**32": (
            [
                "pairs",
                "--model",
                str(tiny_lm),
                "--data",
                data,
                "--out",
                str(tmp_path / "pairs.jsonl"),
                "--seed",
                str(2**32),
            ],
            f"llmalign pairs: error: argument --seed: {2**32} is not below {2**32} (see llmalign pairs --help)",
        ),
    }[case]
    assert refused(llm_main, argv, capsys) == expect
    assert not (tmp_path / "pairs.jsonl").exists()


@pytest.mark.parametrize("front_end", ["flow", "llm"])
def test_describe_says_mapping_overrides_replace(front_end, capsys):
    """--describe through each command line (item 9): the mapping fields say an override replaces them whole."""
    flow_main(["--describe"]) if front_end == "flow" else llm_main(["grpo", "--describe"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reward.weights ")]
    assert len(lines) == 1 and "an override replaces the whole mapping (reward.weights={a: 1} keeps a alone" in lines[0]
