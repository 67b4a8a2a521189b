"""`lidr report RUN_DIR`: one self-contained report.html and a summary.md for a run folder.

Everything is read from files the other commands leave in the run folder (config.yaml,
state.json, iter-<t>/pairs*, iter-<t>/train/*, eval/**/summary.json); any of them may
be missing, and the report says what is missing instead of failing. The HTML embeds
every figure as a base64 PNG and carries its own CSS, so it opens anywhere offline;
summary.md has the same tables and links the same figures, written to
report/figures/*.png next to it.

The report is built once as a list of sections made of neutral blocks (text, tables,
figures, example pairs); two small renderers turn those into HTML and markdown.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from lidr.eval.stats import wilson
from lidr.languages import LANGUAGES
from lidr.records import RecordError, atomic_write_bytes, atomic_write_text, read_jsonl


class ReportError(RecordError):
    """The folder cannot be reported on (it is not a run folder)."""


# ----------------------------------------------------------------------------- blocks


@dataclass
class Cell:
    text: str
    delta: str = ""  # the change against M0, e.g. "+0.150"
    tone: str = ""  # "good" | "bad": colours the delta in HTML
    sub: str = ""  # secondary text (CI, n): small in HTML, after the value in markdown
    bold: bool = False


@dataclass
class Table:
    head: list[str]
    rows: list[list[Union[Cell, str]]]
    title: str = ""
    note: str = ""
    left: int = 1  # leading columns of text (left-aligned)


@dataclass
class Text:
    text: str  # plain text; `code` spans are rendered as code
    kind: str = ""  # "none" (no data), "problem"


@dataclass
class Fig:
    name: str  # file stem under report/figures/
    png: bytes
    caption: str


@dataclass
class Pairs:
    title: str
    lang: str
    rows: list[dict]


@dataclass
class Row:
    items: list  # side by side in HTML (wrapping on narrow screens), one after another in markdown


@dataclass
class Section:
    title: str
    level: int = 2
    blocks: list = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


# ----------------------------------------------------------------------------- the run folder


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def _ci(x: Any) -> Optional[tuple[float, float]]:
    if isinstance(x, (list, tuple)) and len(x) == 2:
        lo, hi = _num(x[0]), _num(x[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def _key_int(name: str, prefix: str) -> Optional[int]:
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", name)
    return int(m.group(1)) if m else None


class Run:
    """Read-only view of a run folder; unreadable files become problems, not exceptions."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.problems: list[str] = []
        self._cache: dict[Path, Any] = {}
        self.config = _dict(self._yaml(run_dir / "config.yaml"))
        self.state = _dict(self.json(run_dir / "state.json"))
        self.stages = _dict(self.state.get("stages"))

    def _yaml(self, path: Path) -> Any:
        if not path.exists():
            return None
        try:
            return yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            self.problems.append(f"{path}: cannot be read ({e.__class__.__name__}: {e})")
            return None

    def json(self, path: Path) -> Optional[dict]:
        if path in self._cache:
            return self._cache[path]
        value = None
        if path.exists():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                self.problems.append(f"{path}: cannot be read ({e.__class__.__name__}: {e})")
            else:
                if not isinstance(value, dict):
                    self.problems.append(f"{path}: expected a JSON object, got {type(value).__name__}")
                    value = None
        self._cache[path] = value
        return value

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.dir))
        except ValueError:
            return str(path)

    @property
    def languages(self) -> list[str]:
        langs = _dict(self.config.get("languages"))
        out = [langs["dominant"]] if isinstance(langs.get("dominant"), str) else []
        others = langs.get("others")
        out += [l for l in others if isinstance(l, str)] if isinstance(others, list) else []
        return out

    def iterations(self) -> list[int]:
        found = {k for p in self._children(self.dir) if (k := _key_int(p.name, "iter-")) is not None}
        for key in self.stages:
            k = _key_int(key.split("/")[0], "iter-")
            if k is not None:
                found.add(k)
        return sorted(found)

    def models(self) -> list[int]:
        return sorted(k for p in self._children(self.dir / "eval") if (k := _key_int(p.name, "M")) is not None)

    @staticmethod
    def _children(path: Path) -> list[Path]:
        return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []

    def eval_summaries(self, bench: str) -> dict[int, dict]:
        out = {}
        for k in self.models():
            s = self.json(self.dir / "eval" / f"M{k}" / bench / "summary.json")
            if s is not None:
                out[k] = s
        return out

    def lang_order(self, langs: list[str]) -> list[str]:
        """The run's languages first (dominant, then others), then the rest in the order met."""
        seen = dict.fromkeys(l for l in self.languages if l in langs)
        seen.update(dict.fromkeys(langs))
        return list(seen)


# ----------------------------------------------------------------------------- formatting


def _fmt(v: Optional[float], digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _delta(d: float, digits: int) -> str:
    if abs(d) < 0.5 * 10 ** -digits:
        d = 0.0
    return f"{d:+.{digits}f}"


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _truncate(text: Any, limit: int = 700, max_lines: int = 14) -> str:
    text = "" if text is None else str(text)
    lines = text.splitlines()
    cut = len(lines) > max_lines
    if cut:
        text = "\n".join(lines[:max_lines])
    if len(text) > limit:
        text, cut = text[:limit], True
        space = text.rfind(" ", limit - 40)
        text = text[:space] if space > 0 else text
    return text.rstrip() + "…" if cut else text


# ----------------------------------------------------------------------------- figures

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
           "#ccb974", "#64b5cd"]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _style(ax, title: str = "", ylabel: str = "") -> None:
    if title:
        ax.set_title(title, fontsize=12)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def grouped_bars(title: str, ylabel: str, categories: list[str],
                 series: list[tuple[str, list[Optional[float]], list[Optional[tuple[float, float]]]]],
                 ylim: Optional[tuple[float, float]] = None) -> bytes:
    """x = categories, one bar per series, error bars from the intervals where known."""
    fig = Figure(figsize=(max(6.0, min(14.0, 1.2 + 0.32 * len(categories) * max(2, len(series)))), 3.8),
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for i, (label, values, cis) in enumerate(series):
        xs, hs, err = [], [], [[], []]
        for j, v in enumerate(values):
            if v is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            hs.append(v)
            ci = cis[j] if j < len(cis) else None
            err[0].append(max(0.0, v - ci[0]) if ci else 0.0)
            err[1].append(max(0.0, ci[1] - v) if ci else 0.0)
        if xs:
            has_err = any(err[0]) or any(err[1])
            ax.bar(xs, hs, width * 0.92, label=label, color=PALETTE[i % len(PALETTE)],
                   yerr=err if has_err else None, capsize=3, error_kw={"elinewidth": 1, "alpha": 0.8})
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    if ylim:
        ax.set_ylim(*ylim)
    ax.axhline(0, color="#333", linewidth=0.8)
    _style(ax, title, ylabel)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=9, ncols=min(len(series), 6), loc="upper left", bbox_to_anchor=(0, -0.1))
    return _png(fig)


