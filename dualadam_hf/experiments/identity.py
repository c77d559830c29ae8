"""One identity per run: a manifest of everything that determines its result, and where it came from.

A manifest has two parts. ``inputs`` determines the result: the content (sha256) of the model's weights, config,
tokenizer and chat template, the data's identity (the content of local data files, or the generator and its
settings, or a hub id) and every resolved setting that changes the result. ``segments`` is provenance, one
entry per process that worked on the run: start and end times, the project's version and git commit, the
versions of the libraries, the command line. Reuse (``compare``) and resume (``train --resume_from_checkpoint``)
compare ``inputs`` only, and a refusal names each difference (:func:`differences`); a new commit of this project
or a new library version is recorded but blocks nothing (docs/recipes.md, "One identity per run").

Hashing a 15 GB model at every call would cost minutes, so file digests are cached on disk by absolute path,
size, modification and change time and inode (:func:`file_sha256`), under :func:`cache_folder`.

transformers is not imported here: ``compare`` imports this module before it needs transformers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._version import __version__

MANIFEST_FILE = "run_manifest.json"  # in a run folder and in each of its checkpoint-N folders
MANIFEST_KEY = "run_manifest"  # the key of run_done.json, and of the log-history entry raw logs carry
MANIFEST_VERSION = 1
# Libraries whose versions a manifest records (None where one is not installed).
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "torchao",
             "reasoning-gym")
_HASH_CACHE_FILE = "file_sha256.json"
_HASH_CACHE_LIMIT = 20_000  # entries kept; the least recently written go first
_CHUNK = 8 << 20

# --- file digests, cached on disk --------------------------------------------------------------------------


def cache_folder() -> Path:
    """Where the digest cache lives: ``$DUALADAM_HF_CACHE``, else ``$XDG_CACHE_HOME/dualadam_hf``, else
    ``~/.cache/dualadam_hf`` (the folder the offline SmolLM2 model is converted into)."""
    if root := os.environ.get("DUALADAM_HF_CACHE"):
        return Path(root).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "dualadam_hf"
    return Path.home() / ".cache" / "dualadam_hf"


def _stamp(path: Path) -> list[int]:
    """What changes when a file's content may have: its size, modification and change times, inode. The change
    time cannot be set back by hand, so a file edited and given its old mtime (``touch -d``) is hashed again."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while read := file.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


_MEMORY: dict[str, dict[str, Any]] = {}  # this process's digests, as the disk cache holds them


def _read_cache(file: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("files") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[bool]:
    """Hold the cache's lock (True), so that processes started together (the ranks of a launch, the runs of a
    comparison) hash a large file once: the others wait and find its digest. False where the cache folder
    cannot be written: then nothing is cached on disk."""
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / f"{_HASH_CACHE_FILE}.lock", "a+", encoding="utf-8")  # noqa: SIM115
    except OSError:
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_cache(file: Path, entries: dict[str, dict[str, Any]]) -> None:
    kept = dict(list(entries.items())[-_HASH_CACHE_LIMIT:])
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"version": 1, "files": kept}) + "\n", encoding="utf-8")
        os.replace(tmp, file)
    except OSError:  # a full or read-only cache folder: the digests stay in this process only
        with contextlib.suppress(OSError):
            tmp.unlink()


