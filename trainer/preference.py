"""Preference pairs for reward-model and DPO training: load, detect format, template, tokenize, filter, collate.

A pair is one prompt with two responses, `chosen` (preferred) and `rejected`. Each side becomes the token ids of
the whole sequence the reward model scores (prompt + response), built from the same pieces as supervised rows
(`trainer.data.example_pieces`): plain text in SFT's prompt/completion layout, conversations through the chat
template, so a backbone trained by `trainer.sft` or `trainer.instruct` sees the layout it was trained on. Each
side also carries its response mask: 1 on the tokens SFT would train on (the response and eos, or the assistant
turn and its end-of-turn token), whose log-probs DPO sums.

Formats, detected once per dataset from its first row (`data.format` overrides):

    preference_text           prompt (string, may be absent) + chosen + rejected strings       (TRL "standard")
    preference_messages       prompt: [{role, content}]; chosen, rejected: the assistant message(s) that follow
                              (TRL conversational, explicit prompt)
    preference_conversations  chosen, rejected: whole conversations, equal up to their final assistant turn
                              (TRL conversational, implicit prompt; UltraFeedback-binarized, whose `prompt`
                              string column is ignored)

Optional columns: `margin` (number, default 0.0); `kind`, `family`, `phrasing`, `family_split` (kept on eval pairs
for accuracy per group).
Pairs with identical sides or an empty response are dropped and counted; a side over `max_length` tokens is
dropped or truncated (`data.overlong`); a malformed row is a DataError naming the source and the row.

Relation to TRL 1.x `RewardTrainer._prepare_dataset` / `DataCollatorForPreference`:

- same: the sequence scored is prompt + response; text sides end with eos; conversations are the chat template's
  rendering of prompt + response messages; the batch is chosen rows then rejected rows, right-padded, with an
  attention mask and a float `margin`.
- text: TRL tokenizes the string `prompt + chosen + eos_token` with the tokenizer's special tokens; we emit
  bos + prompt + response + eos with prompt and response tokenized apart (SFT's pieces). The ids agree unless
  BPE merges across the prompt/response boundary (responses starting with a space, like the synthetic suite's,
  do not: a test compares) or the tokenizer's post-processor adds no bos although it has one.
- conversations: TRL tokenizes the whole rendering; we tokenize it in SFT's pieces, split where assistant turns
  start and end (same caveat), and refuse templates that rewrite earlier turns, as SFT does. `tools` and
  `chat_template_kwargs` columns are not passed to the template.
- filtering: TRL drops pairs with a side over max_length (our `overlong="drop"`) and keeps identical or empty
  responses; we drop those and count them, and `overlong="truncate"` keeps the first max_length tokens instead.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import torch

from trainer.config import PREFERENCE_FORMATS, DataConfig
from trainer.sampling import SeededOrder
from trainer.data import (
    DataError,
    EvalPrompt,
    best_fit_rows,
    Templater,
    checked_message,
    describe_source,
    encode_pieces,
    example_pieces,
    load_rows,
    map_rows,
    plan_rows,
    templater,
)

FORMAT_FIELDS = {
    "preference_text": "prompt (optional) + chosen + rejected strings",
    "preference_messages": "prompt: [{role, content}] + chosen, rejected: the assistant message(s) that follow",
    "preference_conversations": "chosen, rejected: [{role, content}] conversations differing in the last assistant turn",
}
PAIR_DROP_REASONS = ("identical", "empty_response", "overlong")
# What a pair holds: each side's token ids and response mask (1 on the tokens SFT trains on), and its margin.
PAIR_KEYS = ("chosen_input_ids", "rejected_input_ids", "chosen_response_mask", "rejected_response_mask", "margin")
# Optional source columns kept on eval pairs, so accuracy is reported per group (the synthetic suite has all four).
EVAL_GROUP_COLUMNS = ("kind", "family", "phrasing", "family_split")
# datasets caches map results by the mapped function's name; this changes the key when the code changes.
_CODE_HASH = hashlib.sha256(Path(__file__).read_bytes() + Path(__file__).with_name("data.py").read_bytes()).hexdigest()[:16]


def _accepted_formats() -> str:
    return "; ".join(f"{name} ({fields})" for name, fields in FORMAT_FIELDS.items())


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------------- formats


def detect_preference_format(row: dict) -> str:
    """preference_text | preference_messages | preference_conversations, from the types of one row's fields."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "preference_text"
    if isinstance(chosen, list) and isinstance(rejected, list):
        # UltraFeedback-binarized carries a `prompt` string next to whole conversations: only a list is a prompt.
        return "preference_messages" if isinstance(row.get("prompt"), list) else "preference_conversations"
    fields = sorted(k for k, v in row.items() if v is not None)
    raise DataError(f"cannot detect the preference format of a row with fields {fields} (chosen: "
                    f"{_type_name(chosen)}, rejected: {_type_name(rejected)}); accepted formats: {_accepted_formats()}")