# ----------------------------------------------------------------------------- section: run


STAGE_ORDER = ["respond", "translate", "pairs", "train"]


def run_section(run: Run) -> Section:
    cfg = run.config
    prompts = _dict(cfg.get("prompts"))
    langs = run.languages
    lang_text = (f"{langs[0]} (dominant); " + ", ".join(langs[1:])) if langs else "–"
    info = [["run folder", str(run.dir.resolve())],
            ["model", str(cfg.get("model", "–"))],
            ["languages", lang_text],
            ["iterations", str(cfg.get("iterations", "–"))],
            ["prompts per language per iteration", str(prompts.get("per_iteration", "–"))],
            ["prompt source", str(prompts.get("source", "–"))],
            ["generated", time.strftime("%Y-%m-%d %H:%M:%S")]]
    sec = Section("Run", blocks=[Table(["", ""], [[Cell(k, bold=True), v] for k, v in info])])
    if not cfg:
        sec.blocks.append(Text(f"No readable config.yaml in {run.dir}.", "none"))

    times = Section("Time per stage", level=3)
    sec.blocks.append(times)
    iters = [k for k in run.iterations() if any(key.startswith(f"iter-{k}/") for key in run.stages)]
    if not run.stages:
        times.blocks.append(Text("No stages recorded (state.json is missing or empty).", "none"))
        return sec
    names = list(STAGE_ORDER)
    for key in run.stages:
        group, _, stage = key.partition("/")
        if _key_int(group, "iter-") is not None and stage and stage not in names:
            names.append(stage)
    rows = []
    for t in iters:
        row: list = [Cell(f"iter-{t}", bold=True)]
        total = 0.0
        for stage in names:
            st = _dict(run.stages.get(f"iter-{t}/{stage}"))
            secs = _num(st.get("seconds"))
            status = st.get("status")
            total += secs or 0.0
            sub = "" if status in (None, "done") else str(status)
            row.append(Cell(_duration(secs) if st else "–", sub=sub))
        row.append(Cell(_duration(total), bold=True))
        rows.append(row)
    if rows:
        times.blocks.append(Table(["iteration"] + names + ["total"], rows))
    other = [(k, _dict(v)) for k, v in run.stages.items() if _key_int(k.split("/")[0], "iter-") is None]
    if other:
        rows = [[Cell(k, bold=True), str(v.get("status", "–")), _duration(_num(v.get("seconds")))] for k, v in other]
        times.blocks.append(Table(["stage", "status", "time"], rows, title="Other stages", left=2))
    return sec


# ----------------------------------------------------------------------------- section: evaluation


@dataclass(frozen=True)
class Metric:
    bench: str  # folder under eval/M<k>/
    key: str
    title: str
    digits: int = 3
    ci: Optional[str] = None  # key of a [lo, hi] interval
    se: Optional[str] = None  # key of a standard error (interval = value ± 1.96 SE)
    average: Optional[str] = None
    higher_better: Optional[bool] = None
    figure: Optional[str] = None  # file stem of its figure; None: a count, in the benchmark's counts table
    ylim: Optional[tuple[float, float]] = None
    n: str = "n"
    short: str = ""  # column label in the counts table
    clip: Optional[tuple[float, float]] = None  # the range an interval from an SE is cut to

    def change(self, v: Optional[float], base: Optional[float]) -> tuple[str, str]:
        """('+0.150', 'good'|'bad'|''): the change against M0, and whether it is an improvement."""
        if v is None or base is None:
            return "", ""
        delta = _delta(v - base, self.digits)
        if self.higher_better is None or float(delta) == 0:
            return delta, ""
        return delta, "good" if (v > base) == self.higher_better else "bad"


METRICS = [
    Metric("mgsm", "accuracy", "MGSM accuracy", 3, "accuracy_ci95", None, "average_accuracy", True,
           "mgsm-accuracy", (0, 1.05)),
    Metric("mgsm", "off_target_rate", "MGSM off-target rate", 3, "off_target_ci95", None,
           "average_off_target_rate", False, "mgsm-off-target", (0, 1.05)),
    Metric("mgsm", "no_number", "MGSM answers without a number", 0, higher_better=False, short="no number"),
    Metric("mgsm", "langid_undecided", "MGSM answers too short to identify their language", 0,
           short="language undecided"),
    Metric("alpaca", "win_rate", "X-AlpacaEval win rate (%)", 1, None, "win_rate_se", "average_win_rate", True,
           "alpaca-win-rate", (0, 105), n="judged", clip=(0, 100)),
    Metric("alpaca", "off_target_rate", "X-AlpacaEval off-target rate", 3, "off_target_ci95", None,
           "average_off_target_rate", False, "alpaca-off-target", (0, 1.05)),
    Metric("alpaca", "hit_token_limit", "X-AlpacaEval answers that hit the token limit", 0, higher_better=False,
           short="token limit"),
    Metric("alpaca", "judge_failures", "X-AlpacaEval judgments that failed", 0, higher_better=False,
           short="judge failures"),
    Metric("alpaca", "langid_undecided", "X-AlpacaEval answers too short to identify their language", 0,
           short="language undecided"),
    Metric("likelihood", "mean_logprob", "Reference log-likelihood (mean per token)", 3, "ci95", None,
           "average_mean_logprob", True, "likelihood", n="tokens"),
    Metric("likelihood", "truncated", "Reference answers cut at the token limit", 0, short="truncated"),
]

