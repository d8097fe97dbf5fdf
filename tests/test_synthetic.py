"""The synthetic suite is deterministic, leak-free and correct; the shipped tokenizer fits it."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer import synthetic
from trainer.synthetic import (
    FAMILIES,
    HELDOUT_FAMILIES,
    PREFERENCE_KINDS,
    PREFERENCE_VARIANTS,
    SFT_ANSWER_PREFIX,
    TRAINED_FAMILIES,
    VARIANTS,
    load_synthetic,
    make_rows,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = ROOT / "trainer" / "assets" / "tokenizer"
ROW_KEYS = {
    "sft": {"prompt", "completion"},
    "chat": {"messages"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "input", "output"},
}
METADATA_KEYS = {"family", "phrasing", "family_split", "answer"}


def phrasing_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{letter}"), "(?P<letter>[a-z])") + "$")


def parse_instruction(family: str, instruction: str) -> tuple[int, str | None]:
    """(phrasing index, letter to count) of an instruction, by matching the family's templates."""
    for i, template in enumerate(FAMILIES[family].phrasings):
        m = phrasing_pattern(template).match(instruction)
        if m:
            return i, m.groupdict().get("letter")
    raise AssertionError(f"{instruction!r} is no phrasing of {family}")


def solve(family: str, payload: str, letter: str | None) -> str:
    """The answer recomputed from the payload, independently of the generator."""
    chars = payload.split(" ")
    if family == "addition":
        a, b = (int(x.replace(" ", "")) for x in payload.split(" + "))
        return " ".join(str(a + b))
    return {
        "reversal": lambda: " ".join(reversed(chars)),
        "sorting": lambda: " ".join(sorted(chars)),
        "sort_descending": lambda: " ".join(sorted(chars, reverse=True)),
        "uppercase": lambda: payload.upper(),
        "lowercase": lambda: payload.lower(),
        "first_letter": lambda: chars[0],
        "last_letter": lambda: chars[-1],
        "counting": lambda: str(len(chars)),
    }[family]()


def split_sft_prompt(prompt: str) -> tuple[str, str]:
    assert prompt.endswith(SFT_ANSWER_PREFIX)
    instruction, payload = prompt[: -len(SFT_ANSWER_PREFIX)].split("\n")
    return instruction, payload


def instance_key(row: dict) -> tuple:
    instruction, payload = split_sft_prompt(row["prompt"])
    return row["family"], payload, parse_instruction(row["family"], instruction)[1]


@pytest.fixture(scope="module")
def rows():
    return {(v, s): make_rows(v, s) for v in VARIANTS for s in ("train", "eval")}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))


def test_default_sizes_and_eval_balance(rows):
    for v in VARIANTS:
        assert len(rows[v, "train"]) == 20_000
        assert len(rows[v, "eval"]) == 600
    groups = Counter((r["family_split"], r["phrasing"]) for r in rows["sft", "eval"])
    assert groups == {("trained", "seen"): 200, ("trained", "heldout"): 200, ("heldout", "heldout"): 200}
    assert set(Counter(r["family"] for r in rows["sft", "eval"]).values()) == {80, 50}


def test_same_seed_same_rows_other_seed_other_rows():
    first = {v: make_rows(v, "eval", seed=3) for v in VARIANTS}
    synthetic._tasks.cache_clear()
    for v in VARIANTS:
        assert make_rows(v, "eval", seed=3) == first[v]
        assert make_rows(v, "eval", seed=4) != first[v]
    assert make_rows("sft", "train", seed=3, n=500) == make_rows("sft", "train", seed=3, n=500)
    assert make_rows("sft", "train", seed=3, n=500) != make_rows("sft", "train", seed=4, n=500)


