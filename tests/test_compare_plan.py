"""`dualadam-hf compare` before and around its runs: the plan's checks, the variants' one syntax, what a run
folder may be reused for, what --rerun may delete, the output-folder lock and a dead parent's child."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dualadam_hf.experiments import RecipeError
from dualadam_hf.experiments import compare as compare_module
from dualadam_hf.experiments.checkpoints import folder_lock
from dualadam_hf.experiments.cli import main
from dualadam_hf.experiments.compare import (
    COMMAND_FILE,
    LOCK_FILE,
    Interrupted,
    RunSpec,
    check_launcher,
    choose_rates,
    grid_folder,
    make_plan,
    remove_run_folder,
    run_child,
    run_key,
    train_command,
)
from dualadam_hf.experiments.report import RunResult
from dualadam_hf.experiments.variants import entry_mapping, parse_variant, parse_variants

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_math_lora.yaml"


def with_keys(text: str, extra: str) -> str:
    """A recipe's YAML with the top-level keys of ``extra`` set to extra's values: each key's line (and the
    lines nested under it) leaves the recipe, then ``extra`` is appended. A recipe names each key once."""
    keys = set(re.findall(r"^([A-Za-z_]\w*):", extra, re.M))
    kept, dropping = [], False
    for line in text.splitlines():
        if line[:1].strip() and not line.startswith("#"):  # a top-level line
            dropping = line.split(":", 1)[0] in keys
        if not dropping:
            kept.append(line)
    return "\n".join(kept) + "\n" + extra


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, tiny_chat_dataset_dir):
    """A copy of a shipped recipe on the tiny model and data; ``recipe(extra)`` sets the keys of the YAML
    ``extra`` in it, ``recipe(extra, data=folder)`` reads the data of ``folder``."""

    def write(extra: str = "", data: str | Path = tiny_chat_dataset_dir) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(with_keys(RECIPE.read_text(), f"model_name_or_path: {tiny_model_dir}\n"
                                  f"dataset_name: {data}\n" + extra))
        return path

    return write


def plan_of(path: Path, out: Path, **settings):
    overrides = [*compare_module.smoke_overrides(), "--accuracy_size", "0"]  # the tiny chat data has no answers
    return make_plan(path, output_dir=out, overrides=overrides, smoke=True, **settings)


# --- the compare: block and the command line get the same checks --------------------------------


@pytest.mark.parametrize("block, match", [
    ("seeds: two", r"compare: seeds must be a whole number, got 'two'"),
    ("seeds: 2.7", r"compare: seeds must be a whole number, got 2.7"),
    ("seeds: true", r"compare: seeds must be a whole number, got True"),
    ("seeds: 0", r"compare: seeds must be >= 1"),
    ("grid_seed: abc", r"compare: grid_seed must be a whole number, got 'abc'"),
    ("grid_seeds: 1.5", r"compare: grid_seeds must be a whole number"),
    ("sharpness: maybe", r"compare: sharpness must be true or false, got 'maybe'"),
    ("lr_grid: [0.001, abc]", r"compare: lr_grid must be learning rates \(numbers\), got 'abc'"),
    ("lr_grid: [0.001, true]", r"compare: lr_grid must be learning rates \(numbers\), got True"),
    ("lr_grid: 1e-3,0.001", r"compare: lr_grid gives the rate 0.001 twice"),
    ("select_metric: accuracy", r"compare: select_metric must be eval_loss or eval_accuracy"),
    ("select_metric: [eval_loss]", r"compare: select_metric must be eval_loss or eval_accuracy, got \['eval_loss'\]"),
    ("optims: 3", r"compare: optims must be text or a list of variants"),
    ("baseline: sgd", r"baseline 'sgd' is not a variant of this comparison; variants: adamw_torch, dualadam"),
    ("baseline: [dualadam, sgd]", r"baseline 'sgd' is not a variant of this comparison"),
    ("baseline: [dualadam, dualadam]", r"compare: baseline names 'dualadam' twice"),
    ("baseline: [dualadam, 3]", r"compare: baseline must be a variant's label or a list of them"),
    ("baseline: \"\"", r"compare: baseline must be a variant's label or a list of them"),
    ("optims: [adamw_torch, {optim: dualadam, learning_rate: 0.1}]", r"learning_rate is set by compare"),
])
def test_a_bad_compare_block_is_refused_before_any_run(recipe, tmp_path, block, match):
    with pytest.raises(RecipeError, match=match):
        plan_of(recipe(f"compare:\n  {block}\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, match", [
    ("--seeds", "2.7", r"--seeds must be a whole number, got '2.7'"),
    ("--seeds", "0", r"--seeds must be >= 1"),
    ("--grid_seeds", "two", r"--grid_seeds must be a whole number"),
    ("--lr_grid", "1e-3,x", r"--lr_grid must be learning rates"),
    ("--baseline", "sgd", r"baseline 'sgd' is not a variant"),
    ("--baseline", "dualadam,", r"--baseline must be a variant's label or a list of them"),
])
def test_the_command_line_gets_the_same_checks(recipe, tmp_path, capsys, flag, value, match):
    assert main(["compare", "--config", str(recipe()), "--output_dir", str(tmp_path / "out"), flag, value]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_compare_block_values_are_typed_as_on_the_command_line(recipe, tmp_path):
    plan = plan_of(recipe("compare:\n  sharpness: \"false\"\n  lr_grid: 0.001\n  seeds: \"3\"\n  grid_seeds: 2\n"
                          "  grid_seed: 7\n  baseline: dualadam\n"), tmp_path / "out")
    assert plan.sharpness is False  # "false" is a non-empty string: taken as truthy it would switch sharpness on
    assert plan.lr_grid == [0.001] and plan.seeds == [0, 1, 2] and plan.grid_seeds == [7, 8]
    assert plan.baselines == ["adamw_torch", "dualadam"]
    # The command line wins over the recipe.
    plan = plan_of(recipe("compare:\n  seeds: 3\n"), tmp_path / "out", seeds="2", baseline="adamw_torch")
    assert plan.seeds == [0, 1] and plan.baselines == ["adamw_torch"]
    # Several: a YAML list or comma-separated on the command line, in order, the first variant first.
    plan = plan_of(recipe("compare:\n  baseline: [dualadam, adamw_torch]\n"), tmp_path / "out")
    assert plan.baselines == ["adamw_torch", "dualadam"]
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch,dualadam,matched_warmup",
                   baseline="matched-warmup,dualadam")
    assert plan.baselines == ["adamw_torch", "matched-warmup", "dualadam"]


# --- variants: one syntax, one check, settings a variant may not change --------------------------


def test_the_one_line_form_is_the_mapping_form():
    assert entry_mapping("dualadam[blend_steps=4, inverse_scale=auto]") == {
        "optim": "dualadam", "blend_steps": "4", "inverse_scale": "auto"}
    line = parse_variant("dualadam[blend_steps=4,warmup_steps=2,seeds=3]")
    mapping = parse_variant({"optim": "dualadam", "blend_steps": 4, "warmup_steps": 2, "seeds": 3})
    assert line == mapping
    assert (line.label, line.optim_args, line.settings, line.seeds) == (
        "dualadam[blend_steps=4,warmup_steps=2]", {"blend_steps": "4"}, {"warmup_steps": "2"}, 3)
    assert parse_variant({"optim": "matched_warmup", "seeds": 3}).label == "matched-warmup"
    with pytest.raises(RecipeError, match="drop optim="):
        parse_variant("dualadam[optim=adamw_torch]")


@pytest.mark.parametrize("entry, match", [
    ("dualadam[accuracy_size=4]", "accuracy_size must be the same in every run"),
    ("dualadam[eval_size=4]", "eval_size must be the same in every run"),
    ("dualadam[dataset_name=other]", "dataset_name must be the same in every run"),
    ("dualadam[learning_rate=0.1]", "learning_rate is set by compare for each run"),
    ("dualadam[dataset_test_split=validation]", "dataset_test_split is set by compare"),
    ("dualadam[sharpness=true]", "sharpness is set by compare"),
    ("dualadam[seed=3]", "seed is set by compare"),
    ("dualadam[seeds=0]", "seeds must be >= 1"),
    ("dualadam[seeds=two]", "seeds must be a whole number"),
    ("dualadam[blend_steps]", "'blend_steps' is not of the form key=value"),
    ("dualadam[blend_steps=4,blend_steps=5]", "gives 'blend_steps' twice"),
    ("dualadam[switch_rate=0.1,blend_steps=4]", "give only one of switch_rate, blend_steps, blend_fraction"),
    ("dualadam[inverse_scale=huge]", "inverse_scale='huge' is malformed"),
    ("invadam[blend_steps=4]", "invadam holds the blend weight at 1"),
])
def test_a_variant_setting_that_cannot_differ_is_refused_when_parsed(entry, match):
    with pytest.raises(RecipeError, match=match):
        parse_variants(entry)
    with pytest.raises(RecipeError, match=match):  # the mapping form is checked the same
        parse_variants([entry_mapping(entry)])


def test_a_variant_with_fewer_seeds_runs_fewer_and_pairs_on_the_seeds_it_has(recipe, tmp_path):
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch,matched_warmup[seeds=2],dualadam", seeds="4")
    assert [plan.seeds_of(v) for v in plan.variants] == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]


# --- the learning-rate grid ------------------------------------------------------------------------


def test_grid_rates_equal_to_six_digits_get_folders_of_their_own(recipe, tmp_path):
    plan = plan_of(recipe(), tmp_path / "out", lr_grid="0.0012345671,0.0012345674")
    folders = {grid_folder(plan, plan.variants[0], lr, plan.grid_seed) for lr in plan.lr_grid}
    assert len(folders) == 2


def test_the_grid_chooses_on_the_mean_over_grid_seeds_and_a_rate_that_diverged_once_loses(recipe, tmp_path):
    plan = plan_of(recipe(), tmp_path / "out", lr_grid="1e-3,3e-3", grid_seeds="2")

    def run(label, lr, value, seed, **extra):
        return RunResult(label, seed, [{"eval_loss": value, "step": 1}], phase="grid", lr=lr, **extra)

    results = [run("adamw_torch", 1e-3, 1.0, 1042), run("adamw_torch", 1e-3, 0.2, 1043),  # mean 0.6
               run("adamw_torch", 3e-3, 0.5, 1042), run("adamw_torch", 3e-3, 0.8, 1043),  # mean 0.65
               run("dualadam", 1e-3, 0.9, 1042), run("dualadam", 1e-3, 0.9, 1043),
               run("dualadam", 3e-3, 0.1, 1042), run("dualadam", 3e-3, 0.1, 1043, diverged={"step": 2})]
    assert choose_rates(plan, results) == {"adamw_torch": 1e-3, "dualadam": 1e-3}
    # No safe rate for dualadam: it gets none, and the others keep theirs.
    assert choose_rates(plan, [r for r in results if not (r.label == "dualadam" and r.lr == 1e-3)]) == {
        "adamw_torch": 1e-3}


# --- what a run folder may be reused for ---------------------------------------------------------


def fake_finished_run(plan, spec) -> None:
    spec.output_dir.mkdir(parents=True)
    (spec.output_dir / COMMAND_FILE).write_text(json.dumps(run_key(plan, train_command(plan, spec, None), None)))
    (spec.output_dir / "run_done.json").write_text(json.dumps({"log_history": [{"eval_loss": 1.0, "step": 2}]}))


def final_specs(plan):
    return [RunSpec(v, seed, plan.output_dir / "runs" / f"{v.folder}-seed{seed}", "final")
            for seed in plan.seeds for v in plan.variants]


def test_an_edited_recipe_is_refused_instead_of_mixing_old_and_new_runs(recipe, tmp_path):
    out = tmp_path / "out"
    plan = plan_of(recipe("learning_rate: 0.01\n"), out, optims="adamw_torch")
    said = []
    fake_finished_run(plan, final_specs(plan)[0])
    assert compare_module._execute(plan, final_specs(plan), None, False, said.append)[0].ok
    assert "already finished, reusing its log" in said[0]
    # The same command line, the recipe's learning rate changed in the file: the finished run was made with
    # another recipe; reusing it would mix lr 0.01 and lr 0.3 results in one mean.
    edited = plan_of(recipe("learning_rate: 0.3\n"), out, optims="adamw_torch", seeds="2")
    with pytest.raises(RecipeError, match="holds a run whose recipe content differs from this comparison's.*--rerun"):
        compare_module._execute(edited, final_specs(edited), None, False, said.append)
    # A comment or a compare: setting reaches no run: the run is still reused.
    same = plan_of(recipe("learning_rate: 0.01  # tuned\ncompare:\n  seeds: 1\n"), out, optims="adamw_torch")
    assert same.recipe_digest == plan.recipe_digest
    # Another launcher (e.g. another number of processes) is another run too.
    with pytest.raises(RecipeError, match="whose launcher differs"):
        compare_module._execute(plan, final_specs(plan), "torchrun", False, said.append)


def test_a_study_moved_with_its_checkout_is_reused_and_a_changed_seed_still_refused(recipe, tmp_path):
    """The reuse key leaves out the recipe's path and the run folder (the content and the folder itself stand
    for them): a study copied to another checkout resumes; keys written with absolute paths still match."""
    first = tmp_path / "first"
    first.mkdir()
    plan = plan_of(recipe(), first / "out", optims="adamw_torch")
    fake_finished_run(plan, final_specs(plan)[0])
    key = json.loads((final_specs(plan)[0].output_dir / COMMAND_FILE).read_text())
    assert str(first) not in json.dumps(key)
    # A key whose command holds the absolute recipe path and run folder of the first checkout.
    spec = RunSpec(plan.variants[0], 7, plan.output_dir / "runs" / "adamw_torch-seed7", "final")
    spec.output_dir.mkdir(parents=True)
    command = train_command(plan, spec, None)
    (spec.output_dir / COMMAND_FILE).write_text(json.dumps(
        {**run_key(plan, command, None), "command": command[command.index("train"):]}))
    (spec.output_dir / "run_done.json").write_text(json.dumps({"log_history": [{"eval_loss": 1.0, "step": 2}]}))
    assert str(first) in (spec.output_dir / COMMAND_FILE).read_text()

    moved = tmp_path / "second"
    moved.mkdir()
    (first / "out").rename(moved / "out")
    (tmp_path / "recipe.yaml").rename(moved / "recipe.yaml")
    again = plan_of(moved / "recipe.yaml", moved / "out", optims="adamw_torch")
    specs = [*final_specs(again), RunSpec(again.variants[0], 7, again.output_dir / "runs" / "adamw_torch-seed7",
                                          "final")]
    said = []
    assert all(r.ok for r in compare_module._execute(again, specs, None, False, said.append))
    assert len(said) == 2 and all("already finished, reusing its log" in line for line in said)
    # What the key still holds decides: the same folder asked for with another seed is refused.
    wrong = RunSpec(again.variants[0], 8, specs[-1].output_dir, "final")
    with pytest.raises(RecipeError, match="whose train command differs"):
        compare_module._execute(again, [wrong], None, False, said.append)


def test_a_folder_compare_did_not_make_is_neither_reused_nor_deleted(recipe, tmp_path):
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch")
    spec = final_specs(plan)[0]
    spec.output_dir.mkdir(parents=True)
    (spec.output_dir / "precious.txt").write_text("keep me")
    for rerun in (False, True):
        with pytest.raises(RecipeError, match="exists but was not made by compare"):
            compare_module._execute(plan, [spec], None, rerun, print)
    assert (spec.output_dir / "precious.txt").read_text() == "keep me"


def test_rerun_deletes_only_run_folders_compare_made_under_its_output_dir(tmp_path):
    runs = tmp_path / "out" / "runs"
    made = runs / "adamw_torch-seed0"
    made.mkdir(parents=True)
    (made / COMMAND_FILE).write_text("{}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / COMMAND_FILE).write_text("{}")
    link = runs / "link"
    link.symlink_to(outside)
    not_made = runs / "by-hand"
    not_made.mkdir()
    for folder, match in ((outside, "not a run folder under"), (runs / ".." / ".." / "elsewhere", "not a run folder"),
                          (link, "not a run folder under"), (runs, "not a run folder under"),
                          (not_made, "compare did not make it")):
        with pytest.raises(RecipeError, match=match):
            remove_run_folder(folder, runs)
    assert outside.is_dir() and (outside / COMMAND_FILE).is_file() and not_made.is_dir() and link.is_symlink()
    remove_run_folder(made, runs)
    assert not made.exists()


# --- one compare per output folder, children that never outlive compare, the launcher --------------


HOLD_LOCK = """
import sys, time
from dualadam_hf.experiments.checkpoints import folder_lock
with folder_lock(sys.argv[1], sys.argv[2], "compare"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_compare_on_the_same_output_folder_is_refused_with_the_first_ones_pid(recipe, tmp_path):
    out = tmp_path / "out"
    plan = plan_of(recipe(), out, optims="adamw_torch")
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), LOCK_FILE], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(RecipeError, match=f"another compare \\(pid {first.pid}\\) is running in {out}"):
            compare_module.compare(plan, log=print)
        assert not (out / "runs").exists()  # nothing was started
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead holder's lock: the folder is free again.
    with folder_lock(out, LOCK_FILE, "compare"):
        pass