BENCHMARKS = [
    ("mgsm", "MGSM", "accuracy: the answer's final number equals the gold number; off-target: the answer "
                     "is not in the question's language. 95 % Wilson intervals."),
    ("alpaca", "X-AlpacaEval", "win rate of the model's answer against the reference answer, as judged by an "
                               "LLM judge (percent, 95 % interval = ± 1.96 standard errors)."),
    ("likelihood", "Reference likelihood", "mean per-token log-likelihood the model gives to reference "
                                           "answers (higher is better), 95 % intervals."),
]


def _metric_value(summary: dict, lang: str, m: Metric) -> tuple[Optional[float], Optional[tuple[float, float]], Any]:
    row = _dict(_dict(summary.get("languages")).get(lang))
    v = _num(row.get(m.key))
    ci = _ci(row.get(m.ci)) if m.ci else None
    if m.se and v is not None and (se := _num(row.get(m.se))) is not None:
        lo, hi = v - 1.96 * se, v + 1.96 * se
        ci = (max(lo, m.clip[0]), min(hi, m.clip[1])) if m.clip else (lo, hi)
    return v, ci, row.get(m.n)


def metric_table(run: Run, m: Metric, data: dict[int, dict]) -> Optional[tuple[Table, list[str], list[int]]]:
    """Rows = languages, columns = models, 'value (change against M0)' with its interval."""
    langs = run.lang_order([l for s in data.values() for l in _dict(s.get("languages"))])
    models = [k for k in sorted(data)
              if any(_metric_value(data[k], l, m)[0] is not None for l in langs)
              or _num(data[k].get(m.average or "")) is not None]
    if not models:
        return None
    trained = set(run.languages)
    base = data.get(0) if 0 in models else None

    def cell(v, ci, n, b):
        if v is None:
            return Cell("–")
        delta, tone = m.change(v, b)
        sub = []
        if ci:
            sub.append(f"[{_fmt(ci[0], m.digits)}, {_fmt(ci[1], m.digits)}]")
        if n is not None and not isinstance(n, (dict, list)):
            sub.append(f"{m.n}={n}")
        return Cell(_fmt(v, m.digits), delta, tone, " ".join(sub))

    rows = []
    for lang in langs:
        row: list = [Cell(lang, bold=lang in trained)]
        b = _metric_value(base, lang, m)[0] if base is not None else None
        for k in models:
            v, ci, n = _metric_value(data[k], lang, m)
            row.append(cell(v, ci, n, b if k != 0 else None))
        rows.append(row)
    if m.average:
        b = _num(base.get(m.average)) if base is not None else None
        avg = [cell(_num(data[k].get(m.average)), None, None, b if k != 0 else None) for k in models]
        if any(c.text != "–" for c in avg):
            rows.append([Cell("average", bold=True)] + avg)
    note = "Change against M0 in brackets" if base is not None and len(models) > 1 else ""
    if trained & set(langs):
        note = (note + "; " if note else "") + "the run's training languages in bold"
    return Table(["language"] + [f"M{k}" for k in models], rows, title=m.title, note=note), langs, models


def counts_table(run: Run, metrics: list[Metric], data: dict[int, dict]) -> Optional[Table]:
    """The secondary counts of a benchmark in one table: one column per count and model."""
    langs = run.lang_order([l for s in data.values() for l in _dict(s.get("languages"))])
    cols = [(m, k) for m in metrics for k in sorted(data)
            if any(_metric_value(data[k], l, m)[0] is not None for l in langs)]
    if not cols:
        return None
    rows = []
    for lang in langs:
        ns = [_dict(_dict(data[k].get("languages")).get(lang)).get("n") for k in sorted(data)]
        ns = list(dict.fromkeys(str(n) for n in ns if n is not None))
        row: list = [Cell(lang, bold=lang in run.languages), "/".join(ns) or "–"]
        for m, k in cols:
            v = _metric_value(data[k], lang, m)[0]
            b = _metric_value(data[0], lang, m)[0] if 0 in data and k != 0 else None
            row.append(Cell(_fmt(v, 0), *m.change(v, b)))
        rows.append(row)
    head = ["language", "n"] + [f"{m.short}, M{k}" for m, k in cols]
    return Table(head, rows, title="Counts per language",
                 note="; ".join(f"{m.short}: {m.title}" for m in metrics
                                if any(c[0] is m for c in cols)))


def metric_figure(m: Metric, data: dict[int, dict], langs: list[str], models: list[int]) -> Fig:
    series = []
    for k in models:
        vals = [_metric_value(data[k], l, m) for l in langs]
        series.append((f"M{k}", [v for v, _, _ in vals], [ci for _, ci, _ in vals]))
    ylabel = m.title.split(" ", 1)[1] if " " in m.title else m.title
    png = grouped_bars(m.title, ylabel, langs, series, m.ylim)
    names = ", ".join(f"M{k}" for k in models)
    return Fig(m.figure, png, f"{m.title} per language, {names}; error bars: 95 % intervals.")


