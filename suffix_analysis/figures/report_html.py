"""``report.html``: a run's results as one self-contained page to explore, from its tables alone.

Four views, each drawn in the browser from the data embedded in the page (no network, no
server, no plotting library: plain SVG and a little JavaScript):

* **suffix tokens**: the adversarial suffix token by token, coloured by its effect on the
  direction's projection (``attribution/suffix_tokens``); hovering a token shows its effects
  and the attention the top heads pay it from the last EOI position
  (``attribution/suffix_attention``);
* **heads**: a layer x head heatmap of direct attribution onto the direction at the last EOI
  position (``attribution/heads``), per condition, the value on hover;
* **cosine**: cosine with the direction by layer at the last EOI position, per condition
  (``attribution/cosine``);
* **rates**: refused / complied / derailed per condition (``evaluation/evaluation``,
  ``transfer/transfer``), the example completions behind a bar on hover or click.

A stage that is missing is named at the top and its view says so; the rest still shows. The
run's PNG figures follow, embedded.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import pandas as pd

from ..tables import atomic_path
from .run_tables import Tables

log = logging.getLogger(__name__)

# Which stage each view needs, for the note that names what is missing.
VIEW_STAGES = {"tokens": "attribution", "heads": "attribution", "cosine": "attribution", "rates": "evaluation"}
EXAMPLES = 3  # completions shown behind each bar


def _mean_by(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    return df.groupby(keys, sort=True)[cols].mean().reset_index()


def _tokens(t: Tables) -> dict | None:
    eff = t.table("attribution", "suffix_tokens")
    if eff is None or eff.empty:
        return None
    cols = ["effect_replace", "effect_block", "grad_x_input"]
    means = _mean_by(eff, ["suffix_index"], cols)
    text = eff.groupby("suffix_index")["token"].first()
    att = t.table("attribution", "suffix_attention")
    heads, attention = [], {}
    if att is not None and not att.empty:
        a = _mean_by(att, ["suffix_index", "layer", "head"], ["attention"])
        heads = [f"L{l}H{h}" for l, h in a[["layer", "head"]].drop_duplicates().itertuples(index=False)]
        for r in a.itertuples(index=False):
            attention.setdefault(int(r.suffix_index), {})[f"L{r.layer}H{r.head}"] = float(r.attention)
    rows = [{"index": int(r.suffix_index), "token": str(text[r.suffix_index]),
             **{c: float(getattr(r, c)) for c in cols}, "attention": attention.get(int(r.suffix_index), {})}
            for r in means.itertuples(index=False)]
    return {"tokens": rows, "heads": heads, "n_prompts": int(eff["prompt"].nunique()),
            "hook": str(eff["hook"].iloc[0])}


def _heads(t: Tables) -> dict | None:
    df = t.table("attribution", "heads")
    if df is None or df.empty:
        return None
    df = df[(df["component"] == "head") & (df["position"] == df["position"].max())]
    out = {}
    for cond, g in df.groupby("condition", sort=False):
        m = g.groupby(["layer", "head"])["projection"].mean().unstack("head").sort_index()
        out[str(cond)] = [[float(v) for v in row] for row in m.to_numpy()]
    return {"conditions": out, "position": int(df["position"].max()), "hook": "blocks.{layer}.attn.hook_z"}


def _cosine(t: Tables) -> dict | None:
    df = t.table("attribution", "cosine")
    if df is None or df.empty:
        return None
    df = df[(df["site"] == "hook_resid_pre") & (df["position"] == df["position"].max())]
    out = {}
    for cond, g in df.groupby("condition", sort=False):
        m = g.groupby("layer")["cosine"].mean().sort_index()
        out[str(cond)] = [[int(l), float(v)] for l, v in m.items()]
    return {"conditions": out, "position": int(df["position"].max()), "hook": "blocks.{layer}.hook_resid_pre"}


def _examples(t: Tables, rel: str) -> list[dict]:
    rows = t.json(rel) or []
    return [{"instruction": str(r.get("instruction", "")), "completion": str(r.get("completion", "")),
             "refused": bool(r.get("refused", False))} for r in rows[:EXAMPLES]]


def _rates(t: Tables) -> dict | None:
    bars = []
    ev = t.table("evaluation", "evaluation")
    if ev is not None:
        for r in ev.to_dict("records"):
            kind = r.get("intervention", r["condition"])
            bars.append({"label": f"{r['condition']} (harmful)", "refused": r.get("harmful_refusal_rate"),
                         "complied": r.get("harmful_complied_rate"), "derailed": r.get("harmful_derailed_rate"),
                         "examples": _examples(t, f"evaluation/completions_{kind}_harmful.json")})
    tr = t.table("transfer", "transfer")
    if tr is not None:
        for r in tr.to_dict("records"):
            bars.append({"label": f"{r['suffix']} suffix ({r['set']})", "refused": r.get("refused_rate"),
                         "complied": r.get("complied_rate"), "derailed": r.get("derailed_rate"),
                         "examples": _examples(t, f"transfer/completions_{r['suffix']}_{r['set']}.json")})
    if not bars:
        return None
    for b in bars:  # NaN (no compliance judge) -> null
        for k in ("refused", "complied", "derailed"):
            v = b[k]
            b[k] = None if v is None or v != v else float(v)
    return {"bars": bars}


def _figures(folder: Path, budget: int = 3_000_000) -> list[dict]:
    """The PNG figures in ``folder`` as data URIs, while they fit in ``budget`` bytes."""
    out, used = [], 0
    for png in sorted(folder.glob("*.png")):
        data = png.read_bytes()
        if used + len(data) > budget:
            log.info("report.html: %s and later figures left out (the page stays small)", png.name)
            break
        used += len(data)
        out.append({"name": png.stem, "src": "data:image/png;base64," + base64.b64encode(data).decode()})
    return out


def report_data(run: str | Path, figures: str | Path | None = None) -> dict:
    """Everything ``report.html`` shows, from the run's tables: the four views (None where
    their tables are missing), the figures (from ``figures``, default ``RUN/figures``), and
    what is missing."""
    t = Tables(Path(run).expanduser())
    views = {"tokens": _tokens(t), "heads": _heads(t), "cosine": _cosine(t), "rates": _rates(t)}
    missing = sorted({VIEW_STAGES[k] for k, v in views.items() if v is None})
    meta = t.json("run.json") or {}
    pngs = _figures(Path(figures) if figures else t.run / "figures")
    return {"title": f"suffix-analysis: {meta.get('model', t.run.name)}", "footer": t.footer(), "views": views,
            "missing": missing, "figures": pngs, "summary": t.json("summary.json") or {}}


def write_report_html(run: str | Path, out: str | Path | None = None, figures: str | Path | None = None) -> Path:
    """``report.html`` in ``out`` (default: the run folder), written atomically."""
    data = report_data(run, figures)
    page = PAGE.replace("__TITLE__", html.escape(data["title"])).replace(
        "__DATA__", json.dumps(data, allow_nan=False).replace("</", "<\\/"))
    path = Path(out or run).expanduser() / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd}
.note{color:#666;font-size:12.5px}.missing{background:#fff4e5;border:1px solid #f0c36d;padding:8px 12px}
.readout{min-height:3.2em;background:#f6f8fa;border:1px solid #e1e4e8;padding:8px 12px;margin:8px 0;
white-space:pre-wrap;font:12.5px/1.4 ui-monospace,monospace}
.token{display:inline-block;padding:4px 6px;margin:2px;border:1px solid #ccc;border-radius:4px;cursor:default;
font:14px ui-monospace,monospace;white-space:pre}.token:hover,.token.on{outline:2px solid #222}
table.heat{border-collapse:collapse}table.heat td{width:22px;height:16px;padding:0}table.heat th{font-size:11px;
font-weight:normal;color:#555;padding:0 4px}table.heat td:hover{outline:2px solid #222}
button.cond{margin:2px;padding:3px 8px;border:1px solid #aaa;background:#fff;border-radius:3px;cursor:pointer}
button.cond.on{background:#222;color:#fff}svg text{font-size:11px;fill:#444}.bar{cursor:pointer}
.bar:hover{opacity:.75}img.fig{max-width:100%;border:1px solid #eee;margin:8px 0}
</style></head><body>
<h1 id="title"></h1><div class="note" id="footer"></div><div id="missing"></div>
<h2>Suffix tokens</h2><div id="view-tokens" class="view"></div>
<h2>Heads: direct attribution onto the direction</h2><div id="view-heads" class="view"></div>
<h2>Cosine with the direction by layer</h2><div id="view-cosine" class="view"></div>
<h2>Refused, complied, derailed</h2><div id="view-rates" class="view"></div>
<h2>Figures</h2><div id="figures"></div>
<script type="application/json" id="report-data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const f3 = v => (v === null || v === undefined) ? "n/a"
  : (Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(2) : v.toFixed(4));
const pct = v => (v === null || v === undefined) ? "n/a" : (100 * v).toFixed(1) + "%";
function diverging(v, scale) {  // blue (negative) .. white .. red (positive)
  const a = Math.min(1, Math.abs(v) / (scale || 1));
  return v >= 0 ? `rgba(196,78,82,${a})` : `rgba(76,114,176,${a})`;
}
function absent(view, stage) {
  view.appendChild(el("p", {class: "missing"}, `Not in this run: the ${stage} stage's tables are missing.`));
}
document.getElementById("title").textContent = D.title;
document.getElementById("footer").textContent = D.footer;
if (D.missing.length) document.getElementById("missing").appendChild(el("p", {class: "missing", id: "missing-stages"},
  "Missing stages: " + D.missing.join(", ") + ". Their views are empty; run them with suffix-analysis reproduce."));

(function tokens() {
  const view = document.getElementById("view-tokens"), T = D.views.tokens;
  if (!T) return absent(view, "attribution");
  view.appendChild(el("p", {class: "note"}, "Colour: effect of blocking the token on the direction's projection at " +
    `${T.hook} (mean over ${T.n_prompts} prompts; red raises it, blue lowers it). Hover a token.`));
  const row = el("div", {id: "tokens"}), readout = el("div", {class: "readout", id: "token-readout"}, "hover a token");
  const scale = Math.max(1e-9, ...T.tokens.map(t => Math.abs(t.effect_block)));
  for (const t of T.tokens) {
    const s = el("span", {class: "token", "data-index": t.index}, t.token);
    s.style.background = diverging(t.effect_block, scale);
    s.addEventListener("mouseenter", () => {
      document.querySelectorAll(".token.on").forEach(x => x.classList.remove("on"));
      s.classList.add("on");
      let txt = `token ${t.index}: ${JSON.stringify(t.token)}\neffect_block ${f3(t.effect_block)}` +
        `  effect_replace ${f3(t.effect_replace)}  grad_x_input ${f3(t.grad_x_input)}`;
      if (T.heads.length) txt += "\nattention from the last EOI position: " +
        T.heads.map(h => `${h} ${f3(t.attention[h])}`).join("  ");
      readout.textContent = txt;
    });
    row.appendChild(s);
  }
  view.append(row, readout);
})();

(function heads() {
  const view = document.getElementById("view-heads"), H = D.views.heads;
  if (!H) return absent(view, "attribution");
  const names = Object.keys(H.conditions);
  view.appendChild(el("p", {class: "note"}, `Mean projection of each head's write (${H.hook}) on the direction at EOI ` +
    `position ${H.position}. Rows: layers; columns: heads. Hover a cell.`));
  const bar = el("div"), box = el("div"), readout = el("div", {class: "readout", id: "heads-readout"}, "hover a cell");
  function draw(name) {
    bar.querySelectorAll("button").forEach(b => b.classList.toggle("on", b.dataset.condition === name));
    box.replaceChildren();
    const m = H.conditions[name], scale = Math.max(1e-9, ...m.flat().map(Math.abs));
    const tab = el("table", {class: "heat", id: "heads-heatmap"}), head = el("tr");
    head.appendChild(el("th", {}, "L\\H"));
    m[0].forEach((_, h) => head.appendChild(el("th", {}, h)));
    tab.appendChild(head);
    m.forEach((row, l) => {
      const tr = el("tr");
      tr.appendChild(el("th", {}, l));
      row.forEach((v, h) => {
        const td = el("td", {class: "cell", "data-layer": l, "data-head": h, "data-value": v});
        td.style.background = diverging(v, scale);
        td.addEventListener("mouseenter", () => { readout.textContent = `${name}: layer ${l}, head ${h}: ${f3(v)}`; });
        tr.appendChild(td);
      });
      tab.appendChild(tr);
    });
    box.appendChild(tab);
  }
  for (const n of names) {
    const b = el("button", {class: "cond", "data-condition": n}, n);
    b.addEventListener("click", () => draw(n));
    bar.appendChild(b);
  }
  view.append(bar, box, readout);
  draw(names.includes("adversarial") ? "adversarial" : names[0]);
})();

(function cosine() {
  const view = document.getElementById("view-cosine"), C = D.views.cosine;
  if (!C) return absent(view, "attribution");
  view.appendChild(el("p", {class: "note"}, `Mean cosine of ${C.hook} with the direction at EOI position ${C.position}. ` +
    "Hover a point."));
  const W = 760, Hh = 300, P = 40, series = Object.entries(C.conditions);
  const xs = series.flatMap(([, s]) => s.map(p => p[0])), ys = series.flatMap(([, s]) => s.map(p => p[1]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(0, ...ys), y1 = Math.max(0, ...ys);
  const X = x => P + (W - 2 * P) * (x - x0) / Math.max(1, x1 - x0);
  const Y = y => Hh - P - (Hh - 2 * P) * (y - y0) / Math.max(1e-9, y1 - y0);
  const svg = el("svg:svg", {width: W, height: Hh, id: "cosine-chart"});
  svg.appendChild(el("svg:line", {x1: P, x2: W - P, y1: Y(0), y2: Y(0), stroke: "#bbb"}));
  svg.appendChild(el("svg:text", {x: W / 2, y: Hh - 8}, "layer"));
  svg.appendChild(el("svg:text", {x: 4, y: Y(y1) + 4}, y1.toFixed(2)));
  svg.appendChild(el("svg:text", {x: 4, y: Y(y0) + 4}, y0.toFixed(2)));
  const colors = ["#c44e52", "#8172b3", "#dd8452", "#55a868", "#4c72b0", "#937860", "#da8bc3"];
  const readout = el("div", {class: "readout", id: "cosine-readout"}, "hover a point");
  series.forEach(([name, s], i) => {
    const c = colors[i % colors.length];
    svg.appendChild(el("svg:polyline", {points: s.map(p => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: c,
      "stroke-width": 1.6}));
    for (const [l, v] of s) {
      const dot = el("svg:circle", {class: "point", cx: X(l), cy: Y(v), r: 3.5, fill: c, "data-condition": name,
        "data-layer": l, "data-value": v});
      dot.addEventListener("mouseenter", () => { readout.textContent = `${name}: layer ${l}, cosine ${f3(v)}`; });
      svg.appendChild(dot);
    }
    svg.appendChild(el("svg:text", {x: W - P + 4, y: Y(s[s.length - 1][1]) + 4, fill: c}, name));
  });
  view.append(svg, readout);
})();

(function rates() {
  const view = document.getElementById("view-rates"), R = D.views.rates;
  if (!R) return absent(view, "evaluation");
  view.appendChild(el("p", {class: "note"}, "Share of completions judged refused, complied or derailed (complied and " +
    "derailed need the compliance judge). Hover or click a bar for example completions."));
  const kinds = [["refused", "#4c72b0"], ["complied", "#dd8452"], ["derailed", "#8c8c8c"]];
  const rowH = 22, W = 760, L = 260;
  const svg = el("svg:svg", {width: W, height: R.bars.length * (rowH * 3 + 6) + 20, id: "rates-chart"});
  const readout = el("div", {class: "readout", id: "rates-readout"}, "hover a bar");
  let y = 4;
  R.bars.forEach((b, i) => {
    svg.appendChild(el("svg:text", {x: 0, y: y + 14}, b.label));
    for (const [k, c] of kinds) {
      const v = b[k];
      const r = el("svg:rect", {class: "bar", x: L, y: y, height: rowH - 6, width: Math.max(1, (W - L - 60) * (v || 0)),
        fill: v === null ? "#eee" : c, "data-bar": i, "data-kind": k, "data-value": v === null ? "" : v});
      const show = () => {
        readout.textContent = `${b.label}: ${k} ${pct(v)}\n` + (b.examples.length ? b.examples.map(e =>
          `- ${e.instruction}\n  -> ${JSON.stringify(e.completion.slice(0, 200))}${e.refused ? "  [refused]" : ""}`)
          .join("\n") : "(no completions saved for this bar)");
      };
      r.addEventListener("mouseenter", show);
      r.addEventListener("click", show);
      svg.appendChild(r);
      svg.appendChild(el("svg:text", {x: L + 4 + Math.max(1, (W - L - 60) * (v || 0)), y: y + 12}, `${k} ${pct(v)}`));
      y += rowH;
    }
    y += 6;
  });
  view.append(svg, readout);
})();

(function figures() {
  const box = document.getElementById("figures");
  if (!D.figures.length) box.appendChild(el("p", {class: "note"}, "No figures in this run."));
  for (const f of D.figures) {
    box.appendChild(el("h3", {}, f.name));
    box.appendChild(el("img", {class: "fig", src: f.src, alt: f.name}));
  }
})();
</script></body></html>
"""
