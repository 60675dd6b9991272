"""The report document: one function per section, rendered to Markdown and self-contained HTML by
Jinja2 templates (``templates/report.md.j2``, ``templates/report.html.j2``)."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from diaropt.figures import figure_png
from diaropt.files import atomic_path
from diaropt.keys import DER_METRIC, PARITY_METRICS, TAG_RECOMMENDED
from diaropt.report.analysis import STAGE_GROUPS, axis_effects, parity_table, reproduce_command, scored, timing_table
from diaropt.report.figures import axis_effects_figure, pareto_figure, sweep_timing_figure
from diaropt.report.load import Sweep, metric, present
from diaropt.report.preset import preset_name, preset_yaml
from diaropt.report.select import Selection


@dataclass
class Section:
    """A heading (None: none) and its blocks: ``(kind, content)`` with kind heading, para, bullets,
    code, table (``{"columns", "rows"}`` of strings) or image (name, alt); PNGs in ``images``."""

    title: str | None
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    level: int = 2

    def heading(self, text: str, level: int = 3) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", {"columns": [str(c) for c in frame.columns],
                                      "rows": [[_cell(v) for v in row] for row in frame.itertuples(index=False)]}))

    def image(self, name: str, figure: Any, alt: str) -> None:
        self.images[name] = figure_png(figure)
        self.blocks.append(("image", (name, alt)))


@dataclass
class Document:
    """A title and its sections, rendered by the templates."""

    title: str
    sections: list[Section]

    @property
    def images(self) -> dict[str, bytes]:
        return {name: png for section in self.sections for name, png in section.images.items()}

    def markdown(self) -> str:
        return _ENVIRONMENTS["md"].get_template("report.md.j2").render(doc=self)

    def html(self) -> str:
        return _ENVIRONMENTS["html"].get_template("report.html.j2").render(doc=self)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _inline_html(text: Any) -> Markup:
    """Escaped text with Markdown's ```code``` and ``**bold**`` as HTML."""
    escaped = html.escape(str(text), quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return Markup(re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped))


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=autoescape, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(inline=_inline_html, md_cell=lambda v: str(v).replace("|", "\\|"),
                       b64=lambda png: base64.b64encode(png).decode("ascii"))
    return env


_ENVIRONMENTS = {"md": _environment(False), "html": _environment(True)}


def _pct(value: Any, signed: bool = False) -> str:
    if not present(value):
        return ""
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if present(value) else ""


# --- sections -------------------------------------------------------------------------------------


def overview_section(sweep: Sweep) -> Section:
    """Where the sweep is, its children's outcomes, swept axes, host and commit."""
    frame = sweep.runs
    counts = frame["outcome"].value_counts().to_dict()
    first = frame.iloc[0]
    host = first.get("tags.host.cpu_model")
    section = Section(None)
    section.bullets([
        f"parent run `{sweep.parent_run_id}` in experiment `{sweep.experiment_name}` ({sweep.tracking_uri})",
        f"{len(frame)} children: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())),
        "swept axes: " + (", ".join(f"`{a}`" for a in sweep.axes) or "none (a single configuration)"),
        "measured by: " + _sources(frame),
        f"host: {host if isinstance(host, str) else 'unknown'}; git commit "
        f"`{str(first.get('tags.git.commit', 'unknown'))[:12]}`",
        f"generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `python experiments/report.py`",
    ])
    return section


def _sources(frame: pd.DataFrame) -> str:
    """"backend(s) `onnxruntime`; numerics source(s) `onnxruntime`; timing source(s) 3 target, 1 proxy"."""
    backends = sorted({v for v in frame.get("params.backend.resolved", pd.Series(dtype=object)) if isinstance(v, str)})
    numerics = sorted(set(frame["numerics_source"]))
    timing = frame["timing_source"].value_counts().to_dict()
    return ("backend(s) " + (", ".join(f"`{b}`" for b in backends) or "unrecorded") + "; numerics source(s) "
            + ", ".join(f"`{n}`" for n in numerics) + "; timing source(s) "
            + ", ".join(f"{n} `{t}`" for t, n in sorted(timing.items())))


