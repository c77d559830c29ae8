"""The names under which DualAdam's numbers appear in a run's logs (trainer_state.json, TensorBoard, W&B).

The callback writes them and the comparison report reads them. They live in this module of their own so that
the report can import them without importing the callback, and with it transformers and torch.
"""

LOG_PREFIX = "dualadam/"  # every key below starts with it
BLEND_LOG_KEY = "dualadam/blend"  # the inverse-Adam weight r of the latest step
INVERSE_SHARE_LOG_KEY = "dualadam/inverse_share"  # that step's share of the update from the inverse part
EFFECTIVE_LR_LOG_KEY = "dualadam/effective_lr"  # the rate on the Adam part: (1 - r) times the learning rate
NONFINITE_SKIPS_LOG_KEY = "dualadam/nonfinite_skips"  # tensor steps skipped so far for a NaN or inf gradient
