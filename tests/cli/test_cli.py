"""End-to-end tests of the ``lorapro`` command on tiny random models and a few dozen rows of real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorapro.cli import main
from tiny_models import make_tiny_bert, make_tiny_llama

SMALL = ["--max-train", "48", "--max-eval", "24", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["full", "lora", "rslora", "lorapro", "lorapro-sgd", "lorapro-zero"])
def test_train_every_method_on_real_data(bert_dir, tmp_path, method):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(bert_dir), "--train", "rotten-tomatoes", "--method", method,
               "--max-steps", "3", *SMALL, "--out", str(out)])
    assert rc == 0
    m = _metrics(out)
    assert 0.0 <= m["eval_accuracy"] <= 1.0 and m["method"] == method and m["steps"] == 3
    assert len(m["train_loss"]) == 3 and m["evals"][-1]["step"] == 3
    assert m["config"]["lr"] == 1e-4 and m["config"]["task"] == "classification"
    saved = out / ("model" if method == "full" else "adapter")
    if method == "full":
        assert (saved / "config.json").is_file()
    else:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
        PeftModel.from_pretrained(base, saved)
    assert not [p.name for p in out.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_lorapro_metrics_record_the_optimizer(bert_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--max-steps", "2", *SMALL, "--out", str(out)]) == 0
    m = _metrics(out)
    assert m["method"] == "lorapro" and m["optimizer_state_mib"] > 0 and m["mean_optimizer_step_ms"] > 0


def test_fused_trains_like_the_default(bert_dir, tmp_path):
    """--fused (LoRAProAdamW(fused=True)) follows the default optimizer's trajectory up to float rounding."""
    runs = {}
    for name, extra in (("plain", []), ("fused", ["--fused"])):
        out = tmp_path / name
        assert main(["train", "--model", str(bert_dir), "--max-steps", "3", *SMALL, "--out", str(out), *extra]) == 0
        runs[name] = _metrics(out)
    assert runs["fused"]["config"]["fused"] and not runs["plain"]["config"]["fused"]
    losses = [[loss for _, loss in runs[k]["train_loss"]] for k in ("plain", "fused")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert runs["fused"]["eval_loss"] == pytest.approx(runs["plain"]["eval_loss"], rel=1e-4)


def test_eval_command_reproduces_the_final_metric(bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--max-steps", "3", *SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["eval", "--model", str(bert_dir), "--adapter", str(out / "adapter"), "--eval", "rotten-tomatoes",
               "--max-eval", "24"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert float(printed[printed.index("eval_accuracy") + 1]) == pytest.approx(_metrics(out)["eval_accuracy"])


def test_resume_gives_the_uninterrupted_result(bert_dir, tmp_path):
    args = ["train", "--model", str(bert_dir), "--max-steps", "6", "--eval-every", "2", *SMALL]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--stop-after", "3"]) == 0
    assert not (tmp_path / "b" / "metrics.json").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert a["evals"] == b["evals"] and a["train_loss"] == b["train_loss"] and b["resumed"]
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_causal_lm_with_files_and_exact_match(llama_dir, tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(30)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows[:24])
    evalf = _write_jsonl(tmp_path / "eval.jsonl", rows[24:])
    out = tmp_path / "run"
    rc = main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--train", str(train), "--eval", str(evalf),
               "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "3", "--no-progress", "--out", str(out)])
    assert rc == 0
    m = _metrics(out)
    assert set(m) >= {"eval_exact_match", "eval_loss"} and 0.0 <= m["eval_exact_match"] <= 1.0


def test_compare_trains_a_method_at_its_own_lr(bert_dir, tmp_path, capsys):
    """``method@lr``: that method at its own lr, in its own directory, labelled so in the table and results."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(bert_dir), "--methods", "lora,lora@1e-2", "--lr", "1e-4", "--max-steps", "2",
               *SMALL, "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["own_lr"]) for r in results["runs"]] == [("lora", None), ("lora-lr0.01", 0.01)]
    assert [r["config"]["lr"] for r in (_metrics(out / "lora"), _metrics(out / "lora-lr0.01"))] == [1e-4, 1e-2]
    assert "own lr" in results["lr_rule"]
    printed = capsys.readouterr().out
    assert "LoRA (own lr 0.01)" in printed or "lora (own lr 0.01)" in printed
    for bad in ("lora@x", "lora@-1", "lora@0", "lora,lora"):
        assert main(["compare", "--model", str(bert_dir), "--methods", bad, "--out", str(tmp_path / "bad")]) == 2
        assert "--methods" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_compare_writes_table_json_and_plot(bert_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(bert_dir), "--methods", "lora,lorapro", "--max-steps", "2", *SMALL,
               "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["lora", "lorapro"]
    for r in results["runs"]:
        assert {"eval_accuracy", "final_train_loss", "wall_seconds", "mean_optimizer_step_ms", "peak_memory_mib"} <= set(r)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "one learning rate for every method" in printed.lower() or "for every method" in printed
    assert "lorapro" in printed and "eval_accuracy" in printed


def _bad(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out)] if argv[0] != "eval" else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("lorapro: error:") and "\n" not in err and "Traceback" not in err
    assert message.lower() in err.lower(), err
    assert not out.exists() or not any(out.iterdir()), "something was written for a bad input"


def test_bad_inputs_give_one_line_and_exit_2(bert_dir, tmp_path, capsys):
    rows = [{"text": f"review {i}", "label": "good" if i % 2 else "bad"} for i in range(10)]
    good = _write_jsonl(tmp_path / "good.jsonl", rows)
    unseen = _write_jsonl(tmp_path / "unseen.jsonl", [{"text": "x", "label": "neutral"}])
    nocol = _write_jsonl(tmp_path / "nocol.jsonl", [{"txt": "x", "label": "good"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "good"}\n{not json\n')
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    base = ["train", "--model", str(bert_dir), "--max-steps", "1", "--no-progress"]
    cls = [*base, "--task", "classification"]
    _bad(tmp_path, capsys, [*cls, "--train", str(tmp_path / "missing.jsonl"), "--eval", str(good)], "missing.jsonl")
    _bad(tmp_path, capsys, [*cls, "--train", str(txt), "--eval", str(good)], "data.txt")
    _bad(tmp_path, capsys, [*cls, "--train", str(broken), "--eval", str(good)], "line 2")
    _bad(tmp_path, capsys, [*cls, "--train", str(nocol), "--eval", str(good)], "text")
    _bad(tmp_path, capsys, [*cls, "--train", str(empty), "--eval", str(good)], "empty")
    _bad(tmp_path, capsys, [*cls, "--train", str(good), "--eval", str(unseen)], "neutral")
    _bad(tmp_path, capsys, [*base, "--model", "no-such-model"], "no-such-model")
    _bad(tmp_path, capsys, [*base, "--method", "adam"], "unknown method")
    _bad(tmp_path, capsys, [*base, "--target-modules", "nonexistent_proj"], "nonexistent_proj")
    _bad(tmp_path, capsys, [*base, "--resume"], "no checkpoint")
    _bad(tmp_path, capsys, [*base, "--lr", "-1"], "--lr")
    _bad(tmp_path, capsys, [*base, "--method", "lorapro-bf16", "--fused"], "--fused is for lorapro and lorapro-zero")
    _bad(tmp_path, capsys, ["eval", "--model", str(bert_dir), "--adapter", str(tmp_path / "nothing"),
                            "--eval", "rotten-tomatoes"], "nothing")


def test_diagnostics_option(bert_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--max-steps", "5", "--diagnostics", "2", *SMALL,
                 "--out", str(out)]) == 0
    saved = json.loads((out / "diagnostics.json").read_text())
    records = saved["records"]
    assert sorted({r["step"] for r in records}) == [0, 2, 4]
    layers = {r["layer"] for r in records}
    assert len(records) == 3 * len(layers) and layers
    assert all(r["lorapro_distance"] <= r["lora_distance"] * (1 + 1e-5) for r in records)
    assert all(r["rank_B"] == 0 for r in records if r["step"] == 0)  # PEFT starts from B = 0
    assert (out / "diagnostics.png").stat().st_size > 10_000
    # the measurement changes nothing in the run
    plain = tmp_path / "plain"
    assert main(["train", "--model", str(bert_dir), "--max-steps", "5", *SMALL, "--out", str(plain)]) == 0
    assert _metrics(out)["train_loss"] == _metrics(plain)["train_loss"]
    # full fine-tuning has no LoRA pairs to measure
    from lorapro.cli.errors import UserError
    from lorapro.cli.config import TrainConfig
    from lorapro.cli.trainer import _diagnostics

    with pytest.raises(UserError, match="--diagnostics needs LoRA layers"):
        _diagnostics(TrainConfig(method="full", diagnostics=1), torch.nn.Linear(2, 2), 1)
