"""Deterministic synthetic instruction suite the repo trains and evaluates on.

A few-million-parameter Llama must learn these tasks in minutes on a CPU, so
payloads are short and written one character per space-separated word
("r e v e r s e", "3 4 + 5 8"): every character is then one token.

Families are either *trained* (appear in train) or *held out* (eval only), and
each trained family has *seen* phrasings (train) and *held-out* phrasings (eval
only), so eval measures three things apart: new instances, new wordings, new
tasks. Which instances may appear in eval is fixed by a hash of the instance
(`_reserved_for_eval`), so train and eval stay disjoint for any seed and size.

The same tasks are rendered in four row formats (`VARIANTS`); every row also
carries `family`, `phrasing` ("seen"|"heldout"), `family_split`
("trained"|"heldout") and `answer` (the correct last assistant answer). In the
train split a fifth of the demonstrations (completion, output, assistant turns)
carry chatter around that answer, as people's demonstrations do; see
`_with_demos`. Eval rows are always the bare answer.

`preference` (`PREFERENCE_VARIANTS`) turns the same tasks into preference pairs
for a reward model, in the `sft` layout: {prompt, chosen, rejected} strings, the
responses being " " + text. The rule a reward model has to learn: **prefer the
correct answer written exactly in the suite's layout (one symbol per
space-separated word) and nothing else.** Every chosen response is the suite's
answer; `kind` says how the rejected one breaks the rule:

- `wrong_answer`: a plausible wrong answer in the same layout with as many
  symbols: a sum off by 1, 2 or 10, a count off by 1 or 2, two sorted digits
  swapped, the letters not reversed or two of them swapped, one letter left in
  the wrong case, another letter of the word for first/last letter.
- `format`: the correct answer with chatter before or after it ("The answer is
  ...", "... Hope this helps!"; longer than the chosen one) or with the wrong
  separator ("5,7" longer, "57" as many tokens as "5 7"), so a preference for
  the shorter response does not pass for the rule.

The kind and the corruption are drawn per task from their own seeded stream, so
the other variants are unchanged by it; train pairs come from the train tasks
(trained families and wordings only), eval pairs from the eval tasks.

    python -m trainer.synthetic write --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from datasets import Dataset

VARIANTS = ("sft", "chat", "sharegpt", "alpaca")
# Kept apart from VARIANTS: those are the supervised formats the shipped tokenizer is built from.
PREFERENCE_VARIANTS = ("preference",)
PREFERENCE_KINDS = ("wrong_answer", "format")
SPLITS = ("train", "eval")
DEFAULT_ROWS = {"train": 20_000, "eval": 600}
# Plain-text prompt/completion separator: prompt ends with it, completion is " " + answer.
SFT_ANSWER_PREFIX = "\nAnswer:"
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with the result only.",
    "You are a careful assistant. Reply with just the answer.",
)
SYSTEM_PROMPT_RATE = 0.3
MULTI_TURN_RATE = 0.25
DEMO_CHATTER_RATE = 0.2  # share of train demonstrations with chatter around the answer (`_with_demos`)
NUM_SEEN_PHRASINGS = 4  # the first four phrasings of a trained family are trained on
EVAL_RESERVE_MODULUS = 10  # one instance in ten (by hash) may only ever appear in eval


@dataclass(frozen=True)
class Family:
    """One task: how to draw an instance and how the instruction may be worded.

    `draw(rng)` returns (payload, answer, fields); `fields` fill `{...}` slots of
    the phrasing (none of the current families needs one).
    """

    name: str
    draw: Callable[[random.Random], tuple[str, str, dict]]
    phrasings: tuple[str, ...]
    trained: bool


@dataclass(frozen=True)
class Task:
    """One rendered instance; every variant is built from these."""

    family: str
    instruction: str
    payload: str
    answer: str
    phrasing: str  # seen | heldout
    family_split: str  # trained | heldout
    demo: str = ""  # the answer as the train split demonstrates it (see `_with_demos`); `answer` if empty

    @property
    def demonstrated(self) -> str:
        return self.demo or self.answer


def _spaced(chars) -> str:
    return " ".join(chars)


def _letters(rng: random.Random, lo: int, hi: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


# Payloads are short (3-5 symbols) so that a model of a few million parameters
# learns every trained family within a few CPU minutes.
MIN_LEN, MAX_LEN = 3, 5


def _digits(rng: random.Random) -> str:
    return _letters(rng, MIN_LEN, MAX_LEN, string.digits)


def _draw_addition(rng):
    # Two-digit sums without carries: digit-wise addition generalises to unseen
    # operand pairs compositionally, which a tiny model learns in minutes (carries
    # take it far longer).
    tens_a = rng.randint(1, 9)
    tens_b = rng.randint(0, 9 - tens_a)
    ones_a = rng.randint(0, 9)
    ones_b = rng.randint(0, 9 - ones_a)
    a, b = 10 * tens_a + ones_a, 10 * tens_b + ones_b
    return f"{_spaced(str(a))} + {_spaced(str(b))}", _spaced(str(a + b)), {}


def _draw_reversal(rng):
    s = _letters(rng, MIN_LEN, MAX_LEN)
    return _spaced(s), _spaced(s[::-1]), {}


def _draw_sorting(rng):
    s = _digits(rng)
    return _spaced(s), _spaced(sorted(s)), {}


def _draw_sort_descending(rng):
    s = _digits(rng)
    return _spaced(s), _spaced(sorted(s, reverse=True)), {}


def _draw_uppercase(rng):
    s = _letters(rng, MIN_LEN, MAX_LEN)
    return _spaced(s), _spaced(s.upper()), {}


def _draw_lowercase(rng):
    s = _letters(rng, MIN_LEN, MAX_LEN, string.ascii_uppercase)
    return _spaced(s), _spaced(s.lower()), {}


def _draw_first_letter(rng):
    s = _letters(rng, MIN_LEN, MAX_LEN)
    return _spaced(s), s[0], {}


def _draw_last_letter(rng):
    s = _letters(rng, MIN_LEN, MAX_LEN)
    return _spaced(s), s[-1], {}


def _draw_counting(rng):
    # Counting the symbols of the payload: counting occurrences of a named letter
    # needed far more steps than the few CPU minutes the default run has.
    s = _letters(rng, MIN_LEN, MAX_LEN + 3)
    return _spaced(s), str(len(s)), {}


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("addition", _draw_addition, (
        "Add the two numbers.",
        "What is the sum?",
        "Compute the sum of these numbers.",
        "Add these together.",
        "Calculate the total.",
        "Give the result of this addition.",
    ), trained=True),
    Family("reversal", _draw_reversal, (
        "Reverse the letters.",
        "Write this string backwards.",
        "Reverse the following.",
        "Spell it in reverse order.",
        "Flip the order of the characters.",
        "Read these letters from right to left.",
    ), trained=True),
    Family("sorting", _draw_sorting, (
        "Sort the digits in ascending order.",
        "Sort these digits.",
        "Arrange the digits from smallest to largest.",
        "Put the digits in increasing order.",
        "Order these digits, lowest first.",
        "List the digits sorted ascending.",
    ), trained=True),
    Family("uppercase", _draw_uppercase, (
        "Convert to uppercase.",
        "Write these letters in capitals.",
        "Make every letter uppercase.",
        "Uppercase the following.",
        "Change the letters to upper case.",
        "Rewrite in capital letters.",
    ), trained=True),
    Family("counting", _draw_counting, (
        "How many letters are there?",
        "Count the letters.",
        "Count how many characters there are.",
        "What is the length of this string?",
        "Tell me the number of letters.",
        "How long is this sequence?",
    ), trained=True),
    Family("sort_descending", _draw_sort_descending, (
        "Sort the digits in descending order.",
        "Arrange the digits from largest to smallest.",
        "Put the digits in decreasing order.",
        "Sort these digits, biggest first.",
        "Order the digits from high to low.",
        "List the digits sorted descending.",
    ), trained=False),
    Family("first_letter", _draw_first_letter, (
        "What is the first letter?",
        "Give the first letter.",
        "Which letter comes first?",
        "Return only the first character.",
        "Write the first letter of the string.",
        "Name the first letter.",
    ), trained=False),
    Family("last_letter", _draw_last_letter, (
        "What is the last letter?",
        "Give the last letter.",
        "Which letter comes last?",
        "Return only the last character.",
        "Write the last letter of the string.",
        "Name the final letter.",
    ), trained=False),
    Family("lowercase", _draw_lowercase, (
        "Convert to lowercase.",
        "Write these letters in small letters.",
        "Make every letter lowercase.",
        "Lowercase the following.",
        "Change the letters to lower case.",
        "Rewrite without capital letters.",
    ), trained=False),
)}
TRAINED_FAMILIES = tuple(n for n, f in FAMILIES.items() if f.trained)
HELDOUT_FAMILIES = tuple(n for n, f in FAMILIES.items() if not f.trained)


def _reserved_for_eval(family: str, payload: str, fields: dict) -> bool:
    """Fixed, seed-independent partition of instances into train-only and eval-only."""
    key = f"{family}|{payload}|{sorted(fields.items())}"
    return zlib.crc32(key.encode()) % EVAL_RESERVE_MODULUS == 0


def _draw_task(rng: random.Random, family: str, phrasing: str, for_eval: bool, taken: Optional[set]) -> Task:
    fam = FAMILIES[family]
    for _ in range(100_000):
        payload, answer, fields = fam.draw(rng)
        key = (payload, tuple(sorted(fields.items())))
        if _reserved_for_eval(family, payload, fields) == for_eval and (taken is None or key not in taken):
            break
    else:
        raise ValueError(f"ran out of distinct eval instances of {family!r}; ask for fewer eval rows")
    if taken is not None:
        taken.add(key)
    if not fam.trained:
        pool = range(len(fam.phrasings))  # no wording of a held-out family was ever trained on
    elif phrasing == "seen":
        pool = range(NUM_SEEN_PHRASINGS)
    else:
        pool = range(NUM_SEEN_PHRASINGS, len(fam.phrasings))
    instruction = fam.phrasings[rng.choice(pool)].format(**fields)
    return Task(family, instruction, payload, answer, phrasing,
                "trained" if fam.trained else "heldout")


# Eval groups, weighted equally: new instances, new wordings, new families.
_EVAL_GROUPS = (
    [(f, "seen") for f in TRAINED_FAMILIES],
    [(f, "heldout") for f in TRAINED_FAMILIES],
    [(f, "heldout") for f in HELDOUT_FAMILIES],
)


@lru_cache(maxsize=16)
def _tasks(split: str, seed: int, n: int, noisy_demos: bool = True) -> tuple[Task, ...]:
    rng = random.Random(f"tuneforge-synthetic/{split}/{seed}")
    if split == "train":
        # Repeats within train are harmless (addition has only 9000 train sums); eval rows are distinct.
        tasks = tuple(_draw_task(rng, TRAINED_FAMILIES[i % len(TRAINED_FAMILIES)], "seen", False, None)
                      for i in range(n))
        return _with_demos(tasks, seed) if noisy_demos else tasks
    taken: dict[str, set] = {f: set() for f in FAMILIES}
    tasks = []
    for i in range(n):
        group = _EVAL_GROUPS[i % len(_EVAL_GROUPS)]
        family, phrasing = group[(i // len(_EVAL_GROUPS)) % len(group)]
        tasks.append(_draw_task(rng, family, phrasing, True, taken[family]))
    return tuple(tasks)


def _with_demos(tasks: tuple[Task, ...], seed: int) -> tuple[Task, ...]:
    """Train tasks with a share of their demonstrations wrapped in chatter.

    Demonstrations written by people are not all in the house style; these are
    why RLHF follows SFT. The SFT model imitates the chatter in that share of its
    samples (its greedy answers stay bare), the reward model's `format` pairs
    teach it to dislike chatter, and PPO has something real to remove. The
    noise has its own seeded stream, so the tasks themselves do not change.
    """
    rng = random.Random(f"tuneforge-synthetic/demo-noise/{seed}")
    return tuple(replace(t, demo=_badly_formatted(t.answer, rng, chatter_only=True))
                 if rng.random() < DEMO_CHATTER_RATE else t for t in tasks)


def _metadata(task: Task) -> dict:
    return {"family": task.family, "phrasing": task.phrasing,
            "family_split": task.family_split, "answer": task.answer}


def _user_text(task: Task) -> str:
    return f"{task.instruction}\n{task.payload}"


def _conversations(tasks: tuple[Task, ...], split: str, seed: int) -> list[list[dict]]:
    """OpenAI-style messages per task; shared by `chat` and `sharegpt` so both hold the same dialogues.

    A multi-turn row first asks another question of the same split (with its
    answer), always of a trained family with a seen wording, so a held-out
    family or wording never gets an in-context demonstration.
    """
    rng = random.Random(f"tuneforge-synthetic/conversations/{split}/{seed}")
    history_pool = [i for i, t in enumerate(tasks) if t.family_split == "trained" and t.phrasing == "seen"]
    out = []
    for i, task in enumerate(tasks):
        messages = []
        if rng.random() < SYSTEM_PROMPT_RATE:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if rng.random() < MULTI_TURN_RATE and len(history_pool) > 1:
            j = i
            while j == i:
                j = rng.choice(history_pool)
            messages += [{"role": "user", "content": _user_text(tasks[j])},
                         {"role": "assistant", "content": tasks[j].demonstrated}]
        messages += [{"role": "user", "content": _user_text(task)},
                     {"role": "assistant", "content": task.demonstrated}]
        out.append(messages)
    return out


_SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
_CHATTER_BEFORE = ("The answer is", "Sure! The result is", "Here you go:")
_CHATTER_AFTER = ("Hope this helps!", "That is the answer.", "Easy.")
_CHATTER_WORDS = frozenset(w.strip("!.:").lower() for phrase in _CHATTER_BEFORE + _CHATTER_AFTER for w in phrase.split())


def has_chatter(text: str) -> bool:
    """Whether a generated answer carries any word of the demonstrations' chatter. Every answer of the suite is
    one symbol per word, so a word of two or more letters from the chatter is never part of an answer."""
    return any(len(w) > 1 and w.strip("!.:,").lower() in _CHATTER_WORDS for w in text.split())


def _nudged(symbol: str, rng: random.Random) -> str:
    """A neighbouring symbol of the same kind (digit, lowercase or uppercase letter)."""
    alphabet = next(a for a in (string.digits, string.ascii_lowercase, string.ascii_uppercase) if symbol in a)
    return alphabet[(alphabet.index(symbol) + rng.choice((-1, 1))) % len(alphabet)]


def _swapped(symbols: list[str], rng: random.Random) -> Optional[list[str]]:
    """`symbols` with two different ones exchanged; None when all are equal."""
    pairs = [(i, j) for i in range(len(symbols)) for j in range(i + 1, len(symbols)) if symbols[i] != symbols[j]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    out = list(symbols)
    out[i], out[j] = out[j], out[i]
    return out


def _wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer to `task` in the suite's layout, as long as the right one where possible."""
    right = task.answer.split(" ")
    payload = task.payload.split(" ")
    wrong: Optional[list[str]] = None
    if task.family in ("addition", "counting"):
        n = int("".join(right))
        near = [n + d for d in (-2, -1, 1, 2, -10, 10) if n + d > 0 and len(str(n + d)) == len(str(n))]
        wrong = list(str(rng.choice(near))) if near else None
    elif task.family in ("sorting", "sort_descending"):
        wrong = _swapped(right, rng)
    elif task.family == "reversal":
        wrong = payload if payload != right and rng.random() < 0.5 else _swapped(right, rng)
    elif task.family in ("uppercase", "lowercase"):
        i = rng.randrange(len(right))
        wrong = right[:i] + [right[i].swapcase()] + right[i + 1:]
    elif task.family in ("first_letter", "last_letter"):
        others = sorted(set(payload) - set(right))
        wrong = [rng.choice(others)] if others else None
    if wrong is None:  # no plausible mistake of the family's own kind (e.g. "5 5 5" sorted): change one symbol
        i = rng.randrange(len(right))
        wrong = right[:i] + [_nudged(right[i], rng)] + right[i + 1:]
    return " ".join(wrong)


