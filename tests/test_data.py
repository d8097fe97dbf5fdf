"""trainer/data.py: formats, masks checked on decoded text, errors users see, packing, mixing, collate; the preview CLI (trainer/preview.py)."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import trainer
from trainer.config import DataConfig, DatasetSpec
from trainer.data import (
    IGNORE_INDEX,
    DataError,
    build_supervised_data,
    collate,
    detect_format,
    load_rows,
    mixture_counts,
    pack_examples,
    sample_mixture,
    to_messages,
    tokenize_example,
    unpack_row,
)

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "Add 2 and 2."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Reverse abc."},
    {"role": "assistant", "content": "c b a"},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(Path(trainer.__file__).parent / "assets/tokenizer")


def runs(example, tok):
    """Decoded (trained, text) runs of an example, so masks are checked as text, not as ids."""
    out, ids, cur = [], [], None
    for t, label in zip(example["input_ids"], example["labels"]):
        if (label != IGNORE_INDEX) != cur and ids:
            out.append((cur, tok.decode(ids, skip_special_tokens=False)))
            ids = []
        ids.append(t)
        cur = label != IGNORE_INDEX
    out.append((cur, tok.decode(ids, skip_special_tokens=False)))
    return out


def trained_texts(example, tok):
    return [text for trained, text in runs(example, tok) if trained]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pc_rows(n, start=0, tag="r"):
    return [{"prompt": f"Question {tag}{i}?\nAnswer:", "completion": f" {tag}{i}"} for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]},
     "prompt_completion"),
    ({"instruction": "i", "input": None, "output": "o"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}, "sharegpt"),
    ({"messages": [{"from": "human", "value": "h"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "u"}], "family": "x"}, "messages"),
    ({"text": "A document.", "source": "web"}, "text"),
    ({"instruction": "i", "output": "o", "text": "### Instruction: i ### Response: o"}, "alpaca"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_undetectable_row_lists_accepted_formats():
    with pytest.raises(DataError) as e:
        detect_format({"body": "hello", "prompt": None})
    msg = str(e.value)
    assert "['body']" in msg
    for name in ("prompt_completion", "alpaca", "sharegpt", "messages", "instruction", "conversations", "text"):
        assert name in msg


def test_to_messages_normalises_roles_and_adds_system_prompt():
    alpaca = to_messages({"instruction": "Do it.", "input": "x y", "output": "done"}, "alpaca")
    assert alpaca == [{"role": "user", "content": "Do it.\n\nx y"}, {"role": "assistant", "content": "done"}]
    assert to_messages({"instruction": "Do it.", "input": "", "output": "d"}, "alpaca")[0]["content"] == "Do it."
    share = to_messages({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                                           {"from": "gpt", "value": "g"}]}, "sharegpt", system_prompt="ignored")
    assert [m["role"] for m in share] == ["system", "user", "assistant"] and share[0]["content"] == "s"
    added = to_messages({"messages": [{"role": "user", "content": "u"}]}, "messages", system_prompt="S")
    assert added[0] == {"role": "system", "content": "S"}
    with pytest.raises(DataError, match="unknown sharegpt speaker 'bot'"):
        to_messages({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt")


# ------------------------------------------------------------------------------------------- masking


def test_prompt_completion_trains_on_completion_and_eos_only(tok):
    ex = tokenize_example({"prompt": "What is 2+2?\nAnswer:", "completion": " 4"}, "auto", tok, 64, "truncate")
    assert runs(ex, tok) == [(False, "<|bos|>What is 2+2?\nAnswer:"), (True, " 4<|eos|>")]


def test_a_text_row_trains_on_the_whole_document_and_eos(tok):
    ex = tokenize_example({"text": "A plain document, all of it a target."}, "auto", tok, 64, "truncate")
    assert runs(ex, tok) == [(False, "<|bos|>"), (True, "A plain document, all of it a target.<|eos|>")]
    assert tokenize_example({"text": "  "}, "text", tok, 64, "truncate") is None  # nothing to learn


def test_text_documents_give_eval_loss_but_no_prompts_to_answer(tok, tmp_path):
    from trainer.data import build_prompts

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Document number {i}."} for i in range(4)])
    data = build_supervised_data(DataConfig(path=str(docs), eval_path=str(docs), max_length=64), tok, seed=0)
    assert data.stats.kept == 4 and len(data.eval) == 4 and data.eval_prompts == []
    with pytest.raises(DataError, match=r"docs\.jsonl: no row has a prompt to answer \(plain `text` documents"):
        build_prompts(DataConfig(path=str(docs), max_length=64), tok, str(docs), "train")


def test_messages_train_every_assistant_turn(tok):
    ex = tokenize_example({"messages": CHAT}, "messages", tok, 256, "truncate")
    assert trained_texts(ex, tok) == ["4<|end|><|eos|>", "c b a<|end|><|eos|>"]
    untrained = "".join(text for trained, text in runs(ex, tok) if not trained)
    for m in CHAT[:2] + CHAT[3:4]:
        assert m["content"] in untrained
    assert untrained.endswith("<|assistant|>\n")
    # Pieces are tokenized apart, yet the ids are what the tokenizer's own chat tokenization gives.
    assert ex["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)


def test_sharegpt_and_alpaca_masks(tok):
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                               {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}
    ex = tokenize_example(share, "auto", tok, 256, "truncate")
    assert trained_texts(ex, tok) == ["hello<|end|><|eos|>", "ciao<|end|><|eos|>"]
    ex = tokenize_example({"instruction": "Upper.", "input": "a b", "output": "A B"}, "auto", tok, 256, "truncate",
                          system_prompt="Be brief.")
    prompt = "<|bos|><|system|>\nBe brief.<|end|><|user|>\nUpper.\n\na b<|end|><|assistant|>\n"
    assert runs(ex, tok) == [(False, prompt), (True, "A B<|end|><|eos|>")]


def test_conversational_prompt_completion_is_templated(tok):
    row = {"prompt": [SYSTEM, {"role": "user", "content": "Say hi."}],
           "completion": [{"role": "assistant", "content": "hi"}]}
    ex = tokenize_example(row, "prompt_completion", tok, 256, "truncate")
    assert trained_texts(ex, tok) == ["hi<|end|><|eos|>"]
    assert "Be brief." in runs(ex, tok)[0][1]


def test_opening_assistant_turn_is_context(tok):
    row = {"messages": [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    assert trained_texts(tokenize_example(row, "messages", tok, 256, "truncate"), tok) == ["hello<|end|><|eos|>"]


def test_truncate_keeps_partial_answer_and_drop_drops(tok):
    row = {"prompt": "p", "completion": " a b c d e f g h"}
    full = tokenize_example(row, "auto", tok, 256, "truncate")
    cut = tokenize_example(row, "auto", tok, len(full["input_ids"]) - 3, "truncate")
    assert cut["input_ids"] == full["input_ids"][:-3] and trained_texts(cut, tok) == [" a b c d e f"]
    assert tokenize_example(row, "auto", tok, len(full["input_ids"]) - 3, "drop") is None
    assert tokenize_example(row, "auto", tok, 2, "truncate") is None  # nothing trained survives
    assert tokenize_example({"prompt": "p", "completion": "  "}, "auto", tok, 64, "truncate") is None


def test_non_prefix_template_is_refused(tok, tmp_path):
    # Renders the number of messages up front, so no prefix rendering is a prefix of the whole.
    template = ("{{ messages|length }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    cfg = DataConfig(path=str(path), eval_path=None, chat_template=template)
    with pytest.raises(DataError, match=r"chat\.jsonl: row 0: chat template problem: .*not a prefix"):
        build_supervised_data(cfg, AutoTokenizer.from_pretrained(tok.name_or_path), seed=0)


def test_template_without_generation_prompt_is_refused(tok, tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    cfg = DataConfig(path=str(path), eval_path=None, chat_template=template)
    with pytest.raises(DataError, match="ignores add_generation_prompt"):
        build_supervised_data(cfg, AutoTokenizer.from_pretrained(tok.name_or_path), seed=0)


def test_template_exception_names_the_row(tok, tmp_path):
    rows = [{"messages": CHAT}, {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "chat.jsonl", rows)), eval_path=None)
    with pytest.raises(DataError, match="row 1: chat template error: roles must be system, user or assistant"):
        build_supervised_data(cfg, tok, seed=0)


# ------------------------------------------------------------------------------------------- loading and filtering


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", completion: "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_rows(str(path))
    doc = tmp_path / "bad.json"
    doc.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"{doc}:3: malformed JSON"):
        load_rows(str(doc))


def test_missing_file_and_json_array_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(pc_rows(2)))
    write_jsonl(tmp_path / "d" / "b.jsonl", pc_rows(3))
    assert len(load_rows(str(tmp_path / "d"))) == 5


def test_undetectable_row_names_file_and_row(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", pc_rows(2) + [{"body": "just text"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl: row 2: cannot detect the format .*accepted formats"):
        build_supervised_data(DataConfig(path=str(path), eval_path=None), tok, seed=0)


def test_empty_and_non_utf8_files_name_file_and_line(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{empty}: empty file \(0 bytes\)"):
        load_rows(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"{latin}:2: not UTF-8 text"):
        build_supervised_data(DataConfig(path=str(latin), eval_path=None), tok, seed=0)


def test_json_line_that_is_not_an_object_names_the_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n["a", "b"]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object per line, got list"):
        load_rows(str(path))


def test_rows_with_another_schema_name_the_first_that_differs(tok, tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "two.jsonl", pc_rows(3) + [chat] + pc_rows(2) + [chat])
    with pytest.raises(DataError, match=r"two\.jsonl: row 3: its fields \['messages'\] are format 'messages' but row 0 "
                                        r"is 'prompt_completion' .*\(and 1 more rows\)"):
        build_supervised_data(DataConfig(path=str(path), eval_path=None), tok, seed=0)


def test_chat_data_without_an_assistant_turn_is_refused(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    path = write_jsonl(tmp_path / "users.jsonl", rows)
    with pytest.raises(DataError, match=r"users\.jsonl: none of its 3 rows has an answer to learn from"):
        build_supervised_data(DataConfig(path=str(path), eval_path=None), tok, seed=0)


def test_forced_format_names_the_fields_it_expects(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", pc_rows(2))
    with pytest.raises(DataError, match=r"pc\.jsonl: row 0: row does not have the fields of format 'alpaca' "
                                        r"\(instruction \+ output \(\+ optional input\)\); it has \['completion', 'prompt'\]"):
        build_supervised_data(DataConfig(path=str(path), format="alpaca", eval_path=None), tok, seed=0)


def test_prompts_all_over_the_limit_name_the_shortest(tok, tmp_path):
    from trainer.data import build_prompts

    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * (40 + i), "completion": " y"} for i in range(3)])
    with pytest.raises(DataError, match=r"long\.jsonl: no prompts shorter than data.max_length=16; the shortest of its "
                                        r"3 prompts has \d+ tokens"):
        build_prompts(DataConfig(path=str(path), max_length=16), tok, str(path), "train")


def test_empty_after_filtering_reports_counts(tok, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 50, "completion": " y"}] * 3
                       + [{"prompt": "p", "completion": ""}])
    cfg = DataConfig(path=str(path), eval_path=None, max_length=16, overlong="drop")
    with pytest.raises(DataError, match=r"no training examples left after filtering \(4 rows; dropped overlong: 3, "
                                        r"no_trained_tokens: 0, empty: 1\)"):
        build_supervised_data(cfg, tok, seed=0)


def test_overlong_truncate_vs_drop_counted(tok, tmp_path):
    rows = pc_rows(5) + [{"prompt": "short", "completion": " a b c d e f g h i j k l m n o p"}] * 2 \
        + [{"prompt": "x " * 40, "completion": " y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    truncated = build_supervised_data(DataConfig(path=str(path), eval_path=None, max_length=16), tok, seed=0).stats
    assert (truncated.kept, truncated.truncated, truncated.dropped) == (7, 2, {"overlong": 0, "no_trained_tokens": 1,
                                                                            "empty": 0})
    dropped = build_supervised_data(DataConfig(path=str(path), eval_path=None, max_length=16, overlong="drop"),
                                    tok, seed=0).stats
    assert (dropped.kept, dropped.truncated, dropped.dropped["overlong"]) == (5, 0, 3)
    assert "truncated 2" in truncated.summary() and truncated.as_dict()["dropped"]["no_trained_tokens"] == 1


# ------------------------------------------------------------------------------------------- packing and collate


def examples(tok, n=12):
    rows = [{"prompt": f"Q{i}: " + "w " * (i % 5), "completion": " a" * (1 + i % 4)} for i in range(n)]
    return [tokenize_example(r, "auto", tok, 64, "truncate") for r in rows]


def test_packing_restarts_positions_and_keeps_every_example(tok):
    exs = examples(tok)
    packed = pack_examples(exs, 24)
    assert len(packed) < len(exs) and all(len(r["input_ids"]) <= 24 for r in packed)
    for row in packed:
        restarts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert restarts[0] == 0 and all(row["position_ids"][i] == row["position_ids"][i - 1] + 1
                                        for i in range(1, len(row["position_ids"])) if i not in restarts)
    unpacked = [(tuple(e["input_ids"]), tuple(e["labels"])) for row in packed for e in unpack_row(row)]
    assert Counter(unpacked) == Counter((tuple(e["input_ids"]), tuple(e["labels"])) for e in exs)
    assert pack_examples(exs, 24) == packed


def test_collate_pads_right_with_own_segment():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [1] * 9, "labels": [1] * 9, "position_ids": list(range(4)) + list(range(5))}]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(v.shape == (2, 16) and v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["position_ids"][0].tolist() == [0, 1, 2] + list(range(13))
    assert batch["position_ids"][1].tolist() == list(range(4)) + list(range(5)) + list(range(7))
    assert collate(rows, pad_id=0, pad_to_multiple_of=1)["input_ids"].shape == (2, 9)


def token_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return loss  # (B, T-1): loss of predicting token t+1


def test_packed_loss_equals_separate_loss(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         attn_implementation="sdpa")).eval()
    exs = examples(tok)
    packed = pack_examples(exs, 40)
    assert any(r["position_ids"].count(0) > 1 for r in packed)
    with torch.no_grad():
        losses = token_losses(model, collate(packed, tok.pad_token_id))
        packed_per_example = []
        for b, row in enumerate(packed):
            start = 0
            for e in unpack_row(row):  # loss of an example's tokens 1..n-1, predicted from within the example
                packed_per_example.append(losses[b, start:start + len(e["input_ids"]) - 1].sum())
                start += len(e["input_ids"])
        alone = [token_losses(model, collate([{**e, "position_ids": list(range(len(e["input_ids"])))}],
                                             tok.pad_token_id, 1)).sum() for r in packed for e in unpack_row(r)]
    torch.testing.assert_close(torch.stack(packed_per_example), torch.stack(alone), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- mixing and building


def test_mixture_counts_and_determinism():
    sizes, weights = [100, 10, 40], [1.0, 2.0, 1.0]
    assert mixture_counts(sizes, weights) == [38, 75, 38]
    picks = sample_mixture(sizes, weights, seed=3)
    assert Counter(m for m, _ in picks) == {0: 38, 1: 75, 2: 38}
    # Member 1 (10 rows, 75 drawn) is cycled: every row 7 or 8 times; member 0 draws without replacement.
    assert set(Counter(i for m, i in picks if m == 1).values()) == {7, 8}
    assert len({i for m, i in picks if m == 0}) == 38
    assert sample_mixture(sizes, weights, seed=3) == picks
    assert sample_mixture(sizes, weights, seed=4) != picks


def test_build_mixture_counts_and_seed(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pc_rows(30, tag="a"))
    b = write_jsonl(tmp_path / "b.jsonl", pc_rows(10, tag="b"))
    cfg = DataConfig(mixture=[DatasetSpec(path=str(a), weight=1.0), DatasetSpec(path=str(b), weight=3.0)],
                     eval_path=None, packing=False)
    data = build_supervised_data(cfg, tok, seed=7)
    assert [(m["rows"], m["kept"]) for m in data.stats.members] == [(10, 10), (30, 30)]
    prompts = [tok.decode(r["input_ids"]) for r in data.train]
    assert sum("Question b" in p for p in prompts) == 30 and len(set(prompts)) == 20
    assert [tok.decode(r["input_ids"]) for r in build_supervised_data(cfg, tok, seed=7).train] == prompts
    assert [tok.decode(r["input_ids"]) for r in build_supervised_data(cfg, tok, seed=8).train] != prompts


def test_eval_rows_and_prompts(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", pc_rows(4))
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"messages": CHAT, "family": "reversal", "phrasing": "heldout"},
        {"messages": CHAT[1:3], "family": "addition", "phrasing": "seen"},
    ])
    data = build_supervised_data(DataConfig(path=str(train), eval_path=str(evals), max_length=128), tok, seed=0)
    assert len(data.eval) == 2 and data.eval[0]["position_ids"] == list(range(len(data.eval[0]["input_ids"])))
    first = data.eval_prompts[0]
    assert (first.answer, first.family, first.phrasing) == ("c b a", "reversal", "heldout")
    assert first.prompt_text == tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert first.prompt_ids == data.eval[0]["input_ids"][:len(first.prompt_ids)]
    assert data.stats.eval_examples == 2 and data.stats.eval_prompts == 2


def test_synthetic_default_builds_packed_rows(tok):
    data = build_supervised_data(DataConfig(max_length=128), tok, seed=1234)
    s = data.stats
    assert s.rows == s.kept > 10_000 and s.packed_sequences == len(data.train) < s.kept
    assert all(len(r["input_ids"]) <= 128 for r in data.train) and s.packing_efficiency > 0.85
    assert {p.phrasing for p in data.eval_prompts} == {"seen", "heldout"}
    p = data.eval_prompts[0]
    assert p.prompt_text.startswith("<|bos|>") and p.prompt_text.endswith("Answer:") and p.answer.startswith(" ")


# ------------------------------------------------------------------------------------------- preview CLI


def run_preview(repo_root, *args):
    return subprocess.run([sys.executable, "-m", "trainer.preview", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)


def test_preview_cli_shows_trained_spans_and_stats(repo_root):
    out = run_preview(repo_root, "--n", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- example") == 2 and "Answer:[[ " in out.stdout and "<|eos|>]]" in out.stdout
    assert "packing efficiency" in out.stdout and "synthetic:sft" in out.stdout


def test_preview_cli_bad_path_is_one_line(repo_root, tmp_path):
    out = run_preview(repo_root, f"data.path={tmp_path}/missing.jsonl")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.jsonl: no such file or directory" in lines[0]


# ------------------------------------------------------------------------------- a user's data.path


USER_ROWS = {  # one row of each user format, distinct per index
    "prompt_completion": lambda i: {"prompt": f"Say {i}.\nAnswer:", "completion": f" {i}"},
    "alpaca": lambda i: {"instruction": f"Say {i}.", "input": "", "output": f"{i}"},
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}]},
    "messages": lambda i: {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]},
}


@pytest.mark.parametrize("fmt", sorted(USER_ROWS))
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_user_data_path_replaces_the_instruct_stage_default_mixture(fmt, suffix, tok, tmp_path, capsys):
    from trainer.compose import compose

    rows = [USER_ROWS[fmt](i) for i in range(7)]
    path = tmp_path / f"mine{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    job = compose("instruct", [f"data.path={path}"])
    assert job.data.mixture == [] and job.data.path == str(path)
    assert f"data.path={path} replaces the stage's default data.mixture (synthetic:chat" in capsys.readouterr().err
    data = build_supervised_data(job.data, tok, job.seed)
    assert [(m["path"], m["rows"]) for m in data.stats.members] == [(str(path), 7)]
    assert data.stats.kept == 7 and f"{path} [train] weight 1: 7 rows, 7 kept" in data.stats.summary()
    assert "eval: synthetic:chat [eval]" in data.stats.summary()  # the stage's eval set, named


def test_the_default_mixture_stays_without_a_data_path_and_both_keys_is_an_error(tmp_path):
    from trainer.compose import compose
    from trainer.config import ConfigError

    assert [m.path for m in compose("instruct").data.mixture] == ["synthetic:chat", "synthetic:sharegpt",
                                                                  "synthetic:alpaca"]
    # Another key under data (or a data= group) is not a data.path: the mixture stays.
    assert len(compose("instruct", ["data.max_length=64"]).data.mixture) == 3
    with pytest.raises(ConfigError, match=r"data\.path and data\.mixture are both set"):
        compose("instruct", [f"data.path={tmp_path}/a.jsonl", "data.mixture=[{path: x}]"])


def test_instruct_trains_on_the_user_file_only_and_both_keys_exit_2(repo_root, tmp_path):
    from runs import TINY, run_stage

    path = write_jsonl(tmp_path / "chats.jsonl", [USER_ROWS["messages"](i) for i in range(12)])
    run_dir = tmp_path / "run"
    proc = run_stage(run_dir, *TINY, f"data.path={path}", "train.max_steps=1", "train.micro_batch_size=2",
                     stage="instruct")
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert [(m["path"], m["rows"]) for m in stats["members"]] == [(str(path), 12)] and stats["kept"] == 12
    assert f"{path} [train] weight 1: 12 rows, 12 kept" in proc.stdout
    assert "replaces the stage's default data.mixture" in proc.stderr
    both = run_stage(tmp_path / "both", *TINY, f"data.path={path}", f"data.mixture=[{{path: {path}}}]",
                     stage="instruct", check=False)
    assert both.returncode == 2, both.stderr[-2000:]
    last = both.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.path" in last and "data.mixture" in last
    assert not (tmp_path / "both" / "data_stats.json").exists()