def _string(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"missing {key!r} (format {fmt}: {FORMAT_FIELDS[fmt]})")
    if not isinstance(value, str):
        raise DataError(f"{key} must be a string in format {fmt}, got {_type_name(value)}")
    return value


def _messages(row: dict, key: str, fmt: str) -> list[dict]:
    value = row.get(key)
    if value is None:
        raise DataError(f"missing {key!r} (format {fmt}: {FORMAT_FIELDS[fmt]})")
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else _type_name(value)
        raise DataError(f"{key} must be a non-empty list of {{role, content}} messages in format {fmt}, got {what}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{key}[{i}] must be a {{role, content}} message, got {_type_name(m)}")
        out.append(checked_message(m.get("role"), m.get("content"), f"{key}[{i}]"))
    return out


def _ends_with_assistant(messages: list[dict], key: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{key} must end with the assistant message being compared; it ends with a "
                        f"{messages[-1]['role']!r} message")


def _margin(row: dict) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"margin must be a finite number, got {value!r}")
    return float(value)


@dataclass
class _PlannedPair:
    chosen: object  # trainer.data._Pieces of prompt + chosen response
    rejected: object
    margin: float


def _plan_pair(row: dict, fmt: str, t: Templater, system_prompt: Optional[str]) -> Optional[_PlannedPair]:
    """Check a row and split both sides into pieces; None when a response is empty (whitespace only)."""
    if fmt == "preference_text":
        prompt = "" if row.get("prompt") is None else _string(row, "prompt", fmt)
        sides = [_string(row, "chosen", fmt), _string(row, "rejected", fmt)]
        if not all(s.strip() for s in sides):
            return None
        # SFT's prompt/completion layout: bos + prompt + response + eos, no chat template.
        planned = [example_pieces({"prompt": prompt, "completion": s}, "prompt_completion", t, None) for s in sides]
    elif fmt == "preference_messages":
        prompt = _messages(row, "prompt", fmt)
        sides = [_messages(row, "chosen", fmt), _messages(row, "rejected", fmt)]
        for key, side in zip(("chosen", "rejected"), sides):
            _ends_with_assistant(side, key)
        if not all("".join(m["content"] for m in side).strip() for side in sides):
            return None
        planned = [example_pieces({"messages": prompt + side}, "messages", t, system_prompt) for side in sides]
    elif fmt == "preference_conversations":
        sides = [_messages(row, "chosen", fmt), _messages(row, "rejected", fmt)]
        for key, side in zip(("chosen", "rejected"), sides):
            _ends_with_assistant(side, key)
            if len(side) < 2:
                raise DataError(f"{key} has no prompt: it needs at least one message before its final assistant turn")
        chosen, rejected = sides
        if chosen[:-1] != rejected[:-1]:
            i = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                     min(len(chosen), len(rejected)) - 1)
            raise DataError(f"chosen and rejected must share every message before their final assistant turn; "
                            f"they differ at message {i}")
        if not all(side[-1]["content"].strip() for side in sides):
            return None
        planned = [example_pieces({"messages": side}, "messages", t, system_prompt) for side in sides]
    else:
        raise DataError(f"unknown preference format {fmt!r}; accepted: {', '.join(PREFERENCE_FORMATS)}")
    if None in planned:  # example_pieces found nothing to answer (cannot happen after the checks above)
        return None
    return _PlannedPair(planned[0], planned[1], _margin(row))