def test_schema_of_every_variant(rows):
    for (variant, split), rs in rows.items():
        for r in rs:
            assert set(r) == ROW_KEYS[variant] | METADATA_KEYS, variant
            assert r["phrasing"] in ("seen", "heldout") and r["family_split"] in ("trained", "heldout")
            assert (r["family_split"] == "heldout") == (r["family"] in HELDOUT_FAMILIES)
    for split in ("train", "eval"):
        for sft, alpaca, chat in zip(rows["sft", split], rows["alpaca", split], rows["chat", split]):
            # Every variant demonstrates the same thing; `answer` is the correct one.
            assert sft["completion"] == " " + alpaca["output"] == " " + chat["messages"][-1]["content"]
            assert alpaca["input"] and alpaca["instruction"]
            if split == "eval":
                assert sft["completion"] == " " + sft["answer"]
    for r in rows["alpaca", "train"]:
        assert demo_is_answer_or_chatter(r["output"], r["answer"]), r
    for r in rows["chat", "train"]:
        roles = [m["role"] for m in r["messages"]]
        assert set(r["messages"][0]) == {"role", "content"}
        body = roles[1:] if roles[0] == "system" else roles
        assert body in (["user", "assistant"], ["user", "assistant"] * 2)
    kinds = Counter((m["messages"][0]["role"] == "system", len(m["messages"]) > 3) for m in rows["chat", "train"])
    assert len(kinds) == 4, "system prompts and multi-turn rows, with and without each other"


def demo_is_answer_or_chatter(demo: str, answer: str) -> bool:
    return demo == answer or any(demo in (f"{c} {answer}", f"{answer} {c}")
                                 for c in synthetic._CHATTER_BEFORE + synthetic._CHATTER_AFTER)


def test_a_fifth_of_train_demonstrations_carry_chatter(rows):
    # Noisy demonstrations give RLHF something the SFT model imitates and the reward model dislikes.
    noisy = [r for r in rows["sft", "train"] if r["completion"] != " " + r["answer"]]
    assert 0.17 < len(noisy) / len(rows["sft", "train"]) < 0.23
    assert all(demo_is_answer_or_chatter(r["completion"][1:], r["answer"]) for r in noisy)
    families = Counter(r["family"] for r in noisy)
    assert set(families) == set(TRAINED_FAMILIES) and min(families.values()) > 0.15 * len(noisy)
    chat_turns = [m["content"] for r in rows["chat", "train"] for m in r["messages"] if m["role"] == "assistant"]
    assert 0.17 < sum(not re.fullmatch(r"(\S )*\S", t) for t in chat_turns) / len(chat_turns) < 0.23


