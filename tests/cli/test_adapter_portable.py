"""A saved adapter names its base model portably: a builtin model by its Hugging Face id, the user's own model by
the path as given (not a directory inside this installation), and ``lorapro eval`` loads that name offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_bert

from lorapro.cli import main
from lorapro.cli import models as M

TINY_RUN = ["--train", "rotten-tomatoes", "--max-steps", "1", "--max-train", "8", "--max-eval", "8",
            "--batch-size", "4", "--max-length", "32", "--no-progress"]


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the Hub raises at once instead of waiting on the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def recorded_base_model(adapter: Path) -> tuple[str, str]:
    """(``base_model_name_or_path`` of ``adapter_config.json``, ``base_model`` of the model card)."""
    from huggingface_hub import ModelCard

    config = json.loads((adapter / "adapter_config.json").read_text())
    return config["base_model_name_or_path"], ModelCard.load(adapter / "README.md").data.base_model


def train_then_eval(model: str, out: Path, capsys) -> tuple[str, dict, dict]:
    """Train ``model`` for one step into ``out``, then ``lorapro eval`` the adapter on the base model its config
    records. Returns (that base model, the training's metrics, eval's printed metrics)."""
    assert main(["train", "--model", model, *TINY_RUN, "--out", str(out)]) == 0
    adapter = out / "adapter"
    base, card_base = recorded_base_model(adapter)
    assert card_base == base
    capsys.readouterr()
    assert main(["eval", "--model", base, "--adapter", str(adapter), "--eval", "rotten-tomatoes", "--max-eval", "8",
                 "--max-length", "32"]) == 0
    printed = capsys.readouterr().out
    # without --model, eval takes the base model the adapter records: the same scores
    assert main(["eval", "--adapter", str(adapter), "--eval", "rotten-tomatoes", "--max-eval", "8",
                 "--max-length", "32"]) == 0
    assert capsys.readouterr().out == printed
    words = printed.split()
    evaluated = {k: float(v) for k, v in zip(words[::2], words[1::2])}
    return base, json.loads((out / "metrics.json").read_text()), evaluated


def test_eval_without_model_needs_an_adapter_that_records_one(tmp_path, capsys):
    assert main(["eval", "--eval", "rotten-tomatoes"]) == 2
    assert "--model" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--eval", "rotten-tomatoes"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["eval", "--adapter", str(tmp_path / "adapter"), "--eval", "rotten-tomatoes"]) == 2
    assert "records no base model" in capsys.readouterr().err


def test_builtin_model_is_recorded_by_its_hub_id_and_eval_loads_the_local_copy(tmp_path, capsys, offline):
    base, trained, evaluated = train_then_eval("minilm", tmp_path / "run", capsys)
    assert base == "sentence-transformers/all-MiniLM-L6-v2"
    local = str(M.resolve_model("minilm"))
    for f in (tmp_path / "run" / "adapter").glob("*.json"):
        assert local not in f.read_text(), f.name  # nothing names a directory of this installation
    assert local not in (tmp_path / "run" / "adapter" / "README.md").read_text()
    # The eval of the recorded name (the local MiniLM plus the adapter) reproduces the training's final eval.
    assert evaluated["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_user_model_is_recorded_by_the_path_given(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    make_tiny_bert(tmp_path / "home" / "models" / "tiny-bert")
    base, trained, evaluated = train_then_eval("~/models/tiny-bert", tmp_path / "run", capsys)
    assert base == "~/models/tiny-bert"  # as given, not the directory it expands to
    assert evaluated["eval_accuracy"] == pytest.approx(trained["eval_accuracy"])
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_hub_ids_of_the_builtins_resolve_to_their_local_copies(tmp_path, monkeypatch):
    assert {name: M.portable_model_name(name) for name in M.BUILTIN_MODELS} == {
        "minilm": "sentence-transformers/all-MiniLM-L6-v2",
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    assert M.portable_model_name("MiniLM") == "sentence-transformers/all-MiniLM-L6-v2"
    assert M.portable_model_name("./my-model") == "./my-model"
    assert M.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == M.resolve_model("minilm")
    assert M.resolve_model("Sentence-Transformers/All-MiniLM-L6-v2") == M.resolve_model("minilm")
    converted = tmp_path / "smollm2"
    monkeypatch.setattr(M, "_smollm2_dir", lambda: converted)  # the converted copy, without converting here
    assert M.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == converted
    # A local model directory at the id's path wins, as with from_pretrained.
    monkeypatch.chdir(tmp_path)
    own = make_tiny_bert(tmp_path / "sentence-transformers" / "all-MiniLM-L6-v2")
    assert M.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == Path("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path.cwd() / M.resolve_model("sentence-transformers/all-MiniLM-L6-v2")).resolve() == own.resolve()
