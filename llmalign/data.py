"""Prompt datasets for the llmalign trainers: read rows, render chat prompts, tokenize with a length check.

    rows = load_rows("train.jsonl")                               # list of dicts, every column kept
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    ids, truncated = tokenize_prompts(tokenizer, texts, max_length=512, overlong="error")

Accepted data: `.jsonl` (one JSON object per line), `.json` (a list of objects), `.csv` (a header line,
values are strings), `.parquet`, or a directory written by `datasets`' `save_to_disk` (a Dataset, or a
DatasetDict from which one split is taken). All columns are kept, so extra columns (a reference solution,
a difficulty tag) reach the reward functions as metadata.

A recipe's data section reads through `load_train_test`: the files data.train and data.test as above, or, with
data.path set, a hub id or local dataset through `datasets.load_dataset` (its splits data.split and
data.test_split). Either way data.<name>_column names the source column of prompt, answer (and chosen, rejected),
and data.prompt_template / data.system_prompt render plain-text prompts (`format_prompts`).

A prompt is either plain text or chat messages: a list of {"role": str, "content": str} dicts, rendered
with the tokenizer's chat template. In CSV a prompt cell holding a JSON list of objects is read as messages.

Every problem with the data raises `DataError`: one line naming the file, the column or row, and the fix.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMATS = ".jsonl, .json, .csv or .parquet file, or a directory written by datasets' save_to_disk"


class DataError(ValueError):
    """A data problem, one line naming the file/column/row and the fix."""


# ---------------------------------------------------------------------------------------------- reading


def _first_line(error: BaseException) -> str:
    """A library's error text squeezed onto one line, so our message stays one line."""
    return " ".join(str(error).split())[:300] or type(error).__name__


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, as a user would call it in the file."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM left by some editors is not part of the data
    except UnicodeDecodeError as error:
        raise DataError(f"data file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _read_jsonl(path: Path) -> tuple[list[dict], list[int] | None]:
    rows, lines = [], []
    # split on "\n" only: str.splitlines would also split at U+2028, which JSON allows inside strings
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry no row
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"data file {path} line {number} is not valid JSON ({error.msg} at column "
                f"{error.colno}); fix that line: each line must be one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"data file {path} line {number} is {_json_kind(row)}, not a JSON object; "
                f'each line must be one object like {{"prompt": ..., "answer": ...}}'
            )
        rows.append(row)
        lines.append(number)
    return rows, lines


def _read_json(path: Path) -> tuple[list[dict], list[int] | None]:
    text = _read_text(path)
    if not text.strip():
        return [], None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; if it holds one object per line, name it .jsonl" if error.msg == "Extra data" else ""
        raise DataError(
            f"data file {path} is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}){hint}; a .json file must hold one list of objects"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"data file {path} holds {_json_kind(data)}, not a list; a .json file must "
            f'hold a list of objects like [{{"prompt": ..., "answer": ...}}]'
        )
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(
                f"data file {path} item {index} is {_json_kind(row)}, not a JSON object; "
                f"every item of the list must be an object with the columns as keys"
            )
    return data, None


def _messages_from_cell(cell: str) -> str | list:
    """A CSV prompt cell that holds a JSON list of objects is chat messages; anything else stays text."""
    if not cell.lstrip().startswith("["):
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell  # "[1] Compute ..." is an ordinary question that happens to start with a bracket
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return value  # shape checked later with the other formats' messages
    return cell


def _read_csv(path: Path) -> tuple[list[dict], list[int] | None]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted cells may hold line breaks
    rows, lines = [], []
    try:
        header = reader.fieldnames or []
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise DataError(
                f"data file {path} header names column(s) {duplicated} more than once; "
                f"give every column a distinct name"
            )
        for row in reader:
            # DictReader files extra cells under the key None and fills missing cells with None
            if None in row or any(value is None for value in row.values()):
                count = len(header) + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise DataError(
                    f"data file {path} line {reader.line_num} has {count} field(s) but the header has "
                    f"{len(header)}; quote cells that contain commas and give every line all columns"
                )
            if isinstance(row.get("prompt"), str):
                row["prompt"] = _messages_from_cell(row["prompt"])
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise DataError(
            f"data file {path} line {reader.line_num} is not valid CSV ({_first_line(error)}); fix that line"
        ) from None
    return rows, lines


