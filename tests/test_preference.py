"""trainer/preference.py: formats checked on decoded text, drops counted, errors naming the row, collate."""

import json
from pathlib import Path

import pytest
import torch

from trainer.config import DataConfig, ModelConfig
from trainer.data import DataError, tokenize_example
from trainer.model import load_tokenizer
from trainer.preference import (
    EVAL_GROUP_COLUMNS,
    PREFERENCE_FORMATS,
    build_preference_data,
    collate_pairs,
    detect_preference_format,
    tokenize_pair,
)
from trainer.synthetic import make_rows

USER = {"role": "user", "content": "Add 2 and 3."}
SYSTEM = {"role": "system", "content": "Be brief."}


def say(content):
    return {"role": "assistant", "content": content}


TEXT = {"prompt": "Add 2 and 3.\nAnswer:", "chosen": " 5", "rejected": " 6"}
MESSAGES = {"prompt": [USER], "chosen": [say("5")], "rejected": [say("6")]}
CONVERSATIONS = {"chosen": [USER, say("5")], "rejected": [USER, say("6")]}
# The UltraFeedback-binarized layout: a prompt string next to whole conversations, plus scores.
ULTRAFEEDBACK = {"prompt": "Add 2 and 3.", "prompt_id": "abc", "chosen": [USER, say("5")],
                 "rejected": [USER, say("6")], "messages": [USER, say("5")], "score_chosen": 9.0, "score_rejected": 2.0}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def decoded(pair, tok):
    return tok.decode(pair["chosen_input_ids"]), tok.decode(pair["rejected_input_ids"])


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tmp_path, rows, seed=0, eval_rows=None, **data):
    cfg = DataConfig(path=write_jsonl(tmp_path / "train.jsonl", rows), eval_path=None, **data)
    if eval_rows is not None:
        cfg.eval_path = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    return build_preference_data(cfg, load_tokenizer(ModelConfig()), seed)


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("row, fmt", [
    (TEXT, "preference_text"),
    ({"chosen": "Q: 2+3? A: 5", "rejected": "Q: 2+3? A: 6"}, "preference_text"),
    (MESSAGES, "preference_messages"),
    (CONVERSATIONS, "preference_conversations"),
    (ULTRAFEEDBACK, "preference_conversations"),
])
def test_detect_preference_format(row, fmt):
    assert detect_preference_format(row) == fmt
    assert fmt in PREFERENCE_FORMATS


def test_undetectable_row_names_fields_and_formats():
    with pytest.raises(DataError, match=r"fields \['chosen', 'prompt'\].*rejected: null.*preference_text"):
        detect_preference_format({"prompt": "p", "chosen": "c"})


def test_text_pair_is_sft_layout_and_trl_standard_layout(tok):
    pair, status = tokenize_pair(TEXT, "auto", tok, 64, "truncate")
    assert status == "kept" and pair["margin"] == 0.0
    assert decoded(pair, tok) == ("<|bos|>Add 2 and 3.\nAnswer: 5<|eos|>", "<|bos|>Add 2 and 3.\nAnswer: 6<|eos|>")
    sft = tokenize_example({"prompt": TEXT["prompt"], "completion": TEXT["chosen"]}, "prompt_completion", tok, 64, "drop")
    assert pair["chosen_input_ids"] == sft["input_ids"]
    # TRL's RewardTrainer tokenizes prompt + response + eos_token as one string; on the suite's layout the ids agree.
    for row in make_rows("preference", "eval")[:200]:
        pair, _ = tokenize_pair(row, "preference_text", tok, 256, "drop")
        for side in ("chosen", "rejected"):
            assert pair[f"{side}_input_ids"] == tok(row["prompt"] + row[side] + tok.eos_token).input_ids


def test_text_pair_without_prompt(tok):
    pair, _ = tokenize_pair({"chosen": "good", "rejected": "bad", "prompt": None}, "auto", tok, 64, "drop")
    assert decoded(pair, tok) == ("<|bos|>good<|eos|>", "<|bos|>bad<|eos|>")


def test_messages_pair_renders_prompt_and_response_through_the_template(tok):
    pair, status = tokenize_pair(MESSAGES, "auto", tok, 64, "drop")
    assert status == "kept"
    head = "<|bos|><|user|>\nAdd 2 and 3.<|end|><|assistant|>\n"
    assert decoded(pair, tok) == (head + "5<|end|><|eos|>", head + "6<|end|><|eos|>")
    sft = tokenize_example({"messages": [USER, say("5")]}, "messages", tok, 64, "drop")
    assert pair["chosen_input_ids"] == sft["input_ids"], "one way to render and tokenize a conversation"
    with_system, _ = tokenize_pair(MESSAGES, "auto", tok, 64, "drop", system_prompt="Be brief.")
    assert decoded(with_system, tok)[0] == "<|bos|><|system|>\nBe brief.<|end|>" + head[len("<|bos|>"):] + "5<|end|><|eos|>"
    own_system, _ = tokenize_pair({**MESSAGES, "prompt": [SYSTEM, USER]}, "auto", tok, 64, "drop", system_prompt="Other.")
    assert "Other." not in decoded(own_system, tok)[0] and "Be brief." in decoded(own_system, tok)[0]