def eval_section(run: Run) -> Section:
    sec = Section("Evaluation")
    eval_dir = run.dir / "eval"
    h2h = sorted(p for p in Run._children(eval_dir / "h2h") if (p / "summary.json").exists())
    reward = sorted((k, p) for p in Run._children(eval_dir / "reward-accuracy")
                    if (k := _key_int(p.name, "iter-")) is not None and (p / "summary.json").exists())
    per_bench = {b: run.eval_summaries(b) for b, _, _ in BENCHMARKS}
    if not any(per_bench.values()) and not h2h and not reward:
        sec.blocks.append(Text(f"No evaluation results: {run.rel(eval_dir)}/ has no summary.json. "
                               f"Evaluation is missing; score a model with "
                               f"`lidr eval mgsm {run.dir} --iteration N --data FOLDER` (or `lidr eval alpaca`, "
                               "`h2h`, `reward-accuracy`) and run `lidr report` again.",
                               "none"))
        return sec

    glance, uneven = [], []
    all_models = sorted({k for d in per_bench.values() for k in d})
    for m in METRICS:
        data = per_bench[m.bench]
        if not m.average or not data:
            continue
        vals = {k: _num(data[k].get(m.average)) if k in data else None for k in all_models}
        if all(v is None for v in vals.values()):
            continue
        b = vals.get(0)
        row: list = [Cell(m.title, bold=True)]
        for k in all_models:
            v = vals[k]
            row.append(Cell(_fmt(v, m.digits), *m.change(v, b if k != 0 else None)))
        glance.append(row)
        lang_sets = {frozenset(_dict(data[k].get("languages"))) for k in data}
        if len(lang_sets) > 1:
            uneven.append(m.bench)
    if glance:
        note = "Change against M0 in brackets."
        if uneven:
            names = ", ".join(t for b, t, _ in BENCHMARKS if b in uneven)
            note += (f" {names}: the models were evaluated on different languages, so their averages are "
                     "not directly comparable; compare the per-language tables.")
        sec.blocks.append(Table(["average over languages"] + [f"M{k}" for k in all_models], glance,
                                title="At a glance", note=note))

    for bench, title, about in BENCHMARKS:
        sub = Section(title, level=3)
        sec.blocks.append(sub)
        data = per_bench[bench]
        if not data:
            sub.blocks.append(Text(f"No {title} results (eval/M<k>/{bench}/summary.json).", "none"))
            continue
        sub.blocks.append(Text(about))
        judges = {json.dumps(data[k].get("judge"), sort_keys=True) for k in data if "judge" in data[k]}
        if bench == "alpaca":
            for j in sorted(judges):
                jd = _dict(json.loads(j))
                sub.blocks.append(Text(_judge_text(jd) if jd else "No judge was used: win rates are not available."))
        for m in METRICS:
            if m.bench != bench or not m.figure:
                continue
            built = metric_table(run, m, data)
            if built is not None:
                table, langs, models = built
                sub.blocks.append(Row([table, metric_figure(m, data, langs, models)]))
        counts = counts_table(run, [m for m in METRICS if m.bench == bench and not m.figure], data)
        if counts is not None:
            sub.blocks.append(counts)

    sec.blocks.append(h2h_section(run, h2h))
    sec.blocks.append(reward_section(run, reward))
    return sec


def _judge_text(judge: Any) -> str:
    jd = _dict(judge)
    text = f"Judge: {jd.get('model', '–')} at {jd.get('url', '–')}"
    return text + (f" (prompt {jd['prompt_version']})" if jd.get("prompt_version") else "")


def h2h_section(run: Run, folders: list[Path]) -> Section:
    sec = Section("Head-to-head", level=3)
    if not folders:
        sec.blocks.append(Text("No head-to-head results (eval/h2h/M<a>-vs-M<b>/summary.json).", "none"))
        return sec
    sec.blocks.append(Text("Both answers judged in both orders; a win needs both orders to agree. "
                           "Win rate = (win + tie / 2) / n."))
    for folder in folders:
        s = run.json(folder / "summary.json")
        if s is None:
            continue
        a, b = s.get("a"), s.get("b")
        name = f"{a} vs {b}" if a and b else folder.name
        langs = run.lang_order(list(_dict(s.get("languages"))))
        rows, counts = [], []
        for lang in langs:
            r = _dict(s["languages"][lang])
            n = _num(r.get("n")) or 0
            wr = _num(r.get("win_rate"))
            w, t, l = (int(_num(r.get(x)) or 0) for x in ("win", "tie", "lose"))
            counts.append((lang, w, t, l))
            rows.append([Cell(lang, bold=lang in run.languages), str(int(n)), str(w), str(t), str(l),
                         _fmt(wr, 3), str(r.get("failures", "–"))])
        table = Table(["language", "n", "win", "tie", "lose", "win rate", "judge failures"], rows,
                      title=f"{name} (win = {a or 'A'} better)", note=_judge_text(s["judge"]) if s.get("judge") else "")
        sec.blocks.append(Row([table, Fig(f"h2h-{_stem(folder.name)}", h2h_figure(name, counts),
                                          f"Head-to-head {name}: share of win / tie / lose per language.")]))
    return sec


def _stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def h2h_figure(name: str, counts: list[tuple[str, int, int, int]]) -> bytes:
    fig = Figure(figsize=(8, 1.3 + 0.42 * len(counts)), layout="constrained")
    ax = fig.subplots()
    labels = [c[0] for c in counts][::-1]
    parts = list(zip(*[c[1:] for c in counts][::-1]))  # win, tie, lose columns
    totals = [max(1, sum(c[1:])) for c in counts][::-1]
    left = [0.0] * len(labels)
    for part, label, color in zip(parts, ("win", "tie", "lose"), ("#55a868", "#b0b0b0", "#c44e52")):
        widths = [p / t for p, t in zip(part, totals)]
        ax.barh(labels, widths, left=left, color=color, label=label, height=0.7)
        for i, (x0, w, p) in enumerate(zip(left, widths, part)):
            if w >= 0.08:
                ax.text(x0 + w / 2, i, str(p), ha="center", va="center", fontsize=8,
                        color="#222" if label == "tie" else "white")
        left = [x + w for x, w in zip(left, widths)]
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="#333", linewidth=0.8, linestyle=":")
    ax.set_xlabel("share of prompts")
    ax.set_title(f"Head-to-head: {name}", fontsize=12)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(frameon=False, fontsize=9, ncols=3, loc="upper left", bbox_to_anchor=(0, -0.18 - 0.3 / len(counts)))
    return _png(fig)