def file_sha256(paths: Iterable[str | os.PathLike]) -> dict[Path, str]:
    """The sha256 of each file, read from the cache while the file's :func:`_stamp` is the one the cache holds,
    else hashed (once, under the cache's lock) and cached. An unreadable file raises its OSError."""
    wanted = {Path(p): str(Path(p).resolve()) for p in paths}
    stamps = {path: _stamp(path) for path in wanted}
    found: dict[Path, str] = {}

    def look_up(entries: dict[str, dict[str, Any]]) -> None:
        for path, key in wanted.items():
            entry = entries.get(key)
            if path not in found and isinstance(entry, dict) and entry.get("stamp") == stamps[path]:
                found[path] = entry["sha256"]

    look_up(_MEMORY)
    if len(found) == len(wanted):
        return found
    folder = cache_folder()
    look_up(_read_cache(folder / _HASH_CACHE_FILE))
    if len(found) < len(wanted):
        with _cache_lock(folder) as cached:
            entries = _read_cache(folder / _HASH_CACHE_FILE) if cached else {}
            look_up(entries)  # another process may have hashed them while this one waited
            for path in (p for p in wanted if p not in found):
                found[path] = _sha256(path)
                if _stamp(path) != stamps[path]:  # written while it was read: hashed again next time
                    stamps[path] = []
                    continue
                entries.pop(wanted[path], None)
                entries[wanted[path]] = {"stamp": stamps[path], "sha256": found[path]}
            if cached:
                _write_cache(folder / _HASH_CACHE_FILE, entries)
    _MEMORY.update({wanted[path]: {"stamp": stamps[path], "sha256": found[path]} for path in wanted if stamps[path]})
    return found


# --- what a run reads -----------------------------------------------------------------------------------------

# How the files of a model folder are grouped in the manifest (and named in a refusal).
WEIGHTS, CONFIG, TOKENIZER, CHAT_TEMPLATE = "model weights", "model config", "tokenizer", "chat template"
_CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json", "preprocessor_config.json")
_TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece",
                       "sentencepiece")
_CHAT_TEMPLATE_FOLDER = "additional_chat_templates"  # transformers' folder of named templates
_NOT_WEIGHTS = ("training_args.bin",)  # a run folder's pickled arguments


def model_file_group(name: str) -> str | None:
    """The group of a model folder's file (None: the file does not change what is trained, e.g. a README, a
    run's logs or optimizer state)."""
    lower = name.lower()
    if lower.startswith("chat_template"):
        return CHAT_TEMPLATE
    if lower in _CONFIG_FILES:
        return CONFIG
    if lower.startswith(_TOKENIZER_PREFIXES) or lower.endswith((".model", ".tiktoken")):
        return TOKENIZER
    if lower in _NOT_WEIGHTS:
        return None
    if lower.endswith((".safetensors", ".gguf", ".bin", ".index.json")):
        return WEIGHTS
    return None


def model_files(folder: Path) -> dict[str, dict[str, Path]]:
    """A model folder's files by group (:func:`model_file_group`), each under its name in the folder."""
    groups: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and (group := model_file_group(path.name)) is not None:
            groups.setdefault(group, {})[path.name] = path
    templates = folder / _CHAT_TEMPLATE_FOLDER
    for path in sorted(templates.iterdir()) if templates.is_dir() else ():
        if path.is_file():
            groups.setdefault(CHAT_TEMPLATE, {})[f"{_CHAT_TEMPLATE_FOLDER}/{path.name}"] = path
    return groups


def _digests(files: dict[str, Path]) -> dict[str, str]:
    sums = file_sha256(files.values())
    return {name: sums[path] for name, path in files.items()}


def model_identity(name: str, path: str | os.PathLike, revision: str | None = None, *,
                   with_base: bool = True) -> dict[str, Any]:
    """What identifies the model a run starts from: the sha256 of each file of its folder, by group (weights,
    config, tokenizer, chat template) and name in the folder, whatever the folder's path (an alias's cached
    copy, a moved checkout); a hub id not on disk: the id and revision. A PEFT adapter's base model counts too
    (``base model weights``, ...)."""
    folder = Path(path)
    if not folder.is_dir():
        return {"hub model": str(name), "revision": revision}
    identity: dict[str, Any] = {group: _digests(files) for group, files in model_files(folder).items()}
    base = _adapter_base(folder) if with_base else None
    if base is not None:  # one level: an adapter's base is a model, not another adapter
        identity.update({f"base {group}" if group.startswith("model") else f"base model {group}": value
                         for group, value in model_identity(*base, with_base=False).items()})
    return identity


