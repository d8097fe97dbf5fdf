"""trainer.progress: in a log file (not a TTY) a bar is a line every few percent, each with its rate and ETA."""

from __future__ import annotations

import io
import re

import trainer.progress as progress_module
from trainer.progress import progress


def test_a_log_gets_a_line_every_few_percent_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    clock = iter(range(10**6))
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))  # a second per look at the clock
    log = io.StringIO()
    for _ in progress(range(1000), total=1000, desc="eval", unit="batch", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("eval:") for line in lines)
    assert 15 <= len(lines) <= 100 // progress_module.LOG_PERCENT + 2, lines  # not one per update
    assert "1000/1000" in lines[-1] and "batch/s" in lines[-1] and "<" in lines[-2]  # rate; elapsed<remaining


def test_a_rank_other_than_0_shows_nothing():
    log = io.StringIO()
    for _ in progress(range(10), total=10, desc="x", enabled=False, stream=log):
        pass
    assert log.getvalue() == ""


def _rows(n: int):
    import datasets

    from trainer.synthetic import make_rows

    rows = make_rows("sft", "train", seed=0)[:n]
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def test_tokenization_shows_a_bar_over_the_rows_on_rank_0_and_tokenizes_the_same(monkeypatch, capsys):
    import trainer.data as data
    from trainer.config import DataConfig, ModelConfig
    from trainer.model import load_tokenizer

    tok, cfg, ds = load_tokenizer(ModelConfig()), DataConfig(max_length=64), _rows(400)
    whole = data._tokenize_dataset(ds, "auto", tok, cfg, "rows.jsonl")  # fits one map: no bar, no slices
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    monkeypatch.setattr(data, "_MAP_BATCH", 10)  # 400 rows are then 20 slices of 20
    assert data._tokenize_dataset(ds, "auto", tok, cfg, "rows.jsonl") == whole
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("tokenizing rows.jsonl:") for line in lines), lines
    assert "400/400" in lines[-1] and "row/s" in lines[-1]
    monkeypatch.setattr(data, "_POOL_BATCHES", 5)  # with 2 processes: 4 slices of 100, a pool each
    assert data._tokenize_dataset(ds, "auto", tok, DataConfig(max_length=64, num_proc=2), "rows.jsonl") == whole
    assert "400/400" in capsys.readouterr().err.splitlines()[-1]
    monkeypatch.setenv("RANK", "1")
    data._tokenize_dataset(ds, "auto", tok, cfg, "rows.jsonl")
    assert capsys.readouterr().err == ""  # neither ours nor datasets' bar on another rank


def test_model_loading_is_announced_with_its_time_and_keeps_transformers_bar(tmp_path, capsys):
    import torch

    from trainer.config import ModelConfig
    from trainer.model import build_causal_lm, load_tokenizer

    tiny = ModelConfig()
    tiny.tiny.hidden_size, tiny.tiny.intermediate_size, tiny.tiny.num_hidden_layers = 64, 128, 2
    tok = load_tokenizer(tiny)
    build_causal_lm(tiny, tok, torch.float32).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = capsys.readouterr().out
    # a Llama under sdpa attends one packed sequence at a time (trainer/packed_attention.py), and says so
    per_sequence = r" \(attention: sdpa per packed sequence\)\n"
    assert re.match(r"tiny random-init model \(model.tiny\) built in \d+\.\d s" + per_sequence, out), out
    build_causal_lm(ModelConfig(name_or_path=str(tmp_path)), tok, torch.float32)
    out, err = capsys.readouterr()
    assert out.startswith(f"loading model {tmp_path} (AutoModelForCausalLM, torch.float32) ...\n"), out
    assert re.search(rf"model {re.escape(str(tmp_path))} loaded in \d+\.\d s{per_sequence}$", out), out
    assert "Loading weights" in err  # transformers' own bar, left on
