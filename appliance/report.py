"""``armdi bench report``: the JSON of every bench -> one Markdown page with PNG plots.

The page is a template (``docs/benchmarks.template.md``) whose prose is written by hand and
whose ``{{placeholders}}`` are filled from the results directory (``docs/results/``)::

    pipeline.json     armdi bench pipeline --json ...      {{pipeline}}
    adaptive.json     armdi bench adaptive --json ...      {{adaptive}}
    faults.json       armdi bench faults --json ...        {{faults}}
    mdi-vs-ddi.json   armdi bench mdi-vs-ddi --json ...    {{mdi_vs_ddi}}, {{win_map}}

and, when present, the same benches run another way: ``pipeline-run*.json`` (repeated runs:
each run's ratios and their median, ``{{pipeline_runs}}``), ``pipeline-old.json`` (the code
before the data-plane rework, ``{{pipeline_old}}``), ``pipeline-pre-c.json`` (the code
before the hop's C codec, ``{{pipeline_pre_c}}``), ``pipeline-mobilenet_v2.json``
(``{{pipeline_mnv2}}``), ``adaptive-real.json`` (``--real``, ``{{adaptive_real}}``) and
``faults-emulated.json`` (``--emulate``, ``{{faults_emulated}}``),

plus ``{{machine}}`` (from the files' ``machine`` fields), ``{{emulation}}`` (which figures
rest on emulation) and ``{{commands}}`` (the command of each file, as recorded by the bench
or rebuilt from its settings). A missing file gives a note in its place, never an error; an
unknown placeholder is an error. Plots go into ``plots_dir`` and are linked relative to the
page. Nothing here runs a bench.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.errors import ArmdiError

FILES = {"pipeline": "pipeline.json", "adaptive": "adaptive.json", "faults": "faults.json",
         "mdi_vs_ddi": "mdi-vs-ddi.json",
         # optional companions: the same benches run another way
         "pipeline_old": "pipeline-old.json",  # the code before the data-plane rework
         "pipeline_pre_c": "pipeline-pre-c.json",  # the code before the hop's C codec
         "pipeline_mnv2": "pipeline-mobilenet_v2.json",
         "adaptive_real": "adaptive-real.json",  # --real
         "faults_emulated": "faults-emulated.json",  # --emulate
         "mdi_vs_ddi_memory": "mdi-vs-ddi-memory.json",  # --memory below 1, hybrid
         "mdi_vs_ddi_720p": "mdi-vs-ddi-720p.json",  # --sizes 720x1280
         "mdi_vs_ddi_slow": "mdi-vs-ddi-slow.json"}  # --slow 1,4
BENCH_COMMANDS = {"pipeline": "armdi bench pipeline", "adaptive": "armdi bench adaptive",
                  "faults": "armdi bench faults", "mdi_vs_ddi": "armdi bench mdi-vs-ddi",
                  "pipeline_old": "armdi bench pipeline",
                  "pipeline_pre_c": "armdi bench pipeline",
                  "pipeline_mnv2": "armdi bench pipeline --model mobilenet_v2",
                  "adaptive_real": "armdi bench adaptive --real",
                  "faults_emulated": "armdi bench faults --emulate",
                  "mdi_vs_ddi_memory": "armdi bench mdi-vs-ddi --memory 0.5",
                  "mdi_vs_ddi_720p": "armdi bench mdi-vs-ddi --models mobilenet_v2 "
                                     "--sizes 720x1280",
                  "mdi_vs_ddi_slow": "armdi bench mdi-vs-ddi --slow 1,4"}
PIPELINE_RUNS = "pipeline-run*.json"  # repeated runs of `armdi bench pipeline`: the median
RATIOS = ("overhead_1node", "hop_cost_ratio", "speedup_2node", "cpu_ratio")
MDI_MODES = ("armdi", "edgepipe")
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z0-9_]+)\s*\}\}")


@dataclass(frozen=True)
class ReportOptions:
    results: Path = Path("docs/results")
    template: Path = Path("docs/benchmarks.template.md")
    out: Path = Path("docs/benchmarks.md")
    plots: Path | None = None
    """Where the PNGs go (default: ``plots`` beside ``out``)."""


@dataclass
class Report:
    page: str
    plots: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def load_results(directory: Path) -> dict[str, dict[str, Any]]:
    """The bench results present in ``directory``, by bench (``FILES``); a file that does
    not parse is an error that names it."""
    if not directory.is_dir():
        raise ArmdiError(f"{directory}: no such results directory")
    out = {}
    for key, name in FILES.items():
        path = directory / name
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ArmdiError(f"{path}: not a bench result ({exc})") from exc
            if not isinstance(data, dict):
                raise ArmdiError(f"{path}: not a bench result (a JSON object expected)")
            out[key] = data
    runs = []
    for path in sorted(directory.glob(PIPELINE_RUNS)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArmdiError(f"{path}: not a bench result ({exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("summary"), dict):
            runs.append({**data, "_file": path.name})
    if runs:
        out["pipeline_runs"] = {"runs": runs}
    return out


def pipeline_runs_section(data: dict[str, Any]) -> str:
    """Each run's ratios, and their median (what the data-plane goals are judged on)."""
    runs = data["runs"]
    rows: list[list[Any]] = []
    for r in runs:
        s = r["summary"]
        load = r.get("load_avg", {}).get("start", ["?"])
        rows.append([f"`{r['_file']}`", *(s.get(k) for k in RATIOS),
                     s.get("overhead_1node_ms"), load[0] if load else "?"])
    med = [statistics.median([float(r["summary"][k]) for r in runs
                              if isinstance(r["summary"].get(k), int | float)] or [math.nan])
           for k in (*RATIOS, "overhead_1node_ms")]
    rows.append([f"**median of {len(runs)}**", *med, ""])
    goals = runs[0]["summary"].get("goals", {})
    rows.append(["goal", *(goals.get(k, "") for k in RATIOS), "", ""])
    return _table(["run", *(f"`{k}`" for k in RATIOS), "overhead ms", "load at start"],
                  rows)