def _adapter_base(folder: Path) -> tuple[str, str] | None:
    """(name, local folder or hub id) of the base model a PEFT adapter folder names (None for a full model)."""
    from .smollm2 import resolve_model_path

    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        return str(base), resolve_model_path(str(base))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_identity(experiment: Any) -> dict[str, Any]:
    """What identifies the rows a run reads: the sha256 of each local file it reads (under the name the recipe
    gives it) and the held-out splits carved out of train; generated data: the generator, its settings and its
    version (a new version may generate other problems); a hub dataset: its id and config."""
    from . import tasks
    from .data import ALIASES, local_data_files

    script = experiment.script
    name = ALIASES.get(str(script.dataset_name), str(script.dataset_name))
    if name.startswith(tasks.PREFIX):
        return {"data generator": name, "generator settings": script.dataset_config,
                "generator version": library_versions().get("reasoning-gym")}
    files, carved = local_data_files(experiment)
    if files:
        return {"data files": _digests(files), "held-out splits carved from train": carved}
    return {"hub dataset": name, "dataset config": script.dataset_config}


# Settings that do not change a run's result: where it is written and logged, how often it is saved, and what
# only changes its speed (the list a comparison's variants may change for speed, and more). Every other field
# of TRL's and our argument classes counts, a field added by a later release included.
NOT_DETERMINING = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "resume_without_optimizer_state",
    "logging_dir", "run_name", "project", "report_to", "disable_tqdm", "log_level", "log_level_replica",
    "log_on_each_node", "skip_memory_metrics", "local_rank", "ddp_timeout", "debug",
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model", "save_safetensors",
    "enable_jit_checkpoint", "push_to_hub", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "torch_empty_cache_steps", "dataset_num_proc",
})
# Settings a manifest holds as identities of their own: the model's, the data's.
IDENTIFIED_APART = frozenset({"model_name_or_path", "model_revision", "dataset_name", "dataset_config"})
# Settings that may name a local file or folder, held by its content (a moved checkout keeps its identity).
FILE_SETTINGS = ("chat_template_path", "deepspeed", "fsdp_config", "accelerator_config")


def plain(value: Any) -> Any:
    """A setting as JSON holds it: enums by value, dataclasses and mappings as mappings, tuples as lists."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _file_setting(value: Any) -> Any:
    """A setting that names a local file or folder, as the sha256 of its content; any other value as it is."""
    if not isinstance(value, str) or not value.strip():
        return plain(value)
    path = Path(value).expanduser()
    if path.is_file():
        return f"sha256:{file_sha256([path])[path]}"
    if path.is_dir():
        files = {p.name: p for p in sorted(path.iterdir()) if p.is_file()}
        return f"sha256:{combined_digest(_digests(files))}"
    return value


def determining_settings(experiment: Any) -> dict[str, Any]:
    """Every resolved setting of the run that changes its result (all fields of TRL's ScriptArguments,
    SFTConfig or TrainingArguments, ModelConfig and ExperimentArguments, less :data:`NOT_DETERMINING` and
    :data:`IDENTIFIED_APART`), with files by content. With ``max_steps`` set, the number of epochs changes
    nothing and is left out. The secrets of the hub (its token) are never read."""
    settings: dict[str, Any] = {}
    for part in (experiment.script, experiment.training, experiment.model, experiment.args):
        for f in dataclasses.fields(part):
            name = f.name
            if name in NOT_DETERMINING or name in IDENTIFIED_APART or name.startswith("hub_") or not f.init:
                continue
            value = getattr(part, name, None)
            settings[name] = _file_setting(value) if name in FILE_SETTINGS else plain(value)
    if isinstance(settings.get("max_steps"), int) and settings["max_steps"] > 0:
        settings.pop("num_train_epochs", None)
    return settings


def run_inputs(experiment: Any, model_path: str | os.PathLike, *, processes: int | None = None) -> dict[str, Any]:
    """The determining part of a run's manifest: model, data and settings (and the number of processes, which
    changes the batch and the data order, when known)."""
    settings = determining_settings(experiment)
    if processes is not None:
        settings["processes"] = processes
    model = experiment.model
    return json.loads(json.dumps({
        "model": model_identity(model.model_name_or_path, model_path, getattr(model, "model_revision", None)),
        "data": data_identity(experiment),
        "settings": settings,
    }, sort_keys=True))  # as it reads back from a file: lists for tuples, text keys


# --- where it came from ---------------------------------------------------------------------------------------


def library_versions() -> dict[str, str | None]:
    """The installed versions of :data:`LIBRARIES` (None where one is missing), read without importing them."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


