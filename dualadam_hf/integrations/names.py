"""The `--optim` names dualadam-hf adds, in a module that imports nothing: the command's usage shows them
without loading torch (about 5 s on a busy CPU)."""

DUALADAM_NAME = "dualadam"
INVADAM_NAME = "invadam"
# DualAdam with low-bit optimizer state (state_bits), named as transformers names adamw_torch_8bit/4bit.
STATE_BITS_OF_NAME = {"dualadam_8bit": 8, "dualadam_4bit": 4}
OPTIMIZER_NAMES = (DUALADAM_NAME, INVADAM_NAME, *STATE_BITS_OF_NAME)
# The variants `dualadam-hf compare` runs when neither the command line nor the recipe names any.
DEFAULT_OPTIMS = f"adamw_torch,{DUALADAM_NAME}"
