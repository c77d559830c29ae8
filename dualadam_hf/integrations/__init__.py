"""Glue between DualAdam and the Hugging Face stack (transformers, TRL, PEFT, accelerate, DeepSpeed).

Submodules are imported on demand so that `import dualadam_hf` never pulls in transformers eagerly.
"""