# ---------------------------------------------------------------------------------------------------- tokenizing


def _assemble_pair(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]], margin: float,
                   max_length: int, overlong: str) -> tuple[Optional[dict], str]:
    """chosen, rejected: (token ids, response mask) of each side."""
    (chosen, chosen_mask), (rejected, rejected_mask) = chosen, rejected
    if chosen == rejected:
        return None, "identical"
    status = "kept"
    if max(len(chosen), len(rejected)) > max_length:
        if overlong == "drop":
            return None, "overlong"
        chosen, rejected, status = chosen[:max_length], rejected[:max_length], "truncated"
        chosen_mask, rejected_mask = chosen_mask[:max_length], rejected_mask[:max_length]
        if chosen == rejected:  # they differed only after max_length
            return None, "identical"
    return {"chosen_input_ids": chosen, "rejected_input_ids": rejected, "chosen_response_mask": chosen_mask,
            "rejected_response_mask": rejected_mask, "margin": margin}, status


def _response_mask(pieces: list[tuple[list[int], bool]]) -> list[int]:
    """1 on the trained pieces' tokens, 0 elsewhere; the first token has nothing to predict it, so it is 0."""
    mask = [int(trained) for ids, trained in pieces for _ in ids]
    if mask:
        mask[0] = 0
    return mask


def _encode_pairs(tokenizer, planned: list[_PlannedPair], max_length: int,
                  overlong: str) -> list[tuple[Optional[dict], str]]:
    """Tokenize many planned pairs in one call and assemble them."""
    encoded = encode_pieces(tokenizer, [p for pair in planned for p in (pair.chosen, pair.rejected)])
    sides = [([t for piece, _ in pieces for t in piece], _response_mask(pieces)) for pieces in encoded]
    return [_assemble_pair(sides[2 * i], sides[2 * i + 1], pair.margin, max_length, overlong)
            for i, pair in enumerate(planned)]


def tokenize_pair(row: dict, fmt: str, tokenizer, max_length: int, overlong: str,
                  system_prompt: Optional[str] = None) -> tuple[Optional[dict], str]:
    """(pair or None, status) for one row; status is kept | truncated | identical | empty_response | overlong.

    A pair is {"chosen_input_ids", "rejected_input_ids", "chosen_response_mask", "rejected_response_mask",
    "margin"}; `fmt` may be "auto" (detected from this row). A malformed row raises DataError.
    """
    planned = _plan_pair(row, detect_preference_format(row) if fmt == "auto" else fmt, templater(tokenizer),
                         system_prompt)
    if planned is None:
        return None, "empty_response"
    return _encode_pairs(tokenizer, [planned], max_length, overlong)[0]


def _tokenize_pair_batch(batch: dict, *, fmt, tokenizer, max_length, overlong, system_prompt, code_hash) -> dict:
    """datasets.map function; errors are returned per row so that `map_rows` can name the row."""
    t = templater(tokenizer)
    planned, errors = plan_rows(batch, lambda row: _plan_pair(row, fmt, t, system_prompt))
    assembled = iter(_encode_pairs(tokenizer, [p for p in planned if p is not None], max_length, overlong))
    out = {k: [] for k in PAIR_KEYS}
    out.update(status=[], error=errors)
    for p, err in zip(planned, errors):
        pair, status = next(assembled) if p is not None else (None, "error" if err else "empty_response")
        for k in PAIR_KEYS:
            out[k].append(pair[k] if pair else 0.0 if k == "margin" else [])
        out["status"].append(status)
    return out