def reward_section(run: Run, found: list[tuple[int, Path]]) -> Section:
    sec = Section("Reward accuracy", level=3)
    if not found:
        sec.blocks.append(Text("No reward-accuracy results (eval/reward-accuracy/iter-<t>/summary.json).", "none"))
        return sec
    sec.blocks.append(Text("How often the iteration's preference pairs agree with the judge "
                           "(chosen judged better than rejected), with 95 % intervals."))
    summaries = {t: _dict(run.json(p / "summary.json")) for t, p in found}
    data = {t: _dict(v.get("languages")) for t, v in summaries.items()}
    judges = {json.dumps(v.get("judge"), sort_keys=True) for v in summaries.values() if v.get("judge")}
    langs = run.lang_order([l for v in data.values() for l in v])
    iters = sorted(data)
    rows = []
    for lang in langs:
        row: list = [Cell(lang, bold=lang in run.languages)]
        for t in iters:
            r = _dict(data[t].get(lang))
            acc, ci = _num(r.get("accuracy")), _ci(r.get("ci95"))
            sub = " ".join(x for x in (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "",
                                       f"{r.get('agree', '–')}/{r.get('n', '–')}" if r else "",
                                       f"failures={r['failures']}" if r.get("failures") else "") if x)
            row.append(Cell(_fmt(acc, 3), sub=sub))
        rows.append(row)
    table = Table(["language"] + [f"iter-{t}" for t in iters], rows,
                  note="; ".join(_judge_text(json.loads(j)) for j in sorted(judges)))
    series = []
    for t in iters:
        vals = [_dict(data[t].get(l)) for l in langs]
        series.append((f"iter-{t}", [_num(v.get("accuracy")) for v in vals], [_ci(v.get("ci95")) for v in vals]))
    png = grouped_bars("Reward accuracy", "agreement with the judge", langs, series, (0, 1.05))
    sec.blocks.append(Row([table, Fig("reward-accuracy", png, "Reward accuracy per language and iteration; "
                                                              "error bars: 95 % intervals.")]))
    return sec


# ----------------------------------------------------------------------------- section: training

CURVES = [("loss", "loss (DPO + NLL)"), ("dpo_loss", "DPO loss"), ("reward_margin", "reward margin"),
          ("reward_accuracy", "reward accuracy")]


def training_section(run: Run) -> Section:
    sec = Section("Training")
    curves: dict[int, list[dict]] = {}
    rows = []
    steps_only = False
    for t in run.iterations():
        train = run.dir / f"iter-{t}" / "train"
        metrics = train / "metrics.jsonl"
        if metrics.exists():
            steps = []
            try:
                for _, rec in read_jsonl(metrics):
                    if _num(rec.get("step")) is not None:
                        steps.append(rec)
            except (RecordError, OSError, UnicodeDecodeError) as e:
                run.problems.append(f"{metrics}: {e} (the steps before it are shown)")
            if steps:
                curves[t] = steps
        s = run.json(train / "summary.json")
        if s is None:
            continue
        # before and after: the full passes over the pairs, else the first and last batches
        # (no final pass unless training.final_metrics: then "after" is the last step's batch)
        first = _dict(s.get("initial")) or _dict(s.get("first_step"))
        last = _dict(s.get("final"))
        last_step = not last and bool(_dict(s.get("last_step")))
        if last_step:
            last = _dict(s.get("last_step"))
            steps_only = True

        def arrow(key, digits=3):
            a, b = _num(first.get(key)), _num(last.get(key))
            return Cell(f"{_fmt(a, digits)} → {_fmt(b, digits)}" if a is not None or b is not None else "–")

        rows.append([Cell(f"iter-{t}", bold=True, sub="after: last step" if last_step else ""),
                     str(s.get("pairs", "–")), str(s.get("steps", "–")),
                     _duration(_num(s.get("seconds"))), arrow("loss"), arrow("dpo_loss"), arrow("nll_loss"),
                     arrow("reward_margin"), arrow("reward_accuracy")])
    if not rows and not curves:
        sec.blocks.append(Text("No training logs (iter-<t>/train/metrics.jsonl, summary.json).", "none"))
        return sec
    if rows:
        sec.blocks.append(Table(["iteration", "pairs", "steps", "time", "loss", "DPO loss", "NLL loss",
                                 "reward margin", "reward accuracy"], rows,
                                note="Before → after training: passes over all the iteration's pairs "
                                     "(train/summary.json initial, final; else its first and last step)."
                                     + (" \"after: last step\": no final pass over the pairs (training.final_metrics "
                                        "off), so \"after\" is the last training step's batch." if steps_only else "")))
    if curves:
        fig = Figure(figsize=(11, 6.6), layout="constrained")
        axes = fig.subplots(2, 2).ravel()
        for ax, (key, label) in zip(axes, CURVES):
            for i, (t, steps) in enumerate(sorted(curves.items())):
                pts = [(s["step"], _num(s.get(key))) for s in steps if _num(s.get(key)) is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.5,
                            color=PALETTE[i % len(PALETTE)], label=f"iter-{t} (M{t})")
            ax.set_xlabel("step")
            _style(ax, label)
            ax.grid(axis="x", alpha=0.3)
            if key == "reward_accuracy":
                ax.set_ylim(-0.05, 1.05)
        axes[0].legend(frameon=False, fontsize=9)
        sec.blocks.append(Fig("training", _png(fig), "Per training step, one line per iteration: total loss, "
                                                     "DPO loss, reward margin and reward accuracy (batch values)."))
    else:
        sec.blocks.append(Text("No per-step training metrics (iter-<t>/train/metrics.jsonl).", "none"))
    return sec


# ----------------------------------------------------------------------------- section: pairs, translations


