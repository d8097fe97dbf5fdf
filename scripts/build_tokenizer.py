"""Build the small BPE tokenizer the repo ships in `trainer/assets/tokenizer/`.

It is trained on the train split of every synthetic variant, so the tiny
random-init model spends few tokens per task. Byte-level, so any text
round-trips; every digit is its own token (with its leading space, " 7"), so
"3 4 + 5 8" costs one token per character. Re-running is byte-for-byte
deterministic; `--check` rebuilds into a temporary directory and fails if the
shipped files differ.

    python scripts/build_tokenizer.py [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import string
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/build_tokenizer.py`
    sys.path.insert(0, str(ROOT))

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from trainer.synthetic import VARIANTS, make_rows  # noqa: E402

SHIPPED_DIR = ROOT / "trainer" / "assets" / "tokenizer"
VOCAB_SIZE = 512
PAD, BOS, EOS, END = "<|pad|>", "<|bos|>", "<|eos|>", "<|end|>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, END, *ROLE_MARKERS)
# GPT-2's split with single digits (` ?\p{N}` instead of ` ?\p{N}+`), so numbers never merge.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Weight of one " a b ... Z 0 ... 9" line: large enough that every spaced letter and digit
# becomes a single token, even capitals that only occur in `uppercase` answers.
ALPHABET_WEIGHT = 5000

# Each turn is `<|role|>\n{content}<|end|>`; an assistant turn also ends with eos so
# generation stops by default. The generation prompt is exactly the text before an
# assistant's content, so rendering messages[:k] with add_generation_prompt=True is a
# string prefix of rendering messages[:k+1]: loss masks are taken from those lengths.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] + '<|end|>' + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def training_texts():
    """Every string a model sees in the synthetic suite, in a fixed order."""
    yield from [" " + " ".join(string.ascii_letters + string.digits)] * ALPHABET_WEIGHT
    for variant in VARIANTS:
        # The clean suite: the vocabulary predates the chatter in some train demonstrations, and
        # keeping it keeps every token id (and every model trained on them) unchanged.
        for row in make_rows(variant, "train", noisy_demos=False):
            if variant == "sft":
                yield row["prompt"] + row["completion"]
            elif variant == "alpaca":
                yield f"{row['instruction']}\n{row['input']}\n{row['output']}"
            elif variant == "chat":
                yield from (m["content"] for m in row["messages"])
            else:
                yield from (m["value"] for m in row["conversations"])


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: a bos in front of plain text; the chat template writes its own.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"end_token": END},
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer(out_dir: Path) -> None:
    build_tokenizer().save_pretrained(str(out_dir))


def differing_files(a: Path, b: Path) -> list[str]:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file()
                                      and filecmp.cmp(a / n, b / n, shallow=False))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        write_tokenizer(args.out)
        print(f"wrote {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        diff = differing_files(Path(tmp), args.out)
    if diff:
        print(f"{args.out} is stale; differing files: {', '.join(diff)}", file=sys.stderr)
        return 1
    print(f"{args.out} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