def _badly_formatted(answer: str, rng: random.Random, chatter_only: bool = False) -> str:
    """The correct answer with chatter around it or (unless `chatter_only`) with the wrong separator."""
    forms = ["before", "after"] + (["joined", "commas"] if " " in answer and not chatter_only else [])
    form = rng.choice(forms)
    if form == "before":
        return f"{rng.choice(_CHATTER_BEFORE)} {answer}"
    if form == "after":
        return f"{answer} {rng.choice(_CHATTER_AFTER)}"
    return answer.replace(" ", "" if form == "joined" else ",")


def _preference_rows(tasks: tuple[Task, ...], split: str, seed: int) -> list[dict]:
    rng = random.Random(f"tuneforge-synthetic/preference/{split}/{seed}")
    rows = []
    for t in tasks:
        kind = rng.choice(PREFERENCE_KINDS)
        rejected = _wrong_answer(t, rng) if kind == "wrong_answer" else _badly_formatted(t.answer, rng)
        rows.append({"prompt": _user_text(t) + SFT_ANSWER_PREFIX, "chosen": " " + t.answer, "rejected": " " + rejected,
                     "kind": kind, "family": t.family, "phrasing": t.phrasing, "family_split": t.family_split})
    return rows


def make_rows(variant: str, split: str, seed: int = 0, n: Optional[int] = None,
              noisy_demos: bool = True) -> list[dict]:
    """Rows of one variant and split; the variants of a split share the same tasks. With
    `noisy_demos=False` every train demonstration is the bare answer (see `_with_demos`).

    sft:      {"prompt": "<instruction>\\n<payload>\\nAnswer:", "completion": " <answer>"}
    chat:     {"messages": [{"role", "content"}, ...]}   (some with a system prompt, some two tasks)
    sharegpt: {"conversations": [{"from", "value"}, ...]} (the same dialogues as chat)
    alpaca:   {"instruction", "input": <payload>, "output": <answer>}
    plus family, phrasing, family_split, answer on every row.

    preference: {"prompt" (as sft), "chosen": " <answer>", "rejected": " <worse response>",
                 "kind": wrong_answer|format, family, phrasing, family_split} (no `answer`: it is `chosen`)
    """
    if variant not in VARIANTS + PREFERENCE_VARIANTS:
        raise ValueError(f"unknown synthetic variant {variant!r}; accepted: {', '.join(VARIANTS + PREFERENCE_VARIANTS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; accepted: {', '.join(SPLITS)}")
    tasks = _tasks(split, seed, DEFAULT_ROWS[split] if n is None else n, noisy_demos)
    if variant == "preference":
        return _preference_rows(tasks, split, seed)
    if variant == "sft":
        return [{"prompt": _user_text(t) + SFT_ANSWER_PREFIX, "completion": " " + t.demonstrated, **_metadata(t)}
                for t in tasks]
    if variant == "alpaca":
        return [{"instruction": t.instruction, "input": t.payload, "output": t.demonstrated, **_metadata(t)}
                for t in tasks]
    dialogues = _conversations(tasks, split, seed)
    if variant == "chat":
        return [{"messages": m, **_metadata(t)} for m, t in zip(dialogues, tasks)]
    return [{"conversations": [{"from": _SHAREGPT_ROLES[x["role"]], "value": x["content"]} for x in m],
             **_metadata(t)} for m, t in zip(dialogues, tasks)]


@lru_cache(maxsize=16)
def _cached_rows(variant: str, split: str, seed: int) -> tuple[dict, ...]:
    return tuple(make_rows(variant, split, seed))


def load_synthetic(spec: str, split: str, seed: int = 0) -> Dataset:
    """`synthetic:<variant>` as a `datasets.Dataset` (rows cached per process)."""
    from datasets import Dataset  # imported here so the build script and CLI stay light

    prefix, _, variant = spec.partition(":")
    if prefix != "synthetic" or variant not in VARIANTS + PREFERENCE_VARIANTS:
        raise ValueError(f"bad synthetic spec {spec!r}; accepted: "
                         + ", ".join(f"synthetic:{v}" for v in VARIANTS + PREFERENCE_VARIANTS))
    return Dataset.from_list(list(_cached_rows(variant, split, seed)))


def write_jsonl(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write `<variant>_<split>.jsonl` for every variant and split, so users can see the formats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for variant in VARIANTS + PREFERENCE_VARIANTS:
        for split in SPLITS:
            path = out_dir / f"{variant}_{split}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for row in make_rows(variant, split, seed):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            paths.append(path)
    return paths


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.synthetic", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write every variant and split as JSONL")
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_jsonl(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