PARENT = """
import sys
from dualadam_hf.experiments.compare import run_child
run_child([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_dies_with_compare_even_under_kill_9(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _alive(child_pid):
        time.sleep(0.1)
    alive = _alive(child_pid)
    if alive:
        os.kill(child_pid, signal.SIGKILL)
    assert not alive, "the training child outlived its killed parent"


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for a reaper) and not gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_compare_reaches_the_child_and_is_waited_for(tmp_path, signum):
    marker = tmp_path / "child_stopped"
    child = (f"import signal, sys, time\n"
             f"def stop(*_):\n    open({str(marker)!r}, 'w').write('yes'); sys.exit(3)\n"
             f"signal.signal({int(signum)}, stop)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signum))
    timer.start()
    try:
        with pytest.raises(Interrupted) as stop:
            run_child([sys.executable, "-c", child])
    finally:
        timer.cancel()
    # The child got the signal and finished before compare went on.
    assert stop.value.signum == signum and marker.read_text() == "yes"


def test_a_child_stops_for_sigint_even_when_compare_started_with_it_ignored(tmp_path):
    """`compare ... &` in a script (or under nohup) starts with SIGINT ignored; its children must not inherit
    that, or the SIGINT compare passes on would leave them training."""
    marker = tmp_path / "child_stopped"
    child = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
             f"    open({str(marker)!r}, 'w').write('yes')\n    raise SystemExit(3)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(Interrupted) as stop:
            run_child([sys.executable, "-c", child])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert stop.value.signum == signal.SIGINT and marker.read_text() == "yes"


@pytest.mark.parametrize("launcher, match", [
    ("no-such-launcher-xyz launch", "no program 'no-such-launcher-xyz' on PATH"),
    ("accelerate launch 'unclosed", "not a valid command line"),
    ("  ", "--launcher is empty"),
])
def test_a_bogus_launcher_is_named_before_any_run(launcher, match, recipe, tmp_path, capsys):
    with pytest.raises(RecipeError, match=match):
        check_launcher(launcher)
    argv = ["compare", "--config", str(recipe()), "--output_dir", str(tmp_path / "out"), "--launcher", launcher]
    assert main(argv) == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_dir_where_nothing_can_be_written_is_refused_before_any_run(recipe, tmp_path):
    # As root, os.access says yes everywhere; /proc takes no new files from anyone.
    with pytest.raises(RecipeError, match="is not writable"):
        plan_of(recipe(), Path("/proc/dualadam-compare-test"))


def test_the_report_gets_the_baseline(recipe, tmp_path, monkeypatch):
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch,dualadam", baseline="dualadam")
    seen = []

    def write_report(plan, results, grid_results, *, seconds, baselines):
        seen.append(baselines)
        return tmp_path / "report.md"

    monkeypatch.setattr(compare_module, "_execute", lambda *args: [])
    monkeypatch.setattr(compare_module, "write_report", write_report)
    compare_module.compare(plan)
    assert seen == [["adamw_torch", "dualadam"]]


# --- the data is part of what a run measured ---------------------------------------------------------


def chat_folder(folder: Path, rows: int = 64) -> Path:
    """A dataset folder of its own (train.jsonl), so that a test may edit it."""
    from dualadam_hf.experiments.tiny import write_tiny_chat_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_chat_jsonl(folder / "train.jsonl", n=rows, seed=0)
    return folder


def test_an_edited_data_file_is_refused_instead_of_mixing_old_and_new_runs(recipe, tmp_path):
    data = chat_folder(tmp_path / "data")
    out = tmp_path / "out"
    plan = plan_of(recipe(data=data), out, optims="adamw_torch")
    fake_finished_run(plan, final_specs(plan)[0])
    said = []
    assert compare_module._execute(plan, final_specs(plan), None, False, said.append)[0].ok  # unchanged: reused
    # The same command with a second seed, after a row of the file changed: seed 0 ran on the old rows.
    lines = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join([*lines[:-1], lines[0]]) + "\n")
    more = plan_of(recipe(data=data), out, optims="adamw_torch", seeds="2")
    with pytest.raises(RecipeError, match=rf"read other data: data file {re.escape(str(data / 'train.jsonl'))} "
                                          r"changed since it ran.*--rerun"):
        compare_module._execute(more, final_specs(more), None, False, said.append)
    # A validation file that appears changes which rows are carved out of train, though the run never reads it.
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "validation.jsonl").write_text("\n".join(lines[:8]) + "\n")
    added = plan_of(recipe(data=data), out, optims="adamw_torch")
    with pytest.raises(RecipeError, match="a split file of the data folder was added or removed"):
        compare_module._execute(added, final_specs(added), None, False, said.append)
    # The held-out file the run reads, new since: named as such.
    (data / "validation.jsonl").unlink()
    (data / "test.jsonl").write_text("\n".join(lines[:8]) + "\n")
    tested = plan_of(recipe(data=data), out, optims="adamw_torch")
    with pytest.raises(RecipeError, match=r"data file .*test.jsonl was not there when it ran"):
        compare_module._execute(tested, final_specs(tested), None, False, said.append)


def write_key_without_data(plan, spec) -> None:
    """A finished run whose key records no data files, so nothing in it tells which data the run read."""
    spec.output_dir.mkdir(parents=True)
    key = run_key(plan, train_command(plan, spec, None), None)
    key.pop("data", None)
    (spec.output_dir / COMMAND_FILE).write_text(json.dumps(key))
    (spec.output_dir / "run_done.json").write_text(json.dumps({"log_history": [{"eval_loss": 1.0, "step": 2}]}))


def test_a_key_that_records_no_data_is_reused_only_for_data_with_no_local_file(recipe, tmp_path):
    local = plan_of(recipe(), tmp_path / "local", optims="adamw_torch")
    write_key_without_data(local, final_specs(local)[0])
    with pytest.raises(RecipeError, match="recorded without the content of its data files, so it cannot be told "
                                          "whether .*train.jsonl changed"):
        compare_module._execute(local, final_specs(local), None, False, print)
    # Generated rows follow from the recipe and the seed, both in the key already.
    generated = plan_of(recipe("dataset_config: min_terms=2,max_terms=2,min_digits=1,max_digits=2\n",
                               data="reasoning-gym:chain_sum"), tmp_path / "generated", optims="adamw_torch")
    spec = final_specs(generated)[0]
    write_key_without_data(generated, spec)
    assert "data" not in run_key(generated, train_command(generated, spec, None), None)
    said = []
    assert compare_module._execute(generated, [spec], None, False, said.append)[0].ok
    assert "already finished, reusing its log" in said[0]


# --- what a variant may change ---------------------------------------------------------------------


@pytest.mark.parametrize("entry, why", [
    ("adamw_torch[max_length=12]", "cuts the training and held-out rows"),
    ("adamw_torch[per_device_eval_batch_size=2]", "changes how the held-out loss is batched"),
    ("dualadam[chat_template_path=other.jinja]", "changes the text the model trains and is scored on"),
    ("dualadam[completion_only_loss=false]", "changes which tokens the loss counts"),
    ("dualadam[max_steps=4]", "changes how long the runs train"),
    ("dualadam[bf16=true]", "not an optimizer, schedule or speed setting"),
    ("adamw_torch[warmup_step=2]", r"did you mean 'warmup_steps'"),
])
def test_a_variant_may_change_only_the_optimizer_its_schedule_and_speed(entry, why):
    key = entry.split("[")[1].split("=")[0]
    with pytest.raises(RecipeError, match=rf"{key} must be the same in every run: it .*{why}"):
        parse_variants(entry)
    allowed = parse_variant("adamw_torch[weight_decay=0.1,adam_beta2=0.95,max_grad_norm=0.5,lr_scheduler_type=cosine,"
                            "warmup_ratio=0.1,gradient_checkpointing=true,dataloader_num_workers=2]")
    assert set(allowed.settings) == {"weight_decay", "adam_beta2", "max_grad_norm", "lr_scheduler_type",
                                     "warmup_ratio", "gradient_checkpointing", "dataloader_num_workers"}


# --- names that fit the file system -----------------------------------------------------------------


def test_a_label_too_long_for_a_folder_name_is_refused_before_any_run(recipe, tmp_path):
    label = "x" * 300
    with pytest.raises(RecipeError, match=rf"variant label '{'x' * 57}\.\.\.' \(300 characters\) is too long: .* "
                                          r"over the file system's limit of \d+ bytes per name"):
        plan_of(recipe(), tmp_path / "out", optims=f"adamw_torch,dualadam[label={label}]")
    # A long label that fits is fine, grid folders and raw files included.
    plan = plan_of(recipe(), tmp_path / "out", optims=f"adamw_torch,dualadam[label={'y' * 200}]", lr_grid="1e-3")
    assert plan.variants[1].label == "y" * 200


# --- a variant with no safe rate, a full disk --------------------------------------------------------


def test_a_variant_that_diverges_at_every_grid_rate_is_reported_and_the_others_go_on(recipe, tmp_path, monkeypatch):
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch,dualadam", lr_grid="1e-3,3e-3")
    ran = []

    def execute(plan, specs, launcher, rerun, log):
        ran.extend(specs)
        history = [{"loss": 1.0, "step": 1}, {"eval_loss": 1.0, "step": 1}]
        return [RunResult(s.variant.label, s.seed, history, phase=s.phase, lr=s.lr,
                          diverged={"step": 1} if s.variant.label == "dualadam" else None) for s in specs]

    monkeypatch.setattr(compare_module, "_execute", execute)
    report, results = compare_module.compare(plan, log=lambda line: None)
    assert plan.chosen_lr == {"adamw_torch": 1e-3}
    assert [(s.variant.label, s.phase) for s in ran if s.phase == "final"] == [("adamw_torch", "final")]
    text = report.read_text()
    assert "| dualadam | diverged | diverged | none: diverged at every rate |" in text
    assert "dualadam ran no seeds: it diverged at every rate of the learning-rate grid" in text
    assert "seeds none" not in text and " none." not in text


def test_a_full_disk_while_writing_the_report_is_one_line_and_keeps_the_old_report(recipe, tmp_path, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the previous report\n")
    write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == ".report.md.tmp":
            write_text(self, "half a rep")  # what a full disk leaves: part of the file
            raise OSError(28, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(compare_module, "_execute", lambda *args: [])
    monkeypatch.setattr(Path, "write_text", full_disk)
    argv = ["compare", "--config", str(recipe()), "--output_dir", str(out), "--optims", "adamw_torch", "--smoke",
            "--accuracy_size", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"could not write {out / 'report.md'}: No space left on device" in err
    assert "Traceback" not in err
    assert (out / "report.md").read_text() == "the previous report\n"


# --- the model, its tokenizer and chat template are part of what a run measured ------------------------------


def plan_on_model(path: Path, out: Path, model: Path, **settings):
    overrides = [*compare_module.smoke_overrides(), "--accuracy_size", "0", "--model_name_or_path", str(model)]
    return make_plan(path, output_dir=out, overrides=overrides, smoke=True, **settings)


@pytest.mark.parametrize("file, what", [("model.safetensors", "model weights"), ("tokenizer.json", "tokenizer"),
                                        ("chat_template.jinja", "chat template")])
def test_a_model_file_changed_at_the_same_path_is_refused_instead_of_mixing_two_models(recipe, tmp_path, tiny_model_dir,
                                                                                      file, what):
    """It was reused ("already finished, reusing its log"), and the report mixed the runs of two models."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    plan = plan_on_model(recipe(), out, model, optims="adamw_torch")
    fake_finished_run(plan, final_specs(plan)[0])
    said = []
    assert compare_module._execute(plan, final_specs(plan), None, False, said.append)[0].ok  # unchanged: reused
    with (model / file).open("ab") as changed:
        changed.write(b"\n")
    more = plan_on_model(recipe(), out, model, optims="adamw_torch", seeds="2")
    with pytest.raises(RecipeError, match=rf"adamw_torch-seed0 holds a run made from other inputs: {what} "
                                          r"\(sha256 [0-9a-f]{8}\.\. -> [0-9a-f]{8}\.\.\) \(reusing it would mix "
                                          r"results of different inputs\); give another --output_dir, or --rerun"):
        compare_module._execute(more, final_specs(more), None, False, said.append)


