"""The technical report: one self-contained HTML page (no script, no network) describing the whole run.

Charts are inline SVG drawn here (a few lines each) rather than with a plotting library, so the page
has no external files and renders the same in any browser. Every number comes from the run's
records (data card, training log, evaluation results, openness report).
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from clearlm.release.card import metric_rows, optimizer_summary, schedule_summary
from clearlm.stages import describe, spec
from clearlm.trace.memorization import report_section as memorization_section

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_W, _H, _PAD = 560, 220, 44


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step") -> str:
    """Lines over a shared x axis, with min/max tick labels and a legend."""
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def xy(x: float, y: float) -> str:
        px = _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD)
        py = _H - _PAD + (y0 - y) / (y1 - y0) * (_H - 2 * _PAD)
        return f"{px:.1f},{py:.1f}"

    parts = [f'<rect x="{_PAD}" y="{_PAD}" width="{_W - 2 * _PAD}" height="{_H - 2 * _PAD}" class="frame"/>']
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(xy(x, y) for x, y in pts if math.isfinite(y))
        marker = "".join(
            f'<circle cx="{xy(x, y).split(",")[0]}" cy="{xy(x, y).split(",")[1]}" r="2.5" fill="{color}"/>'
            for x, y in pts
            if len(pts) < 40 and math.isfinite(y)
        )
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"/>{marker}')
        parts.append(
            f'<text x="{_W - _PAD - 4}" y="{_PAD + 14 + 14 * i}" text-anchor="end" fill="{color}">{_esc(name)}</text>'
        )
    parts += [
        f'<text x="{_PAD - 4}" y="{_PAD + 4}" text-anchor="end">{_fmt(y1)}</text>',
        f'<text x="{_PAD - 4}" y="{_H - _PAD}" text-anchor="end">{_fmt(y0)}</text>',
        f'<text x="{_PAD}" y="{_H - _PAD + 16}">{_fmt(x0)}</text>',
        f'<text x="{_W - _PAD}" y="{_H - _PAD + 16}" text-anchor="end">{_fmt(x1)}</text>',
        f'<text x="{_W / 2}" y="{_H - 8}" text-anchor="middle">{_esc(x_label)}</text>',
    ]
    return _figure(title, parts)


def bar_chart(title: str, labels: list[str], series: dict[str, list[float]]) -> str:
    """Grouped horizontal bars, one group per label, value printed at each bar's end."""
    if not labels:
        return ""
    top = max((v for values in series.values() for v in values), default=1) or 1
    n = len(series)
    row = 14 * n + 8
    height = 2 * _PAD + row * len(labels)
    parts = []
    for j, label in enumerate(labels):
        y = _PAD + j * row
        parts.append(f'<text x="{_PAD + 126}" y="{y + 7 * n + 4}" text-anchor="end">{_esc(label[:24])}</text>')
        for i, (name, values) in enumerate(series.items()):
            width = values[j] / top * (_W - 2 * _PAD - 190)
            parts.append(
                f'<rect x="{_PAD + 130}" y="{y + 14 * i}" width="{max(width, 0.5):.1f}" height="12" '
                f'fill="{_COLORS[i % len(_COLORS)]}"><title>{_esc(name)}</title></rect>'
            )
            parts.append(f'<text x="{_PAD + 134 + width:.1f}" y="{y + 14 * i + 10}">{_fmt(values[j])}</text>')
    for i, name in enumerate(series if n > 1 else []):
        parts.append(
            f'<text x="{_W - _PAD}" y="{_PAD - 10 + 14 * i}" text-anchor="end" '
            f'fill="{_COLORS[i % len(_COLORS)]}">{_esc(name)}</text>'
        )
    return _figure(title, parts, height)


def _figure(title: str, parts: list[str], height: int = _H) -> str:
    return (
        f'<figure><figcaption>{_esc(title)}</figcaption><svg class="chart" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}" role="img" aria-label="{_esc(title)}">{"".join(parts)}</svg></figure>'
    )