_GIT: dict[str, Any] = {}


def code_version() -> dict[str, Any]:
    """This project's version, and its git commit where it runs from a checkout (None otherwise, e.g. from a
    wheel), with whether tracked files differ from that commit."""
    if not _GIT:
        package = Path(__file__).resolve().parents[1]
        commit = _git(package, "rev-parse", "HEAD")
        top = _git(package, "rev-parse", "--show-toplevel")
        # A package installed into a virtual environment inside some other checkout is not that checkout's code.
        ours = commit is not None and top is not None and Path(top).resolve() == package.parent
        dirty = _git(package, "status", "--porcelain", "--untracked-files=no") if ours else None
        _GIT.update(version=__version__, git_commit=commit if ours else None,
                    uncommitted_changes=None if dirty is None else bool(dirty))
    return dict(_GIT)


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def now() -> str:
    """The time, in UTC, ISO 8601 to the second."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_segment() -> dict[str, Any]:
    """Provenance of this process's part of a run: when it started (it has not ended), the code and libraries."""
    return {"started": now(), "ended": None, "dualadam_hf": code_version(), "libraries": library_versions(),
            "python": sys.version.split()[0], "argv": list(sys.argv)}


def manifest(inputs: dict[str, Any], where: dict[str, Any], earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's manifest: its ``inputs``, the paths it read them from (``where``: provenance, not compared), and
    its segments: those of ``earlier`` (the manifest of the checkpoint it resumes) and a new one."""
    segments = list(earlier.get("segments") or []) if isinstance(earlier, dict) else []
    return {"manifest_version": MANIFEST_VERSION, "inputs": inputs, "where": where,
            "segments": [*segments, new_segment()]}


def ended(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of the manifest with its last segment ended now."""
    segments = [dict(s) for s in record["segments"]]
    segments[-1]["ended"] = now()
    return {**record, "segments": segments}


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest a run or checkpoint folder holds (None: none, or not one)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("inputs"), dict) else None


# --- differences ----------------------------------------------------------------------------------------------


def combined_digest(files: dict[str, str]) -> str:
    """One sha256 for a group of files: of their names and digests, in name order."""
    return hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items())).encode()).hexdigest()


def _file_group(value: Any) -> bool:
    """Whether ``value`` is a group of files by name, each with its sha256."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, str) and len(v) == 64 for v in value.values())


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if _file_group(value):
        return f"{next(iter(value.values())) if len(value) == 1 else combined_digest(value)}"[:8] + ".."
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _change(what: str, old: Any, new: Any) -> str:
    """``"what (old -> new)"``; files by the first 8 hex digits of their sha256."""
    digests = "sha256 " if _file_group(old) or _file_group(new) else ""
    return f"{what} ({digests}{_shown(old)} -> {_shown(new)})"


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each entry of two manifests' inputs that differs, as ``"what (old -> new)"``: a group of files by its
    sha256 (one file's own, else the group's :func:`combined_digest`), a setting by its value."""
    found = []
    for section in dict.fromkeys([*new, *old]):
        before, after = old.get(section) or {}, new.get(section) or {}
        if not isinstance(before, dict) or not isinstance(after, dict):
            if before != after:
                found.append(_change(section, before, after))
            continue
        for what in dict.fromkeys([*after, *before]):
            if before.get(what) != after.get(what):
                found.append(_change(what, before.get(what), after.get(what)))
    return found