def test_a_run_recorded_without_a_manifest_is_not_reused(recipe, tmp_path):
    plan = plan_of(recipe(), tmp_path / "out", optims="adamw_torch")
    spec = final_specs(plan)[0]
    fake_finished_run(plan, spec)
    key = json.loads((spec.output_dir / COMMAND_FILE).read_text())
    del key["inputs"]  # as an earlier version wrote it
    (spec.output_dir / COMMAND_FILE).write_text(json.dumps(key))
    with pytest.raises(RecipeError, match=r"holds a run recorded without a manifest of its inputs \(by an earlier "
                                          r"version of dualadam-hf\), so whether its model, tokenizer or settings "
                                          r"changed since it ran cannot be told; give another --output_dir, or --rerun "
                                          r"to replace it"):
        compare_module._execute(plan, [spec], None, False, print)


def test_a_compare_output_dir_that_is_the_data_folder_is_refused_before_any_run(recipe, tmp_path):
    data = chat_folder(tmp_path / "data")
    with pytest.raises(RecipeError, match=rf"^output_dir {data} is the data folder {data}: "):
        plan_of(recipe(data=data), data)
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]


# --- labels are folder names; optimizer settings are checked when the plan is made ------------------------


@pytest.mark.parametrize("label, words", [
    ("..", "would name the folder itself or the one above it"),
    (".", "would name the folder itself or the one above it"),
    ("grid/../..", "holds the path separator '/'"),
    ("a\\b", "holds the path separator '\\\\'"),
    ("two\nlines", "holds the control character 0x000a"),
    ("bell\x07", "holds the control character 0x0007"),
])
def test_a_label_that_is_not_one_folder_name_is_refused(label, words):
    """A label `..` put the grid's runs outside runs/grid/; one with a newline was taken."""
    with pytest.raises(RecipeError, match=rf"^variant label {re.escape(repr(label))} {re.escape(words)}"):
        parse_variants([{"optim": "adamw_torch", "label": label}])
    with pytest.raises(RecipeError, match=re.escape(words)):  # the command line's form gets the same check
        parse_variants(f"adamw_torch[label={label}]")