def unranked_section(sweep: Sweep, selection: Selection) -> Section | None:
    """Runs whose timings are not the target's own (``proxy``, ``not_measured``): compared on DER,
    parity, size and op counts only, with the reason from their ``diaropt.timing_source_reason`` tag."""
    frame = sweep.runs[sweep.runs["timing_source"] != "target"]
    if frame.empty:
        return None
    cand = selection.candidates.set_index("run_id")
    section = Section("Compared without speed (timings not the target's own)")
    section.para("These runs are not ranked by RTFx: their timing was measured by another engine or precision "
                 "standing in for the configuration (`proxy`), or not measured at all (`not_measured`). Compare "
                 "them on accuracy, parity, size and op counts only.")
    size = metric(frame, "embedding_model_size_bytes")
    table = pd.DataFrame({
        "run": [f"`{r[:8]}`" for r in frame["run_id"]], "label": frame["label"],
        "timing": frame["timing_source"], "numerics": frame["numerics_source"],
        "DER %": [_pct(v) for v in frame["der"]],
        "ΔDER pts": [_pct(cand.loc[r, "der_delta"], True) for r in frame["run_id"]],
        "parity": frame["parity"],
        "embedding MB": [_num(v / 2**20, 1) if present(v) else "" for v in size],
        "slice_by_index ops": [_num(v, 0) for v in metric(frame, "embedding_coreml_slice_by_index_ops")],
    })
    section.table(table)
    reasons = sorted({(lab, why) for lab, why in zip(frame["label"], frame["timing_reason"]) if why})
    if reasons:
        section.bullets([f"`{lab}`: {why}" for lab, why in reasons])
    return section


def recommendation_section(sweep: Sweep, selection: Selection, preset_check: str | None = None) -> Section:
    """The recommended child (or why none qualifies), the baseline, the rule, how to reproduce it."""
    section = Section("Recommendation")
    base, rec = selection.baseline, selection.recommended
    if sweep.unfinished:  # an interrupted sweep: the choice covers only the jobs that ran
        never = (f"{sweep.jobs_never_run} of {sweep.jobs_planned} planned jobs never ran" if sweep.jobs_planned
                 else "the number of planned jobs is unknown")
        section.para(f"**This sweep is unfinished** (parent run {sweep.parent_status}"
                     + (f": {sweep.closed_reason}" if sweep.closed_reason else "") + f"); {never}. What follows "
                     "compares only the jobs that ran; `resume=true` on the same sweep dir runs the rest.")
    if rec is not None:
        speedup = rec["rtfx"] / base["rtfx"] if base is not None and base["rtfx"] > 0 else math.nan
        section.para(f"**Recommended: `{rec['label']}`** (run `{rec['run_id']}`): RTFx **{rec['rtfx']:.2f}**"
                     + (f" ({speedup:.2f}x the baseline)" if present(speedup) else "")
                     + f", DER **{_pct(rec['der'])} %** ({_pct(rec['der_delta'], True)} points vs the baseline), "
                     f"parity: {rec['parity']}.")
        if selection.caveat:
            section.para(f"**Caution:** {selection.caveat}.")
    elif selection.message.startswith("no configuration"):
        section.para(f"**No configuration qualifies.** {selection.message[len('no configuration qualifies: '):]}.")
    else:
        section.para(f"**{selection.message}**")
    alternative = selection.row(selection.if_unchecked_allowed)
    if alternative is not None:
        section.para(f"With `--allow-unchecked` (accepting runs whose parity was not checked) the recommendation would "
                     f"be `{alternative['label']}` (run `{alternative['run_id'][:8]}`): RTFx {alternative['rtfx']:.2f}, "
                     f"DER {_pct(alternative['der'])} % ({_pct(alternative['der_delta'], True)} points).")
    if base is not None:
        section.para(f"Baseline: `{base['label']}` (run `{base['run_id']}`), DER {_pct(base['der'])} %, "
                     f"RTFx {_num(base['rtfx'])}: {selection.baseline_note}.")
    else:
        section.para(f"Baseline: {selection.baseline_note}.")
    section.para(f"Rule: the highest RTFx among finished, non-skipped children whose DER ({DER_METRIC}) is at most the "
                 f"baseline's plus {100 * selection.tolerance:.2f} points and whose parity check passed "
                 f"(`parity_ok = 1`), among runs timed by their own engine and precision (`diaropt.timing_source = "
                 f"target`) on the baseline's engine, host and ONNX Runtime optimization levels; an RTFx advantage "
                 f"inside the measured min-max spread over repeats is not a win. Children without parity metrics "
                 f"count as unchecked and are "
                 + ("eligible (`--allow-unchecked`)." if selection.allow_unchecked
                    else "not eligible unless they are the baseline."))
    if rec is not None:
        row = sweep.runs[sweep.runs["run_id"] == rec["run_id"]].iloc[0]
        name = preset_name(sweep.parent_run_id)
        section.heading("Reproduce the recommended run")
        section.code(reproduce_command(row))
        section.para(f"The same configuration as a Hydra preset, `conf/experiment/{name}.yaml` in this folder (copy "
                     f"it to the repository's `conf/experiment/`, or run the report with `--install-preset`), then:")
        section.code(f"python experiments/sweep.py experiment={name}")
        if preset_check:
            section.para(preset_check)
    not_eligible = selection.candidates[~selection.candidates["eligible"]]
    if len(not_eligible):
        section.para("Why the others were not chosen: " + "; ".join(
            f"`{r.label}`: {r.reason}" for r in not_eligible.itertuples()) + ".")
    return section


