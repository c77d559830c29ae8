"""Every figure the docs cite from a study comes from that study's report, rebuilt here from its raw logs.

Pages read: the study pages (docs/study.md, docs/study/lowbit.md, docs/study/v1.md) whole, and in README.md,
docs/optimizer.md and docs/inverse-share.md every paragraph, list item or table row that links a study page or
report or names a study. Each number in them must have a source, or the test names it with its context:

- a *claim*: a phrase computed here from the raw logs or read off the rebuilt report (e.g. "3 of 10 (seeds 3, 4,
  8; AdamW better in each)", a row of study.md's table of comparisons); every claim must stand in its page as
  written, so no count, seed or cell in it can change;
- a line of the study's *report*, rebuilt from its raw logs by the project's report code (as tests/test_report.py
  does), that prints the figure as the page does (0.437 is not 0.4370; an accuracy in points, -2.64, stands for
  the report's -0.0264) together with another figure of the same paragraph; a table row that copies a row of the
  report is read against that row only;
- a *derived figure*, computed here from the raw logs with the report code (ratios of peak memory, per-seed
  ranges, "within" bounds, what 10 seeds would detect), or a value of the study's recipe;
- or the short ALLOWED list of phrases that hold figures no run of a study gives, each with its reason.

Code spans, link targets, names that mix letters and digits (SmolLM2-135M, fp32), "N-bit", versions and dates
are no figures. A whole number below 100 (a count of seeds, steps, tests) counts as sourced by a report line only
in a table row that copies that line. A changed digit in a cited figure therefore makes a number that no source
gives, or breaks a claim; tests/test_doc_figures.py's own checks show it for one figure of each kind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import statistics
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from dualadam_hf.experiments.report import RunResult, load_raw, write_report
from dualadam_hf.experiments.stats import ALPHA, CONFIDENCE, POWER, min_detectable_difference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


Key = tuple[Decimal, int]  # a figure as printed: its value and the place of its last digit (0.437 is not 0.4370)


def key(value: Decimal) -> Key:
    return value, value.as_tuple().exponent


@dataclass
class Study:
    raw: Path
    recipe: Path
    baselines: tuple[str, ...] | None  # None: the recipe's
    pages: tuple[str, ...]  # link targets (relative to the repository root) that name this study
    words: tuple[str, ...]  # words that name it in a paragraph without a link
    text: str = ""  # its report, rebuilt from the raw logs
    results: list[RunResult] = field(default_factory=list)
    grid: list[RunResult] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # its report's lines
    records: list[set[Key]] = field(default_factory=list)  # the figures of each line, as printed
    recipe_values: set[Key] = field(default_factory=set)
    derived: set[Key] = field(default_factory=set)
    claims: dict[str, list[str]] = field(default_factory=dict)  # page -> phrases it must hold


STUDIES = {
    "v2": Study(DOCS / "study" / "raw", ROOT / "recipes" / "smollm2_chainsum_study_v2.yaml", None,
                ("docs/study.md", "docs/study/report.md"), ("the study", "the CPU study", "study v2")),
    "lowbit": Study(DOCS / "study" / "lowbit" / "raw", ROOT / "recipes" / "smollm2_chainsum_lowbit_full.yaml", None,
                    ("docs/study/lowbit.md", "docs/study/lowbit/report.md"), ("low-bit study",)),
    "v1": Study(DOCS / "study" / "v1" / "raw", ROOT / "recipes" / "smollm2_chainsum_study.yaml", ("matched-warmup",),
                ("docs/study/v1.md", "docs/study/v1/report.md"), ("v1", "first CPU study", "first study")),
}
# Pages read whole, with the study each belongs to; and pages whose study-citing blocks are read.
STUDY_PAGES = {"docs/study.md": "v2", "docs/study/lowbit.md": "lowbit", "docs/study/v1.md": "v1"}
CITING_PAGES = ("README.md", "docs/optimizer.md", "docs/inverse-share.md")

# Figures in the checked blocks that are no result of a study's runs, each in the phrase that says what it is and
# with its reason: a figure inside such a phrase needs no other source. (Code spans, link targets, names that mix
# letters and digits such as SmolLM2-135M or fp32, "N-bit" state widths, versions x.y.z and dates YYYY-MM-DD are
# not read as figures at all.)
ALLOWED: dict[str, dict[str, str]] = {
    "*": {
        "2 idle CPU cores": "the machine the studies ran on",
        "2 CPU cores": "the machine the studies ran on",
        "2 cores": "the machine the studies ran on",
        "2.4e4-fold": "v1's review measured one tensor's amplification; the raw logs hold only the share (v1.md says)",
    },
    "docs/study.md": {
        "at least the default 20": "the sharpness measurement's default iteration cap (docs/flatness.md)",
        "one model (135M parameters)": "the model's size",
    },
    "docs/study/v1.md": {"from 22 to 2.4e4 by step 8": "v1's review, as 2.4e4-fold above"},
    "docs/study/lowbit.md": {
        "reached a held-out accuracy of 2.8%": "the trial that set the rate: its log is not among the raw logs (the "
                                               "recipe's header records it)",
        "134.5M parameters": "the model's size (docs/optimizer.md counts it)",
    },
    "docs/optimizer.md": {
        "median about 1e-5": "the size of d, measured by benchmarks/inverse_share.py (docs/inverse-share.md)",
        "took 14.6 s, later steps 6-7 s": "a low-bit run's step times, read on its console: no raw log holds them",
    },
    "docs/inverse-share.md": {
        "(`d` about 1e-5) the inverse part is 1e-5 to 1e-7 of the update in the runs above":
            "this page's own benchmark runs (its table)",
        "stayed near 0.9 through the blend": "this page's own benchmark runs (its table)",
        "about 1.4 AdamW steps": "the cost of `norm`, measured in docs/performance.md",
    },
}

_DROP = (
    (re.compile(r'"[^"\n]*="'), " "),  # an example problem: "34 - 96 ="
    (re.compile(r"```.*?```", re.S), " "),  # code blocks: commands
    (re.compile(r"`[^`]*`"), " "),  # code spans: option values and names
    (re.compile(r"\]\([^)]*\)"), "]"),  # link targets
    (re.compile(r"!\[[^\]]*\]"), " "),  # image captions
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), " "),  # dates
    (re.compile(r"\b\d+\.\d+\.\d+\b"), " "),  # versions
    (re.compile(r"\b\d+-bit\b|\b\d+ bits?\b"), " "),  # state widths: 8-bit, 4 bits
    (re.compile(r"\b[A-Za-z][\w]*\d[\w.\-]*"), " "),  # names mixing letters and digits: SmolLM2-135M, fp32, v1
    (re.compile(r"2\^20|2\*\*20"), " "),  # the size of a MiB
)
NUMBER = re.compile(r"(?<![\w.])(?P<sign>[+\-−](?=\d))?(?P<body>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
                    r"(?P<exp>e[+\-−]?\d+)?(?![\w.]*\d)")


@dataclass(frozen=True)
class Figure:
    text: str
    value: Decimal
    signed: bool
    start: int
    end: int


def figures(text: str) -> list[Figure]:
    """The numbers of ``text`` (already stripped of what is no figure). A dash between two numbers is a range."""
    text = re.sub(r"(?<=\d)-(?=\d)", " ", text)
    found = []
    for m in NUMBER.finditer(text):
        sign = (m["sign"] or "").replace("−", "-")
        literal = sign + m["body"].replace(",", "") + (m["frac"] or "") + (m["exp"] or "").replace("−", "-")
        found.append(Figure(m.group(0), Decimal(literal), bool(sign), m.start(), m.end()))
    return found


def stripped(text: str) -> str:
    for pattern, replacement in _DROP:
        text = pattern.sub(lambda m, r=replacement: r + " " * (len(m.group(0)) - len(r)), text)
    return text


def blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each paragraph, list item, table row and heading; code blocks left out."""
    out, current, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        new_block = not line.strip() or re.match(r"\s*(- |\| |#|\d+\. )", line)
        if new_block and current:
            out.append((start, "\n".join(current)))
            current = []
        if line.strip():
            if not current:
                start = number
            current.append(line)
    if current:
        out.append((start, "\n".join(current)))
    return out