@pytest.mark.parametrize("entry, words", [
    ("adamw_torch[adam_beta1=1.5]", "Invalid beta parameter at index 0: 1.5"),
    ("adamw_torch[adam_beta2=1]", "Invalid beta parameter at index 1: 1.0"),
    ("adamw_torch[weight_decay=-1]", "Invalid weight_decay value: -1.0"),
    ("adamw_torch[adam_epsilon=-0.1]", "Invalid epsilon value: -0.1"),
])
def test_a_variant_its_optimizer_would_refuse_is_refused_when_the_plan_is_made(recipe, tmp_path, entry, words):
    """The first failed only when its run started, after the runs before it; the weight decay was not checked at
    all (the Trainer passes it in param groups) and trained."""
    with pytest.raises(RecipeError, match=rf"^variant {re.escape(repr(entry))}: recipe .*: --optim adamw_torch: "
                                          rf"{re.escape(words)}$"):
        plan_of(recipe(), tmp_path / "out", optims=f"dualadam,{entry}")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_report_is_written_ends_in_one_line(recipe, tmp_path, monkeypatch, capsys):
    def write_report(plan, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the terminal, while report.md is written
        return plan.output_dir / "report.md"

    monkeypatch.setattr(compare_module, "_execute", lambda *args: [])
    monkeypatch.setattr(compare_module, "write_report", write_report)
    stray = []
    previous = signal.signal(signal.SIGINT, lambda *args: stray.append(args))  # one compare did not take: no stop
    try:
        code = main(["compare", "--config", str(recipe()), "--output_dir", str(tmp_path / "out"), "--optims",
                     "adamw_torch", "--smoke", "--accuracy_size", "0"])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert (code, stray) == (128 + signal.SIGINT, []) and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("[compare]")] == [
        "[compare] interrupted by SIGINT outside a run. Rerun the same command to continue where it stopped: finished "
        "runs are reused, and a report being replaced keeps its previous content."]