def configurations_section(sweep: Sweep, selection: Selection) -> Section:
    """Every child: DER in both conventions, RTFx and its spread, peak memory, parity, verdict."""
    frame = sweep.runs
    cand = selection.candidates.set_index("run_id")

    def verdict(run_id: str) -> str:
        if cand.loc[run_id, "is_baseline"]:
            return "baseline" + (" (eligible)" if cand.loc[run_id, "eligible"] else f": {cand.loc[run_id, 'reason']}")
        if run_id == selection.recommended_run_id:
            return "**recommended**"
        return "eligible" if cand.loc[run_id, "eligible"] else cand.loc[run_id, "reason"]

    lo, hi = metric(frame, "rtfx_min"), metric(frame, "rtfx_max")
    table = pd.DataFrame({
        "run": [f"`{r[:8]}`" for r in frame["run_id"]], "label": frame["label"], "outcome": frame["outcome"],
        "DER %": [_pct(v) for v in frame["der"]],
        "ΔDER pts": [_pct(cand.loc[r, "der_delta"], True) for r in frame["run_id"]],
        "DER % (FluidAudio)": [_pct(v) for v in metric(frame, "der_fluidaudio")],
        "RTFx": [_num(v) + (f" ({s}, not ranked)" if present(v) and s != "target" else "")
                 for v, s in zip(frame["rtfx"], frame["timing_source"])],
        "RTFx min-max": [f"{a:.2f}-{b:.2f}" if present(a) and present(b) and b > a else "" for a, b in zip(lo, hi)],
        "peak RSS MB": [_num(v / 2**20, 0) if present(v) else "" for v in metric(frame, "peak_rss_bytes")],
        "parity": frame["parity"], "verdict": [verdict(r) for r in frame["run_id"]],
    })
    section = Section("All configurations")
    section.table(table)
    return section


def pareto_section(sweep: Sweep, selection: Selection) -> Section:
    """DER vs RTFx with the Pareto front, and the configurations on it."""
    section = Section("Pareto front: DER vs RTFx")
    section.image("pareto.png", pareto_figure(sweep.runs, selection), "DER vs RTFx; Pareto front joined")
    done = scored(sweep.runs)
    missing = sweep.runs[(sweep.runs["outcome"] == "finished") & ~sweep.runs["run_id"].isin(done["run_id"])]
    if len(missing):
        section.para("Not drawn (no DER or no RTFx): " + ", ".join(f"`{lab}`" for lab in missing["label"]) + ".")
    unranked = done[~done["rankable"]]
    if len(unranked):
        section.para("Drawn apart and never on the front: " + ", ".join(
            f"`{r.label}` ({'parity flagged' if r.parity == 'flagged' else 'timing ' + r.timing_source})"
            for r in unranked.itertuples()) + ".")
    if done["on_front"].any():
        front = done[done["on_front"]].sort_values("rtfx")
        section.para("On the front (no other configuration is both at least as fast and at least as accurate): "
                     + ", ".join(f"`{r.label}` (RTFx {r.rtfx:.2f}, DER {100 * r.der:.2f} %)"
                                 for r in front.itertuples()) + ".")
    return section


def timing_section(sweep: Sweep) -> Section:
    """Seconds per stage category and configuration (figure and table)."""
    section = Section("Timing breakdown")
    section.image("timing.png", sweep_timing_figure(sweep.runs), "seconds per stage category and configuration")
    timings = timing_table(sweep.runs)
    if len(timings):
        shown = timings[["label", *STAGE_GROUPS, "total", "repeats"]].copy()
        for column in [*STAGE_GROUPS, "total"]:
            shown[column] = [_num(v, 3) for v in shown[column]]
        spread = [f"{a:.3f}-{b:.3f}" if r > 1 and present(a) and present(b) else ""
                  for a, b, r in zip(timings["total_min"], timings["total_max"], timings["repeats"])]
        shown.insert(len(shown.columns) - 1, "total min-max", spread)
        section.para("Seconds over the whole evaluation set (median over repeats; compile counted once per repeat; "
                     "warm-up excluded, as in `time_total_s`).")
        section.table(shown)
    return section


