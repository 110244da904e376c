"""Prompt sources for flow training: an OCR prompt generator and prompts read from a dataset.

    python -m flowalign.prompts ocr --n 1000 --out ocr_train.txt               # data.prompts_file
    python -m flowalign.prompts ocr --split eval --n 64 --out ocr_eval.txt     # data.eval_prompts_file

OCR prompts (for `flowalign.rewards.ocr:ocr_reward`) are a template times a word, the word in double quotes:
'a neon sign that says "harbor"'. Some words (EVAL_WORDS) and templates (EVAL_TEMPLATES) never appear in
training prompts: the eval split is every (template, word) pair that uses at least one of them, so evaluation
measures text the policy was never rewarded for.

`dataset_prompts` reads one column of one split with `datasets.load_dataset` (data.prompts_dataset); a
missing column or split is a ConfigError naming those that exist.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from shared.config import ConfigError, exit_on_config_error

TRAIN_TEMPLATES = [
    'a sign that says "{}"',
    'a neon sign that says "{}"',
    'a wooden sign with the word "{}" carved into it',
    'a storefront with "{}" written above the door',
    'a chalkboard with "{}" written on it',
    'a coffee mug with the word "{}" printed on it',
    'a t-shirt with "{}" printed across the chest',
    'a street sign reading "{}"',
    'a book cover titled "{}"',
    'a poster with the word "{}" in large letters',
    'a birthday cake with "{}" written in icing',
    'a license plate that reads "{}"',
    'graffiti on a brick wall spelling "{}"',
    'a banner that says "{}" hanging across a street',
    'a road sign with the word "{}"',
    'a handwritten note that says "{}"',
]

EVAL_TEMPLATES = [
    'a movie poster with the title "{}"',
    'a glowing billboard that says "{}" at night',
    'a paper bag with "{}" stamped on it',
    'a sandy beach with "{}" written in the sand',
]

TRAIN_WORDS = """
apple river garden window planet coffee market silver yellow orange bridge forest castle rocket winter summer
autumn spring candle mirror pencil ticket harbor island jungle meadow valley canyon desert ocean thunder shadow
lantern anchor bottle butter cookie donut pizza noodle pepper tomato banana cherry lemon melon mango peach
tiger zebra panda rabbit turtle dragon falcon parrot dolphin whale spider beetle monkey donkey kitten puppy
hello welcome thanks sorry please open closed sale exit enter stop danger quiet relax dream smile happy lucky
magic music dance party story poem letter number signal engine motor wheel ladder hammer basket pillow blanket
jacket pocket button zipper velvet cotton marble copper bronze golden crystal diamond pearl ruby emerald
sunset sunrise rainbow comet galaxy orbit moon star cloud storm breeze frost snow ice fire water stone
""".split()

EVAL_WORDS = """
lighthouse saturn mosaic walnut penguin violin cactus glacier pretzel compass teapot kayak origami raccoon
tulip volcano waffle meteor bamboo harvest
""".split()


def ocr_prompts(split: str = "train") -> list[str]:
    """Every distinct OCR prompt of `split`, in a fixed order: train = TRAIN_TEMPLATES x TRAIN_WORDS;
    eval = every (template, word) pair with a held-out template or a held-out word."""
    if split == "train":
        return [template.format(word) for template in TRAIN_TEMPLATES for word in TRAIN_WORDS]
    if split == "eval":
        return [
            template.format(word)
            for template in TRAIN_TEMPLATES + EVAL_TEMPLATES
            for word in TRAIN_WORDS + EVAL_WORDS
            if template in EVAL_TEMPLATES or word in EVAL_WORDS
        ]
    raise ValueError(f"unknown split {split!r}; choose train or eval")


def sample_ocr_prompts(count: int, split: str = "train", seed: int = 0) -> list[str]:
    """`count` distinct prompts of `split`, drawn without replacement by `seed`."""
    pool = ocr_prompts(split)
    if not 1 <= count <= len(pool):
        raise ConfigError(f"--n {count}: the {split} split has {len(pool)} distinct prompts; ask for 1 to {len(pool)}")
    return random.Random(seed).sample(pool, count)


def dataset_prompts(source: str, split: str, column: str, split_field: str = "data.prompts_split") -> list[str]:
    """The text of `column` in `split` of the dataset `source` (hub id, directory of data files, or one
    .parquet/.json/.jsonl/.csv file), read with datasets.load_dataset. Problems are ConfigErrors naming the
    config field to fix: data.prompts_dataset, `split_field`, or data.prompts_column."""
    import datasets  # imported here: it takes a second, and only dataset users need it

    field = "config field 'data.prompts_dataset'"
    path = Path(source)
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or path.suffix.lower() in builders
    if looks_local and not path.exists():  # a hub id is 'name' or 'org/name': this is a path, so do not ask the hub
        raise ConfigError(
            f"{field}: {source}: no such file or directory; give a data file, a directory of them, "
            f"or a hub id such as org/name"
        )
    if path.is_file() and path.suffix.lower() not in builders:
        raise ConfigError(
            f"{field}: {source} has suffix {path.suffix!r}; give a {'/'.join(builders)} file, "
            f"a directory of them, or a hub id"
        )
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a refusal stays one line on stderr
    try:
        if path.is_file():  # one data file: datasets calls its only split 'train'
            loaded = datasets.load_dataset(builders[path.suffix.lower()], data_files=str(path))
        else:
            loaded = datasets.load_dataset(source)
    except Exception as error:  # missing path, no network for a hub id, a damaged file: many exception types
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise ConfigError(
            f"{field}: {source} could not be loaded with datasets.load_dataset ({reason}); give a "
            f"hub id, a directory of data files, or a data file"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if split not in loaded:
        raise ConfigError(
            f"config field '{split_field}': {source} has no split {split!r}; its splits are {sorted(loaded)}"
        )
    table = loaded[split]
    if column not in table.column_names:
        raise ConfigError(
            f"config field 'data.prompts_column': split {split!r} of {source} has no column "
            f"{column!r}; its columns are {table.column_names}"
        )
    prompts = table[column]
    if not prompts:
        raise ConfigError(
            f"config field '{split_field}': split {split!r} of {source} has no rows; choose a split with prompts"
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            got = "an empty prompt" if isinstance(prompt, str) else f"a {type(prompt).__name__}, not text,"
            raise ConfigError(
                f"{field}: row {index} of split {split!r} of {source} has {got} in column "
                f"{column!r}; give every row a non-empty text prompt or drop the row"
            )
    return [prompt.strip() for prompt in prompts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ocr = commands.add_parser("ocr", help="prompts with a quoted word for the OCR reward, one per line")
    ocr.add_argument("--n", type=int, default=1000, help="number of distinct prompts (default 1000)")
    ocr.add_argument(
        "--split",
        choices=["train", "eval"],
        default="train",
        help="train: training words and templates only; eval: pairs with a held-out word or template",
    )
    ocr.add_argument("--seed", type=int, default=0, help="which prompts are drawn, and their order")
    ocr.add_argument("--out", help="write to this file (default: standard output)")
    args = parser.parse_args(argv)
    try:
        prompts = sample_ocr_prompts(args.n, args.split, args.seed)
    except ConfigError as error:
        exit_on_config_error(error)
    text = "".join(prompt + "\n" for prompt in prompts)
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
