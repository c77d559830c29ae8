"""Tasks generated offline by reasoning-gym (``dataset_name: reasoning-gym:<task>``, settings in
``dataset_config: "key=value,..."``), with answer-only loss and exact-match scoring.

Rows are TRL conversational prompt-completion, so ``SFTTrainer`` puts loss on the answer only: a worked
solution ending ``#### <answer>`` where the generator gives one (gsm_symbolic's ``answer_cot``), else the bare
answer. The splits ``train``, ``validation`` and ``test`` are disjoint: a hash of each question picks its split.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from ..keyvalue import parse_pairs

PREFIX = "reasoning-gym:"
ANSWER_PREFIX = "####"
INSTRUCTION = "Reply with only the final answer."
COT_INSTRUCTION = f"Solve it step by step, then write the final answer on the last line as '{ANSWER_PREFIX} <number>'."
# Share of all questions per split, by the hash of the question text (in eighths).
_SPLIT_OF_BUCKET = {0: "test", 1: "test", 2: "validation"}
_SHARE = {"test": 2 / 8, "validation": 1 / 8, "train": 5 / 8}
SPLITS = tuple(_SHARE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big")


def split_of(question: str) -> str:
    """The split a question belongs to, decided by a hash of its text."""
    return _SPLIT_OF_BUCKET.get(_hash(question) % 8, "train")


def _setting(raw: str) -> Any:
    """A generator setting's value: an int if it reads as one, else a float, else a boolean, else the text."""
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def parse_config(text: str | None) -> dict[str, Any]:
    """Generator settings from "key=value,key=value" (numbers and true/false parsed; anything else is text)."""
    return {key: _setting(raw) for key, raw in parse_pairs(text, "dataset_config").items()}


def format_prompt(question: str, worked: bool) -> list[dict[str, str]]:
    """The chat prompt for one problem: the question with the answer-format instruction. The empty system
    message keeps a template's default system prompt out of every row (SmolLM2's adds 16 tokens to a 41-token
    problem, a quarter of the compute of a short-answer task)."""
    instruction = COT_INSTRUCTION if worked else INSTRUCTION
    return [{"role": "system", "content": ""}, {"role": "user", "content": f"{question.strip()}\n{instruction}"}]


def format_completion(answer: str, worked_solution: str | None = None) -> list[dict[str, str]]:
    """The assistant message: the bare answer, or a worked solution ending with one line "#### <answer>",
    rewritten from the gold answer (some solutions end "#### 20.0" for "20") so the model learns one format."""
    if worked_solution is None:
        return [{"role": "assistant", "content": answer}]
    lines = worked_solution.strip().splitlines()
    if lines and lines[-1].lstrip().startswith(ANSWER_PREFIX):
        lines = lines[:-1]
    body, final = "\n".join(lines).rstrip(), f"{ANSWER_PREFIX} {answer}"
    return [{"role": "assistant", "content": f"{body}\n{final}" if body else final}]


def generated_dataset(task: str, split: str, size: int, seed: int = 0, config: str | None = None) -> Any:
    """``size`` problems of a reasoning-gym task for ``split``: a Dataset of ``prompt``, ``completion`` and
    ``answer`` (the gold answer text). No question occurs twice or in two splits. Deterministic for given
    arguments; a smaller dataset is a prefix of a larger one."""
    from datasets import Dataset

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    import reasoning_gym

    settings = parse_config(config)
    # Generators seed item i with Random(seed + i), so nearby seeds would share most items; hashing
    # (task, split, seed) spreads them far apart.
    generator_seed = _hash(f"{task}:{split}:{seed}")
    # Generate with margin for the hash filter and duplicates; grow if the draw was unlucky. Growing keeps
    # the earlier items (item i depends on the seed and i only), so the rows found first stay first.
    n_generate = int(size / _SHARE[split] * 1.2) + 32
    for _ in range(8):
        try:
            source = reasoning_gym.create_dataset(task, seed=generator_seed, size=n_generate, **settings)
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(f"reasoning-gym task {task!r} with {settings}: {error}") from error
        rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "answer": []}
        seen: set[str] = set()
        for entry in source:
            question = entry["question"]
            if question in seen or split_of(question) != split:
                continue
            seen.add(question)
            answer = str(entry["answer"]).strip()
            worked = (entry.get("metadata") or {}).get("answer_cot")
            rows["prompt"].append(format_prompt(question, worked is not None))
            rows["completion"].append(format_completion(answer, worked))
            rows["answer"].append(answer)
            if len(rows["answer"]) == size:
                return Dataset.from_dict(rows)
        n_generate *= 2
    raise ValueError(f"could not generate {size} distinct {split} problems of {task} (too few distinct questions)")