def _table(header: list[str], rows: list[list[Any]], pre: bool = False) -> str:
    """An HTML table; with `pre`, cells keep their line breaks and indentation (prompts, generated code)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    td = "<td class='code'>" if pre else "<td>"
    body = "".join("<tr>" + "".join(f"{td}{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:.2em}table{border-collapse:collapse;margin:.6em 0 1.2em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}th{background:#f3f3f3}
figure{display:inline-block;margin:.4em 1em .8em 0;vertical-align:top}figcaption{font-weight:600}
svg.chart text{font-size:11px;fill:#444}svg.chart .frame{fill:none;stroke:#bbb}
.class{display:inline-block;padding:.3em .8em;border-radius:4px;background:#e6f4ea;font-weight:700}
.no{color:#b00}.note{color:#666;font-size:13px}pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}
td.code{white-space:pre-wrap;font:12px/1.35 monospace;vertical-align:top;max-width:420px}"""


def _curve(log: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], float(r[key])) for r in log if r.get(key) is not None]


def _summary(ctx: dict[str, Any], openness: dict[str, Any]) -> list[str]:
    name, train, mof = ctx["name"], ctx["train"], openness["mof"]
    bpb = ctx["eval"].get("bits_per_byte", {})
    trained = (f"{train['tokens']:,} training tokens, {train['steps']} steps" if train
               else f"post-trained from <code>{_esc(ctx['base_model']['folder'])}</code>")  # fmt: skip
    return [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_esc(name)}: technical report"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_esc(name)}</h1><p class='sub'>Technical report, generated by clearlm {_esc(ctx['clearlm_version'])}"
        " from the run's own records (data card, training log, evaluation results, artifact manifests).</p>",
        f"<p><span class='class'>{_esc(mof['label'])}</span> &nbsp; {ctx['parameters']:,} parameters, {trained}; "
        f"validation bits per byte {bpb.get('all', {}).get('bits_per_byte', float('nan')):.4f}.</p>",
    ]


def _data(data: dict[str, Any] | None) -> list[str]:
    """Sources and licences, bytes per source, what each cleaning step removed and why, document lengths."""
    if data is None:
        return ["<h2>Data</h2>", "<p>The recipe has no corpus of its own (no <code>[data]</code> section).</p>"]
    splits, before = data["splits"], data.get("before_steps", {})
    sources = sorted(data["licenses"])
    rows = [[s, data["licenses"][s], before.get(s, {}).get("documents", ""),
             splits["train"].get(s, {}).get("documents", 0), splits["validation"].get(s, {}).get("documents", 0)]
            for s in sources]  # fmt: skip
    out = [
        "<h2>Data</h2>",
        _table(["source", "licence", "documents read", "train documents", "validation documents"], rows),
        bar_chart("Bytes per source (training split)", sources,
                  {"bytes": [splits["train"].get(s, {}).get("bytes", 0) for s in sources]}),
    ]  # fmt: skip
    steps = data.get("steps", {})
    if steps:
        out.append(_table(["step", "documents in", "removed", "bytes in", "bytes out"],
                          [[k, v["documents_in"], v["removed"], v["bytes_in"], v["bytes_out"]]
                           for k, v in steps.items()]))  # fmt: skip
        reasons = {f"{k}: {r}": n for k, v in steps.items() for r, n in v["reasons"].items()}
        out.append(bar_chart("Documents removed, by step and reason", list(reasons),
                             {"documents": list(reasons.values())}))  # fmt: skip
    else:
        out.append("<p>No cleaning steps: every document read was kept.</p>")
    lengths = data.get("length_histogram", {})
    if lengths:  # bin k holds documents of up to 2**(k + 4) bytes; empty bins at either end are left out
        used = [k for k in range(len(next(iter(lengths.values())))) if any(row[k] for row in lengths.values())]
        bins = range(used[0], used[-1] + 1) if used else range(0)
        labels = [f"<= {_size(2 ** (k + 4))}" for k in bins]
        out.append(bar_chart("Kept documents by length (bytes)", labels,
                             {s: [float(row[k]) for k in bins] for s, row in lengths.items()}))  # fmt: skip
    return out


def _model(ctx: dict[str, Any]) -> list[str]:
    m = ctx["model"]
    row = [m["architecture"], f"{ctx['parameters']:,}", m["d_model"], m["n_layers"], m["n_heads"], m["context"],
           ctx["vocab_size"]]  # fmt: skip
    header = ["architecture", "parameters", "d_model", "layers", "heads", "context", "vocabulary"]
    return ["<h2>Model</h2>", _table(header, [row])]