def test_conversation_pairs_end_with_the_compared_assistant_turn(tok):
    multi = {"chosen": [SYSTEM, USER, say("5"), {"role": "user", "content": "Double it."}, say("10")],
             "rejected": [SYSTEM, USER, say("5"), {"role": "user", "content": "Double it."}, say("11")]}
    for row in (CONVERSATIONS, ULTRAFEEDBACK, multi):
        pair, status = tokenize_pair(row, "auto", tok, 128, "drop")
        chosen, rejected = decoded(pair, tok)
        assert status == "kept"
        assert chosen.startswith("<|bos|>")
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            assert text.endswith(f"<|assistant|>\n{row[side][-1]['content']}<|end|><|eos|>")
        assert chosen.rsplit("<|assistant|>", 1)[0] == rejected.rsplit("<|assistant|>", 1)[0]
    assert "Add 2 and 3." in decoded(tokenize_pair(ULTRAFEEDBACK, "auto", tok, 64, "drop")[0], tok)[0]


def test_margin_is_carried(tok):
    pair, _ = tokenize_pair({**TEXT, "margin": 2.5}, "auto", tok, 64, "drop")
    assert pair["margin"] == 2.5
    with pytest.raises(DataError, match="margin must be a finite number"):
        tokenize_pair({**TEXT, "margin": "big"}, "auto", tok, 64, "drop")


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("row, fmt, message", [
    ({"prompt": "p", "chosen": "c"}, "preference_text", "missing 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "preference_text",
     "chosen must be a string in format preference_text, got int"),
    ({"prompt": ["p"], "chosen": "c", "rejected": "r"}, "preference_text", "prompt must be a string"),
    ({**MESSAGES, "chosen": ["5"]}, "auto", r"chosen\[0\] must be a \{role, content\} message, got str"),
    ({**MESSAGES, "rejected": [{"content": "6"}]}, "auto", "rejected.0.: message role must be a string"),
    ({**MESSAGES, "chosen": [{"role": "assistant", "content": 5}]}, "auto", "message content must be a string"),
    ({**MESSAGES, "chosen": []}, "auto", "chosen must be a non-empty list"),
    ({**MESSAGES, "rejected": [USER]}, "auto", "rejected must end with the assistant message"),
    (TEXT, "preference_messages", "prompt must be a non-empty list .* got str"),
    ({"chosen": [USER, say("5")], "rejected": [{"role": "user", "content": "Add 2 and 4."}, say("6")]}, "auto",
     "differ at message 0"),
    ({"chosen": [say("5")], "rejected": [say("6")]}, "preference_conversations", "chosen has no prompt"),
    (TEXT, "prompt_completion", "unknown preference format 'prompt_completion'"),
])
def test_malformed_rows_raise_a_clear_error(tok, row, fmt, message):
    with pytest.raises(DataError, match=message):
        tokenize_pair(row, fmt, tok, 64, "drop")


@pytest.mark.parametrize("rows, data, message", [
    ([TEXT, TEXT, {"prompt": "p", "chosen": "c", "rejected": None}], {}, r"train.jsonl: row 2: missing 'rejected'"),
    ([MESSAGES, {**MESSAGES, "chosen": [{"role": None, "content": "5"}]}], {},
     r"train.jsonl: row 1: chosen\[0\]: message role must be a string"),
    ([MESSAGES, {**MESSAGES, "prompt": []}], {}, "row 1: prompt must be a non-empty list"),
    ([CONVERSATIONS, CONVERSATIONS, {**CONVERSATIONS, "rejected": [USER, say("6"), USER]}], {},
     "row 2: rejected must end with the assistant message"),
    ([ULTRAFEEDBACK, {**ULTRAFEEDBACK, "rejected": [{"role": "user", "content": "Other"}, say("6")]}], {},
     "row 1: chosen and rejected must share every message before their final assistant turn"),
    ([TEXT, TEXT], {"format": "preference_conversations"}, "row 0: chosen must be a non-empty list"),
    ([{"prompt": "p", "chosen": 1, "rejected": 2}], {}, r"row 0: cannot detect the preference format"),
])
def test_errors_name_the_file_and_row(tmp_path, rows, data, message):
    with pytest.raises(DataError, match=message):
        build(tmp_path, rows, **data)