# ---------------------------------------------------------------------------- helpers
def _num(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: Iterable[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(_num(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _missing(key: str) -> str:
    if key == "pipeline_runs":
        return (f"_Not measured: no `{PIPELINE_RUNS}` in the results directory (repeated runs "
                "of `armdi bench pipeline --json docs/results/pipeline-run1.json`, ...)._")
    return (f"_Not measured: no `{FILES[key]}` in the results directory. Run "
            f"`{BENCH_COMMANDS[key]} --json docs/results/{FILES[key]}`._")


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ArmdiError("armdi bench report draws with matplotlib: "
                         "pip install 'armdi[bench]'") from exc
    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    _plt().close(fig)
    return path


def command_of(key: str, data: dict[str, Any]) -> str:
    """The command that made ``data``: as the bench recorded it, else rebuilt from its
    settings (the flags the settings pin down)."""
    if isinstance(data.get("command"), str):
        return str(data["command"])
    s = data.get("settings", {}) if isinstance(data.get("settings"), dict) else {}
    flags: list[str] = []
    model = data.get("model", s.get("model"))
    if model:
        flags += ["--model", str(model)]
    if key == "pipeline":
        for name in ("requests", "repeats", "window", "warmup"):
            if name in s:
                flags += [f"--{name}", str(s[name])]
        if isinstance(data.get("link"), dict):
            flags += ["--link", str(data["link"].get("spec"))]
        if "security" in data and "direct" not in data:
            flags.append("--security-only")
        elif "security" in data:
            flags.append("--security")
    elif key == "adaptive":
        for name, flag in (("workers", "--workers"), ("duration_s", "--duration"),
                           ("time_scale", "--time-scale")):
            if name in s:
                flags += [flag, _num(s[name], 1) if isinstance(s[name], float) else str(s[name])]
        for name in ("modes", "scenarios"):
            if isinstance(s.get(name), list):
                flags += [f"--{name}", ",".join(s[name])]
        if s.get("emulate") is False:
            flags.append("--real")
    elif key.startswith("mdi_vs_ddi") and isinstance(data.get("options"), dict):
        o = data["options"]
        for name, flag in (("models", "--models"), ("sizes", "--sizes"),
                           ("links_mbps", "--links"), ("workers", "--workers"),
                           ("modes", "--modes"), ("wire_dtypes", "--wire-dtypes"),
                           ("memory", "--memory"), ("slow", "--slow")):
            if isinstance(o.get(name), list) and o[name] != [1.0]:
                flags += [flag, ",".join(_num(v, 3).rstrip("0").rstrip(".")
                                         if isinstance(v, float) else str(v) for v in o[name])]
        if "images" in o:
            flags += ["--images", str(o["images"])]
        return " ".join(["armdi bench mdi-vs-ddi", *(shlex.quote(f) for f in flags),
                         "--json", f"docs/results/{FILES[key]}"])
    elif key == "faults":
        if "duration_s" in s:
            flags += ["--duration", _num(s["duration_s"], 1)]
        modes = sorted({str(r.get("mode")) for r in data.get("runs", []) if isinstance(r, dict)})
        if modes:
            flags += ["--modes", ",".join(str(m) for m in modes)]
    return " ".join([BENCH_COMMANDS[key], *(shlex.quote(f) for f in flags),
                     "--json", f"docs/results/{FILES[key]}"])


# ---------------------------------------------------------------------------- sections
def machine_section(results: dict[str, dict[str, Any]]) -> str:
    machines: dict[str, list[str]] = {}
    for key, data in _files(results):
        m = data.get("machine")
        if isinstance(m, dict):
            text = (f"{m.get('cpu_count', '?')} x {m.get('cpu_model', '?')}, "
                    f"{m.get('platform', '?')}, Python {m.get('python', '?')}, ONNX Runtime "
                    f"{m.get('onnxruntime', '?')}, pynng {m.get('pynng', '?')}")
            if m.get("gpu"):
                text += f", GPU {m['gpu']}"
            if m.get("frame_decoder"):
                text += f", hop in {'C' if m['frame_decoder'] == 'c' else 'Python'}"
        else:
            text = "not recorded"
        load = data.get("load_avg")
        if isinstance(load, dict) and load.get("start"):
            text += f" (load average {load['start'][0]} at the start)"
        machines.setdefault(text, []).append(key)
    if not machines:
        return "_No results yet._"
    return "\n".join(f"- {', '.join(f'`{f}`' for f in files)}: {text}"
                     for text, files in machines.items())


def _files(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(file name, its data) of every result file read, the repeated runs one by one."""
    out = [(FILES[k], d) for k, d in results.items() if k in FILES]
    out += [(r["_file"], r) for r in results.get("pipeline_runs", {}).get("runs", [])]
    return out


def emulation_section(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for key, data in _files(results):
        what = data.get("emulation")
        if key.startswith("faults") and not what:
            what = f"compute: {data.get('settings', {}).get('compute', 'not recorded')}; " \
                   "all processes share this machine's cores, links are ipc:// sockets"
        link = data.get("link")
        if isinstance(link, dict) and link.get("how") and link["how"] not in str(what):
            what = f"{what}; {link['how']}"
        lines.append(f"- `{key}`: {what or 'not recorded'}")
    return "\n".join(lines) or "_No results yet._"


def commands_section(results: dict[str, dict[str, Any]]) -> str:
    if not results:
        return "_No results yet._"
    commands = [command_of(k, d) for k, d in results.items() if k != "pipeline_runs"]
    commands += [str(r.get("command", "armdi bench pipeline")) + f"  # {r['_file']}"
                 for r in results.get("pipeline_runs", {}).get("runs", [])]
    body = "\n".join(commands)
    return f"```\n{body}\narmdi bench report --out docs/benchmarks.md\n```"


def pipeline_section(data: dict[str, Any]) -> str:
    if "direct" not in data:
        return "_This `pipeline.json` holds only the security figures (`--security-only`)._"
    rows = []
    for key, label in (("direct", "direct ORT (model.onnx, 1 thread)"),
                       ("pipeline_1node", None), ("pipeline_1node_pinned", None),
                       ("pipeline_2node", None), ("pipeline_2node_balanced", None)):
        r = data.get(key)
        if not isinstance(r, dict):
            continue
        rows.append([label or f"pipeline, {r.get('label', key)}", r.get("throughput_ips"),
                     r.get("p50_ms"), r.get("p99_ms"), r.get("compute_p50_ms"),
                     r.get("overhead_p50_ms"), str(r.get("boundaries", ""))])
    s = data.get("settings", {})
    out = [f"{data.get('model', '?')}, {s.get('requests', '?')} requests x "
           f"{s.get('repeats', '?')} repetitions (median), {s.get('window', '?')} in flight "
           "for throughput, 1 for latency" + (
               f"; links `--link {data['link']['spec']}`" if data.get("link") else "") + ":",
           "", _table(["configuration", "img/s", "p50 ms", "p99 ms", "compute p50 ms",
                       "overhead p50 ms", "boundaries"], rows, "lrrrrrl")]
    transfers = [[name, t.get("bytes"), t.get("raw_ms"), t.get("frame_ms"),
                  (t["frame_ms"] / t["raw_ms"]) if t.get("raw_ms") else None]
                 for name, t in (("2-worker boundary", data.get("transfer")),
                                 ("the input", data.get("transfer_input")))
                 if isinstance(t, dict)]
    if transfers:
        out += ["", _table(["transfer, one way", "bytes", "raw pynng ms", "frame hop ms",
                            "ratio"], transfers)]
    summary = data.get("summary", {})
    goals, met = summary.get("goals", {}), summary.get("met", {})
    if goals:
        out += ["", _table(["ratio", "measured", "goal", "met"],
                           [[f"`{k}`", summary.get(k), goals[k],
                             "yes" if met.get(k) else "no"] for k in goals], "lrrl")]
    return "\n".join(out)


def adaptive_section(data: dict[str, Any], plots: Path, page_dir: Path,
                     made: list[Path], name: str = "adaptive") -> str:
    runs = data.get("runs", {})
    rows = []
    for key, r in runs.items():
        tput = [v for v in r.get("throughput_per_s", []) if isinstance(v, int | float)]
        opt = [v for v in r.get("optimum_ips", []) if isinstance(v, int | float)
               and not math.isnan(v)]
        rows.append([f"{key.split('/')[0]} / {r.get('mode')}",
                     sum(tput) / len(tput) if tput else None,
                     sum(opt) / len(opt) if opt else None, r.get("p50_ms"), r.get("p99_ms"),
                     r.get("moves"), r.get("failed_requests")])
    out = [_table(["run", "img/s (mean)", "optimum (mean)", "p50 ms", "p99 ms", "moves",
                   "failed"], rows)]
    summary = {k: v for k, v in data.get("summary", {}).items() if not isinstance(v, dict)}
    if summary:
        out += ["", "Summary: " + ", ".join(f"`{k}` {'none' if v is None else _num(v, 3)}"
                                            for k, v in summary.items()) + "."]
    from appliance.bench_adaptive import write_plot

    png = plots / f"{name}.png"
    if runs and write_plot(data, png):
        made.append(png)
        out += ["", f"![throughput over time through a slowdown]({_rel(png, page_dir)})"]
    return "\n".join(out)


def faults_section(data: dict[str, Any], plots: Path, page_dir: Path,
                   made: list[Path], name: str = "faults") -> str:
    runs = [r for r in data.get("runs", []) if isinstance(r, dict)]
    rows = [[f"{r.get('mode')} / {r.get('fault')}", r.get("sent"), r.get("returned"),
             r.get("lost"), r.get("duplicated"), r.get("wrong"),
             r.get("longest_stall_s") if r.get("lost") == 0 else None] for r in runs]
    out = [_table(["mode / fault", "sent", "returned", "lost", "dup", "wrong",
                   "longest stall s"], rows)]
    if runs:
        png = _faults_plot(data, runs, plots / f"{name}.png")
        made.append(png)
        out += ["", f"![throughput over time through a failure]({_rel(png, page_dir)})"]
    return "\n".join(out)


def _faults_plot(data: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    faults = list(dict.fromkeys(str(r.get("fault")) for r in runs))
    fig, axes = plt.subplots(len(faults), 1, figsize=(9, 2.4 * len(faults)), squeeze=False)
    fault_s = data.get("settings", {}).get("fault_s")
    for ax, fault in zip(axes[:, 0], faults, strict=True):
        for r in runs:
            if str(r.get("fault")) == fault:
                ax.plot(r.get("throughput_per_s", []), label=str(r.get("mode")))
        if isinstance(fault_s, int | float):
            ax.axvline(fault_s, color="k", linestyle=":", linewidth=1, label="fault")
        ax.set_title(fault)
        ax.set_xlabel("s")
        ax.set_ylabel("img/s")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------- mdi vs ddi
@dataclass(frozen=True)
class Cell:
    """One measurement of the MDI-vs-DDI sweep, read tolerantly from its JSON."""

    model: str
    input: str
    link_mbps: float
    workers: int
    mode: str
    wire: str
    time_s: float | None
    throughput_ips: float | None
    p50_ms: float | None
    predicted_time_s: float | None


def _first(d: dict[str, Any], *names: str) -> Any:
    return next((d[n] for n in names if d.get(n) is not None), None)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def mdi_cells(data: dict[str, Any]) -> list[Cell]:
    """The measurements of an ``mdi-vs-ddi.json``: a list (or a dict) of records under
    ``cells``, ``runs``, ``results`` or ``measurements``, each naming its model, input size,
    link rate (Mbit/s), worker count and mode, with the time for N images and/or the
    throughput, and optionally a ``predicted`` record (or ``predicted_time_s``)."""
    records: list[Any] = []
    for key in ("cells", "runs", "results", "measurements"):
        value = data.get(key)
        if isinstance(value, list):
            records = value
            break
        if isinstance(value, dict):
            records = list(value.values())
            break
    cells = []
    for r in records:
        if not isinstance(r, dict) or r.get("mode") is None:
            continue
        size = _first(r, "input_size", "input", "size", "resolution")
        if isinstance(size, list | tuple):
            size = "x".join(str(v) for v in size)
        elif isinstance(size, int):
            size = f"{size}x{size}"
        link = _float(_first(r, "link_mbps", "mbps", "link_rate_mbps", "link"))
        time_s = _float(_first(r, "time_s", "total_s", "time_for_n_s", "seconds"))
        tput = _float(_first(r, "throughput_ips", "throughput"))
        images = _float(_first(r, "images", "n", "requests"))
        if time_s is None and tput and images:
            time_s = images / tput
        predicted = r.get("predicted") if isinstance(r.get("predicted"), dict) else {}
        p_time = _float(_first(predicted, "time_s", "total_s")) if predicted else None
        if p_time is None:
            p_time = _float(r.get("predicted_time_s"))
        if link is None:
            continue
        memory, slow = _float(r.get("memory")), _float(r.get("slow"))
        model = str(r.get("model", data.get("model", "?"))) + (
            f" (memory {memory:g})" if memory is not None and memory < 1 else "") + (
            f" (one worker {slow:g}x slower)" if slow is not None and slow != 1 else "")
        cells.append(Cell(model=model,
                          input=str(size or "?"), link_mbps=link,
                          workers=int(_first(r, "workers", "nodes") or 0),
                          mode=str(r["mode"]), wire=str(_first(r, "wire_dtype", "wire")
                                                        or "float32"),
                          time_s=time_s, throughput_ips=tput,
                          p50_ms=_float(_first(r, "p50_ms", "latency_p50_ms")),
                          predicted_time_s=p_time))
    return cells


def _label(c: Cell) -> str:
    return c.mode + ("" if c.wire == "float32" else f" ({c.wire})")


def _groups(cells: list[Cell]) -> dict[tuple[str, str, int], list[Cell]]:
    out: dict[tuple[str, str, int], list[Cell]] = {}
    for c in cells:
        out.setdefault((c.model, c.input, c.workers), []).append(c)
    return out


def mdi_section(data: dict[str, Any], plots: Path, page_dir: Path, made: list[Path],
                name: str = "mdi-vs-ddi") -> str:
    cells = [c for c in mdi_cells(data) if c.time_s is not None]
    if not cells:
        return "_`mdi-vs-ddi.json` holds no measurement the report can read (see " \
               "`appliance/report.py`, `mdi_cells`)._"
    rows = [[c.model, c.input, c.workers, _num(c.link_mbps, 0), _label(c), c.time_s,
             c.throughput_ips, c.p50_ms, c.predicted_time_s,
             (c.time_s / c.predicted_time_s) if c.time_s and c.predicted_time_s else None]
            for c in sorted(cells, key=lambda c: (c.model, c.input, c.workers, c.link_mbps,
                                                  c.mode, c.wire))]
    out = [_table(["model", "input", "workers", "link Mbit/s", "mode", "time s", "img/s",
                   "p50 ms", "predicted s", "measured / predicted"], rows, "llrrlrrrrr")]
    plt = _plt()
    groups = _groups(cells)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 3 * len(groups)), squeeze=False)
    for ax, ((model, size, workers), group) in zip(axes[:, 0], sorted(groups.items()),
                                                   strict=True):
        for label in sorted({_label(c) for c in group}):
            line = sorted((c.link_mbps, c.time_s) for c in group if _label(c) == label)
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_title(f"{model}, {size}, {workers} workers")
        ax.set_xlabel("link Mbit/s")
        ax.set_ylabel("time for N images, s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = _save(fig, plots / f"{name}.png")
    made.append(png)
    out += ["", f"![inference time vs link rate]({_rel(png, page_dir)})"]
    return "\n".join(out)


def winners_section(data: dict[str, Any]) -> str:
    """The bench's own summaries: the fastest mode per condition (measured / predicted) and
    what mode auto chose there, against the best of the paper's modes and of hybrid."""
    auto = {(c.get("model_id"), c.get("link_mbps"), c.get("workers"), c.get("memory", 1.0),
             c.get("slow", 1.0)): c
            for c in (data.get("auto") or {}).get("cells", []) if isinstance(c, dict)}
    rows = []
    for w in data.get("winners", []):
        if not isinstance(w, dict):
            continue
        a = auto.get((w.get("model_id"), w.get("link_mbps"), w.get("workers"),
                      w.get("memory", 1.0), w.get("slow", 1.0)), {})
        rows.append([w.get("model_id"), w.get("memory", 1.0), w.get("slow", 1.0),
                     w.get("workers"),
                     _num(_float(w.get("link_mbps")), 0), w.get("measured"), w.get("predicted"),
                     a.get("chose"), _float(a.get("ratio_to_best")),
                     _float(a.get("ratio_to_hybrid"))])
    if not rows:
        return "_No condition to summarise._"
    return _table(["model", "memory", "last worker slower", "workers", "link Mbit/s",
                   "fastest (measured)", "fastest (predicted)", "auto chose",
                   "auto / best of armdi, edgepipe, ddi", "auto / hybrid"], rows, "lrrrrlllrr")


def win_map(cells: list[Cell]) -> dict[tuple[str, str, int], dict[float, float]]:
    """Per condition and link rate: DDI's best time / MDI's best time (> 1: MDI wins).
    Pure: the unit under test. Conditions lacking either side are left out."""
    out: dict[tuple[str, str, int], dict[float, float]] = {}
    for key, group in _groups(cells).items():
        for link in sorted({c.link_mbps for c in group}):
            here = [c for c in group if c.link_mbps == link and c.time_s]
            mdi = [c.time_s for c in here if c.mode in MDI_MODES and c.time_s]
            ddi = [c.time_s for c in here if c.mode == "ddi" and c.time_s]
            if mdi and ddi:
                out.setdefault(key, {})[link] = min(ddi) / min(mdi)
    return out


def win_map_section(data: dict[str, Any], plots: Path, page_dir: Path,
                    made: list[Path]) -> str:
    ratios = win_map(mdi_cells(data))
    if not ratios:
        return "_No condition with both an MDI and a DDI measurement._"
    links = sorted({link for row in ratios.values() for link in row})
    keys = sorted(ratios)

    def word(r: float | None) -> str:
        if r is None:
            return ""
        return f"MDI x{r:.2f}" if r > 1 else f"DDI x{1 / r:.2f}"

    rows = [[f"{m}, {s}, {w} workers", *(word(ratios[(m, s, w)].get(x)) for x in links)]
            for m, s, w in keys]
    out = [_table(["condition", *(f"{_num(x, 0)} Mbit/s" for x in links)], rows,
                  "l" + "r" * len(links)),
           "", "(the winner and by how much: the loser's time for N images / the winner's; "
           "MDI is the better of armdi and edgepipe, on either wire dtype)"]
    plt = _plt()
    grid = [[math.log2(ratios[k][x]) if x in ratios[k] else math.nan for x in links]
            for k in keys]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(links) + 4), 0.5 * len(keys) + 2))
    bound = max((abs(v) for row in grid for v in row if not math.isnan(v)), default=1.0) or 1.0
    image = ax.imshow(grid, cmap="coolwarm_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(links)), [f"{_num(x, 0)} Mbit/s" for x in links])
    ax.set_yticks(range(len(keys)), [f"{m}, {s}, {w}w" for m, s, w in keys])
    for i, k in enumerate(keys):
        for j, x in enumerate(links):
            if x in ratios[k]:
                ax.text(j, i, word(ratios[k][x]), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="log2(DDI time / MDI time)")
    ax.set_title("where MDI beats DDI (blue: MDI faster, red: DDI faster)")
    fig.tight_layout()
    png = _save(fig, plots / "win-map.png")
    made.append(png)
    out += ["", f"![win map]({_rel(png, page_dir)})"]
    return "\n".join(out)


def _rel(path: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()


# ---------------------------------------------------------------------------- the page
def render(template: str, results: dict[str, dict[str, Any]], plots: Path,
           page_dir: Path) -> Report:
    """Fill ``template``'s placeholders from ``results`` (by bench key)."""
    made: list[Path] = []

    def needs(key: str, body: Callable[[dict[str, Any]], str]) -> Callable[[], str]:
        return lambda: body(results[key]) if key in results else _missing(key)

    sections: dict[str, Callable[[], str]] = {
        "machine": lambda: machine_section(results),
        "emulation": lambda: emulation_section(results),
        "commands": lambda: commands_section(results),
        "pipeline": needs("pipeline", pipeline_section),
        "adaptive": needs("adaptive", lambda d: adaptive_section(d, plots, page_dir, made)),
        "faults": needs("faults", lambda d: faults_section(d, plots, page_dir, made)),
        "mdi_vs_ddi": needs("mdi_vs_ddi", lambda d: mdi_section(d, plots, page_dir, made)),
        "pipeline_runs": needs("pipeline_runs", pipeline_runs_section),
        "pipeline_old": needs("pipeline_old", pipeline_section),
        "pipeline_pre_c": needs("pipeline_pre_c", pipeline_section),
        "pipeline_mnv2": needs("pipeline_mnv2", pipeline_section),
        "adaptive_real": needs("adaptive_real", lambda d: adaptive_section(
            d, plots, page_dir, made, "adaptive-real")),
        "faults_emulated": needs("faults_emulated", lambda d: faults_section(
            d, plots, page_dir, made, "faults-emulated")),
        "win_map": needs("mdi_vs_ddi", lambda d: win_map_section(d, plots, page_dir, made)),
        "mdi_vs_ddi_memory": needs("mdi_vs_ddi_memory", lambda d: mdi_section(
            d, plots, page_dir, made, "mdi-vs-ddi-memory")),
        "memory_winners": needs("mdi_vs_ddi_memory", winners_section),
        "mdi_vs_ddi_720p": needs("mdi_vs_ddi_720p", lambda d: mdi_section(
            d, plots, page_dir, made, "mdi-vs-ddi-720p")),
        "winners_720p": needs("mdi_vs_ddi_720p", winners_section),
        "mdi_vs_ddi_slow": needs("mdi_vs_ddi_slow", lambda d: mdi_section(
            d, plots, page_dir, made, "mdi-vs-ddi-slow")),
        "winners_slow": needs("mdi_vs_ddi_slow", winners_section),
    }
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(sections))
    if unknown:
        raise ArmdiError(f"the template names unknown sections: {', '.join(unknown)} "
                         f"(known: {', '.join(sections)})")
    page = _PLACEHOLDER.sub(lambda m: sections[m.group(1)](), template)
    return Report(page=page, plots=made,
                  missing=[FILES[k] for k in ("pipeline", "adaptive", "faults", "mdi_vs_ddi")
                           if k not in results])


def generate(options: ReportOptions) -> Report:
    """Read the results and the template, write the page and its plots."""
    try:
        template = options.template.read_text()
    except OSError as exc:
        raise ArmdiError(f"{options.template}: cannot read the template ({exc})") from exc
    results = load_results(options.results)
    plots = options.plots or options.out.parent / "plots"
    report = render(template, results, plots, options.out.parent)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(report.page)
    return report