def test_variants_share_instances_and_sharegpt_mirrors_chat(rows):
    for split in ("train", "eval"):
        for sft, chat, share, alpaca in zip(*(rows[v, split] for v in VARIANTS)):
            assert sft["prompt"] == chat["messages"][-2]["content"] + SFT_ANSWER_PREFIX
            assert sft["prompt"] == f"{alpaca['instruction']}\n{alpaca['input']}{SFT_ANSWER_PREFIX}"
            assert [(m["from"], m["value"]) for m in share["conversations"]] == [
                ({"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], m["content"])
                for m in chat["messages"]]
            meta = [{k: r[k] for k in METADATA_KEYS} for r in (sft, chat, share, alpaca)]
            assert all(m == meta[0] for m in meta)


def test_answers_are_correct(rows):
    for split in ("train", "eval"):
        for r in rows["sft", split]:
            instruction, payload = split_sft_prompt(r["prompt"])
            _, letter = parse_instruction(r["family"], instruction)
            assert r["answer"] == solve(r["family"], payload, letter), r
            assert len(r["answer"].split(" ")) <= 12


def test_train_and_eval_are_disjoint(rows):
    train = {instance_key(r) for r in rows["sft", "train"]}
    evals = [instance_key(r) for r in rows["sft", "eval"]]
    assert not train & set(evals)
    assert len(set(evals)) == len(evals), "eval instances are distinct"
    # Multi-turn history in eval is itself an eval question, so it never leaks train data either.
    eval_questions = {r["prompt"][: -len(SFT_ANSWER_PREFIX)] for r in rows["sft", "eval"]}
    train_questions = {r["prompt"][: -len(SFT_ANSWER_PREFIX)] for r in rows["sft", "train"]}
    for r in rows["chat", "eval"]:
        for m in r["messages"]:
            if m["role"] == "user":
                assert m["content"] in eval_questions and m["content"] not in train_questions


def test_heldout_families_and_phrasings_never_trained(rows):
    for variant in VARIANTS:
        assert all(r["family_split"] == "trained" and r["phrasing"] == "seen" for r in rows[variant, "train"])
    seen_phrasings = Counter()
    for r in rows["sft", "train"]:
        assert r["family"] not in HELDOUT_FAMILIES
        index, _ = parse_instruction(r["family"], split_sft_prompt(r["prompt"])[0])
        assert index < synthetic.NUM_SEEN_PHRASINGS
        seen_phrasings[r["family"], index] += 1
    assert len(seen_phrasings) == 5 * synthetic.NUM_SEEN_PHRASINGS, "every seen phrasing is trained on"
    for r in rows["sft", "eval"]:
        index, _ = parse_instruction(r["family"], split_sft_prompt(r["prompt"])[0])
        if r["family_split"] == "trained":
            assert (index < synthetic.NUM_SEEN_PHRASINGS) == (r["phrasing"] == "seen")
        else:
            assert r["phrasing"] == "heldout"


def test_load_synthetic_parses_spec_and_caches():
    ds = load_synthetic("synthetic:alpaca", "eval")
    assert len(ds) == 600 and set(ds.column_names) == ROW_KEYS["alpaca"] | METADATA_KEYS
    hits = synthetic._cached_rows.cache_info().hits
    assert load_synthetic("synthetic:alpaca", "eval")[0] == ds[0]
    assert synthetic._cached_rows.cache_info().hits == hits + 1
    with pytest.raises(ValueError, match="synthetic:sft, synthetic:chat, synthetic:sharegpt, synthetic:alpaca"):
        load_synthetic("synthetic:nope", "train")
    with pytest.raises(ValueError, match="train, eval"):
        make_rows("sft", "test")


def test_cli_writes_every_variant_and_split(tmp_path):
    synthetic.main(["write", "--out", str(tmp_path), "--seed", "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{v}_{s}.jsonl" for v in VARIANTS + PREFERENCE_VARIANTS for s in ("train", "eval"))
    for variant in ("chat", "preference"):
        lines = (tmp_path / f"{variant}_eval.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(x) for x in lines] == make_rows(variant, "eval", seed=1)


# ------------------------------------------------------------------------------------------- preference pairs


@pytest.fixture(scope="module")
def pairs():
    return {s: make_rows("preference", s) for s in ("train", "eval")}


def symbols(response: str) -> list[str]:
    return response.split()


def test_preference_pairs_are_the_sft_tasks_with_the_correct_answer_chosen(rows, pairs):
    for split in ("train", "eval"):
        assert len(pairs[split]) == len(rows["sft", split])
        for pair, sft in zip(pairs[split], rows["sft", split]):
            assert set(pair) == {"prompt", "chosen", "rejected", "kind", "family", "phrasing", "family_split"}
            assert pair["prompt"] == sft["prompt"] and pair["chosen"] == " " + sft["answer"]
            assert {k: pair[k] for k in ("family", "phrasing", "family_split")} == \
                {k: sft[k] for k in ("family", "phrasing", "family_split")}
            assert pair["rejected"].startswith(" ") and pair["rejected"] != pair["chosen"]
    assert all(p["family_split"] == "trained" and p["phrasing"] == "seen" for p in pairs["train"])
    train = {instance_key(p) for p in pairs["train"]}
    assert not train & {instance_key(p) for p in pairs["eval"]}, "eval pairs are new instances"


def test_preference_kinds_are_balanced_and_follow_the_rule(pairs):
    for split, rs in pairs.items():
        kinds = Counter(p["kind"] for p in rs)
        assert set(kinds) == set(PREFERENCE_KINDS)
        assert all(0.4 < n / len(rs) < 0.6 for n in kinds.values()), (split, kinds)
    longer = Counter()
    for p in pairs["train"] + pairs["eval"]:
        instruction, payload = split_sft_prompt(p["prompt"])
        answer = solve(p["family"], payload, parse_instruction(p["family"], instruction)[1])
        rejected = p["rejected"][1:]
        if p["kind"] == "wrong_answer":
            # Same layout, wrong content: one symbol per word, and as many symbols as the answer.
            assert rejected != answer and all(len(w) == 1 for w in symbols(rejected)), p
            assert len(symbols(rejected)) == len(symbols(answer)), p
        else:
            # The right answer, with chatter around it or with the wrong separator.
            assert "".join(symbols(answer)) in rejected.replace(" ", "").replace(",", ""), p
            assert rejected != answer and (len(rejected) > len(answer) or " " not in rejected), p
        longer[p["kind"], len(p["rejected"]) > len(p["chosen"])] += 1
    # Not learnable by length alone: in format pairs the rejected response is sometimes the shorter one.
    assert longer["format", False] > 0.1 * longer["format", True]
    assert longer["wrong_answer", True] < 0.1 * longer["wrong_answer", False]


def test_preference_pairs_are_deterministic():
    first = make_rows("preference", "eval", seed=3)
    synthetic._tasks.cache_clear()
    assert make_rows("preference", "eval", seed=3) == first
    assert make_rows("preference", "eval", seed=4) != first
    ds = load_synthetic("synthetic:preference", "eval")
    assert len(ds) == 600 and ds[0] == make_rows("preference", "eval")[0]


def test_shipped_tokenizer_round_trips_every_answer(rows, tok):
    assert 384 <= len(tok) <= 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    answers = sorted({r["answer"] for split in ("train", "eval") for r in rows["sft", split]})
    for texts in (answers, [" " + a for a in answers]):
        ids = tok(texts, add_special_tokens=False).input_ids
        assert tok.batch_decode(ids) == texts
        # One token per space-separated character, so the model never has to spell a merged chunk.
        assert [len(x) for x in ids] == [len(t.split()) for t in texts]
    odd = "Any text: 12345, héllo 🙂\n\n  tabs\tand  <|end|>"
    assert tok.decode(tok(odd, add_special_tokens=False).input_ids) == odd
    assert tok("x").input_ids[0] == tok.bos_token_id


def test_chat_template_prefix_property(rows, tok):
    multi = [r["messages"] for split in ("train", "eval") for r in rows["chat", split] if len(r["messages"]) > 3]
    for messages in multi[:300]:
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages[: k + 1], tokenize=False)
            assert full.startswith(prompt)
            assert full[len(prompt):] == m["content"] + "<|end|>" + tok.eos_token
            prompt_ids = tok(prompt, add_special_tokens=False).input_ids
            assert tok(full, add_special_tokens=False).input_ids[: len(prompt_ids)] == prompt_ids
    system = [r["messages"] for r in rows["chat", "train"] if r["messages"][0]["role"] == "system"][0]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|bos|><|system|>\n" + system[0]["content"])


def test_tokenizer_build_is_deterministic_and_shipped_files_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.write_tokenizer(tmp_path / "a")
    build.write_tokenizer(tmp_path / "b")
    assert build.differing_files(tmp_path / "a", tmp_path / "b") == []
    assert build.differing_files(tmp_path / "a", SHIPPED_TOKENIZER) == [], \
        "rerun `python scripts/build_tokenizer.py` and commit trainer/assets/tokenizer"
    assert sum(p.stat().st_size for p in SHIPPED_TOKENIZER.iterdir()) < 200_000
