"""Rule-based rewards for `reward.function` (verifiable tasks need no reward model).

A reward function takes three equal-length lists (decoded prompts, decoded responses without
special tokens, and each prompt's reference answer, or None where the data has none) and
returns one float per response. Extra keyword arguments come from the config:
`reward.function={_target_: rlhf.reward_functions.exact_match, correct: 1.0, wrong: 0.0}`.
"""

from __future__ import annotations

from typing import Optional


def exact_match(prompts: list[str], responses: list[str], answers: list[Optional[str]],
                correct: float = 1.0, wrong: float = 0.0) -> list[float]:
    """`correct` where the stripped response equals the stripped reference answer, else `wrong`."""
    return [correct if a is not None and r.strip() == a.strip() else wrong for r, a in zip(responses, answers)]
