"""A minimal run_clm.py-style script: HfArgumentParser + Trainer, and no `import dualadam_hf`.

`--optim dualadam` works here only because the dualadam-hf startup hook registered the name.

    python tests/scripts/train_clm.py --model_name_or_path <dir> --train_file <train.jsonl> \
        --output_dir out --optim dualadam --optim_args "blend_fraction=0.5" --max_steps 20
"""

import json
from dataclasses import dataclass, field

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "local model folder"})
    train_file: str = field(metadata={"help": "JSONL file of {'messages': [...]} chat rows"})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    with open(script_args.train_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = [
        {"input_ids": tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False))["input_ids"]}
        for row in rows
    ]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()


if __name__ == "__main__":
    main()
