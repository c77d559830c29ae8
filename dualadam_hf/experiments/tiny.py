"""Offline stand-ins (no hub access): a tiny word-level tokenizer, a tiny Llama, a tiny arithmetic chat dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# Chat role markers; "<|end|>" closes every turn and is the end-of-sequence token, so a trained model stops.
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, USER, ASSISTANT, SYSTEM, END]

_SYMBOLS = list("0123456789+-*/=?.,!:;()'\"%")
_WORDS = """
a an the is are was were be been am do does did of to in on at by for from with and or not no yes what which who why
how when where this that these those it its i you he she we they me my your our their can could will would should
may might must shall have has had get got make made take give find tell say answer question number numbers sum
difference product quotient plus minus times divided multiplied add subtract multiply divide equals equal total
result value zero one two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty hundred
thousand half double triple more less than greater smaller bigger larger many much some all each every both few most
other another if then else so because but also only just very too again first second third last next step steps let
us solve compute calculate think check correct wrong true false right left up down out over under apple apples
orange oranges book books cat cats dog dogs car cars box boxes coin coins day days hour hours minute minutes year
years week weeks cost costs price money dollar dollars cent cents buy buys bought sell sells sold has have left
remain remains now after before each per there here please thanks hello hi good bad new old big small long short
time way people man woman child children friend dummy example test sample hint note help user assistant system
""".split()

# Assistant turns sit inside {% generation %} markers (with their closing <|end|>) so TRL's assistant_only_loss
# can mask everything else.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|> ' }}{% generation %}{{ message['content'] + ' <|end|>' }}{% endgeneration %}{{ ' ' }}"
    "{% else %}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_vocabulary() -> list[str]:
    """The fixed vocabulary: special tokens first (so their ids are stable), then symbols and words."""
    return list(dict.fromkeys(SPECIAL_TOKENS + _SYMBOLS + _WORDS))


def build_tiny_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer (digits are single tokens; "13" decodes as "1 3") and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tiny_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    # Split on whitespace and punctuation, then split numbers into single digits so any number encodes.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=END,
        additional_special_tokens=[EOS, USER, ASSISTANT, SYSTEM], model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_llama(out_dir: str | Path, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Save a randomly initialised LlamaForCausalLM plus the tiny tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size < 4 or hidden_size % 4:
        raise ValueError(f"hidden_size must be a positive multiple of 4 (4 attention heads), got {hidden_size}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    tokenizer = build_tiny_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    return str(Path(out_dir))


def tiny_arithmetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs of one-operation arithmetic on small numbers."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng, pairs = random.Random(seed), []
    for _ in range(n):
        a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        pairs.append((f"what is {a} {op} {b} ?", f"{a} {op} {b} = {result}"))
    return pairs


def _chats(n: int, seed: int) -> list[list[dict[str, str]]]:
    pairs = tiny_arithmetic_pairs(n, seed)
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]


def write_tiny_chat_jsonl(path: str | Path, n: int = 64, seed: int = 0) -> str:
    """Write `n` chat rows {"messages": [user question, assistant answer]} as JSONL; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in _chats(n, seed)), encoding="utf-8")
    return str(path)


def tiny_lm_dataset(tokenizer: PreTrainedTokenizerFast, n: int = 64, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` tokenized chat transcripts ({"input_ids": [...]}) for causal-LM training with a Trainer.

    Pair it with `DataCollatorForLanguageModeling(tokenizer, mlm=False)`, which pads and sets the labels.
    """
    return [{"input_ids": tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]}
            for messages in _chats(n, seed)]