def _training(ctx: dict[str, Any], logs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Pretraining's settings and curves, or what the outside base model is."""
    recipe, train = ctx["recipe"], ctx["train"]
    if not train:
        base = ctx["base_model"]
        return [
            "<h2>Base model</h2>",
            f"<p>Post-trained from <code>{_esc(base['folder'])}</code> ({_esc(base['digest'])}), which clearlm did "
            f"not train; its openness as audited: {_esc(base['mof_class'])}. Its pretraining data, code and "
            "checkpoints are not part of this release.</p>",
        ]
    t, log = recipe["train"], logs["train"]
    return [
        "<h2>Training</h2>",
        f"<p>{_esc(optimizer_summary(t))}, {_esc(schedule_summary(t))} schedule, learning rate {t['lr']} "
        f"with {t['warmup_steps']} warmup steps, "
        f"micro-batch {t['micro_batch_size']} x {t['grad_accum_steps']} accumulation, seed {recipe['seed']}. "
        f"{train['tokens']:,} tokens in {train['train_seconds']:.0f} s.</p>",
        line_chart("Loss", {"training loss": _curve(log, "loss"), "validation loss": _curve(log, "val_loss")}),
        line_chart("Learning rate", {"lr": _curve(log, "lr")}),
        line_chart("Gradient norm", {"grad norm": _curve(log, "grad_norm")}),
        line_chart("Throughput (tokens/s)", {"tokens/s": _curve(log, "tokens_per_s")}),
    ]


def _post_training(ctx: dict[str, Any], logs: dict[str, list[dict[str, Any]]]) -> list[str]:
    post = [stage for stage in ctx["post_training"] if logs.get(stage) and not spec(stage).report]  # (self-described)
    out = ["<h2>Post-training</h2>"] if post else []
    for stage in post:
        label = spec(stage).label
        out.append(line_chart(f"{label}: loss", {"loss": _curve(logs[stage], "loss")}))
        if any("rewards/accuracies" in r for r in logs[stage]):
            rewards = {"accuracy": _curve(logs[stage], "rewards/accuracies"),
                       "margin": _curve(logs[stage], "rewards/margins")}  # fmt: skip
            out.append(line_chart(f"{label}: reward accuracy and margin", rewards))
    return out


def _evaluation(evaluation: dict[str, Any]) -> list[str]:
    bpb = evaluation.get("bits_per_byte", {})
    untrained = evaluation.get("untrained_bits_per_byte", {})
    domains = list(bpb)
    out = ["<h2>Evaluation</h2>"]
    if domains:
        rows = [[d, f"{bpb[d]['bits_per_byte']:.4f}", f"{untrained.get(d, {}).get('bits_per_byte', float('nan')):.4f}",
                 bpb[d]["documents"], bpb[d]["bytes"]] for d in domains]  # fmt: skip
        out.append(_table(["domain", "bits/byte", "untrained", "documents", "bytes"], rows))
        series = {"trained": [bpb[d]["bits_per_byte"] for d in domains],
                  "untrained": [untrained.get(d, {}).get("bits_per_byte", 0.0) for d in domains]}  # fmt: skip
        out.append(bar_chart("Validation bits per byte per domain (lower is better)", domains, series))
    tasks = evaluation.get("tasks", {})
    if tasks:
        out.append(_table(["task", "metric", "value", "stderr", "items"], metric_rows(tasks)))
    return out


def _openness(openness: dict[str, Any]) -> list[str]:
    mof = openness["mof"]
    out = [
        "<h2>Openness</h2>",
        f"<p><span class='class'>{_esc(mof['label'])}</span> (Model Openness Framework, "
        "classes computed with the Model Openness Tool's rules). OSI Open Source AI Definition checklist: "
        f"{'complete' if openness['osaid']['complete'] else 'incomplete'}.</p>",
    ]
    out += [f"<p class='no'>{_esc(r)}</p>" for r in mof["reasons"]]
    rows = [[r["component"], "I" * r["mof_class"], ", ".join(r["paths"]) or "missing", r["license"] or "-",
             "yes" if r["status"] == "included" else "no", "yes" if r["right_type"] else "no",
             "yes" if r["generated"] else ""] for r in openness["components"]]  # fmt: skip
    out.append(_table(["component", "class", "where", "licence", "open", "right type", "generated"], rows))
    return out


def _generations(generations: list[dict[str, Any]], traced: list[list[dict[str, Any]]] | None = None) -> list[str]:
    """Each sample generation; with a trace index, its spans found in the training data marked, and under it each
    span's documents (id, source, licence, a snippet) one click away."""
    out = ["<h2>Sample generations</h2>"] if generations else []
    for i, g in enumerate(generations):
        spans = traced[i] if traced and i < len(traced) else []
        text, parts, at = g["completion"], [], 0
        for n, span in enumerate(spans):  # in text order; OLMoTrace's spans may overlap: the overlap is marked once
            start = max(at, span["start"])
            if span["end"] > start:
                parts += [_esc(text[at:start]), f"<mark title='span {n + 1}: {span['count']} occurrence(s) in the "
                          f"training data'>{_esc(text[start : span['end']])}</mark>"]  # fmt: skip
                at = span["end"]
        parts.append(_esc(text[at:]))
        out.append(f"<p class='note'>prompt (temperature {g['temperature']}, top-k {g['top_k']}, seed {g['seed']})"
                   f"</p><pre><b>{_esc(g['prompt'])}</b>{''.join(parts)}</pre>")  # fmt: skip
        for n, span in enumerate(spans):
            docs = "".join(f"<li>{_esc(d['id'])} ({_esc(d['stage'])}, {_esc(d['source'])}, {_esc(d['license'])})"
                           f"<pre>{_esc(d['snippet'])}</pre></li>" for d in span["documents"])  # fmt: skip
            out.append(f"<details><summary>span {n + 1}: {_esc(text[span['start'] : span['end']])} — "
                       f"{span['count']} occurrence(s)</summary><ul>{docs}</ul></details>")  # fmt: skip
    return out


def _answered(samples: list[dict[str, Any]], shown: int = 5) -> list[str]:
    """Per generative task: how its items ended (the code sandbox's verdicts, counted) and its first items, each with
    the end of its prompt, the generation and what was scored (the extracted answer, the verdict)."""
    out = []
    for task in dict.fromkeys(row["task"] for row in samples):
        rows = [row for row in samples if row["task"] == task]
        out.append(f"<h3>{_esc(task)}: generations</h3>")
        verdicts = Counter(v for row in rows for vs in row.get("verdicts", {}).values() for v in vs)
        if verdicts:
            out.append(_table(["sandbox verdict", "programs"], [[k, n] for k, n in verdicts.most_common()]))
        table = []
        for row in rows[:shown]:
            answers = "; ".join(f"{name}: {value}" for name, value in row["filtered"].items() if isinstance(value, str)
                                and name != "none" and len(value) < 80)  # fmt: skip
            verdict = "; ".join(v for vs in row.get("verdicts", {}).values() for v in vs)
            table.append([row["doc_id"], "…" + row["context"][-160:], row["generations"][0][:300],
                          verdict or answers or "", json.dumps(row["metrics"])])  # fmt: skip
        out.append(_table(["item", "prompt (end)", "generation", "scored", "metrics"], table, pre=True))
    return out


def _reproduce(lineage: dict[str, str]) -> list[str]:
    return [
        "<h2>Reproduce</h2>",
        "<pre>pip install clearlm\nclearlm run recipe.toml\nclearlm verify .</pre>",
        "<p>Artifact digests:</p>",
        _table(["stage", "digest"], [[k, v] for k, v in lineage.items()]),
        "</body></html>",
    ]


def technical_report(
    ctx: dict[str, Any],
    logs: dict[str, list[dict[str, Any]]],
    openness: dict[str, Any],
    generations: list[dict[str, Any]],
    answered: Sequence[dict[str, Any]] = (),
) -> str:
    """The page: summary, data, model, training and post-training curves, evaluation (with the generative tasks'
    items, `answered`: their rows of the evaluation's samples), openness, samples, reproduction. `logs` holds the
    per-step log of each training stage, by stage name."""
    own = [part for name, metrics in ctx["stages"].items()
           for part in describe(name, "report", ctx["recipe"], metrics, logs.get(name))]  # fmt: skip
    sections = [
        _summary(ctx, openness), _data(ctx["data"]), _model(ctx), _training(ctx, logs), own,
        _post_training(ctx, logs),
        _evaluation(ctx["eval"]), _answered(list(answered)), _openness(openness),
        _generations(generations, (ctx.get("memorization") or {}).get("traced_generations")),
        memorization_section(ctx["memorization"]) if ctx.get("memorization") else [], _reproduce(ctx["lineage"]),
    ]  # fmt: skip
    return "\n".join(part for section in sections for part in section if part)
