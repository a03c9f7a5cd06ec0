"""Plots and a self-contained evaluation report (metrics.json, report.md, report.html).

Plots use matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so no global backend
or GUI is touched. report.html embeds every plot as a base64 PNG data URI and carries its CSS
inline: it opens from disk with no network and no JavaScript. Every piece of text that reaches
the HTML goes through ``html.escape`` (labels come from user data).

Both report.md and report.html are rendered from one list of blocks (heading, paragraph, list,
table, image), so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.errors import DataError, MedtuneError
from medtune.fsutil import atomic_file, write_json, write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# fields drawn as plots, or too long for a table: left to metrics.json
BULKY_KEYS = {"confusion", "reliability", "coverage_curve", "per_row", "labels", "comparison"}
MAX_TABLE_ROWS = 60
COMPARISON_ORDER = ["accuracy", "macro_f1", "weighted_f1", "semantic_similarity", "size_mb",
                    "weight_mb", "params", "bits_per_param", "quantized_bits_per_param", "merged_in_memory",
                    "peak_memory_mb", "model_memory_mb", "latency_p50_ms", "latency_p95_ms",
                    "throughput", "train_seconds"]
QUALITY_KEYS = {"accuracy", "macro_f1", "weighted_f1", "semantic_similarity", "ece"}
COST_SUFFIXES = ("_mb", "_ms", "_seconds", "_bytes", "params", "bits_per_param", "throughput")
MAX_RATIO_LINES = 4

# ---------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _short(text: str, width: int = 28) -> str:
    """A label or model name for a plot: shortened, and with "$" escaped (matplotlib reads
    text between two "$" as a formula: "CT $x^$" failed the report, "$5 or $10" was garbled)."""
    short = text if len(text) <= width else text[: width - 1] + "…"
    return short.replace("$", r"\$")


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Confusion matrix (rows gold, columns predicted), coloured by row share, counts annotated."""
    import numpy as np

    matrix = np.asarray(confusion, dtype=float)
    n = len(labels)
    if matrix.shape != (n, n):
        raise DataError(f"confusion: shape {matrix.shape} does not match {n} labels")
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = min(24.0, max(4.5, 0.45 * n + 2.5))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of gold row")
    names = [_short(str(lab)) for lab in labels]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_title("Confusion matrix")
    return _png(fig)


def reliability_png(reliability: Sequence[dict]) -> bytes:
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    fig = _figure(5.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    total = sum(int(b.get("count") or 0) for b in reliability) or 1
    legend: str | None = "accuracy"  # on the first drawn bar (the lowest bins are mostly empty)
    for b in reliability:
        lower, upper = float(b["lower"]), float(b["upper"])
        count = int(b.get("count") or 0)
        if count and b.get("accuracy") is not None:
            top.bar(lower, float(b["accuracy"]), width=upper - lower, align="edge",
                    color="tab:blue", edgecolor="white", label=legend)
            legend = None
        bottom.bar(lower, count / total, width=upper - lower, align="edge", color="tab:grey")
    xs = [b["mean_confidence"] for b in reliability if b.get("count")]
    ys = [b["accuracy"] for b in reliability if b.get("count")]
    top.plot(xs, ys, "o", color="tab:orange", markersize=4, label="bin mean confidence")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="Reliability diagram")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="confidence", ylabel="share")
    return _png(fig)


def coverage_png(coverage_curve: Sequence[dict]) -> bytes:
    """Accuracy of the most confident rows as coverage grows (selective prediction)."""
    fig = _figure(5.5, 4.0)
    ax = fig.add_subplot()
    xs = [float(p["coverage"]) for p in coverage_curve]
    ys = [float(p["accuracy"]) for p in coverage_curve]
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set(xlim=(0, 1.02), xlabel="coverage (most confident first)", ylabel="accuracy",
           title="Accuracy vs coverage")
    ax.grid(alpha=0.3)
    return _png(fig)


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-append leaves a partial last line
                break
            raise DataError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curve_png(metrics_jsonl_path: str | Path) -> bytes | None:
    """Training / validation loss (and validation accuracy) by step; None without loss rows."""
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        return None
    rows = _read_jsonl(path)
    train, val = _series(rows, "loss"), _series(rows, "val_loss")
    acc = _series(rows, "val_accuracy")
    if not train[0] and not val[0]:
        return None
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1)
    if val[0]:
        ax.plot(*val, marker="o", markersize=3, label="val loss")
    ax.set(xlabel="step", ylabel="loss", title="Training curve")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if acc[0]:
        right = ax.twinx()
        right.plot(*acc, color="tab:green", marker="s", markersize=3, label="val accuracy")
        right.set(ylabel="val accuracy", ylim=(0, 1))
        more_handles, more_names = right.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    ax.legend(handles, names, fontsize=8, loc="center right")
    return _png(fig)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(float(value)) else float(value)