def axes_section(sweep: Sweep) -> Section:
    """Median RTFx and DER per value of each swept axis."""
    section = Section("Effect of each axis")
    effects = axis_effects(sweep.runs, sweep.axes)
    if effects.empty:
        section.para("No swept axis has finished runs to compare.")
        return section
    section.image("axes.png", axis_effects_figure(effects), "median RTFx and DER per axis value")
    shown = effects.copy()
    shown["rtfx_median"] = [_num(v) for v in shown["rtfx_median"]]
    shown["der_median"] = [_pct(v) for v in shown["der_median"]]
    section.para("Marginal medians: each value's median over all finished runs with that value, whatever the "
                 "other axes were. The median RTFx counts only the runs timed by their own engine and precision "
                 "(`timed runs`, timing source `target`); it is blank for a value with none (e.g. a Core ML weight "
                 "compression timed by ONNX Runtime in fp32 stands in as `proxy`).")
    section.table(shown.rename(columns={"rtfx_median": "median RTFx", "der_median": "median DER %",
                                        "timed_runs": "timed runs"}))
    return section


def parity_section(sweep: Sweep) -> Section:
    """The parity metrics and flag of every child."""
    section = Section("Parity")
    parity = parity_table(sweep.runs)
    if (parity["parity"] == "unchecked").all():
        section.para("No child has parity metrics (parity disabled, or the sweep predates the check): every child "
                     "counts as unchecked.")
    shown = parity.drop(columns=["run_id"]).copy()
    for name in PARITY_METRICS:
        shown[name] = [_num(v, 4) for v in shown[name]]
    section.para("Columns are the `parity_*` metrics (prefix dropped) and the `diaropt.parity_flag` tag.")
    section.table(shown.rename(columns={n: n.removeprefix("parity_") for n in PARITY_METRICS}))
    return section


def notes_section(selection: Selection) -> Section:
    """Units and conventions, and where the verdict is recorded in MLflow."""
    section = Section("Notes")
    section.bullets([
        "DER metrics are fractions in MLflow; this report shows percent. The tolerance "
        f"{selection.tolerance:g} is {100 * selection.tolerance:.2f} DER points.",
        "RTFx = audio seconds / processing seconds (compile, audio decoding and every stage), median over repeats.",
        "Runs tagged `diaropt.timings_comparable = false` reused cached network outputs: their timings are not "
        "comparable and they are never recommended.",
        f"The recommended child is tagged `{TAG_RECOMMENDED} = true` in MLflow (filter: "
        f"`tags.\"{TAG_RECOMMENDED}\" = 'true'`); this report is an artifact of the parent run under `report/`.",
    ])
    return section


# --- the report -----------------------------------------------------------------------------------


@dataclass
class Report:
    """A rendered report; ``write`` puts it in a folder."""

    document: Document
    selection: Selection
    preset_name: str | None
    preset_text: str | None

    def write(self, out_dir: Path) -> dict[str, Path]:
        """``report.md``, ``report.html``, the PNGs and ``conf/experiment/<preset>.yaml``; returns the paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
        # each file is rendered first and written through a temporary file renamed into place: a failed
        # render or write (full disk) leaves the previous report's file whole, never a partial one
        files: dict[Path, str | bytes] = {paths["markdown"]: self.document.markdown(),
                                          paths["html"]: self.document.html()}
        files.update({out_dir / name: png for name, png in self.document.images.items()})
        if self.preset_text is not None and self.preset_name is not None:
            paths["preset"] = out_dir / "conf" / "experiment" / f"{self.preset_name}.yaml"
            files[paths["preset"]] = self.preset_text
        for path, content in files.items():
            with atomic_path(path) as tmp:
                if isinstance(content, bytes):
                    tmp.write_bytes(content)
                else:
                    tmp.write_text(content)
        return paths


def recommended_preset(sweep: Sweep, selection: Selection) -> tuple[str | None, str | None]:
    """(name, YAML text) of the recommended child's Hydra preset; (None, None) if none is recommended."""
    rec = selection.recommended
    if rec is None:
        return None, None
    row = sweep.runs[sweep.runs["run_id"] == rec["run_id"]].iloc[0]
    name = preset_name(sweep.parent_run_id)
    comment = (f"Recommended by experiments/report.py from {sweep.parent_name!s} (parent run "
               f"{sweep.parent_run_id}), child run {rec['run_id']}:\nDER {_pct(rec['der'])} %, RTFx "
               f"{rec['rtfx']:.2f}. Re-run: python experiments/sweep.py experiment={name}")
    return name, preset_yaml(row, name, comment)


def build_report(sweep: Sweep, selection: Selection, preset_check: str | None = None) -> Report:
    """The Markdown/HTML document of a sweep and its selection (figures included as PNGs)."""
    sections = [overview_section(sweep), recommendation_section(sweep, selection, preset_check),
                configurations_section(sweep, selection), unranked_section(sweep, selection),
                pareto_section(sweep, selection), timing_section(sweep),
                axes_section(sweep), parity_section(sweep), notes_section(selection)]
    name, text = recommended_preset(sweep, selection)
    sections = [s for s in sections if s is not None]
    return Report(Document(f"Report: {sweep.parent_name}", sections), selection, name, text)