def _recipe_values(node) -> set[Key]:
    """Every number of a recipe, as Python writes it (3.0e-4 is 0.0003, which a page writes 3e-4)."""
    if isinstance(node, dict):
        return set().union(*(_recipe_values(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_recipe_values(v) for v in node)) if node else set()
    if isinstance(node, bool) or node is None:
        return set()
    if isinstance(node, (int, float)):
        return {key(Decimal(repr(node)))}
    return {key(f.value.copy_abs()) for f in figures(stripped(str(node).replace(",", ", ")))}


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _cells(section: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]


def planned(text: str) -> dict[tuple[str, str], list[str]]:
    """The report's pre-specified tests: {(comparison, metric): [family, mean, interval, p, Holm p, ...]}."""
    return {(c[1], c[2]): [c[0], *c[3:]] for c in _cells(_section(text, "Pre-specified comparisons"))[1:]}


def differences(text: str, baseline: str) -> dict[tuple[str, str], list[str]]:
    """{(variant, metric): [per-seed, mean, interval, sign p, detectable]} against ``baseline``."""
    return {(c[0], c[1]): c[2:] for c in _cells(_section(text, f"Paired differences against {baseline}"))
            if len(c) == 7}


def mcnemar(text: str, baseline: str, variant: str) -> list[list[str]]:
    """Per seed: [seed, right only for the variant, right only for the baseline, p, answers that differ]."""
    table = _section(text, f"Paired differences against {baseline}").split("answers that differ |", 1)[1]
    return [c[1:] for c in _cells(table) if c[0] == variant]


def points(cell: str) -> str:
    """A report's accuracy cell (a fraction, or an interval of two) in points: -0.0264 is -2.64."""
    def one(text: str) -> str:
        value = Decimal(text).scaleb(2)
        return f"{value:+}" if text[0] in "+-" else f"{value}"

    if cell.startswith("["):
        low, high = cell.strip("[]").split(", ")
        return f"[{one(low)}, {one(high)}]"
    return one(cell)


WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def study_settings(study: Study) -> tuple[int, int, float]:
    """(optimizer steps of a run, steps of the project's blend, the paper's switch rate) as the recipes set them:
    the study's steps and blend_fraction, the rate of study v2's paper-rate variant."""
    recipe = yaml.safe_load(study.recipe.read_text())
    fraction = float(dict(pair.split("=") for pair in recipe["optim_args"].split(","))["blend_fraction"])
    optims = yaml.safe_load(STUDIES["v2"].recipe.read_text())["compare"]["optims"]
    rate = next(float(o["switch_rate"]) for o in optims if isinstance(o, dict) and o.get("label") ==
                "dualadam-paper-rate")
    return int(recipe["max_steps"]), math.ceil(fraction * int(recipe["max_steps"])), rate


def up(value: float, significant: int) -> str:
    """``value`` rounded up to ``significant`` digits, in scientific notation: a "within" or "at most" bound."""
    exponent = math.floor(math.log10(abs(value))) - significant + 1
    return f"{math.ceil(value / 10**exponent)}e{exponent}"


def _runs(study: Study) -> dict[str, dict[int, RunResult]]:
    runs: dict[str, dict[int, RunResult]] = {}
    for r in study.results:
        runs.setdefault(r.label, {})[r.seed] = r
    return runs


def _per_seed(runs, variant: str, baseline: str, key: str) -> list[float]:
    return [runs[variant][s].summary[key] - runs[baseline][s].summary[key] for s in sorted(runs[variant])]


def _mean(runs: dict[int, RunResult], key: str) -> float:
    return statistics.fmean(r.summary[key] for r in runs.values())


def _training_time(study: Study) -> list[str]:
    """The training time of all runs, as the report sums it, in seconds and hours; the number of runs."""
    seconds = sum(r.summary["wall_time_s"] for r in [*study.results, *study.grid])
    return [f"{seconds:.0f}", f"{seconds / 3600:.1f}", str(len(study.results) + len(study.grid))]


def derive_lowbit(study: Study) -> tuple[list[str], dict[str, list[str]]]:
    """The low-bit study's figures that its report does not print, from its raw logs."""
    runs = _runs(study)
    found = _training_time(study)
    # Peak memory: the means the report's table rounds, their ratios (of the unrounded means) and the gap of
    # 8-bit below fp32; fp32 and 8-bit moments of 134.5M parameters in MiB (8 and 2.036 bytes each).
    peak = {v: _mean(r, "peak_memory_mb") for v, r in runs.items()}
    found += [f"{value:.0f}" for value in peak.values()]
    found += [f"{peak[a] / peak[b]:.3f}" for a, b in (("dualadam_8bit", "dualadam"), ("dualadam_4bit", "dualadam"),
                                                       ("adamw_torch_8bit", "adamw_torch"))]
    found += [f"{peak['dualadam'] - peak['dualadam_8bit']:.0f}", *(f"{134.5e6 * b / 2**20:.0f}" for b in (8, 2.036))]
    # The largest per-seed held-out loss gap of 8-bit DualAdam and of torchao's 8-bit AdamW from their twins, and
    # the range of 4-bit DualAdam's (all below 0).
    for a, b in (("dualadam_8bit", "dualadam"), ("adamw_torch_8bit", "adamw_torch")):
        found.append(f"{max(abs(d) for d in _per_seed(runs, a, b, 'heldout_loss')):.5f}")
    four = _per_seed(runs, "dualadam_4bit", "dualadam", "heldout_loss")
    assert max(four) < 0
    found += [f"{max(four):.5f}", f"{min(four):.5f}"]
    # The study's shape: 5 variants, 5 seeds, the 6 low-bit and 2 primary tests, v2's 12-step blend.
    found += ["5", "6", "2", "12"]
    # Per seed, from the report's McNemar tables: the problems the two runs answered differently, and the
    # discordant ones (right for one run only).
    spans = {}
    for a, b in (("dualadam_8bit", "dualadam"), ("dualadam_4bit", "dualadam"), ("adamw_torch_8bit", "adamw_torch"),
                 ("dualadam", "adamw_torch")):
        rows = mcnemar(study.text, b, a)
        differ, discordant = [int(r[4]) for r in rows], [int(r[1]) + int(r[2]) for r in rows]
        spans[a, b] = (min(differ), max(differ), min(discordant), max(discordant))
    (d8, D8, c8, C8), (d4, D4, c4, C4), (da, DA, ca, CA), (df, DF, cf, CF) = spans.values()
    accuracy = _per_seed(runs, "dualadam", "adamw_torch", "heldout_accuracy")
    total = len(runs["dualadam"][0].accuracy_rows)
    claims = {"docs/study/lowbit.md": [
        f"gave different answers to {d8} to {D8} of the {total} test problems",
        f"and {c8} to {C8} of those were right in one run and wrong in the other",
        f"with {da} to {DA} answers different per seed ({ca} to {CA} discordant)",
        f"on {d4} to {D4} of the {total} problems ({c4} to {C4} discordant)",
        f"({df} to {DF}; {cf} to {CF} discordant)",
        f"({d8}-{D8} against {da}-{DA} problems answered differently per seed; {c8}-{C8} against {ca}-{CA} discordant)",
        f"the answers ({d4}-{D4} of {total} different per seed)",
        f"lower in {sum(d < 0 for d in accuracy)} of {len(accuracy)} seeds",
        f"all {len(four)} below 0", f"{len(runs)} variants x {len(accuracy)} seeds", f"over {len(accuracy)} seeds",
        f"over the {len(accuracy)} seeds",
    ]}
    claims["README.md"] = claims["docs/optimizer.md"] = [f"({d4}-{D4} of {total} test answers different per seed)"]
    # The inverse share of the step taken, from the replay of the low-bit runs' blend: the table the replay script
    # prints from its logs and the study's raw logs, row for row.
    claims["docs/study/lowbit.md"] += _replay_script().summary()
    return found, claims


def _replay_script():
    spec = importlib.util.spec_from_file_location("replay", ROOT / "scripts" / "replay_lowbit_inverse_share.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def derive_v2(study: Study) -> tuple[list[str], dict[str, list[str]]]:
    """Study v2's figures that its report does not print, from its raw logs."""
    from scipy import stats as scipy_stats

    from dualadam_hf.experiments.stats import mcnemar_exact

    runs = _runs(study)
    found = _training_time(study)
    pairs = (("matched-warmup", "dualadam"), ("matched-warmup-paper-rate", "dualadam-paper-rate"))
    # Each blend against its matched warmup, in the seeds both ran: the largest held-out loss gap at steps 16, 32
    # and 48 (each pair, and both), and of the final train loss.
    def eval_gap(a: str, b: str) -> float:
        gaps = []
        for seed, run in runs[a].items():
            other = dict(_curve(runs[b][seed], "eval_loss"))
            gaps += [abs(v - other[step]) for step, v in _curve(run, "eval_loss")]
        return max(gaps)

    gaps = [eval_gap(a, b) for a, b in pairs]
    found += [up(gaps[0], 3), up(gaps[1], 3), up(max(gaps), 2)]
    found.append(up(max(abs(d) for a, b in pairs for d in _per_seed(runs, a, b, "final_train_loss")), 3))
    # The same answer text on every problem, per pair: 3 seeds x 250.
    same = {(a, b): sum(x == y for s in runs[a] for x, y in zip(runs[a][s].accuracy_answers,
                                                                runs[b][s].accuracy_answers, strict=True))
            for a, b in pairs}
    assert len(set(same.values())) == 1
    (same_answers,) = set(same.values())
    # The grid: each blend and its warmup in validation loss, per grid run, at 1e-4 and 3e-4 (both pairs), at 1e-3
    # (each pair), and at 3e-3 (the paper-rate pair); dualadam and its warmup at 3e-3, per grid seed.
    grid = {(r.label, r.seed, r.lr): r.summary["heldout_loss"] for r in study.grid}

    def grid_gap(pair_list, rates) -> float:
        return max(abs(grid[(a, s, lr)] - grid[(b, s, lr)]) for a, b in pair_list for (label, s, lr) in grid
                   if label == a and lr in rates)

    blends = [(b, a) for a, b in pairs]
    found += [up(grid_gap(blends, (1e-4, 3e-4)), 1), up(grid_gap(blends[:1], (1e-3,)), 2),
              up(grid_gap(blends[1:], (1e-3,)), 1), up(grid_gap(blends[1:], (3e-3,)), 1)]
    found += [f"{grid[(v, s, 3e-3)]:.3f}" for v in ("dualadam", "matched-warmup") for s in (1000, 1001)]
    # The blends: the project's of ceil(0.25 * 48) = 12 steps (the inverse part in steps 1-11); the paper's
    # switch rate 0.01, a 100-step blend (steps 1-99) whose r falls to 0.52 by step 48, so that the Adam part
    # grows from 0.01 to 0.48 of its size. The study's shape: 10 seeds (0-9), 3 for the controls, 6 primary and
    # 2 control tests, evaluations at steps 16, 32 and 48, seed 5 resumed.
    steps, blend, rate = study_settings(study)
    paper = round(1 / rate)
    found += [str(blend), str(blend - 1), str(paper), str(paper - 1), str(steps), f"{rate:.2f}",
              f"{1 - steps * rate:.2f}", f"{steps * rate:.2f}", "6", "2", "10", "3", "5", "9", "16", "32"]
    # The paper rate's sharpness against AdamW: the seeds lower, and a signed-rank test (not in the report).
    sharp = _per_seed(runs, "dualadam-paper-rate", "adamw_torch", "sharpness")
    found.append(f"{scipy_stats.wilcoxon(sharp).pvalue:.3f}")
    accuracy = _per_seed(runs, "dualadam", "adamw_torch", "heldout_accuracy")
    loss = _per_seed(runs, "dualadam", "adamw_torch", "heldout_loss")
    significant = {}
    for variant in ("dualadam", "dualadam-paper-rate", "dualadam-norm"):
        exact = {s: mcnemar_exact(runs[variant][s].accuracy_rows, runs["adamw_torch"][s].accuracy_rows)
                 for s in sorted(runs[variant])}
        significant[variant] = [s for s, t in exact.items() if t.p < 0.05]
        assert all(exact[s].baseline_only > exact[s].variant_only for s in significant[variant])
    capped = [r for r in study.results if _last(r, "sharpness/eigenvalue_converged") == 0]
    last = [r for r in study.results if _last(r, "sharpness/eigenvalue_converged") == 1
            and _last(r, "sharpness/eigenvalue_iterations") == 8]
    estimates = sum(r.summary["sharpness"] is not None for r in study.results)
    n = len(accuracy)
    claims = {"docs/study.md": [
        f"{sum(d < 0 for d in sharp)} of its {len(sharp)} seeds are lower",
        f"lower in {sum(d < 0 for d in accuracy)} of {n} seeds", f"higher in {sum(d > 0 for d in loss)} of {n} seeds",
        f"an interval that contains 0 (Holm p = {planned(study.text)[('dualadam − adamw_torch', 'held-out loss')][4]})",
        f"{len(significant['dualadam'])} of {n} (seeds {', '.join(map(str, significant['dualadam']))}; AdamW better "
        "in each)",
        f"{len(significant['dualadam-paper-rate'])} of {n} (AdamW better in each)",
        f"| {len(significant['dualadam-norm'])} of {n} |", f"({same_answers} of {same_answers} per pair)",
        f"({same_answers} of {same_answers}, for both pairs)",
        f"{len(capped) + len(last)} of the {estimates} estimates used every one of the 8 power iterations allowed, "
        f"{len(capped)} stopping at the cap without converging and {len(last)} more",
        f"{WORDS[len(significant['dualadam'])]} seeds with a McNemar p below 0.05",
    ]}
    claims["README.md"] = [f"({same_answers} of {same_answers} per pair)"]
    # The table of the comparisons the study was built for: its cells as the report prints them (accuracy in
    # points), row by row.
    tests = planned(study.text)
    for variant, baseline in (("dualadam", "adamw_torch"), ("dualadam-paper-rate", "adamw_torch"),
                              ("dualadam-norm", "adamw_torch"), ("matched-warmup", "dualadam"),
                              ("matched-warmup-paper-rate", "dualadam-paper-rate")):
        rows = differences(study.text, baseline)
        loss, accuracy = rows[(variant, "held-out loss")], rows[(variant, "held-out accuracy")]
        holm = [tests[(f"{variant} − {baseline}", m)] for m in ("held-out loss", "held-out accuracy")]
        seeds = len(loss[0].split(", "))
        if accuracy[2] == "-":  # every accuracy difference 0: no test
            assert set(accuracy[0].split(", ")) == {"+0.0000"}
            discordant = sum(int(r[1]) + int(r[2]) for r in mcnemar(study.text, baseline, variant))
            claims["docs/study.md"].append(
                f"| {seeds} | {loss[1]} {loss[2]} | 0 (the same answers) | {holm[0][4]} / - | {loss[3]} / - | "
                f"{holm[0][6]} / - | {discordant} of {seeds} (no discordant problem) |")
        else:
            claims["docs/study.md"].append(
                f"| {seeds} | {loss[1]} {loss[2]} | {points(accuracy[1])} {points(accuracy[2])} | {holm[0][4]} / "
                f"{holm[1][4]} | {loss[3]} / {accuracy[3]} | {holm[0][6]} / {points(holm[1][6])} |")
    shares = {c[0]: c[1:] for c in _cells(_section(study.text, "Inverse share of the update"))[1:]}
    claims["docs/study.md"].append(f"(share / r = {shares['dualadam-norm'][-1]}, to three decimals, at every blended "
                                   "step of every run)")
    resumed = [f"`{r.label}` seed {r.seed}" for r in study.results if r.evaluated_without_training]
    claims["docs/study.md"] += [f"One run, {', '.join(resumed)}, was stopped",
                                f"over the {len(study.results) + len(study.grid)} runs"]
    return found, claims


def derive_v1(study: Study) -> tuple[list[str], dict[str, list[str]]]:
    """Study v1's figures that its report does not print, from its raw logs."""
    runs = _runs(study)
    accuracy = _per_seed(runs, "dualadam", "adamw_torch", "heldout_accuracy")
    loss = _per_seed(runs, "dualadam", "adamw_torch", "heldout_loss")
    sd_accuracy, sd_loss = statistics.stdev(accuracy), statistics.stdev(loss)
    found = [f"{100 * sd_accuracy:.1f}", f"{sd_loss:.4f}"]
    # What 10 and 20 seeds would detect with the same sd.
    for n in (10, 20):
        found += [f"{100 * min_detectable_difference(sd_accuracy, n):.1f}",
                  f"{min_detectable_difference(sd_loss, n):.4f}"]
    # Per-seed accuracy differences against AdamW in points; the per-seed held-out loss differences.
    found += [f"{100 * x:.1f}" for v in ("dualadam", "dualadam-scaled")
              for x in _per_seed(runs, v, "adamw_torch", "heldout_accuracy")]
    found += [f"{x:+.3f}" for x in _per_seed(runs, "matched-warmup", "adamw_torch", "heldout_loss")]
    # dualadam-scaled's worst seed, in accuracy.
    found.append(f"{100 * min(r.summary['heldout_accuracy'] for r in runs['dualadam-scaled'].values()):.1f}")
    # Mean final train and held-out losses of AdamW, the matched warmup and DualAdam: their ranges.
    trio = ("adamw_torch", "matched-warmup", "dualadam")
    ranges = []
    for name in ("final_train_loss", "heldout_loss"):
        means = [_mean(runs[v], name) for v in trio]
        ranges.append(f"{min(means):.2f}-{max(means):.2f}")
    # The blend and its warmup: held-out losses within a power of ten, in the runs and in the grid.
    gaps = [abs(a - b) for s in runs["dualadam"] for (_, a), (_, b) in
            zip(_curve(runs["dualadam"][s], "eval_loss"), _curve(runs["matched-warmup"][s], "eval_loss"), strict=True)]
    grid = {(r.label, r.lr): r.summary["heldout_loss"] for r in study.grid}
    grid_gap = max(abs(grid[("dualadam", lr)] - grid[("matched-warmup", lr)]) for _, lr in grid)
    found += [f"{10 ** math.ceil(math.log10(max(gaps))):.0e}", f"{10 ** math.ceil(math.log10(grid_gap)):.0e}"]
    # The norm of mh*d over that of mh/d, from the logged share and r: share = r B / ((1 - r) A + r B).
    ratios = [share * (1 - r) / (r * (1 - share)) for s in runs["dualadam"]
              for _, r, share in _blended(runs["dualadam"][s])]
    found += [f"{min(ratios):.1e}", f"{max(ratios):.1e}"]
    # dualadam-scaled: its share at step 1, through the blend in seeds 0 and 1, at step 11 in seed 2; r at step 11;
    # the train loss of seed 1 at steps 7 and 9.
    shares = {s: _blended(runs["dualadam-scaled"][s]) for s in range(3)}
    high = [share for s in (0, 1) for _, _, share in shares[s]]
    found += [f"{shares[0][0][2]:.2f}", f"{shares[2][-1][2]:.2f}", f"{shares[2][-1][1]:.2f}"]
    through = f"{min(high):.2f}-{max(high):.3f} through the blend"
    loss1 = dict(_curve(runs["dualadam-scaled"][1], "loss"))
    found += [f"{loss1[7]:.2f}", f"{loss1[9]:.1f}"]
    # Cost: the training time in hours and minutes, of the grid and of the final runs in minutes; the final runs'
    # shortest and longest; the sharpness measurement's seconds per final run; the resumed run's peak memory.
    final = [r.summary["wall_time_s"] for r in study.results]
    grid_time = [r.summary["wall_time_s"] for r in study.grid]
    total = sum(final) + sum(grid_time)
    sharpness = [_last(r, "sharpness/seconds_total") for r in study.results]
    hours = total // 3600
    found += [f"{total:.0f}", f"{hours:.0f}", f"{total / 60 - 60 * hours:.0f}", f"{sum(grid_time) / 60:.0f}",
              f"{sum(final) / 60:.0f}", f"{min(final):.0f}", f"{max(final):.0f}", str(len(final) + len(grid_time)),
              f"{min(sharpness):.0f}", f"{max(sharpness):.0f}",
              f"{runs['dualadam-scaled'][0].summary['peak_memory_mb']:.0f}"]
    # The study's shape: a 12-step blend (steps 1-11) of 48 steps, the paper's 100-step one at switch rate 0.01, 3
    # seeds of 250 problems (750), the 8-iteration cap of the sharpness measurement; what 10 and 20 seeds would
    # detect; seed 1's train loss at steps 7 and 9.
    steps, blend, rate = study_settings(study)
    found += [str(blend), str(blend - 1), str(steps), str(round(1 / rate)), f"{rate:.2f}", "3", "250", "750", "8",
              "10", "20", "7", "9"]
    capped = [r for r in study.results if _last(r, "sharpness/eigenvalue_converged") == 0]
    estimates = sum(r.summary["sharpness"] is not None for r in study.results)
    names = {"adamw_torch": "AdamW", "dualadam-scaled": "`dualadam-scaled`"}
    by_variant = {}
    for r in capped:
        by_variant.setdefault(r.label, []).append(str(r.seed))
    which = ", ".join(f"{names[v]} seeds {' and '.join(s)}" for v, s in by_variant.items())
    holm = [float(row[4]) for row in planned(study.text).values() if row[0] == "primary"]
    scaled_accuracy = _per_seed(runs, "dualadam-scaled", "adamw_torch", "heldout_accuracy")
    zero = differences(study.text, "matched-warmup")[("dualadam", "held-out accuracy")][0].split(", ")
    warmup = [row[3] for row in mcnemar(study.text, "adamw_torch", "matched-warmup")]
    scaled = [row[3] for row in mcnemar(study.text, "adamw_torch", "dualadam-scaled")]
    rows = differences(study.text, "adamw_torch")
    detectable = (rows[("dualadam", "held-out accuracy")][-1], rows[("dualadam", "held-out loss")][-1])
    claims = {"docs/study/v1.md": [
        f"{len(capped)} of the {estimates} top-eigenvalue estimates ({which})",
        f"higher than AdamW's in {sum(d > 0 for d in loss)} of {len(loss)} seeds",
        f"lower in {sum(d < 0 for d in scaled_accuracy)} of {len(scaled_accuracy)} seeds",
        f"| {'0 on every seed' if set(zero) == {'+0.0000'} else '?'} |",
        f"corrects the {len(holm)} tests of", f"(Holm p {min(holm):.3g} to {max(holm):.3g}: no difference shown)",
        f"(p = {', '.join(warmup)})", f"in seeds 1 and 2 (p = {scaled[1]} and {scaled[2]}; {scaled[0]} in seed 0)",
        f"{100 * float(detectable[0]):.2f} accuracy points and {detectable[1]} held-out loss",
        f"mean final train loss {ranges[0]} against held-out {ranges[1]}", f"stayed at {through} in seeds 0 and 1",
    ]}
    claims["docs/optimizer.md"] = [f"stayed at {through} in two of its three seeds"]
    return found, claims


def _last(run: RunResult, name: str) -> float | None:
    return next((e[name] for e in reversed(run.log_history) if name in e), None)


def _curve(run: RunResult, name: str) -> list[tuple[int, float]]:
    return sorted({int(e["step"]): float(e[name]) for e in run.log_history if name in e and "step" in e}.items())


def _blended(run: RunResult) -> list[tuple[int, float, float]]:
    shares = dict(_curve(run, "dualadam/inverse_share"))
    return [(s, r, shares[s]) for s, r in _curve(run, "dualadam/blend") if r > 0 and s in shares]


DERIVE = {"v2": derive_v2, "lowbit": derive_lowbit, "v1": derive_v1}


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Study]:
    from dualadam_hf.experiments.compare import choose_rates, make_plan

    built = {}
    for name, template in STUDIES.items():
        study = built[name] = dataclasses.replace(template)
        study.results, study.grid = load_raw(study.raw)
        plan = make_plan(study.recipe, output_dir=tmp_path_factory.mktemp(name))
        if study.grid:
            plan.chosen_lr = choose_rates(plan, study.grid)
        study.text = write_report(plan, study.results, study.grid,
                                  baselines=study.baselines or plan.baselines).read_text()
        study.lines = study.text.splitlines()
        study.records = [_record(line) for line in study.lines]
        study.recipe_values = _recipe_values(yaml.safe_load(study.recipe.read_text()))
        study.recipe_values |= {key(Decimal(repr(x))) for x in (*plan.lr_grid, *plan.grid_seeds, *plan.seeds)}
        derived, study.claims = DERIVE[name](study)
        # The report code's levels: 95% intervals, 80% power, tests at 5% (0.05, and 0.05/m).
        derived += [f"{100 * CONFIDENCE:.0f}", f"{100 * POWER:.0f}", f"{100 * ALPHA:.0f}", f"{ALPHA:.2f}"]
        study.derived = {key(Decimal(x.replace(",", ""))) for x in derived}
    return built


def _claim_pattern(claim: str) -> str:
    """A claim as a pattern that lets a line break (and a list item's indent) stand for any space."""
    return r"\s+".join(re.escape(word) for word in claim.split())


def _record(line: str) -> set[Key]:
    """The figures of one line of a report, as printed; on a line about accuracy, also each difference in points
    (the report prints -0.0264 where a page says -2.64 points, and -8.00e-04 where it says -0.08)."""
    printed = figures(line)
    keys = {key(f.value) for f in printed}
    if "accuracy" in line:
        keys |= {key(f.value.scaleb(2)) for f in printed if re.fullmatch(r"[+\-]?\d+\.\d{4}", f.text)}
        keys |= {key(f.value.scaleb(2).normalize()) for f in printed if "e" in f.text}
    return keys


def _small(figure: Figure) -> bool:
    """A whole number below 100: a count, a seed, a step; such numbers are everywhere in a report, so they pair a
    figure with its line only in a claim."""
    return figure.value == figure.value.to_integral_value() and abs(figure.value) < 100 and "." not in figure.text


def _has(figure: Figure, keys: set[Key]) -> bool:
    return key(figure.value) in keys or (not figure.signed and key(-figure.value) in keys)


NEAR = 0  # report lines either side of a figure's line in which a partner may stand


def _by_itself(figure: Figure, sources: list[Study]) -> bool:
    """Whether ``figure`` is sourced without its report: a derived figure or a recipe value."""
    return any(_has(figure, s.derived) or _has(figure, s.recipe_values) for s in sources)


def _in_report(figure: Figure, partners: list[Figure], sources: list[Study], label: str | None) -> bool:
    """Whether a line of the reports holds ``figure`` as printed with one of its ``partners`` (the other figures
    of its block that only the report gives); with no partner, any line. A table row of a page whose first cell
    names a row of the report (a variant) is read against that row only. The pairing keeps a figure from being
    matched by a number of the same value elsewhere in a report."""
    for study in sources:
        rows = [k for k, line in enumerate(study.lines) if label and line.startswith(f"| {label} |")]
        for k in rows or range(len(study.records)):
            if _has(figure, study.records[k]) and (not partners or any(
                    _has(o, near) for near in study.records[max(0, k - NEAR):k + NEAR + 1] for o in partners)):
                return True
    return False


def unsourced(page: str, studies: dict[str, Study], text: str | None = None) -> list[str]:
    """Each figure of ``page`` (or of ``text`` in its place) without a source, with its place and context."""
    text = (ROOT / page).read_text() if text is None else text
    phrases = [c for s in studies.values() for c in s.claims.get(page, [])]
    phrases += [*ALLOWED["*"], *ALLOWED.get(page, {})]
    covered = [(m.start(), m.end()) for c in phrases for m in re.finditer(_claim_pattern(c), text)]
    found = []
    for line, block, names, base in _checked(page, text):
        sources = [studies[n] for n in names]
        numbers = [f for f in figures(stripped(block))
                   if not any(start <= base + f.start < end for start, end in covered)]
        label = block.strip("| ").split("|", 1)[0].strip().strip("`") if block.startswith("|") else None
        big = [f for f in numbers if not _small(f)]
        row = label if label and any(sum(_has(f, st.records[k]) for f in big) >= 2 for st in sources
                                     for k, text_line in enumerate(st.lines)
                                     if text_line.startswith(f"| {label} |")) else None
        # A table row that copies a row of the report (its first cell names the row, and two of its figures are
        # there) takes every figure from that row.
        alone = set() if row else {id(f) for f in numbers if _by_itself(f, sources)}
        for figure in numbers:
            if id(figure) in alone:
                continue
            partners = [o for o in numbers if o is not figure and id(o) not in alone and not _small(o)]
            # A whole number below 100 is everywhere in a report: only a row of a table pins it.
            if (_small(figure) and not (row and partners)) or not _in_report(figure, partners, sources, row):
                context = block[max(0, figure.start - 40):figure.end + 20].replace("\n", " ")
                found.append(f"{page}:{line + block[:figure.start].count(chr(10))}: {figure.text!r} in "
                             f"...{context}... (sources: {', '.join(names)})")
    return found


def _studies_of(page: str, block: str) -> list[str]:
    """The studies a block of ``page`` links (a study page or report) or names."""
    folder = (ROOT / page).parent
    linked = {(folder / target).resolve().relative_to(ROOT).as_posix()
              for target in re.findall(r"\]\(([^)#]+)", block) if "://" not in target}
    return [name for name, study in STUDIES.items()
            if linked & set(study.pages) or any(word in block for word in study.words)]


def _checked(page: str, text: str) -> list[tuple[int, str, list[str], int]]:
    """(line, block, its studies, offset in ``text``) of every block of ``page`` that must cite its figures."""
    out, offset = [], 0
    for line, block in blocks(text):
        offset = text.index(block, offset)
        named = _studies_of(page, block)
        if page in STUDY_PAGES:
            out.append((line, block, list(dict.fromkeys([STUDY_PAGES[page], *named])), offset))
        elif named or "study" in block.lower():
            out.append((line, block, named or list(STUDIES), offset))
        offset += len(block)
    return out


PAGES = (*STUDY_PAGES, *CITING_PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_every_figure_a_page_cites_from_a_study_has_a_source(studies, page):
    found = unsourced(page, studies)
    assert not found, "figures without a source:\n" + "\n".join(found)


@pytest.mark.parametrize("page", PAGES)
def test_every_claim_computed_from_the_raw_logs_is_in_its_page(studies, page):
    text = (ROOT / page).read_text()
    missing = [c for s in studies.values() for c in s.claims.get(page, []) if not re.search(_claim_pattern(c), text)]
    assert not missing, f"{page} does not say, as the raw logs give it: {missing}"


def test_the_allow_list_stays_short_and_every_entry_is_used():
    assert sum(len(entries) for entries in ALLOWED.values()) <= 15
    for page, entries in ALLOWED.items():
        texts = [(ROOT / p).read_text() for p in (PAGES if page == "*" else (page,))]
        unused = [phrase for phrase in entries if not any(re.search(_claim_pattern(phrase), t) for t in texts)]
        assert not unused, f"allow-list entries of {page} that no page says: {unused}"


def problems(page: str, studies: dict[str, Study], text: str) -> list[str]:
    """What the two checks above find in ``text`` read as ``page``: figures without a source, claims missing."""
    missing = [c for s in studies.values() for c in s.claims.get(page, []) if not re.search(_claim_pattern(c), text)]
    return unsourced(page, studies, text) + missing


@pytest.mark.parametrize(("page", "cited", "changed"), [
    ("docs/study/lowbit.md", "4-bit 2982 MiB (0.839x)", "4-bit 2982 MiB (0.838x)"),  # a derived ratio
    ("README.md", "DualAdam scored 2.96 points below AdamW", "DualAdam scored 2.97 points below AdamW"),  # points
    ("docs/study/lowbit.md", "Holm p = 0.0892", "Holm p = 0.0893"),  # a report cell in prose
    ("docs/optimizer.md", "0.01851 with 80% power", "0.01861 with 80% power"),  # a report cell, another page
    ("docs/study/lowbit.md", "| 3552 ± 17 |", "| 3552 ± 18 |"),  # a table row copied from the report
    ("docs/study.md", "(seeds 3, 4, 8;", "(seeds 3, 4, 9;"),  # a claim
    ("docs/study/lowbit.md", "on 105 to 140 of the 250", "on 105 to 141 of the 250"),  # a count in a claim
    ("docs/study/v1.md", "7.94 accuracy points", "7.84 accuracy points"),
    ("docs/study.md", "within 7.34e-6", "within 7.35e-6"),  # a "within" bound derived from the raw logs
    ("README.md", "no difference shown, and", "no difference shown (a gain of 1.37 points), and"),  # a new figure
])
def test_a_one_digit_change_or_a_new_figure_fails(studies, page, cited, changed):
    text = (ROOT / page).read_text()
    assert re.search(_claim_pattern(cited), text) and not problems(page, studies, text)
    assert problems(page, studies, re.sub(_claim_pattern(cited), lambda _: changed, text, count=1))