def comparison_png(rows: list[dict], metric: str) -> bytes:
    """Bar chart of ``metric`` for each row's ``model`` (rows lacking it are left out)."""
    given = [(str(r.get("model", f"row {i}")), _number(r.get(metric))) for i, r in enumerate(rows)]
    points = [(name, v) for name, v in given if v is not None]
    if not points:
        raise MedtuneError(f"comparison: no row has a numeric {metric!r}")
    fig = _figure(6.5, 1.2 + 0.5 * len(points))
    ax = fig.add_subplot()
    names = [_short(name, 36) for name, _ in points][::-1]
    values = [v for _, v in points][::-1]
    bars = ax.barh(range(len(points)), values, color="tab:blue")
    ax.set_yticks(range(len(points)), names, fontsize=9)
    ax.bar_label(bars, labels=[_fmt(v) for v in values], padding=3, fontsize=8)
    ax.set_xlim(0, max(max(values), 0.0) * 1.18 or 1.0)
    ax.set_title(metric)
    return _png(fig)


# ---------------------------------------------------------------- blocks


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        # 4 significant digits, more where that would round a fraction to a whole number
        # (an accuracy of 0.99996 is not "1")
        for digits in (4, 6, 8):
            text = f"{value:.{digits}g}"
            if float(text) % 1 or not value % 1:
                return text
        return repr(value)
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _table_dict(value: Any) -> bool:
    """A dict of flat dicts (per_class, by_subject, ...) renders as one table."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values())
                    for v in value.values()))


def _columns(dicts: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


def _dict_blocks(data: dict, level: int) -> list[tuple]:
    blocks: list[tuple] = []
    scalars = [(k, v) for k, v in data.items() if _is_scalar(v)]
    if scalars:
        blocks.append(("table", ["metric", "value"], [[str(k), _fmt(v)] for k, v in scalars]))
    left_out = []
    for key, value in data.items():
        if _is_scalar(value):
            continue
        if key in BULKY_KEYS:
            left_out.append(str(key))
        elif _table_dict(value):  # per_class of any size: one row per label, in one table
            cols = _columns(list(value.values()))
            rows = [[str(name), *(_fmt(d.get(c)) for c in cols)] for name, d in value.items()]
            blocks += [("h", level, str(key)), ("table", ["", *cols], rows)]
        elif isinstance(value, dict):
            blocks += [("h", level, str(key)), *_dict_blocks(value, min(level + 1, 4))]
        elif isinstance(value, list) and all(_is_scalar(v) for v in value) and len(value) <= 20:
            blocks += [("h", level, str(key)), ("p", ", ".join(_fmt(v) for v in value))]
        elif (isinstance(value, list) and value and len(value) <= MAX_TABLE_ROWS
              and all(isinstance(v, dict) for v in value)):
            cols = _columns(value)
            blocks += [("h", level, str(key)),
                       ("table", cols, [[_fmt(d.get(c)) for c in cols] for d in value])]
        else:
            left_out.append(str(key))
    if left_out:
        blocks.append(("p", f"In metrics.json only: {', '.join(left_out)}."))
    return blocks


def _is_cost(key: str) -> bool:
    return key not in QUALITY_KEYS and key.endswith(COST_SUFFIXES)


def _comparison_blocks(rows: list[dict]) -> list[tuple]:
    keys = _columns(rows)
    cols = [k for k in COMPARISON_ORDER if k in keys]
    cols += [k for k in keys if k not in cols and k != "model"]
    table = [[str(r.get("model", f"row {i}")), *(_fmt(r.get(c)) for c in cols)]
             for i, r in enumerate(rows)]
    blocks: list[tuple] = [("h", 2, "Comparison")]
    ref = rows[0]
    if 2 <= len(rows) <= MAX_RATIO_LINES + 1:
        ref_name = str(ref.get("model", "row 0"))
        for i, row in enumerate(rows[1:], start=1):
            line = [f"ratio {row.get('model', f'row {i}')} / {ref_name}"]
            for c in cols:
                a, b = _number(ref.get(c)), _number(row.get(c))
                if a is None or b is None:
                    line.append("")
                elif _is_cost(c):
                    line.append(f"×{b / a:.3g}" if a else "")
                else:
                    line.append(f"{b - a:+.4f}")
            table.append(line)
        blocks.append(("p", f"Ratio lines: cost columns (size, memory, latency, throughput, "
                            f"params) as ×factor, quality columns as difference, both against "
                            f"the first row ({ref_name})."))
    blocks.append(("table", ["model", *cols], table))
    return blocks


def _card_blocks(card: dict) -> list[tuple]:
    blocks: list[tuple] = [("h", 2, "Model card")]
    for key, value in card.items():
        blocks.append(("h", 3, str(key).replace("_", " ").capitalize()))
        if isinstance(value, dict):
            blocks.append(("table", ["", "value"], [[str(k), _fmt(v) if _is_scalar(v)
                                                     else json.dumps(v, default=str)]
                                                    for k, v in value.items()]))
        elif isinstance(value, list | tuple):
            blocks.append(("ul", [_fmt(v) if _is_scalar(v) else json.dumps(v, default=str)
                                  for v in value]))
        else:
            blocks.append(("p", _fmt(value)))
    return blocks


# ---------------------------------------------------------------- rendering

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       max-width: 1100px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7e2; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #e3e8ef; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7e2; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f1f4f9; }
tr:nth-child(even) td { background: #fafbfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e8ef; }
figcaption { font-size: .85rem; color: #5a6475; }
"""
NUMERIC = re.compile(r"^[×+\-−]?[\d,]*\.?\d+(e[+-]?\d+)?$|^–$")