def pairs_section(run: Run) -> Section:
    sec = Section("Preference pairs")
    per_iter: dict[int, dict] = {}
    for t in run.iterations():
        s = run.json(run.dir / f"iter-{t}" / "pairs.summary.json")
        if s is None:
            s = _dict(run.stages.get(f"iter-{t}/pairs")).get("summary")
        if isinstance(s, dict) and (s.get("kept") or s.get("dropped")):
            per_iter[t] = s
    if not per_iter:
        sec.blocks.append(Text("No pairs yet (iter-<t>/pairs.summary.json).", "none"))
        return sec
    reasons: list[str] = []
    for s in per_iter.values():
        for d in _dict(s.get("dropped")).values():
            reasons += [r for r in _dict(d) if r not in reasons]
    rows, bars = [], {}
    for t, s in per_iter.items():
        kept, dropped = _dict(s.get("kept")), _dict(s.get("dropped"))
        langs = run.lang_order(list(kept) + [l for l in dropped if l not in kept])
        tot = [0] * (len(reasons) + 1)
        bars[t] = []
        for lang in langs:
            k = int(_num(kept.get(lang)) or 0)
            d = [int(_num(_dict(dropped.get(lang)).get(r)) or 0) for r in reasons]
            bars[t].append((lang, k, d))
            tot = [a + b for a, b in zip(tot, [k] + d)]
            share = k / (k + sum(d)) if k + sum(d) else None
            rows.append([Cell(f"iter-{t}"), Cell(lang, bold=True), str(k)] + [str(x) for x in d]
                        + [str(sum(d)), _pct(share)])
        all_ = tot[0] + sum(tot[1:])
        rows.append([Cell(f"iter-{t}", bold=True), Cell("all", bold=True), Cell(str(tot[0]), bold=True)]
                    + [Cell(str(x), bold=True) for x in tot[1:]]
                    + [Cell(str(sum(tot[1:])), bold=True), Cell(_pct(tot[0] / all_ if all_ else None), bold=True)])
    sec.blocks.append(Table(["iteration", "language", "kept"] + [f"dropped: {r}" for r in reasons]
                            + ["dropped", "kept share"], rows, left=2))
    sec.blocks.append(Fig("pairs", pairs_figure(bars, reasons),
                          "Pairs kept and dropped (by reason) per language, one panel per iteration."))
    return sec


def pairs_figure(bars: dict[int, list[tuple[str, int, list[int]]]], reasons: list[str]) -> bytes:
    n = len(bars)
    fig = Figure(figsize=(min(14, 1.5 + 3.2 * n), 3.8), layout="constrained")
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    colors = ["#55a868"] + [c for c in PALETTE if c != "#55a868"]
    for ax, (t, items) in zip(axes, bars.items()):
        labels = [lang for lang, _, _ in items]
        bottom = [0] * len(items)
        for j, name in enumerate(["kept"] + reasons):
            vals = [k if j == 0 else d[j - 1] for _, k, d in items]
            ax.bar(labels, vals, 0.7, bottom=bottom, color=colors[j % len(colors)],
                   label=name if t == next(iter(bars)) else None)
            bottom = [a + b for a, b in zip(bottom, vals)]
        _style(ax, f"iter-{t}", "pairs" if ax is axes[0] else "")
    fig.legend(frameon=False, fontsize=9, loc="outside lower center", ncols=min(6, len(reasons) + 1))
    return _png(fig)


def translation_section(run: Run) -> Section:
    sec = Section("Self-translation")
    per_iter = {}
    for t in run.iterations():
        tr = _dict(_dict(_dict(run.stages.get(f"iter-{t}/translate")).get("summary")).get("translations"))
        if tr:
            per_iter[t] = tr
    if not per_iter:
        sec.blocks.append(Text("No translation statistics (state.json, stage iter-<t>/translate).", "none"))
        return sec
    sec.blocks.append(Text("A translation fails when the model does not close the delimited answer; "
                           "its pairs are dropped."))
    dirs = sorted({d for tr in per_iter.values() for d in tr},
                  key=lambda d: (d.split("-")[0] not in run.languages[:1], d))
    iters = sorted(per_iter)
    rows, series = [], []
    for d in dirs:
        row: list = [Cell(d, bold=True)]
        for t in iters:
            r = _dict(per_iter[t].get(d))
            n, failed = _num(r.get("n")), _num(r.get("failed"))
            rate = _num(r.get("failure_rate"))
            if rate is None and n:
                rate = (failed or 0) / n
            row.append(Cell(_pct(rate), sub=f"{int(failed)}/{int(n)}" if n is not None and failed is not None else ""))
        rows.append(row)
    table = Table(["direction"] + [f"iter-{t}" for t in iters], rows, title="Failure rate")
    for t in iters:
        vals, cis = [], []
        for d in dirs:
            r = _dict(per_iter[t].get(d))
            n, failed, rate = _num(r.get("n")), _num(r.get("failed")), _num(r.get("failure_rate"))
            if rate is None and n:
                rate = (failed or 0) / n
            vals.append(rate)
            ci = wilson(int(failed), int(n)) if n and failed is not None else None
            cis.append(tuple(ci) if ci else None)
        series.append((f"iter-{t}", vals, cis))
    sec.blocks.append(Row([table, Fig("translation-failures",
                                      grouped_bars("Self-translation failure rate", "failure rate", dirs, series,
                                                   (0, 1.05)),
                                      "Failure rate per direction and iteration; error bars: 95 % Wilson intervals.")]))
    return sec


# ----------------------------------------------------------------------------- section: examples


def _pick(rows: list[dict], n: int) -> list[dict]:
    """Up to n rows, covering different kinds of pair first, otherwise in file order."""
    picked, kinds = [], set()
    for r in rows:
        if len(picked) < n and r.get("kind") not in kinds:
            picked.append(r)
            kinds.add(r.get("kind"))
    for r in rows:
        if len(picked) < n and r not in picked:
            picked.append(r)
    return picked


