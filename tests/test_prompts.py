"""Prompt sources: the OCR prompt generator (held-out words and templates) and flow prompts read from a
dataset through datasets.load_dataset on local files (column and split mapping, refusals with exit 2)."""

import json
import re

import pytest

from flowalign import prompts as p
from flowalign.config import FlowGRPOConfig
from flowalign.rewards.ocr import quoted_text
from flowalign.cli import flow_grpo_main as train_main
from flowalign.data import read_prompts
from shared.config import ConfigError, load_config


def template_of(prompt: str) -> str:
    return re.sub(r'"[^"]*"', '"{}"', prompt, count=1)


def test_ocr_generator_draws_training_words_and_templates_only(tmp_path):
    out = tmp_path / "ocr_train.txt"
    p.main(["ocr", "--n", "1000", "--out", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 and len(set(lines)) == 1000
    assert {quoted_text(line) for line in lines} <= set(p.TRAIN_WORDS)  # the reward's target is the word
    assert {template_of(line) for line in lines} <= set(p.TRAIN_TEMPLATES)
    p.main(["ocr", "--n", "1000", "--out", str(tmp_path / "again.txt")])
    assert (tmp_path / "again.txt").read_text(encoding="utf-8").splitlines() == lines  # same seed, same prompts
    assert p.sample_ocr_prompts(1000, seed=1) != lines


def test_ocr_eval_split_holds_every_pair_with_a_held_out_word_or_template():
    assert not set(p.TRAIN_WORDS) & set(p.EVAL_WORDS) and not set(p.TRAIN_TEMPLATES) & set(p.EVAL_TEMPLATES)
    train, evaluation = set(p.ocr_prompts("train")), set(p.ocr_prompts("eval"))
    assert len(train) == len(p.TRAIN_TEMPLATES) * len(p.TRAIN_WORDS)
    assert not train & evaluation
    every_pair = {t.format(w) for t in p.TRAIN_TEMPLATES + p.EVAL_TEMPLATES for w in p.TRAIN_WORDS + p.EVAL_WORDS}
    assert train | evaluation == every_pair
    for prompt in evaluation:
        assert quoted_text(prompt) in p.EVAL_WORDS or template_of(prompt) in p.EVAL_TEMPLATES


def test_ocr_generator_refuses_more_prompts_than_exist(capsys):
    with pytest.raises(SystemExit) as info:
        p.main(["ocr", "--split", "eval", "--n", "5000"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"config error: --n 5000: the eval split has {len(p.ocr_prompts('eval'))} distinct prompts; ask for 1 to "
        f"{len(p.ocr_prompts('eval'))}"
    ]


def config_with(*overrides: str) -> FlowGRPOConfig:
    return load_config(FlowGRPOConfig, None, list(overrides))


def test_prompts_from_a_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "caption": ['a sign that says "one"', " two ", "three"]}), path)
    config = config_with(f"data.prompts_dataset={path}", "data.prompts_column=caption")
    assert read_prompts(config) == (['a sign that says "one"', "two", "three"],) * 2  # eval: the training prompts


def test_train_and_eval_splits_from_a_directory_of_json_files(tmp_path):
    for split, texts in (("train", ["apple", "river"]), ("test", ["comet"])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "n": 0}) + "\n" for t in texts))
    config = config_with(f"data.prompts_dataset={tmp_path}", "data.prompts_column=text", "data.eval_split=test")
    assert read_prompts(config) == (["apple", "river"], ["comet"])


def test_eval_prompts_file(tmp_path):
    (tmp_path / "eval.txt").write_text("held out one\n\n  held out two \n")
    assert read_prompts(config_with(f"data.eval_prompts_file={tmp_path / 'eval.txt'}"))[1] == [
        "held out one",
        "held out two",
    ]


@pytest.mark.parametrize("case", ["missing_column", "missing_split", "missing_eval_split"])
def test_missing_column_or_split_exits_2_naming_what_exists(case, tmp_path, capsys):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a", "tag": "x"}, {"prompt": "b", "tag": "y"}]))
    overrides, expect = [f"data.prompts_dataset={path}", f"log.output_dir={tmp_path / 'run'}"], None
    if case == "missing_column":
        overrides.append("data.prompts_column=caption")
        expect = (
            f"config field 'data.prompts_column': split 'train' of {path} has no column 'caption'; its columns "
            f"are ['prompt', 'tag']"
        )
    elif case == "missing_split":
        overrides.append("data.prompts_split=validation")
        expect = f"config field 'data.prompts_split': {path} has no split 'validation'; its splits are ['train']"
    else:
        overrides.append("data.eval_split=test")
        expect = f"config field 'data.eval_split': {path} has no split 'test'; its splits are ['train']"
    with pytest.raises(SystemExit) as info:
        train_main(overrides)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"config error: {expect}"]
    assert not (tmp_path / "run").exists()  # refused before the run starts: nothing written


def test_a_missing_local_path_is_refused_without_asking_the_hub(tmp_path):
    missing = tmp_path / "typo.parquet"
    with pytest.raises(ConfigError) as info:
        read_prompts(config_with(f"data.prompts_dataset={missing}"))
    assert str(info.value) == (
        f"config field 'data.prompts_dataset': {missing}: no such file or directory; give a "
        f"data file, a directory of them, or a hub id such as org/name"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.prompts_dataset=x.parquet", "data.prompts_file=p.txt"],
            "config field 'data.prompts_dataset': set together with data.prompts_file; keep one source of training prompts",
        ),
        (
            ["data.eval_split=test"],
            "config field 'data.eval_split': names a split of data.prompts_dataset, which is not set",
        ),
        (
            ["data.eval_prompts_file=e.txt", "data.eval_prompts=[a]"],
            "config field 'data.eval_prompts': set together with data.eval_prompts_file; keep one source of evaluation "
            "prompts",
        ),
    ],
)
def test_conflicting_prompt_sources_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_with(*overrides)