def _after_marker(text: str) -> str | None:
    """The line after the last "####" (None without one)."""
    return text.rsplit(ANSWER_PREFIX, 1)[1].strip().split("\n", 1)[0] if ANSWER_PREFIX in text else None


def parse_final_answer(text: str) -> str | None:
    """The final answer of a generated text (None if it has none): the line after the last "####", else the
    last line, the usual GSM8K convention, so an untuned model that answers in prose still gets scored."""
    if (tail := _after_marker(text)) is not None:
        return tail.strip() or None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def final_number(text: str) -> float | None:
    """The number a generated text answers with: the first number after the last "####" (commas, spaces
    and $ removed, so "1,200" and a word-level tokenizer's "1 2" both read as numbers), else its last number."""
    tail = _after_marker(text)
    if tail is not None and (match := _NUMBER.search(re.sub(r"[\s,$]", "", tail))):
        return float(match.group(0))
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def is_correct(text: str, gold: str) -> bool:
    """Whether a generated ``text`` answers ``gold``: numbers compare as numbers (:func:`final_number`),
    anything else as the final answer's text, ignoring case and surrounding spaces."""
    gold = str(gold).strip()
    if _NUMBER.fullmatch(gold.replace(",", "")):
        return final_number(text) == float(gold.replace(",", ""))
    parsed = parse_final_answer(text)
    return parsed is not None and parsed.lower() == gold.lower()


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], *,
                     max_new_tokens: int = 128, batch_size: int = 8, show_bar: bool = False) -> list[str]:
    """Greedy answers of ``model`` to chat ``prompts`` (template applied), as decoded text, in prompt order.

    Prompts are batched by length (the longest first), so a batch pads its prompts to nearly the same length
    and a too-large ``batch_size`` fails at once; ``show_bar`` draws a progress bar over the problems.
    """
    import torch
    from tqdm.auto import tqdm

    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    # The chat template already holds the special tokens (BOS etc.); do not add them twice.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    # Decoder-only models continue from the last position, so the batch is padded on the left; the
    # tokenizer's own setting is restored afterwards because training pads on the right.
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    answers: list[str] = [""] * len(texts)
    bar = tqdm(total=len(texts), desc="exact match: generating answers", unit="problem", disable=not show_bar,
               dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in chosen], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for index, text in zip(chosen, decoded, strict=True):
                answers[index] = text
            bar.update(len(chosen))
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def score_answers(model: Any, tokenizer: Any, rows: Any, *, max_new_tokens: int = 128, batch_size: int = 8,
                  show_bar: bool = False) -> tuple[list[bool], list[str]]:
    """Per row, whether the greedy answer to its ``prompt`` matches its ``answer``, and the answer's text."""
    rows = list(rows)
    if not rows:
        raise ValueError("exact-match evaluation needs at least one row")
    if missing := [c for c in ("prompt", "answer") if c not in rows[0]]:
        raise KeyError(f"rows lack {missing} (columns: {sorted(rows[0])})")
    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, show_bar=show_bar)
    return [is_correct(text, str(row["answer"])) for text, row in zip(answers, rows, strict=True)], answers