def examples_section(run: Run, n: int) -> Section:
    sec = Section("Example pairs")
    if n <= 0:
        sec.blocks.append(Text("Examples were turned off (--examples 0).", "none"))
        return sec
    found = False
    for t in run.iterations():
        path = run.dir / f"iter-{t}" / "pairs.jsonl"
        if not path.exists():
            continue
        by_lang: dict[str, list[dict]] = {}
        try:
            for _, rec in read_jsonl(path):
                by_lang.setdefault(str(rec.get("lang", "?")), []).append(rec)
        except (RecordError, OSError, UnicodeDecodeError) as e:
            run.problems.append(f"{path}: {e} (the pairs before it are shown)")
        if not by_lang:
            continue
        found = True
        sub = Section(f"Iteration {t}", level=3)
        sec.blocks.append(sub)
        for lang in run.lang_order(list(by_lang)):
            rows = by_lang[lang]
            title = f"{lang} — {LANGUAGES.get(lang, lang)} ({len(rows)} pairs)"
            sub.blocks.append(Pairs(title, lang, _pick(rows, n)))
    if not found:
        sec.blocks.append(Text("No pairs to show (iter-<t>/pairs.jsonl).", "none"))
    else:
        sec.blocks.insert(0, Text(f"Up to {n} pairs per language and iteration; long texts are cut with “…”."))
    return sec


