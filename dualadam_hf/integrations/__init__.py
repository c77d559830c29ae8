"""Glue between DualAdam and the Hugging Face stack (transformers, TRL, PEFT, accelerate, DeepSpeed).

Submodules are imported on demand so that `import dualadam_hf` never pulls in transformers eagerly. They need
transformers alone (and accelerate, which transformers' Trainer needs); TRL, PEFT and DeepSpeed work through the
Trainer they subclass or wrap, so none of them is imported here.
"""