def _md_cell(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\n", " "))


def _to_markdown(title: str, blocks: list[tuple], files: dict[str, str]) -> str:
    out = [f"# {_md_cell(title)}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out += [f"{'#' * block[1]} {_md_cell(block[2])}", ""]
        elif kind == "p":
            out += [_md_cell(block[1]), ""]
        elif kind == "ul":
            out += [f"- {_md_cell(item)}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{_md_cell(block[1])}]({files[block[1]]})", ""]
    return "\n".join(out)


def _to_html(title: str, blocks: list[tuple]) -> str:
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            rows = "".join(
                "<tr>" + "".join(
                    f'<td class="num">{esc(c)}</td>' if NUMERIC.match(c) else f"<td>{esc(c)}</td>"
                    for c in row) + "</tr>"
                for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(block[2]).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block[1])}">'
                        f"<figcaption>{esc(block[1])}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, NaN/inf to None, Paths to str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _image_file(name: str) -> str:
    if name.lower().endswith(".png"):
        name = name[:-4]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"
    return f"{stem}.png"


def write_report(output_dir: str | Path, *, title: str, metrics: dict,
                 comparison: list[dict] | None = None, model_card: dict | None = None,
                 images: dict[str, bytes] | None = None,
                 notes: list[str] | None = None) -> dict[str, Path]:
    """Write metrics.json, report.md, report.html and one PNG per image into ``output_dir``.

    Everything is rendered in memory first, then each file is written atomically (report.html
    last), so a failure while rendering leaves no new files. ``comparison`` also goes to
    comparison.json. Returns {file name: path}.
    """
    out = Path(output_dir)
    images = dict(images or {})
    files: dict[str, str] = {}
    for name, data in images.items():
        if not isinstance(data, bytes | bytearray) or not bytes(data).startswith(PNG_SIGNATURE):
            raise MedtuneError(f"report image {name!r}: not PNG bytes")
        file_name, stem, k = _image_file(name), _image_file(name)[:-4], len(files)
        while file_name in files.values() or file_name in ("metrics.png", "report.png"):
            file_name, k = f"{stem}_{k}.png", k + 1  # until it is free
        files[name] = file_name

    blocks: list[tuple] = []
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", [str(n) for n in notes])]
    if comparison:
        blocks += _comparison_blocks(comparison)
    blocks += [("h", 2, "Metrics"), *_dict_blocks(_jsonable(metrics), 3)]
    if images:
        blocks.append(("h", 2, "Plots"))
        blocks += [("img", name, bytes(data)) for name, data in images.items()]
    if model_card:
        blocks += _card_blocks(_jsonable(model_card))

    markdown = _to_markdown(title, blocks, files)
    page = _to_html(title, blocks)
    metrics_json = _jsonable(metrics)

    written: dict[str, Path] = {}
    for name, data in images.items():
        path = out / files[name]
        with atomic_file(path) as tmp:
            tmp.write_bytes(bytes(data))
        written[files[name]] = path
    write_json(out / "metrics.json", metrics_json)
    written["metrics.json"] = out / "metrics.json"
    if comparison:
        write_json(out / "comparison.json", _jsonable(comparison))
        written["comparison.json"] = out / "comparison.json"
    write_text(out / "report.md", markdown)
    written["report.md"] = out / "report.md"
    write_text(out / "report.html", page)
    written["report.html"] = out / "report.html"
    return written