def _read_parquet(path: Path) -> tuple[list[dict], list[int] | None]:
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types (ArrowInvalid, OSError) for a damaged file
        raise DataError(
            f"data file {path} could not be read as parquet ({_first_line(error)}); "
            f"check that it is a complete parquet file"
        ) from None
    return rows, None


def _read_saved_dataset(path: Path, split: str | None) -> tuple[list[dict], list[int] | None]:
    import datasets  # imported here: importing datasets takes a second

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as error:  # FileNotFoundError for a plain folder, others for damaged files
        raise DataError(
            f"data path {path} is a directory but could not be read with datasets.load_from_disk "
            f"({_first_line(error)}); give a {FORMATS}"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in saved:
            asked = "no split was given and there is no 'train' split" if split is None else f"it has no split {name!r}"
            raise DataError(
                f"data path {path} holds splits {sorted(saved)} but {asked}; "
                f"choose the split to train on from {sorted(saved)}"
            )
        saved = saved[name]
    elif split not in (None, "train"):
        raise DataError(
            f"data path {path} holds a single dataset without splits, but split {split!r} was asked; "
            f"leave the split unset"
        )
    return saved.with_format(None).to_list(), None  # with_format(None): plain python rows, whatever was saved


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _to_python(value: Any) -> Any:
    """numpy scalars and arrays (from parquet/datasets) become python numbers and lists, recursively."""
    if isinstance(value, np.ndarray):
        return [_to_python(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------- checks


def _messages_problem(messages: list) -> str | None:
    """Why `messages` is not a list of {"role": str, "content": str} dicts, or None when it is."""
    if not messages:
        return "is an empty list of chat messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f'has chat message {index} of type {type(message).__name__}, not a {{"role", "content"}} object'
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = f"no '{key}'" if key not in message else f"a '{key}' of type {type(message[key]).__name__}"
                return f"has chat message {index} with {got} (a string is needed)"
    return None


def _check_prompt(prompt: Any, row: str) -> None:
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(f"{row} has an empty prompt; give every row a non-empty 'prompt' or drop the row")
    if isinstance(prompt, list):
        problem = _messages_problem(prompt)
        if problem is not None:
            raise DataError(f'{row} {problem}; a chat prompt is a list like [{{"role": "user", "content": "..."}}]')
    elif not isinstance(prompt, str):
        raise DataError(
            f"{row} has a prompt of type {type(prompt).__name__}; a prompt is text or a list of "
            f'chat messages [{{"role": ..., "content": ...}}]'
        )


def _check_columns(label: str, rows: list[dict], names: list[str], required: Sequence[str], csv_file: bool) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every column seen, in first-seen order
    for name in required:
        if name not in columns:
            close = difflib.get_close_matches(name, [str(column) for column in columns], n=1)
            fix = (
                f"did you mean {close[0]!r}? rename it to {name!r}"
                if close
                else f"add the column {name!r} or rename the one that holds it"
            )
            header = " (a CSV file needs a header line naming the columns)" if csv_file and not close else ""
            raise DataError(f"{label} has no column {name!r} (columns: {columns}){header}; {fix}")
        for row, row_name in zip(rows, names):
            if name not in row:
                raise DataError(
                    f"{row_name} has no {name!r} field while other rows do; add it to that row or drop the row"
                )


def load_rows(
    path: str | Path,
    required: Sequence[str] = ("prompt", "answer"),
    split: str | None = None,
    columns: ColumnMap | None = None,
) -> list[dict]:
    """Every row of a dataset as a dict with all its columns, checked so training fails now rather than later.

    path: a .jsonl/.json/.csv/.parquet file or a `save_to_disk` directory (see the module docstring).
    required: columns every row must have; a missing one is reported with a did-you-mean.
    split: for a DatasetDict directory, the split to read ("train" when None); other sources have no
        splits, so only None or "train" is accepted for them.
    columns: target column -> (source column, config field), e.g. {"prompt": ("question", "data.prompt_column")}:
        each row gets the target holding the source's value (see map_columns) before the checks.
    The 'prompt' column, where present, must be non-empty text or well-formed chat messages.
    Errors name rows by their 0-based index, plus the line number for .jsonl and .csv files.
    """
    path = Path(path)
    if path.is_dir():
        rows, lines = _read_saved_dataset(path, split)
    elif not path.exists():
        raise DataError(f"data path {path} does not exist; give a {FORMATS}")
    elif path.suffix.lower() not in READERS:
        raise DataError(f"data file {path} has unknown suffix {path.suffix!r}; give a {FORMATS}")
    else:
        if split not in (None, "train"):
            raise DataError(
                f"data file {path} has no splits, but split {split!r} was asked; leave the split "
                f"unset, or save a DatasetDict with save_to_disk and give its directory"
            )
        rows, lines = READERS[path.suffix.lower()](path)
    label = f"data {'directory' if path.is_dir() else 'file'} {path}"
    if not rows:
        raise DataError(f"{label} has no rows; add at least one row with columns {list(required)}")
    rows = map_columns([_to_python(row) for row in rows], columns or {}, label)
    names = [
        f"row {index}" + (f" (line {lines[index]})" if lines else "") + f" of {path}" for index in range(len(rows))
    ]
    _check_rows(label, rows, names, required, csv_file=path.is_file() and path.suffix.lower() == ".csv")
    return rows


def _check_rows(label: str, rows: list[dict], names: list[str], required: Sequence[str], csv_file: bool) -> None:
    _check_columns(label, rows, names, required, csv_file)
    for row, row_name in zip(rows, names):
        if "prompt" in row:
            _check_prompt(row["prompt"], row_name)


_HELD = {
    "prompt": "prompts",
    "answer": "reference answers",
    "chosen": "chosen completions",
    "rejected": "rejected completions",
}
ColumnMap = Mapping[str, tuple[str, str]]
"""target column -> (source column in the data, the config field that named it)."""


def map_columns(rows: list[dict], columns: ColumnMap, label: str) -> list[dict]:
    """Rows with each target column holding its source column's value (the source stays too, so a reward can
    still ask for it by its own name; a column already called like the target is replaced). A source missing
    from every row is a DataError naming the config field and the columns that exist; a source that only some
    rows lack is left to the row checks (it names the row)."""
    if not columns or not rows:
        return rows
    present = list(dict.fromkeys(key for row in rows for key in row))
    for target, (source, field) in columns.items():
        if source not in present:
            close = difflib.get_close_matches(source, [str(column) for column in present], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(
                f"{field}={source!r}: {label} has no column {source!r} (columns: {present}); "
                f"{hint}set {field} to the column that holds the {_HELD.get(target, target)}"
            )
    moves = {target: source for target, (source, _) in columns.items() if source != target}
    return [{**row, **{target: row[source] for target, source in moves.items() if source in row}} for row in rows]


def format_prompts(rows: list[dict], system_prompt: str | None = None, template: str | None = None) -> list[dict]:
    """Rows whose plain-text prompts are rendered for the policy (data.prompt_template, data.system_prompt):

    template: '{prompt}' in it is replaced by the prompt (no other placeholder, so LaTeX braces such as
        '\\boxed{}' need no escaping); only for plain-text prompts.
    system_prompt: the prompt becomes chat messages [system, user] (rendered with the tokenizer's chat
        template); a chat prompt gets the system message first, unless it already has one.
    """
    if system_prompt is None and template is None:
        return rows
    formatted = []
    for index, row in enumerate(rows):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            text = template.replace("{prompt}", prompt) if template is not None else prompt
            prompt = (
                text
                if system_prompt is None
                else [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
            )
        elif template is not None:
            raise DataError(
                f"data.prompt_template is set but row {index} has a chat prompt; a template renders "
                f"plain-text problems, so unset it or give plain-text prompts"
            )
        elif system_prompt is not None:
            if any(message.get("role") == "system" for message in prompt):
                raise DataError(
                    f"data.system_prompt is set but row {index} already has a system message; unset "
                    f"data.system_prompt or drop the rows' system messages"
                )
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        formatted.append({**row, "prompt": prompt})
    return formatted


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' packaged loaders


def load_dataset_splits(path: str, subset: str | None = None) -> dict:
    """split name -> datasets.Dataset of `path` through datasets.load_dataset: a hub id (downloaded on first use,
    needs the hub), a local dataset directory (data files found by their names, e.g. train.parquet and
    test.parquet, or data/train-*.jsonl), or a single .jsonl/.json/.csv/.parquet file (its one split 'train').
    A directory written by save_to_disk is read with load_from_disk. subset: the dataset's config name."""
    import datasets  # imported here: importing datasets takes a second

    local = Path(path).expanduser()
    try:
        if local.is_file():
            if local.suffix.lower() not in _BUILDERS:
                raise DataError(
                    f"data.path={path!r} has unknown suffix {local.suffix!r}; give a {FORMATS}, "
                    f"a dataset directory or a hub id"
                )
            loaded = datasets.load_dataset(_BUILDERS[local.suffix.lower()], data_files={"train": str(local)})
        elif (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        else:
            loaded = datasets.load_dataset(path, subset)
    except DataError:
        raise
    except Exception as error:  # the hub's, the builders' and the file readers' errors are many types
        where = "the local dataset" if local.exists() else "the hub (is the id right, and is the hub reachable?)"
        cause = error
        while cause.__cause__ is not None:  # datasets wraps the reason: "An error occurred while generating..."
            cause = cause.__cause__
        reason = _first_line(error) if cause is error else f"{_first_line(error)}: {_first_line(cause)}"
        raise DataError(
            f"data.path={path!r} (data.subset={subset!r}) could not be loaded with datasets.load_dataset "
            f"from {where}: {reason}"
        ) from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def dataset_rows(
    splits: dict, path: str, split: str, field: str, required: Sequence[str], columns: ColumnMap | None = None
) -> list[dict]:
    """The checked rows of one split of load_dataset_splits' result; a missing split names the ones there are."""
    if split not in splits:
        raise DataError(
            f"{field}={split!r}: data.path {path!r} has no split {split!r} (splits: {sorted(splits)}); "
            f"set {field} to one of them"
        )
    label = f"data.path {path!r} split {split!r}"
    rows = [_to_python(row) for row in splits[split].with_format(None).to_list()]
    if not rows:
        raise DataError(f"{label} has no rows; choose a split with rows")
    rows = map_columns(rows, columns or {}, label)
    _check_rows(label, rows, [f"row {index} of {label}" for index in range(len(rows))], required, csv_file=False)
    return rows


def load_train_test(
    data,
    required: Sequence[str] = ("prompt", "answer"),
    resolve: Callable[[str], str] = str,
    test_required: Sequence[str] = ("prompt", "answer"),
) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of a recipe's data section, columns mapped and prompts formatted.

    data.path set: both come from that dataset (load_dataset_splits), the training rows from split data.split
    (default 'train'), the held-out rows from data.test_split (None: no held-out rows). Otherwise from the
    files data.train and data.test, as load_rows reads them (`resolve` turns 'embedded:...' paths into files).
    Training rows need the columns `required`, held-out rows `test_required` (prompt and answer, or the reward
    model's pairs); data.<name>_column names the source column of each (prompt, answer, and for pairs chosen,
    rejected)."""

    def column_map(targets: Sequence[str]) -> ColumnMap:
        return {target: (getattr(data, f"{target}_column", target), f"data.{target}_column") for target in targets}

    if data.path is not None:
        splits = load_dataset_splits(data.path, data.subset)
        train_rows = dataset_rows(
            splits, data.path, data.split or "train", "data.split", required, column_map(required)
        )
        test_rows = (
            dataset_rows(
                splits, data.path, data.test_split, "data.test_split", test_required, column_map(test_required)
            )
            if data.test_split is not None
            else []
        )
    else:
        train_rows = load_rows(resolve(data.train), required, split=data.split, columns=column_map(required))
        test_rows = load_rows(resolve(data.test), test_required, columns=column_map(test_required)) if data.test else []
    return tuple(format_prompts(rows, data.system_prompt, data.prompt_template) for rows in (train_rows, test_rows))


def write_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write rows to a .jsonl file, one JSON object per line, atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"write_rows writes JSON lines, but {path} has suffix {path.suffix!r}; name it .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )  # same directory: os.replace is atomic
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(_to_python(row), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- tokens


def render_prompt(tokenizer, prompt) -> str:
    """The text the policy sees: a plain prompt unchanged, chat messages through the chat template with the
    assistant turn opened (add_generation_prompt=True), so the completion starts right after it."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        raise DataError(
            f"prompt of type {type(prompt).__name__} cannot be rendered; a prompt is text or a list "
            f'of chat messages [{{"role": ..., "content": ...}}]'
        )
    problem = _messages_problem(prompt)
    if problem is not None:
        raise DataError(f'prompt {problem}; a chat prompt is a list like [{{"role": "user", "content": "..."}}]')
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the prompt is chat messages but the tokenizer has no chat template; give plain text "
            "prompts or use a tokenizer with a chat template (an instruct model's)"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def tokenize_prompts(
    tokenizer, texts: list[str], max_length: int, overlong: str = "error"
) -> tuple[list[list[int]], int]:
    """Token ids per prompt (no special tokens added: a chat template already wrote its own) and how many
    prompts were truncated.

    overlong="error": a prompt longer than max_length raises DataError naming it.
    overlong="truncate": keep its LAST max_length tokens, ids[-max_length:]; the end of a question (the
        part the answer follows) matters more than its preamble.
    """
    if overlong not in ("error", "truncate"):
        raise ValueError(f"data.overlong_prompts={overlong!r} is not known; use 'error' or 'truncate'")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"data.max_prompt_length={max_length!r} must be a positive integer")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(
                f"prompt {index} is a {type(text).__name__}, not text; render chat messages with "
                f"render_prompt before tokenizing"
            )
    if not texts:
        return [], 0
    ids = [list(row) for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    truncated = 0
    for index, row in enumerate(ids):
        if len(row) <= max_length:
            continue
        if overlong == "error":
            raise DataError(
                f"prompt {index} is {len(row)} tokens, longer than data.max_prompt_length={max_length}; "
                f"raise data.max_prompt_length or set data.overlong_prompts=truncate to keep its "
                f"last {max_length} tokens"
            )
        ids[index] = row[-max_length:]
        truncated += 1
    return ids, truncated


# ---------------------------------------------------------------------------------------------- batches


def iteration_rows(rows: list, iteration: int, count: int, seed: int) -> list:
    """The `count` rows of an iteration (or step): epochs of a seeded permutation, so the data position is a
    function of the iteration alone (resume needs nothing else), the same on every rank."""
    picked = []
    for k in range(iteration * count, (iteration + 1) * count):
        epoch, index = divmod(k, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picked.append(rows[int(order[index])])
    return picked


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    """`indices` in consecutive chunks of `size` (the last may be shorter)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]