# ----------------------------------------------------------------------------- rendering: HTML

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--border:#d1d9e0;--alt:#f6f8fa;--good:#1a7f37;--bad:#cf222e}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#fff;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:28px;margin:0 0 4px}
h2{font-size:22px;margin:40px 0 12px;padding-bottom:6px;border-bottom:1px solid var(--border)}
h3{font-size:18px;margin:28px 0 8px}
h4{font-size:15px;margin:20px 0 6px}
p{margin:6px 0 10px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--alt);padding:1px 4px;
border-radius:4px}
nav{margin:8px 0 20px;font-size:14px}
nav a{color:#0969da;text-decoration:none;margin-right:14px}
.none{color:var(--muted);font-style:italic}
.problem{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}
.tw{overflow-x:auto;margin:6px 0 18px;max-width:100%}
.row{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start;margin:4px 0 12px}
.row>.tw{flex:0 1 auto}
.row>figure{flex:1 1 460px;min-width:0;max-width:860px;margin-top:6px}
table{border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:4px 0;caption-side:top}
th,td{border:1px solid var(--border);padding:4px 10px;text-align:right;vertical-align:top;white-space:nowrap}
th{background:var(--alt);font-weight:600;white-space:normal;vertical-align:bottom}
th.l,td.l{text-align:left}
tbody tr:nth-child(even){background:#fbfcfd}
table.kv td{text-align:left;white-space:normal}
.d{margin-left:4px;color:var(--muted)}
.d.good{color:var(--good)}.d.bad{color:var(--bad)}
.s{display:block;font-size:11.5px;color:var(--muted)}
.tn{font-size:12.5px;color:var(--muted);margin:4px 0 0;max-width:640px}
figure{margin:10px 0 24px}
figure img{display:block;max-width:100%;height:auto}
figcaption{font-size:13px;color:var(--muted);margin-top:4px}
.pair{border:1px solid var(--border);border-radius:8px;padding:10px 12px;margin:10px 0}
.meta{font-size:12px;color:var(--muted)}
.prompt{font-weight:600;margin:4px 0 8px;white-space:pre-wrap;overflow-wrap:anywhere}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.cols>div{white-space:pre-wrap;overflow-wrap:anywhere;padding:6px 10px;border-radius:6px;font-size:14px}
.ch{background:#edfbef;border-left:4px solid var(--good)}
.rj{background:#fff1f0;border-left:4px solid var(--bad)}
.lb{display:block;font-size:11px;font-weight:700;letter-spacing:.05em;text-transform:uppercase;color:var(--muted);
margin-bottom:2px}
details>summary{cursor:pointer}
@media (max-width:700px){.cols{grid-template-columns:1fr}main{padding:12px}}
"""


def _inline_html(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _cell_html(c: Union[Cell, str], tag: str, left: bool = False) -> str:
    if left:
        tag += ' class="l"'
    if not isinstance(c, Cell):
        return f"<{tag}>{html.escape(str(c))}</{tag.split()[0]}>"
    body = html.escape(c.text)
    if c.bold:
        body = f"<b>{body}</b>"
    if c.delta:
        body += f'<span class="d {c.tone}">({html.escape(c.delta)})</span>'
    if c.sub:
        body += f'<span class="s">{html.escape(c.sub)}</span>'
    return f"<{tag}>{body}</{tag.split()[0]}>"


def _html_block(b, out: list[str]) -> None:
    if isinstance(b, Section):
        out.append(f'<h{b.level} id="{b.anchor}">{html.escape(b.title)}</h{b.level}>')
        for x in b.blocks:
            _html_block(x, out)
    elif isinstance(b, Row):
        out.append('<div class="row">')
        for x in b.items:
            _html_block(x, out)
        out.append("</div>")
    elif isinstance(b, Text):
        cls = f' class="{b.kind}"' if b.kind else ""
        out.append(f"<p{cls}>{_inline_html(b.text)}</p>")
    elif isinstance(b, Table):
        kv = not any(b.head)
        out.append('<div class="tw"><table class="kv">' if kv else '<div class="tw"><table>')
        if b.title:
            out.append(f"<caption>{html.escape(b.title)}</caption>")
        if not kv:
            out.append("<thead><tr>" + "".join(_cell_html(h, "th", i < b.left) for i, h in enumerate(b.head))
                       + "</tr></thead>")
        out.append("<tbody>")
        for row in b.rows:
            out.append("<tr>" + "".join(_cell_html(c, "td", i < b.left) for i, c in enumerate(row)) + "</tr>")
        out.append("</tbody></table>")
        if b.note:
            out.append(f'<p class="tn">{_inline_html(b.note)}</p>')
        out.append("</div>")
    elif isinstance(b, Fig):
        data = base64.b64encode(b.png).decode("ascii")
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                   f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    elif isinstance(b, Pairs):
        out.append(f"<h4>{html.escape(b.title)}</h4>")
        for r in b.rows:
            meta = " · ".join(html.escape(str(x)) for x in (r.get("id"), r.get("kind"),
                                                            f"via {r['via']}" if r.get("via") else None) if x)
            out.append(f'<div class="pair"><div class="meta">{meta}</div>'
                       f'<div class="prompt">{html.escape(_truncate(r.get("prompt"), 400, 6))}</div>'
                       f'<div class="cols"><div class="ch"><span class="lb">chosen</span>'
                       f'{html.escape(_truncate(r.get("chosen")))}</div>'
                       f'<div class="rj"><span class="lb">rejected</span>'
                       f'{html.escape(_truncate(r.get("rejected")))}</div></div></div>')


def render_html(title: str, sections: list[Section], problems: list[str]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>",
           f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections) + "</nav>"]
    if problems:
        out.append('<div class="problem"><b>Files that could not be read</b><ul>'
                   + "".join(f"<li>{html.escape(p)}</li>" for p in problems) + "</ul></div>")
    for s in sections:
        _html_block(s, out)
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- rendering: markdown


def _md_escape(text: str) -> str:
    text = html.escape(str(text), quote=False).replace("|", "\\|")
    return re.sub(r"\r?\n", "<br>", text)


def _md_inline(text: str) -> str:
    parts = str(text).split("`")
    return "".join(f"`{p}`" if i % 2 else _md_escape(p) for i, p in enumerate(parts))


def _cell_md(c: Union[Cell, str]) -> str:
    if not isinstance(c, Cell):
        return _md_escape(c)
    s = _md_escape(c.text)
    if c.bold and c.text:
        s = f"**{s}**"
    if c.delta:
        s += f" ({c.delta})"
    if c.sub:
        s += f" {_md_escape(c.sub)}"
    return s


def _md_block(b, out: list[str], figdir: str) -> None:
    if isinstance(b, Section):
        out += ["#" * b.level + " " + b.title, ""]
        for x in b.blocks:
            _md_block(x, out, figdir)
    elif isinstance(b, Row):
        for x in b.items:
            _md_block(x, out, figdir)
    elif isinstance(b, Text):
        out += [f"*{_md_inline(b.text)}*" if b.kind == "none" else _md_inline(b.text), ""]
    elif isinstance(b, Table):
        if b.title:
            out += [f"**{_md_escape(b.title)}**", ""]
        head = b.head if any(b.head) else ["", ""]
        out.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
        align = ["---" if i < b.left or not any(b.head) else "---:" for i in range(len(head))]
        out.append("| " + " | ".join(align) + " |")
        for row in b.rows:
            out.append("| " + " | ".join(_cell_md(c) for c in row) + " |")
        out.append("")
        if b.note:
            out += [f"<sub>{_md_inline(b.note)}</sub>", ""]
    elif isinstance(b, Fig):
        out += [f"![{_md_escape(b.caption)}]({figdir}/{b.name}.png)", "", f"<sub>{_md_escape(b.caption)}</sub>", ""]
    elif isinstance(b, Pairs):
        out += [f"#### {_md_escape(b.title)}", ""]
        for r in b.rows:
            meta = " · ".join(str(x) for x in (r.get("id"), r.get("kind"),
                                               f"via {r['via']}" if r.get("via") else None) if x)
            out += [f"<sub>{_md_escape(meta)}</sub>", "",
                    f"**Prompt:** {_md_escape(_truncate(r.get('prompt'), 400, 6))}", "",
                    "| chosen | rejected |", "| --- | --- |",
                    f"| {_md_escape(_truncate(r.get('chosen')))} | {_md_escape(_truncate(r.get('rejected')))} |", ""]


def render_markdown(title: str, sections: list[Section], problems: list[str], figdir: str) -> str:
    out = [f"# {_md_escape(title)}", ""]
    if problems:
        out += ["**Files that could not be read:**", ""] + [f"- {_md_escape(p)}" for p in problems] + [""]
    for s in sections:
        _md_block(s, out, figdir)
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- entry point


@dataclass
class Written:
    html: Path
    markdown: Path
    figures: list[Path]
    problems: list[str]
    missing: list[str]  # top-level sections with no data


def _figures(blocks) -> list[Fig]:
    out = []
    for b in blocks:
        if isinstance(b, Fig):
            out.append(b)
        elif isinstance(b, Section):
            out += _figures(b.blocks)
        elif isinstance(b, Row):
            out += _figures(b.items)
    return out


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder; pass a run folder made by `lidr run`")
    if not (run_dir / "config.yaml").exists() and not (run_dir / "state.json").exists():
        raise ReportError(f"{run_dir} is not a run folder (it has neither config.yaml nor state.json); "
                          "pass a folder made by `lidr run --out RUN_DIR`")


def build_sections(run: Run, examples: int = 2) -> list[Section]:
    return [run_section(run), eval_section(run), training_section(run), pairs_section(run),
            translation_section(run), examples_section(run, examples)]


def write_report(run_dir: str | Path, out: Optional[str | Path] = None, examples: int = 2) -> Written:
    """Write report.html (self-contained) and summary.md (+ report/figures/*.png) for a run folder."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    dest = Path(out) if out is not None else run_dir
    run = Run(run_dir)
    sections = build_sections(run, examples)
    title = f"lidr report: {run_dir.resolve().name}"

    figs = _figures(sections)
    figdir = dest / "report" / "figures"
    paths = []
    for f in figs:
        paths.append(figdir / f"{f.name}.png")
        atomic_write_bytes(paths[-1], f.png)
    for stale in figdir.glob("*.png") if figdir.is_dir() else []:
        if stale not in paths:
            stale.unlink()

    html_path, md_path = dest / "report.html", dest / "summary.md"
    atomic_write_text(html_path, render_html(title, sections, run.problems))
    atomic_write_text(md_path, render_markdown(title, sections, run.problems, "report/figures"))
    missing = [s.title for s in sections
               if s.blocks and isinstance(s.blocks[0], Text) and s.blocks[0].kind == "none"]
    return Written(html_path, md_path, paths, run.problems, missing)