def _tokenize_pairs(ds: datasets.Dataset, fmt: str, tokenizer, cfg: DataConfig, source: str) -> dict[str, list]:
    """Tokenize every row of one dataset; columns as Python lists. The format is detected from the first row."""
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    if fmt == "auto":
        try:
            fmt = detect_preference_format(ds[0])
        except DataError as e:
            raise DataError(f"{source}: row 0: {e}") from None
    elif fmt not in PREFERENCE_FORMATS:
        raise DataError(f"{source}: unknown preference format {fmt!r}; accepted: {', '.join(PREFERENCE_FORMATS)}")
    ids, mask = datasets.Sequence(datasets.Value("int32")), datasets.Sequence(datasets.Value("int8"))
    features = {"chosen_input_ids": ids, "rejected_input_ids": ids, "chosen_response_mask": mask,
                "rejected_response_mask": mask, "margin": datasets.Value("float64"), "status": datasets.Value("string")}
    fn = functools.partial(_tokenize_pair_batch, fmt=fmt, tokenizer=tokenizer, max_length=cfg.max_length,
                           overlong=cfg.overlong, system_prompt=cfg.system_prompt, code_hash=_CODE_HASH)
    return map_rows(ds, fn, features, cfg.num_proc, source)


# ---------------------------------------------------------------------------------------------------- building


@dataclass
class PreferenceStats:
    """What happened to the training pairs (and how many eval pairs came out)."""

    source: str = ""  # data.path [split]
    rows: int = 0  # source rows of the training data
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIR_DROP_REASONS, 0))
    truncated: int = 0
    tokens: int = 0  # chosen + rejected tokens of the kept training pairs
    eval_source: Optional[str] = None  # data.eval_path [eval_split], None when eval is off
    eval_pairs: int = 0
    eval_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIR_DROP_REASONS, 0))

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        def reasons(counts):
            return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())

        return "\n".join([
            f"train: {self.source}: {self.rows} rows -> {self.kept} pairs (dropped: {reasons(self.dropped)}; "
            f"truncated {self.truncated})",
            f"tokens: {self.tokens} chosen + rejected ({self.tokens / max(2 * self.kept, 1):.1f} per sequence)",
            f"eval: {self.eval_source or 'none (data.eval_path=null)'}: {self.eval_pairs} pairs "
            f"(dropped: {reasons(self.eval_dropped)})",
        ])


@dataclass
class PreferenceData:
    """Everything a reward stage trains and evaluates on, ready for `collate_pairs`."""

    train: list[dict]  # PAIR_KEYS, shuffled, each side <= max_length
    eval: list[dict]  # the same plus the EVAL_GROUP_COLUMNS (str, None where the source lacks one), in source order
    stats: PreferenceStats


def _kept_pairs(out: dict[str, list], dropped: dict[str, int]) -> tuple[list[int], list[dict], int]:
    """(source row indices, pairs, truncated count) of the rows that survived; drops counted into `dropped`."""
    rows, pairs, truncated = [], [], 0
    for i, status in enumerate(out["status"]):
        if status in PAIR_DROP_REASONS:
            dropped[status] += 1
            continue
        truncated += status == "truncated"
        rows.append(i)
        pairs.append({k: out[k][i] for k in PAIR_KEYS})
    return rows, pairs, truncated


def build_preference_data(cfg: DataConfig, tokenizer, seed: int) -> PreferenceData:
    """Load, tokenize, filter and shuffle (by `seed`) the training pairs; tokenize the eval pairs.

    Uses cfg.path/format/split/name and eval_path/eval_format/eval_split, max_length, overlong, chat_template,
    system_prompt and num_proc (not mixture or packing).
    """
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template  # also what an exported model will carry
    ds = load_rows(cfg.path, cfg.split, cfg.name)
    stats = PreferenceStats(source=describe_source(cfg.path, cfg.split), rows=len(ds))
    _, train, stats.truncated = _kept_pairs(
        _tokenize_pairs(ds, cfg.format, tokenizer, cfg, describe_source(cfg.path, cfg.split)), stats.dropped)
    if not train:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.items())
        raise DataError(f"no preference pairs left after filtering ({stats.rows} rows; dropped {reasons}); "
                        f"check data.max_length / data.overlong and that chosen and rejected responses differ")
    train = [train[i] for i in SeededOrder(len(train), seed, "preference_pairs").permutation(0)]
    stats.kept = len(train)
    stats.tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in train)
    eval_pairs = []
    if cfg.eval_path is not None:
        eval_ds = load_rows(cfg.eval_path, cfg.eval_split, cfg.name if cfg.eval_path == cfg.path else None)
        out = _tokenize_pairs(eval_ds, cfg.eval_format, tokenizer, cfg, describe_source(cfg.eval_path, cfg.eval_split))
        rows, eval_pairs, _ = _kept_pairs(out, stats.eval_dropped)
        meta = {k: list(eval_ds[k]) if k in eval_ds.column_names else [None] * len(eval_ds) for k in EVAL_GROUP_COLUMNS}
        for i, pair in zip(rows, eval_pairs):
            pair.update({k: None if v[i] is None else str(v[i]) for k, v in meta.items()})
    stats.eval_pairs = len(eval_pairs)
    stats.eval_source = describe_source(cfg.eval_path, cfg.eval_split) if cfg.eval_path is not None else None
    return PreferenceData(train, eval_pairs, stats)