def test_identical_empty_and_overlong_pairs_are_counted(tmp_path, tok):
    long_tail = " " + " ".join("abcdefghij" * 3)  # 30 one-token words
    rows = [
        TEXT,
        {**TEXT, "chosen": " 5 5", "rejected": " 7"},
        {**TEXT, "rejected": TEXT["chosen"]},  # identical
        {**TEXT, "rejected": "  \n"},  # empty response
        {**TEXT, "chosen": long_tail + " x", "rejected": " 6"},  # overlong, still different when truncated
        {**TEXT, "chosen": long_tail + " x", "rejected": long_tail + " y"},  # identical once truncated
    ]
    max_length = len(tokenize_pair(TEXT, "auto", tok, 999, "drop")[0]["chosen_input_ids"]) + 5
    drop = build(tmp_path, rows, max_length=max_length, overlong="drop").stats
    assert (drop.rows, drop.kept, drop.truncated) == (6, 2, 0)
    assert drop.dropped == {"identical": 1, "empty_response": 1, "overlong": 2}
    truncate = build(tmp_path, rows, max_length=max_length, overlong="truncate")
    assert truncate.stats.dropped == {"identical": 2, "empty_response": 1, "overlong": 0}
    assert (truncate.stats.kept, truncate.stats.truncated) == (3, 1)
    assert all(len(p[f"{s}_input_ids"]) <= max_length for p in truncate.train for s in ("chosen", "rejected"))
    assert "identical 2, empty response 1, overlong 0; truncated 1" in truncate.stats.summary()
    # Conversational sides are compared after rendering too.
    assert tokenize_pair({**MESSAGES, "rejected": MESSAGES["chosen"]}, "auto", tok, 64, "drop") == (None, "identical")
    blank = {**CONVERSATIONS, "chosen": [USER, say(" \t")]}
    assert tokenize_pair(blank, "auto", tok, 64, "drop") == (None, "empty_response")


def test_nothing_left_is_an_error_with_the_counts(tmp_path):
    with pytest.raises(DataError, match="no preference pairs left.*2 rows; dropped identical: 1, empty_response: 1"):
        build(tmp_path, [{**TEXT, "rejected": TEXT["chosen"]}, {**TEXT, "chosen": ""}])


# ------------------------------------------------------------------------------------------- end to end, collate


def test_jsonl_files_end_to_end(tmp_path, tok):
    train = [{"prompt": f"Q{i}\nAnswer:", "chosen": f" {i}", "rejected": f" {i + 1}", "margin": float(i)}
             for i in range(40)]
    train[3].pop("margin")  # absent in one row: 0.0
    evals = [{**MESSAGES, "kind": "wrong_answer"}, {**MESSAGES, "kind": "format"},
             {**MESSAGES, "rejected": MESSAGES["chosen"], "kind": "format"}]  # the last one is dropped: identical
    data = build(tmp_path, train, seed=1, eval_rows=evals, system_prompt="Be brief.")
    assert data.stats.as_dict()["kept"] == 40 and data.stats.eval_pairs == 2
    assert data.stats.eval_dropped == {"identical": 1, "empty_response": 0, "overlong": 0}
    by_text = {tok.decode(p["chosen_input_ids"]): p for p in data.train}
    assert by_text["<|bos|>Q7\nAnswer: 7<|eos|>"]["margin"] == 7.0
    assert by_text["<|bos|>Q3\nAnswer: 3<|eos|>"]["margin"] == 0.0
    assert [p["kind"] for p in data.eval] == ["wrong_answer", "format"]
    assert tok.decode(data.eval[0]["chosen_input_ids"]).startswith("<|bos|><|system|>\nBe brief.<|end|><|user|>")
    order = [tok.decode(p["chosen_input_ids"]) for p in data.train]
    assert order != sorted(order, key=lambda s: int(s.split("Q")[1].split("\n")[0])), "shuffled"
    assert order == [tok.decode(p["chosen_input_ids"]) for p in build(tmp_path, train, seed=1).train]
    assert order != [tok.decode(p["chosen_input_ids"]) for p in build(tmp_path, train, seed=2).train]
    no_kind = build(tmp_path, train, eval_rows=[TEXT])
    assert no_kind.eval == [{**tokenize_pair(TEXT, "auto", tok, 256, "drop")[0],
                             **dict.fromkeys(EVAL_GROUP_COLUMNS)}]


def test_chat_template_override_is_used(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    data = build(tmp_path, [CONVERSATIONS], chat_template=template)
    tok = load_tokenizer(ModelConfig())
    assert tok.decode(data.train[0]["chosen_input_ids"]) == "[user]Add 2 and 3.[assistant]5"


def test_synthetic_preference_default_builds(tok):
    data = build_preference_data(DataConfig(path="synthetic:preference", split="eval", eval_path="synthetic:preference"),
                                 tok, seed=0)
    assert data.stats.kept == data.stats.eval_pairs == 600
    assert {p["kind"] for p in data.eval} == {"wrong_answer", "format"}


def test_collate_pairs_chosen_then_rejected_right_padded():
    rows = [{"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "margin": 1.0},
            {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12], "margin": 0.0}]
    batch = collate_pairs(rows, pad_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 8)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"][:, :4].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert batch["attention_mask"][:, 4:].sum() == 0 and (batch["input_ids"][:, 4:] == 0).all()
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.0, 0.0]
    assert collate_pairs(rows, pad_id=0, pad_to_multiple_of=None)["input_ids"].shape == (4, 4)
