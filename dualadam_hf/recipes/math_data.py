"""Grade-school math word problems, generated offline, with answer-only loss and exact-match scoring.

Problems come from reasoning-gym's `gsm_symbolic` generator: GSM8K-style templates with fresh numbers, so
any number of problems can be made without a download. Each row is in TRL's conversational
prompt-completion format, so `SFTTrainer` puts loss on the worked answer only (the prompt's labels are
-100), and every answer ends with a GSM8K-style final line "#### <number>" that `parse_final_answer` reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

TASK = "gsm_symbolic"
ANSWER_PREFIX = "####"
INSTRUCTION = f"Solve it step by step, then write the final answer on the last line as '{ANSWER_PREFIX} <number>'."
# Fixed generator seeds per split. Disjointness does not rest on them (see _split_of), they only make
# "train" and "eval" draw different problems when no seed is given.
_BASE_SEEDS = {"train": 1_000, "eval": 2_000}
# Share of all possible questions reserved for "eval", chosen by a hash of the question text.
_EVAL_SHARE = 4  # one question in four


def _split_of(question: str) -> str:
    """The split a question belongs to, decided by a hash of its text.

    gsm_symbolic fills about 85 templates with random numbers, so two seeds can produce the same question.
    Assigning each question text to one split by hash makes train and eval disjoint for every pair of
    seeds and sizes, with no need to generate one split to build the other.
    """
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:4], "big") % _EVAL_SHARE == 0 else "train"


def _generator_seed(split: str, seed: int | None) -> int:
    if seed is None:
        return _BASE_SEEDS[split]
    # gsm_symbolic seeds item i with Random(seed + i), so nearby seeds would share most items; hashing
    # (split, seed) spreads them far apart.
    digest = hashlib.sha256(f"{split}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def format_prompt(question: str) -> list[dict[str, str]]:
    """The chat prompt for one problem: a single user message with the answer-format instruction."""
    return [{"role": "user", "content": f"{question.strip()}\n{INSTRUCTION}"}]


def format_completion(answer_cot: str, answer: str) -> list[dict[str, str]]:
    """The assistant message: the worked solution, ending with exactly one final line "#### <answer>".

    Some gsm_symbolic solutions end with "#### 20.0" where the gold answer is "20"; the last line is
    rewritten from the gold answer so the model learns one format.
    """
    lines = answer_cot.strip().splitlines()
    if lines and lines[-1].lstrip().startswith(ANSWER_PREFIX):
        lines = lines[:-1]
    body = "\n".join(lines).rstrip()
    final = f"{ANSWER_PREFIX} {answer}"
    return [{"role": "assistant", "content": f"{body}\n{final}" if body else final}]


def math_dataset(split: str, size: int, seed: int | None = None) -> Dataset:
    """`size` math word problems for `split` ("train" or "eval") as a prompt-completion Dataset.

    Columns: `prompt` (one user message), `completion` (one assistant message ending "#### <answer>") and
    `answer` (the gold answer string). No question occurs twice, and no question of "eval" can occur in
    "train" whatever the seeds. Deterministic for a given (split, size, seed).
    """
    if split not in _BASE_SEEDS:
        raise ValueError(f"split must be one of {sorted(_BASE_SEEDS)}, got {split!r}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    import reasoning_gym

    share = 1 / _EVAL_SHARE if split == "eval" else 1 - 1 / _EVAL_SHARE
    # Generate with margin for the hash filter and duplicates; grow if the draw was unlucky. Growing keeps
    # the earlier items (gsm_symbolic draws template i and numbers i the same whatever the size), so a
    # smaller dataset is a prefix of a larger one with the same seed.
    n_generate = int(size / share * 1.2) + 32
    generator_seed = _generator_seed(split, seed)
    for _ in range(8):
        source = reasoning_gym.create_dataset(TASK, seed=generator_seed, size=n_generate)
        rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "answer": []}
        seen: set[str] = set()
        for entry in source:
            question = entry["question"]
            if question in seen or _split_of(question) != split:
                continue
            seen.add(question)
            answer = str(entry["answer"]).strip()
            rows["prompt"].append(format_prompt(question))
            rows["completion"].append(format_completion(entry["metadata"]["answer_cot"], answer))
            rows["answer"].append(answer)
            if len(rows["answer"]) == size:
                return Dataset.from_dict(rows)
        n_generate *= 2
    raise RuntimeError(f"could not generate {size} distinct {split} problems from {TASK}")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_final_answer(text: str) -> str | None:
    """The final number of a generated answer, or None if it has none.

    Reads the line after the last "####" (commas and spaces removed, so "1,200" and a word-level
    tokenizer's "1 2" both read as numbers); without a "####" line, falls back to the last number in the
    text, the usual GSM8K convention, so an untuned model that answers in prose still gets scored.
    """
    if ANSWER_PREFIX in text:
        tail = text.rsplit(ANSWER_PREFIX, 1)[1].strip().split("\n", 1)[0]
        match = _NUMBER.search(re.sub(r"[\s,$]", "", tail))
        if match:
            return match.group(0)
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


_score_answer = None


def is_correct(text: str, gold: str) -> bool:
    """Whether generated `text` answers `gold`, scored by reasoning-gym's own gsm_symbolic scorer.

    The scorer compares the first number of the string it gets as floats, returning 1.0 for a match and
    0.01 for a wrong number; it gets only the parsed final answer so it cannot pick an earlier number.
    """
    global _score_answer
    if _score_answer is None:
        import reasoning_gym

        _score_answer = reasoning_gym.get_score_answer_fn(TASK)
    parsed = parse_final_answer(text)
    return parsed is not None and _score_answer(parsed, {"answer": gold}) == 1.0


def _prompts_of(dataset: Dataset | Iterable[dict[str, Any]]) -> list[list[dict[str, str]]]:
    rows = list(dataset)
    if rows and "prompt" not in rows[0]:
        raise KeyError(f"dataset has no 'prompt' column (columns: {sorted(rows[0])})")
    return [row["prompt"] for row in rows]


def generate_answers(
    model: Any,
    tokenizer: Any,
    dataset: Dataset | Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of `model` to each row's `prompt` (chat template applied), as decoded text."""
    import torch

    prompts = _prompts_of(dataset)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # Decoder-only models continue from the last position, so the batch is padded on the left; the
    # tokenizer's own setting is restored afterwards because training pads on the right.
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            # The chat template already holds the special tokens (BOS etc.); do not add them twice.
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = batch.to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model: Any,
    tokenizer: Any,
    dataset: Dataset | Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> float:
    """Fraction of rows whose greedy answer's final number equals the row's `answer`."""
    rows = list(dataset)
    if not rows:
        raise ValueError("exact_match_accuracy needs at least one example")
    if "answer" not in rows[0]:
        raise KeyError(f"dataset has no 'answer' column (columns: {sorted(rows[0])})")
    answers = generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(is_correct(text, str(row["answer"])) for text, row in zip(answers, rows, strict=True)) / len(rows)


def load_jsonl_dataset(path: str | Path, required_columns: Sequence[str]) -> Dataset:
    """Read a JSONL file (one JSON object a line) and check it has every column in `required_columns`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            missing = [column for column in required_columns if column not in record]
            if missing:
                raise ValueError(
                    f"{path}:{number}: missing column(s) {', '.join(map(repr, missing))} "
                    f"(required: {', '.join(required_columns)}; found: {', '.join(record) or 'none'})"
                )
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no rows")
    return Dataset.from_list(records)