def pair_prompts(pairs: list[dict], tokenizer) -> list[EvalPrompt]:
    """Each distinct prompt of `pairs` once, for generation, with the chosen response as its reference answer:
    the chosen side's tokens before its last response span, and that span decoded without special tokens. The
    synthetic suite's chosen responses are its bare answers, so this is SFT's exact-match eval on those prompts."""
    prompts, seen = [], set()
    for pair in pairs:
        ids, mask = pair["chosen_input_ids"], pair["chosen_response_mask"]
        if not any(mask):
            continue
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = end - 1
        while start > 0 and mask[start - 1]:
            start -= 1
        key = tuple(ids[:start])
        if key in seen:
            continue
        seen.add(key)
        prompts.append(EvalPrompt(ids[:start], tokenizer.decode(ids[start:end], skip_special_tokens=True),
                                  tokenizer.decode(ids[:start]), pair.get("family"), pair.get("phrasing"),
                                  pair.get("family_split")))
    return prompts


# ---------------------------------------------------------------------------------------------------- collate


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two sequences, leaving each at least its last token."""
    n = 0
    limit = min(len(a), len(b)) - 1
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _round_up(n: int, multiple: Optional[int]) -> int:
    return math.ceil(n / multiple) * multiple if multiple else n


def collate_pairs(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 8, pack_length: Optional[int] = None,
                  share_prompt: bool = False, response_logps: bool = False) -> dict[str, torch.Tensor]:
    """Batch B pairs; the sequences come out chosen first (0..B-1), then rejected (B..2B-1).

    Padded (pack_length None): input_ids (2B, T) right-padded with pad_id and attention_mask (2B, T) with 0 on
    padding; the model's own pooling reads each row's last real token.
    Packed (pack_length L): the 2B sequences go into R rows of <= L tokens with position_ids restarting per
    sequence and no attention_mask, so no sequence attends to another (as in SFT packing): input_ids and
    position_ids (R, T), plus score_index (2B,), the flat index into (R, T) of each sequence's last token.
    Short pairs waste far less compute on padding this way.
    Packed with share_prompt: each pair is laid out once as [shared prefix | chosen tail | rejected tail],
    the rejected tail's positions continuing from the prefix, and attention_mask (R, 1, T, T) (True = may
    attend) lets each tail see the prefix and itself but not the other tail. The shared prompt is computed
    once instead of twice, and every score equals the one of the sequence on its own. Rows hold up to
    max(L, longest pair layout) tokens.
    With response_logps (DPO), in every layout, for the N response tokens (response mask 1) of all 2B sequences:
    logp_index (N,), the flat index into (rows, T) of the position whose logits predict the token: the
    position of the token before it *in its own sequence*, so the first rejected token after a shared prefix
    is predicted from the prefix's last position, not from the chosen tail's last token that precedes it in
    the row; logp_target (N,), the token; logp_sequence (N,), its sequence (0..2B-1).
    Always: margin (B,) float32. T is rounded up to a multiple of pad_to_multiple_of (0 or None: no rounding).
    """
    B = len(rows)
    margin = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)  # (B,)
    chosen = [r["chosen_input_ids"] for r in rows]
    rejected = [r["rejected_input_ids"] for r in rows]
    sequences = chosen + rejected
    if pack_length is None:
        T = _round_up(max(len(s) for s in sequences), pad_to_multiple_of)
        input_ids = torch.full((2 * B, T), pad_id, dtype=torch.long)  # (2B, T)
        for i, s in enumerate(sequences):
            input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask = (torch.arange(T)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]).long()
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "margin": margin}
        if response_logps:
            out.update(_logp_gather(rows, [range(i * T, i * T + len(s)) for i, s in enumerate(sequences)]))
        return out

    # Units to pack, each a list of (token ids, first position, part, sequence slot or -1); part 0 is a
    # shared prefix, 1 a chosen tail, 2 a rejected tail, which must not see part 1 of its unit.
    if share_prompt:
        units = []
        for b, (c, r) in enumerate(zip(chosen, rejected)):
            n = _shared_prefix(c, r)
            units.append([(c[:n], 0, 0, -1), (c[n:], n, 1, b), (r[n:], n, 2, B + b)])
    else:
        units = [[(s, 0, 1, i)] for i, s in enumerate(sequences)]
    lengths = [sum(len(ids) for ids, *_ in u) for u in units]
    groups = best_fit_rows(lengths, max(pack_length, max(lengths)))
    T = _round_up(max(sum(lengths[u] for u in g) for g in groups), pad_to_multiple_of)
    R = len(groups)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)  # (R, T)
    position_ids = torch.zeros((R, T), dtype=torch.long)  # (R, T)
    unit_of = torch.full((R, T), -1, dtype=torch.long)  # (R, T) unit id per token; padding gets its own below
    part_of = torch.zeros((R, T), dtype=torch.long)  # (R, T)
    score_index = torch.zeros(2 * B, dtype=torch.long)  # (2B,)
    placed: list[range] = [range(0)] * (2 * B)  # flat positions of each sequence's tokens, in sequence order
    for row, members in enumerate(groups):
        offset = 0
        for u in members:
            prefix = range(0)
            for ids, first, part, slot in units[u]:
                n = len(ids)
                input_ids[row, offset:offset + n] = torch.tensor(ids, dtype=torch.long)
                position_ids[row, offset:offset + n] = torch.arange(first, first + n)
                unit_of[row, offset:offset + n] = u
                part_of[row, offset:offset + n] = part
                here = range(row * T + offset, row * T + offset + n)
                offset += n
                if slot < 0:
                    prefix = here
                else:
                    score_index[slot] = row * T + offset - 1
                    placed[slot] = [*prefix, *here]
        position_ids[row, offset:] = torch.arange(T - offset)  # padding: a segment of its own
        unit_of[row, offset:] = -1 - torch.arange(T - offset)  # each pad token alone: it attends only itself
    out = {"input_ids": input_ids, "position_ids": position_ids, "score_index": score_index, "margin": margin}
    if share_prompt:
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        same_unit = unit_of[:, :, None] == unit_of[:, None, :]  # (R, T, T)
        other_tail = (part_of[:, :, None] == 2) & (part_of[:, None, :] == 1)  # (R, T, T)
        out["attention_mask"] = (causal & same_unit & ~other_tail)[:, None]  # (R, 1, T, T)
    if response_logps:
        out.update(_logp_gather(rows, placed))
    return out


def _logp_gather(rows: list[dict], placed: list) -> dict[str, torch.Tensor]:
    """logp_index, logp_target, logp_sequence (see `collate_pairs`) from `placed[s]`, the flat positions of
    sequence s's tokens in sequence order (sequences: the B chosen, then the B rejected)."""
    B = len(rows)
    index, target, sequence = [], [], []
    for s in range(2 * B):
        side = "chosen" if s < B else "rejected"
        ids, mask, pos = rows[s % B][f"{side}_input_ids"], rows[s % B][f"{side}_response_mask"], placed[s]
        for j in range(1, len(ids)):
            if mask[j]:
                index.append(pos[j - 1])  # the token before j in this sequence, wherever the layout put it
                target.append(ids[j])
                sequence.append(s)
    return {"logp_index": torch.tensor(index, dtype=torch.long), "logp_target": torch.tensor(target, dtype=torch.long),
            "logp_sequence": torch.tensor(sequence, dtype=torch.long)}
