/* distill-detect report: draws the page from the JSON block #report-data.
 * Every string that comes from data is inserted with textContent or as an attribute
 * value through setAttribute/properties; nothing is ever parsed as HTML. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const COLORS = { member: "#0072b2", nonmember: "#d55e00", unlabelled: "#999999" };
  // What the groups are: members / non-members, or in an audit the reference and benchmark questions.
  const GROUP_NAMES = Object.assign({ member: "members", nonmember: "non-members", unlabelled: "unlabelled" }, DATA.group_names || {});
  const LABEL_NAMES = Object.assign({ "1": "member", "0": "non-member", none: "unlabelled" }, DATA.label_names || {});
  const IS_AUDIT = DATA.kind === "audit";
  // Method lines: Okabe-Ito colours, then dashes once they run out. TPD (the paper's method) in black.
  const PALETTE = ["#000000", "#e69f00", "#56b4e9", "#009e73", "#cc79a7", "#0072b2", "#d55e00", "#7f7f7f"];
  const DASHES = ["", "6 3", "2 3", "8 3 2 3"];

  // -- DOM helpers (text only) -----------------------------------------------------------------------
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    if (attrs) for (const k of Object.keys(attrs)) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "title") e.title = attrs[k];
      else e.setAttribute(k, String(attrs[k]));
    }
    for (const c of children || []) if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return e;
  }
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    if (attrs) for (const k of Object.keys(attrs)) e.setAttribute(k, String(attrs[k]));
    if (text != null) e.textContent = text;
    return e;
  }
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const fmt = (v, d) => (isNum(v) ? v.toFixed(d == null ? 3 : d) : "–");
  const pct = (v) => (isNum(v) ? (100 * v).toFixed(1) + "%" : "–");
  function fmtScore(v) {
    if (!isNum(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    let t = v.toPrecision(4);
    if (t.includes(".") && !t.includes("e")) t = t.replace(/0+$/, "").replace(/\.$/, "");
    return t;
  }
  const dirWord = (m) => (m.higher_is_member === true ? "higher = member" : m.higher_is_member === false ? "lower = member" : "direction unknown");

  // -- charts ------------------------------------------------------------------------------------------
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => (hi - lo) / s <= n) || 10 * mag;
    const out = [];
    for (let t = Math.ceil(lo / step - 1e-9) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }
  function tickLabel(t, ax) {
    if (ax.log) return t >= 1 ? String(t) : String(+t.toPrecision(1));
    if (ax.format) return ax.format(t);
    const a = Math.abs(t);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return t.toExponential(0);
    return String(+t.toPrecision(4));
  }
  function makeScale(ax, a, b) {
    if (ax.log) {
      const l0 = Math.log10(ax.min), l1 = Math.log10(ax.max);
      return (v) => a + ((Math.log10(Math.max(v, ax.min)) - l0) / (l1 - l0)) * (b - a);
    }
    return (v) => a + ((v - ax.min) / (ax.max - ax.min)) * (b - a);
  }
  function axisTicks(ax) {
    if (ax.ticks) return ax.ticks;
    if (ax.log) {
      const out = [];
      for (let k = Math.ceil(Math.log10(ax.min) - 1e-9); k <= Math.floor(Math.log10(ax.max) + 1e-9); k++) out.push(Math.pow(10, k));
      return out;
    }
    return niceTicks(ax.min, ax.max, ax.n || 5);
  }
  function axes(opt) {
    const W = opt.width || 440, H = opt.height || 300;
    const m = { l: 52, r: 14, t: 10, b: 42 };
    const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
    if (opt.label) svg.setAttribute("aria-label", opt.label);
    const x0 = m.l, x1 = W - m.r, y0 = H - m.b, y1 = m.t;
    const sx = makeScale(opt.x, x0, x1), sy = makeScale(opt.y, y0, y1);
    for (const t of axisTicks(opt.x)) {
      svg.appendChild(sv("line", { x1: sx(t), x2: sx(t), y1: y0, y2: y1, class: "grid" }));
      svg.appendChild(sv("text", { x: sx(t), y: y0 + 15, "text-anchor": "middle" }, tickLabel(t, opt.x)));
    }
    for (const t of axisTicks(opt.y)) {
      svg.appendChild(sv("line", { x1: x0, x2: x1, y1: sy(t), y2: sy(t), class: "grid" }));
      svg.appendChild(sv("text", { x: x0 - 6, y: sy(t) + 3.5, "text-anchor": "end" }, tickLabel(t, opt.y)));
    }
    svg.appendChild(sv("rect", { x: x0, y: y1, width: x1 - x0, height: y0 - y1, class: "frame" }));
    if (opt.xLabel) svg.appendChild(sv("text", { x: (x0 + x1) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" }, opt.xLabel));
    if (opt.yLabel)
      svg.appendChild(sv("text", { x: 13, y: (y0 + y1) / 2, "text-anchor": "middle", class: "axis-label", transform: `rotate(-90 13 ${(y0 + y1) / 2})` }, opt.yLabel));
    const plot = sv("g");
    svg.appendChild(plot);
    return { svg, sx, sy, plot, x0, x1, y0, y1 };
  }
  function path(points, sx, sy) {
    return points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(2) + " " + sy(p[1]).toFixed(2)).join("");
  }
  function legendItem(label, color, dash, width, box) {
    const s = sv("svg", { viewBox: "0 0 26 10" });
    if (box) s.appendChild(sv("rect", { x: 6, y: 0, width: 14, height: 10, rx: 2, fill: color }));
    else s.appendChild(sv("line", { x1: 1, x2: 25, y1: 5, y2: 5, stroke: color, "stroke-width": width || 2, "stroke-dasharray": dash || "" }));
    return el("span", null, [s, el("span", { text: label })]);
  }
  function chartBox(title, dir, svg) {
    const h = el("h3", null, [title]);
    if (dir) h.appendChild(el("span", { class: "dir", text: " (" + dir + ")" }));
    return el("div", { class: "chartbox" }, [h, svg]);
  }
  function section(id, title, lead) {
    const s = el("section", { class: "card", id: id }, [el("h2", { text: title })]);
    if (lead) s.appendChild(el("p", { class: "lead", text: lead }));
    return s;
  }

  // -- page --------------------------------------------------------------------------------------------
  const app = document.getElementById("app");
  const meta = DATA.meta || {};
  const methods = DATA.methods || [];
  const questions = DATA.questions || [];
  const methodStyle = {};
  {
    const order = methods.map((m) => m.name).sort((a, b) => (a === "tpd" ? -1 : b === "tpd" ? 1 : 0));
    order.forEach((name, i) => {
      methodStyle[name] = { color: PALETTE[i % PALETTE.length], dash: DASHES[Math.floor(i / PALETTE.length) % DASHES.length], width: name === "tpd" ? 2.6 : 1.6 };
    });
  }
  const byAuc = methods.slice().sort((a, b) => ((b.metrics && b.metrics.auc) || -1) - ((a.metrics && a.metrics.auc) || -1));
  const headline = methods.find((m) => m.name === "tpd" && m.metrics) || byAuc.find((m) => m.metrics) || null;

  app.appendChild(
    el("header", { class: "top" }, [el("h1", { text: "distill-detect report" }), el("div", { class: "sub", text: "distillation-data detection from a model's own greedy tokens" })])
  );
  const metaBits = [];
  if (meta.model) metaBits.push("model: " + meta.model);
  if (meta.members) metaBits.push("members: " + meta.members);
  if (meta.nonmembers) metaBits.push("non-members: " + meta.nonmembers);
  if (meta.max_new_tokens) metaBits.push("max new tokens: " + meta.max_new_tokens);
  if (meta.created) metaBits.push("scored " + meta.created);
  if (meta.package_version) metaBits.push("distill-detect " + meta.package_version);
  app.appendChild(el("div", { class: "meta" }, metaBits.map((b) => el("span", { text: b }))));

  const toc = el("nav", { class: "toc" });
  app.appendChild(toc);
  function addToc(id, label) {
    toc.appendChild(el("a", { href: "#" + id, text: label }));
  }

  // Headline numbers (chosen and worded in Python: build._cards). A TPR set by few non-members carries a warning.
  const stats = el("div", { class: "stats", id: "cards" });
  for (const c of DATA.cards || []) {
    stats.appendChild(
      el("div", { class: "stat" }, [
        el("div", { class: "k", text: c.k }),
        el("div", { class: "v" }, [String(c.v), c.warn ? el("span", { class: "mark", text: "†", title: c.warn }) : null]),
        c.s ? el("div", { class: "s", text: c.s }) : null,
        c.warn ? el("div", { class: "s warn", text: "† " + c.warn }) : null,
      ])
    );
  }
  app.appendChild(stats);

  // -- audit (DIR/audit.json from 'distill-detect audit') ----------------------------------------------
  const AU = DATA.audit;
  if (AU) {
    addToc("audit", "Audit");
    const s = section(
      "audit",
      "Audit: is this benchmark contaminated?",
      "Benchmark questions (labels unknown) against reference questions known not to be in the distillation data. Per question: a conformal p-value of “unseen”; flags by Benjamini–Hochberg at the chosen false-discovery rate. Whole benchmark: a one-sided Mann–Whitney test and Storey's estimate of the contaminated share."
    );
    s.appendChild(el("p", { class: "audit-verdict" + (AU.contaminated ? " yes" : ""), id: "audit-verdict", text: AU.verdict || "" }));
    const cards = el("div", { class: "stats" });
    function card(k, v, sub) {
      cards.appendChild(el("div", { class: "stat" }, [el("div", { class: "k", text: k }), el("div", { class: "v", text: v }), sub ? el("div", { class: "s", text: sub }) : null]));
    }
    const D = AU.dataset_test || {}, F = AU.fraction || {};
    const pv = (p) => (!isNum(p) ? "–" : p >= 0.001 ? String(+p.toPrecision(2)) : p.toExponential(0));
    card("dataset test p", pv(D.pvalue), "one-sided Mann–Whitney; contaminated iff p < " + AU.alpha);
    card("AUC bench vs reference", fmt(D.auc), "0.5 = indistinguishable");
    const ci = F.ci && isNum(F.ci[0]) ? (100 * (F.confidence || 0.95)).toFixed(0) + "% CI " + (100 * F.ci[0]).toFixed(0) + "–" + (100 * F.ci[1]).toFixed(0) + "%" : "";
    card("contaminated share", isNum(F.estimate) ? (100 * F.estimate).toFixed(0) + "%" : "–", (ci ? ci + "; " : "") + "a lower bound");
    card("flagged questions", String(AU.n_flagged) + " of " + AU.n_bench, "at FDR " + +(100 * AU.fdr).toFixed(2) + "%; none or ≥ " + AU.min_flaggable);
    const ref = AU.reference || {};
    s.appendChild(cards);
    const bits = [];
    if (AU.method) bits.push("method: " + AU.method + " (" + Object.keys(AU.params || {}).map((k) => k + "=" + AU.params[k]).join(", ") + ")");
    if (AU.benchmark && AU.benchmark.source) bits.push("benchmark: " + AU.benchmark.source);
    if (ref.source) bits.push("reference: " + ref.source);
    s.appendChild(el("div", { class: "meta" }, bits.map((b) => el("span", { text: b }))));
    for (const n of AU.notes || []) s.appendChild(el("p", { class: "note", text: "• " + n }));

    const byId = {};
    for (const q of questions) byId[q.id] = q;
    const rows = AU.questions || [];
    const head = el("tr", null, ["rank", "id", "flagged", "p-value", "BH q-value", "score (" + AU.method + ")", "question"].map((t, i) => el("th", { class: i >= 3 && i <= 5 ? "num" : i === 0 ? "num" : "", text: t })));
    const body = el("tbody");
    const SHOW = 500;
    rows.slice(0, SHOW).forEach((r, i) => {
      const q = byId[r.id];
      body.appendChild(
        el("tr", { class: r.flagged ? "flagged" : "" }, [
          el("td", { class: "num", text: String(i + 1) }),
          el("td", { class: "id", text: r.id, title: r.id }),
          el("td", null, [r.flagged ? el("span", { class: "badge flag", text: "flagged" }) : el("span", { class: "badge noflag", text: "–" })]),
          el("td", { class: "num", text: pv(r.pvalue) }),
          el("td", { class: "num", text: pv(r.qvalue) }),
          el("td", { class: "num", text: fmtScore(r.raw_score != null ? r.raw_score : r.score) }),
          el("td", { class: "qtext-cell", text: q && q.text ? q.text.replace(/\s+/g, " ") : "–", title: (q && q.text) || "" }),
        ])
      );
    });
    s.appendChild(el("div", { class: "tablewrap audit-table" }, [el("table", { class: "questions audit", id: "audit-table" }, [el("thead", null, [head]), body])]));
    s.appendChild(
      el("p", {
        class: "note",
        text:
          "Benchmark questions, most member-like first" + (rows.length > SHOW ? " (first " + SHOW + " of " + rows.length + "; all in audit_questions.csv)" : "") +
          ". The p-value is (1 + reference questions scoring at least as member-like) / (reference size + 1), so the smallest possible value is " + pv(AU.min_pvalue) +
          ". Scores in the method's own sign. The question table below holds both the benchmark and the reference questions.",
      })
    );
    app.appendChild(s);
  }

  // -- metrics table -------------------------------------------------------------------------------------
  // An audit has no known members, so no AUC or TPR per method: its section above compares benchmark and reference.
  if (!IS_AUDIT || methods.some((m) => m.metrics)) {
    addToc("metrics", "Metrics");
    const s = section("metrics", "Metrics", "Every method scored on the same generations. AUC with a 95% bootstrap interval (members and non-members resampled separately). Best AUC highlighted.");
    if (!DATA.has_labels) s.appendChild(el("p", { class: "empty", text: "No labels (members and non-members are both needed), so no AUC or TPR. Scores are in the question table below." }));
    const head = el("tr", null, [
      el("th", { text: "method" }),
      el("th", { class: "num", text: "AUC" }),
      el("th", { class: "num", text: "95% CI" }),
      el("th", { class: "num", text: "TPR@1%FPR (strict)" }),
      el("th", { class: "num", text: "TPR@1%FPR (paper's reading)" }),
      el("th", { class: "num", text: "TPR@5%FPR" }),
      el("th", { class: "num", text: "members" }),
      el("th", { class: "num", text: "non-members" }),
      el("th", { text: "parameters" }),
    ]);
    const body = el("tbody");
    const best = byAuc.find((m) => m.metrics && isNum(m.metrics.auc));
    const caveats = [];
    function tprCell(m, v, level) {
      const why = m.metrics && isNum(v) && m.tpr_caveat ? m.tpr_caveat[level] : null;
      if (why && !caveats.includes(why)) caveats.push(why);
      return el("td", { class: "num" }, [pct(v), why ? el("span", { class: "mark", text: "†", title: why }) : null]);
    }
    for (const m of byAuc) {
      const mm = m.metrics || {};
      const ci = mm.auc_ci && isNum(mm.auc_ci[0]) ? fmt(mm.auc_ci[0]) + " – " + fmt(mm.auc_ci[1]) : "–";
      const params = Object.keys(m.params || {}).map((k) => k + "=" + m.params[k]).join(", ");
      const nameCell = el("td", { title: m.summary || "" }, [m.name, el("div", { class: "dir", text: dirWord(m) })]);
      body.appendChild(
        el("tr", { class: best === m ? "best" : "" }, [
          nameCell,
          el("td", { class: "num", text: fmt(mm.auc) }),
          el("td", { class: "num", text: ci }),
          tprCell(m, mm.tpr_at_1pct_fpr_strict, "0.01"),
          tprCell(m, mm.tpr_at_1pct_fpr, "0.01"),
          tprCell(m, mm.tpr_at_5pct_fpr, "0.05"),
          el("td", { class: "num", text: mm.n_members != null ? String(mm.n_members) : "–" }),
          el("td", { class: "num", text: mm.n_nonmembers != null ? String(mm.n_nonmembers) : "–" }),
          el("td", { class: "params", text: params }),
        ])
      );
    }
    s.appendChild(el("div", { class: "tablewrap" }, [el("table", { class: "metrics" }, [el("thead", null, [head]), body])]));
    for (const why of caveats) s.appendChild(el("p", { class: "note warn", text: "† " + why + "." }));
    s.appendChild(
      el("p", {
        class: "note",
        text:
          "TPR@1%FPR (strict): the largest TPR among ROC points with FPR ≤ 1%. TPR@1%FPR (paper's reading): the TPR at the first point of sklearn's roc_curve (drop_intermediate=True) with FPR ≥ 1%, as the authors' code reads it; with few non-members that point can sit well above 1% FPR. TPR@5%FPR: strict reading.",
      })
    );
    app.appendChild(s);
  }

  // -- ROC -----------------------------------------------------------------------------------------------
  const rocMethods = methods.filter((m) => m.roc);
  if (rocMethods.length) {
    addToc("roc", "ROC");
    const s = section("roc", "ROC curves", "Members are positives. Left: linear axes; right: log-log, which shows the low-FPR region where an audit operates. Rates of 0 are drawn on the log axes' lower edge.");
    const n = Math.max(meta.n_members || 1, meta.n_nonmembers || 1);
    const lo = Math.min(0.01, Math.pow(10, Math.floor(Math.log10(0.5 / n))));
    const charts = el("div", { class: "charts" });
    for (const log of [false, true]) {
      const ax = log ? { min: lo, max: 1, log: true } : { min: 0, max: 1 };
      const c = axes({ x: ax, y: ax, xLabel: "false-positive rate (non-members flagged)", yLabel: "true-positive rate", label: log ? "ROC curves, log-log" : "ROC curves" });
      const diag = log ? [[lo, lo], [1, 1]] : [[0, 0], [1, 1]];
      c.plot.appendChild(sv("path", { d: path(diag, c.sx, c.sy), stroke: "#b8bec8", "stroke-dasharray": "3 3", fill: "none" }));
      for (const f of [0.01, 0.05]) {
        if (log || f === 0.05) {
          c.plot.appendChild(sv("line", { x1: c.sx(f), x2: c.sx(f), y1: c.y0, y2: c.y1, stroke: "#c8b8e8", "stroke-width": 1 }));
          c.plot.appendChild(sv("text", { x: c.sx(f) + 3, y: c.y1 + 11 }, f * 100 + "% FPR"));
        }
      }
      for (const m of rocMethods.slice().reverse()) {
        const st = methodStyle[m.name];
        const pts = m.roc.fpr.map((f, i) => [f, m.roc.tpr[i]]);
        c.plot.appendChild(sv("path", { d: path(pts, c.sx, c.sy), stroke: st.color, "stroke-width": st.width, "stroke-dasharray": st.dash, fill: "none", "stroke-linejoin": "round" }));
      }
      charts.appendChild(chartBox(log ? "log-log" : "linear", null, c.svg));
    }
    s.appendChild(charts);
    const lg = el("div", { class: "legend" });
    for (const m of byAuc.filter((m) => m.roc)) {
      const st = methodStyle[m.name];
      lg.appendChild(legendItem(m.name + " (AUC " + fmt(m.metrics && m.metrics.auc) + ")", st.color, st.dash, st.width));
    }
    s.appendChild(lg);
    app.appendChild(s);
  }

  // -- score histograms -----------------------------------------------------------------------------------
  function groupedBars(c, edges, series) {
    // series: [{counts, color}] drawn side by side inside each bin.
    const k = series.length;
    for (let b = 0; b < edges.length - 1; b++) {
      const xa = c.sx(edges[b]), xb = c.sx(edges[b + 1]);
      const pad = Math.min(1.5, (xb - xa) * 0.12), w = (xb - xa - 2 * pad) / k;
      series.forEach((se, j) => {
        const v = se.values[b];
        if (!(v > 0) || (se.floor != null && v < se.floor)) return;
        const y = c.sy(v), base = c.sy(se.floor != null ? se.floor : 0);
        c.plot.appendChild(sv("rect", { x: xa + pad + j * w, y: y, width: Math.max(w - 0.5, 0.5), height: Math.max(base - y, 0.5), fill: se.color }));
      });
    }
  }
  if (methods.length) {
    addToc("scores", "Scores");
    const s = section("scores", "Score distributions", IS_AUDIT
        ? "Each method's raw score, in its own sign (TPD as in the paper), benchmark questions against reference questions (known unseen). Benchmark scores shifted towards the member side of the reference suggest contamination."
        : "Each method's raw score, in its own sign (TPD as in the paper), members against non-members. Well-separated colours mean an easy split.");
    const chips = el("div", { class: "legend" });
    for (const g of ["member", "nonmember", "unlabelled"]) if (methods.some((m) => m.hist && m.hist.counts[g])) chips.appendChild(legendItem(GROUP_NAMES[g], COLORS[g], null, null, true));
    s.appendChild(chips);
    const grid = el("div", { class: "hists" });
    for (const m of methods) {
      const h = m.hist;
      if (!h) continue;
      const groups = Object.keys(h.counts);
      const ymax = Math.max(1, ...groups.flatMap((g) => h.counts[g]));
      const e = h.edges;
      const c = axes({ width: 310, height: 200, x: { min: e[0], max: e[e.length - 1], n: 4 }, y: { min: 0, max: ymax, n: Math.min(ymax, 4) }, xLabel: m.name + " score", yLabel: "questions" });
      groupedBars(c, e, groups.map((g) => ({ values: h.counts[g], color: COLORS[g] })));
      grid.appendChild(chartBox(m.name, dirWord(m), c.svg));
    }
    s.appendChild(grid);
    app.appendChild(s);
  }

  // -- the paper's figure: token probabilities ----------------------------------------------------------------
  const TH = DATA.token_hist;
  const TOK = DATA.tokens || {};
  if (TH) {
    addToc("tokprobs", "Token probabilities");
    const s = section(
      "tokprobs",
      "Generated-token probabilities",
      "The paper's motivating figure: the probability of each greedily generated token (the first M = " + TOK.M + " per question, as TPD reads them; longest generation here: " + (TH.longest || "?") + " tokens), " + (IS_AUDIT ? "benchmark questions against reference questions (known unseen)" : "members against non-members") + ". A model distilled on a question answers it with near-certain tokens; unseen questions give more low-probability tokens. The y axis is logarithmic."
    );
    const groups = Object.keys(TH.fractions);
    const all = groups.flatMap((g) => TH.fractions[g]).filter((v) => v > 0);
    const ymin = Math.pow(10, Math.floor(Math.log10(Math.min(...all, 1))));
    const c = axes({ width: 760, height: 300, x: { min: 0, max: 1, ticks: [0, 0.2, 0.4, 0.6, 0.8, 1] }, y: { min: ymin, max: 1, log: true }, xLabel: "probability of the generated token", yLabel: "share of tokens", label: "token probability distribution" });
    groupedBars(c, TH.edges, groups.map((g) => ({ values: TH.fractions[g], color: COLORS[g], floor: ymin })));
    s.appendChild(c.svg);
    const lg = el("div", { class: "legend" });
    for (const g of groups) {
      const low = TH.edges.slice(0, -1).reduce((acc, e0, i) => acc + (e0 < 0.9 - 1e-9 ? TH.fractions[g][i] : 0), 0);
      lg.appendChild(legendItem(GROUP_NAMES[g] + ": " + TH.tokens[g] + " tokens from " + TH.questions[g] + " questions, " + pct(low) + " with p < 0.9", COLORS[g], null, null, true));
    }
    s.appendChild(lg);
    app.appendChild(s);
  }

  // -- ablations -------------------------------------------------------------------------------------------------
  const AB = DATA.ablations;
  if (AB && AB.sweeps) {
    addToc("ablations", "TPD ablations");
    const s = section(
      "ablations",
      "TPD ablations",
      "One hyperparameter varied at a time, the others at their defaults (" +
        Object.keys(AB.defaults || {}).map((k) => k + " = " + AB.defaults[k]).join(", ") +
        "). Shaded: 95% bootstrap interval of the AUC. " + (AB.n_members || 0) + " members, " + (AB.n_nonmembers || 0) + " non-members."
    );
    const charts = el("div", { class: "charts" });
    const lines = [
      { key: "auc", label: "AUC", color: "#000000", dash: "" },
      { key: "tpr_at_5pct_fpr", label: "TPR@5%FPR", color: "#009e73", dash: "6 3" },
      { key: "tpr_at_1pct_fpr_strict", label: "TPR@1%FPR (strict)", color: "#cc79a7", dash: "2 3" },
    ];
    const titles = { max_tokens: "token budget M", tau: "threshold τ", alpha: "exponent α" };
    for (const name of Object.keys(AB.sweeps)) {
      const pts = AB.sweeps[name];
      if (!pts || !pts.length) continue;
      const xs = pts.map((p) => p.value);
      const log = name === "max_tokens" && Math.min(...xs) > 0;
      const xmin = Math.min(...xs), xmax = Math.max(...xs);
      const ax = log ? { min: xmin, max: xmax, log: true, ticks: xs } : { min: xmin, max: xmax === xmin ? xmin + 1 : xmax, n: 5 };
      const c = axes({ width: 380, height: 250, x: ax, y: { min: 0, max: 1, n: 5 }, xLabel: titles[name] || name, yLabel: "" });
      const band = pts.filter((p) => p.auc_ci && isNum(p.auc_ci[0]));
      if (band.length > 1) {
        const up = band.map((p) => [p.value, p.auc_ci[1]]), dn = band.map((p) => [p.value, p.auc_ci[0]]).reverse();
        c.plot.appendChild(sv("path", { d: path(up.concat(dn), c.sx, c.sy) + "Z", fill: "#00000014", stroke: "none" }));
      }
      const dv = (AB.defaults || {})[name];
      if (isNum(dv)) c.plot.appendChild(sv("line", { x1: c.sx(dv), x2: c.sx(dv), y1: c.y0, y2: c.y1, stroke: "#c8b8e8", "stroke-width": 1.5 }));
      for (const L of lines) {
        const P = pts.filter((p) => isNum(p[L.key])).map((p) => [p.value, p[L.key]]);
        if (!P.length) continue;
        c.plot.appendChild(sv("path", { d: path(P, c.sx, c.sy), stroke: L.color, "stroke-width": 1.8, "stroke-dasharray": L.dash, fill: "none" }));
        for (const q of P) c.plot.appendChild(sv("circle", { cx: c.sx(q[0]), cy: c.sy(q[1]), r: 2.6, fill: L.color }));
      }
      const beyond = pts.filter((p) => p.beyond_longest);
      const t = titles[name] || name;
      const box = chartBox(t, null, c.svg);
      if (beyond.length) box.appendChild(el("div", { class: "note", text: "M ≥ " + beyond[0].value + " reads every stored token (longest generation: " + AB.longest_trace + "), so those points repeat." }));
      charts.appendChild(box);
    }
    s.appendChild(charts);
    for (const why of [AB.tpr_caveat && AB.tpr_caveat["0.01"], AB.tpr_caveat && AB.tpr_caveat["0.05"]]) if (why) s.appendChild(el("p", { class: "note warn", text: "TPR curves " + why + "." }));
    const lg = el("div", { class: "legend" });
    for (const L of lines) lg.appendChild(legendItem(L.label, L.color, L.dash, 1.8));
    lg.appendChild(legendItem("default value", "#c8b8e8", "", 1.5));
    s.appendChild(lg);
    app.appendChild(s);
  }

  // -- per-question table -------------------------------------------------------------------------------------------
  addToc("questions", "Questions");
  const QS = section(
    "questions",
    "Questions",
    "One row per question; click a row to open the question and its first M = " + (TOK.M || "?") + " generated tokens, coloured by probability (hover a token for its text, probability and whether it entered TPD: p < τ = " + TOK.tau + "). Click a column header to sort. " +
      (AU
        ? "The verdict column shows the audit's flags (Benjamini–Hochberg at FDR " + +(100 * AU.fdr).toFixed(2) + "% over the benchmark questions; reference questions are not tested). Choose a method instead to flag the questions whose score passes the threshold at which at most the chosen share of reference questions is flagged (one threshold, no correction for testing many questions)."
        : "The verdict flags a question as a member when its score passes the threshold at which at most the chosen share of non-members is flagged.")
  );
  app.appendChild(QS);

  const verdictMethods = methods.filter((m) => m.verdicts && Object.keys(m.verdicts).length);
  // In an audit, the default verdict is the audit's own flag (BH at the FDR); reference rows are not tested.
  const auditFlag = AU ? (() => {
    const f = {};
    for (const r of AU.questions || []) f[r.id] = r.flagged ? 1 : 0;
    return questions.map((q) => (Object.prototype.hasOwnProperty.call(f, q.id) ? f[q.id] : null));
  })() : null;
  const state = {
    sortKey: "index",
    sortDir: 1,
    label: "all",
    verdict: "all",
    search: "",
    vmethod: AU ? "audit" : (verdictMethods.find((m) => m.name === "tpd") || verdictMethods[0] || {}).name || null,
    level: String(DATA.levels && DATA.levels.length ? DATA.levels[0] : 0.01),
    open: new Set(),
  };
  const controls = el("div", { class: "controls" });
  function select(label, options, value, onchange, id) {
    const sel = el("select", { id: id });
    for (const [v, t] of options) {
      const o = el("option", { value: v, text: t });
      if (v === value) o.selected = true;
      sel.appendChild(o);
    }
    sel.addEventListener("change", () => onchange(sel.value));
    controls.appendChild(el("label", null, [label, sel]));
    return sel;
  }
  let levelSel = null;
  if (verdictMethods.length || AU) {
    const vopts = (AU ? [["audit", "audit (BH, FDR " + +(100 * AU.fdr).toFixed(2) + "%)"]] : []).concat(verdictMethods.map((m) => [m.name, m.name]));
    select("verdict by", vopts, state.vmethod, (v) => { state.vmethod = v; render(); }, "vmethod");
    if (verdictMethods.length) levelSel = select("at FPR ≤", (DATA.levels || [0.01, 0.05]).map((l) => [String(l), +(100 * l).toFixed(2) + "%"]), state.level, (v) => { state.level = v; render(); }, "level");
  }
  const labelOpts = [["all", "all"]];
  if (!IS_AUDIT || questions.some((q) => q.label === 1)) labelOpts.push(["1", GROUP_NAMES.member]);
  labelOpts.push(["0", GROUP_NAMES.nonmember]);
  if (questions.some((q) => q.label == null)) labelOpts.push(["none", GROUP_NAMES.unlabelled]);
  select(IS_AUDIT ? "set" : "label", labelOpts, "all", (v) => { state.label = v; render(); }, "flabel");
  select("verdict", [["all", "all"], ["flag", IS_AUDIT ? "flagged" : "flagged as member"], ["noflag", "not flagged"]], "all", (v) => { state.verdict = v; render(); }, "fverdict");
  const search = el("input", { type: "search", placeholder: "search question or id", id: "fsearch" });
  search.addEventListener("input", () => { state.search = search.value.toLowerCase(); render(); });
  controls.appendChild(el("label", null, ["text", search]));
  const openAll = el("button", { type: "button", id: "open-all", text: "open shown (first 100)", title: "Open the first 100 rows shown" });
  const closeAll = el("button", { type: "button", id: "close-all", text: "close all" });
  controls.appendChild(openAll);
  controls.appendChild(closeAll);
  QS.appendChild(controls);
  const status = el("div", { class: "status", id: "status" });
  QS.appendChild(status);

  // Columns: the verdict right after the id, so it stays in view however many methods follow.
  // Each column draws its own cell, so header and cells cannot drift apart.
  const cols = [
    { key: "index", label: "#", num: true, value: (i) => i, cell: (i) => el("td", { class: "num", text: String(i + 1) }) },
    { key: "id", label: "id", value: (i) => questions[i].id, cell: (i) => el("td", { class: "id", text: questions[i].id, title: questions[i].id }) },
    { key: "verdict", label: "verdict", value: (i) => verdictOf(i), cell: (i) => el("td", { class: "verdict" }, [verdictBadge(i)]) },
    { key: "label", label: IS_AUDIT ? "set" : "label", value: (i) => (questions[i].label == null ? -1 : questions[i].label), cell: (i) => el("td", null, [labelBadge(questions[i].label)]) },
    {
      key: "text",
      label: "question",
      value: (i) => (questions[i].text || "").toLowerCase(),
      cell: (i) => { const q = questions[i]; return el("td", { class: "qtext-cell", text: q.text == null ? "–" : q.text.replace(/\s+/g, " "), title: q.text || "" }); },
    },
    {
      key: "n_tokens",
      label: "tokens",
      num: true,
      value: (i) => (questions[i].n_tokens == null ? -1 : questions[i].n_tokens),
      cell: (i) => el("td", { class: "num", text: questions[i].n_tokens == null ? "–" : String(questions[i].n_tokens) }),
    },
  ];
  for (const m of methods)
    cols.push({
      key: "m:" + m.name,
      label: m.name,
      num: true,
      method: m,
      value: (i) => { const v = questions[i].scores[m.name]; return isNum(v) ? v : Infinity; },
      cell: (i) => el("td", { class: "num", text: fmtScore(questions[i].scores[m.name]) }),
    });

  function currentVerdict() {
    if (state.vmethod === "audit" && auditFlag) return { audit: true, m: null, v: { flag: auditFlag } };
    const m = verdictMethods.find((x) => x.name === state.vmethod);
    return m ? { m: m, v: m.verdicts[state.level] || m.verdicts[Object.keys(m.verdicts)[0]] } : null;
  }
  function verdictOf(i) {
    const cv = currentVerdict();
    if (!cv || !cv.v || cv.v.flag[i] == null) return -1;
    return cv.v.flag[i];
  }

  const table = el("table", { class: "questions", id: "qtable" });
  const thead = el("thead");
  const headRow = el("tr");
  for (const c of cols) {
    const th = el("th", { class: c.num ? "num" : "", "data-key": c.key, title: c.method ? c.method.name + ": " + dirWord(c.method) + ". Click to sort." : "Click to sort." }, [c.label, el("span", { class: "arrow" })]);
    th.addEventListener("click", () => {
      if (state.sortKey === c.key) state.sortDir = -state.sortDir;
      else { state.sortKey = c.key; state.sortDir = 1; }
      render();
    });
    headRow.appendChild(th);
  }
  thead.appendChild(headRow);
  const tbody = el("tbody");
  table.appendChild(thead);
  table.appendChild(tbody);
  QS.appendChild(probabilityScale());
  QS.appendChild(el("div", { class: "tablewrap" }, [table]));

  function labelBadge(l) {
    if (l === 1) return el("span", { class: "badge member", text: LABEL_NAMES["1"] });
    if (l === 0) return el("span", { class: "badge nonmember", text: LABEL_NAMES["0"] });
    return el("span", { class: "badge unlabelled", text: LABEL_NAMES.none });
  }
  function verdictBadge(i) {
    const cv = currentVerdict();
    if (!cv || !cv.v) return el("span", { class: "badge na", text: DATA.has_labels || (meta.n_nonmembers || 0) > 0 ? "n/a" : "no labels" });
    const f = cv.v.flag[i];
    if (f == null) return el("span", { class: "badge na", text: "not tested", title: "Reference questions are the yardstick, not under audit." });
    return f ? el("span", { class: "badge flag", text: IS_AUDIT ? "flagged" : "member" }) : el("span", { class: "badge noflag", text: "not flagged" });
  }
  function probClass(p) {
    return p >= 0.99 ? "p0" : p >= 0.95 ? "p1" : p >= 0.9 ? "p2" : p >= 0.75 ? "p3" : p >= 0.5 ? "p4" : p >= 0.25 ? "p5" : "p6";
  }
  function probabilityScale() {
    const d = el("div", { class: "scale" }, [el("span", { text: "token probability: " })]);
    for (const [c, t] of [["p0", "≥ .99"], ["p1", ".95–.99"], ["p2", ".9–.95"], ["p3", ".75–.9"], ["p4", ".5–.75"], ["p5", ".25–.5"], ["p6", "< .25"]]) d.appendChild(el("span", { class: "sw " + c, text: t }));
    d.appendChild(el("span", { text: "· struck-through grey: not counted by TPD (p ≥ τ)" }));
    return d;
  }
  function visible(s) {
    if (s === "") return "∅";
    return s.replace(/\t/g, "→\t").replace(/\n/g, "↵\n");
  }
  function tokenText(row, j) {
    if (row.ids == null) return "·";
    const id = row.ids[j];
    if (TOK.vocab && Object.prototype.hasOwnProperty.call(TOK.vocab, String(id))) return TOK.vocab[String(id)];
    return "#" + id + " ";
  }
  function detail(i) {
    const q = questions[i];
    const row = (TOK.rows || [])[i];
    const td = el("td", { colspan: cols.length });
    const inner = el("div", { class: "detail-inner" });
    td.appendChild(inner);
    const head = el("div", { class: "detail-head" }, [labelBadge(q.label), el("span", { text: "id " + q.id })]);
    for (const m of methods) head.appendChild(el("span", { text: m.name + " " + fmtScore(q.scores[m.name]) }));
    if (q.n_tokens != null) head.appendChild(el("span", { text: q.n_tokens + " tokens generated" + (q.finish ? " (" + q.finish + ")" : "") }));
    const cv = currentVerdict();
    if (cv && cv.v) {
      const how = cv.audit ? "audit, BH at FDR " + +(100 * AU.fdr).toFixed(2) + "%" : cv.m.name + ", FPR ≤ " + +(100 * cv.v.level).toFixed(2) + "%";
      head.appendChild(el("span", null, ["verdict (" + how + "): ", verdictBadge(i)]));
    }
    inner.appendChild(head);
    inner.appendChild(el("div", { class: "detail-q", text: q.text == null ? "(question text not stored)" : q.text }));
    if (row) {
      const box = el("div", { class: "tokens", "data-qid": q.id });
      for (let j = 0; j < row.p.length; j++) {
        const p = row.p[j];
        const inTpd = row.in.charAt(j) === "1";
        const raw = tokenText(row, j);
        const span = el("span", { class: "tok " + probClass(p) + (inTpd ? "" : " out"), text: visible(raw) });
        span.title = JSON.stringify(raw) + (row.ids ? "  (id " + row.ids[j] + ")" : "") + "\np = " + p.toFixed(6) + "\n" + (inTpd ? "entered TPD (p < τ = " + TOK.tau + ")" : "not in TPD (p ≥ τ = " + TOK.tau + ")") + "\ntoken " + (j + 1);
        box.appendChild(span);
      }
      if (!row.p.length) box.appendChild(el("span", { class: "empty", text: "(no tokens generated)" }));
      inner.appendChild(box);
      if (row.more > 0) inner.appendChild(el("div", { class: "more", text: "… " + row.more + " more generated tokens after the first M = " + TOK.M + " (TPD does not read them)." }));
    } else {
      inner.appendChild(el("div", { class: "empty", text: "Tokens unavailable: " + (meta.traces || "no traces") }));
    }
    if (TOK.available && !TOK.vocab) inner.appendChild(el("div", { class: "more", text: "Token ids shown (" + (meta.tokenizer || "no tokenizer") + ")." }));
    return el("tr", { class: "q-detail" }, [td]);
  }

  function shown() {
    const idx = [];
    const cv = currentVerdict();
    for (let i = 0; i < questions.length; i++) {
      const q = questions[i];
      if (state.label === "1" && q.label !== 1) continue;
      if (state.label === "0" && q.label !== 0) continue;
      if (state.label === "none" && q.label != null) continue;
      if (state.verdict !== "all") {
        if (!cv || !cv.v) continue;
        const f = cv.v.flag[i] === 1;
        if ((state.verdict === "flag") !== f) continue;
      }
      if (state.search && !((q.text || "").toLowerCase().includes(state.search) || String(q.id).toLowerCase().includes(state.search))) continue;
      idx.push(i);
    }
    const col = cols.find((c) => c.key === state.sortKey) || cols[0];
    idx.sort((a, b) => {
      const va = col.value(a), vb = col.value(b);
      if (va < vb) return -state.sortDir;
      if (va > vb) return state.sortDir;
      return a - b;
    });
    return idx;
  }

  function render() {
    const idx = shown();
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    for (const i of idx) {
      const tr = el("tr", { class: "q-row" + (state.open.has(i) ? " open" : ""), "data-index": i });
      for (const c of cols) tr.appendChild(c.cell(i));
      tr.addEventListener("click", () => {
        // Only this row's detail changes: no full re-render (fast with many rows open).
        if (state.open.has(i)) {
          state.open.delete(i);
          tr.classList.remove("open");
          const next = tr.nextElementSibling;
          if (next && next.classList.contains("q-detail")) tbody.removeChild(next);
        } else {
          state.open.add(i);
          tr.classList.add("open");
          tbody.insertBefore(detail(i), tr.nextSibling);
        }
      });
      tbody.appendChild(tr);
      if (state.open.has(i)) tbody.appendChild(detail(i));
    }
    if (!idx.length) tbody.appendChild(el("tr", null, [el("td", { colspan: cols.length, class: "empty", text: "No question matches the filters." })]));
    for (const th of headRow.children) {
      const on = th.getAttribute("data-key") === state.sortKey;
      th.setAttribute("aria-sort", on ? (state.sortDir > 0 ? "ascending" : "descending") : "none");
      th.querySelector(".arrow").textContent = on ? (state.sortDir > 0 ? "▲" : "▼") : "";
    }
    let msg = "Showing " + idx.length + " of " + questions.length + " questions.";
    const cv = currentVerdict();
    if (cv && cv.audit) {
      msg += " Verdict: the audit's flags, Benjamini–Hochberg at FDR " + +(100 * AU.fdr).toFixed(2) + "% over the " + AU.n_bench + " benchmark questions: " + AU.n_flagged + " flagged; reference questions are not tested.";
    } else if (cv && cv.v) {
      const m = cv.m, v = cv.v;
      const op = m.higher_is_member ? ">" : "<";
      if (IS_AUDIT)
        msg += " Verdict: " + m.name + " " + op + " " + fmtScore(v.threshold_raw) + " flags a question (reference questions flagged: " + pct(v.fpr) + "; no correction for testing many questions).";
      else
        msg += " Verdict: " + m.name + " " + op + " " + fmtScore(v.threshold_raw) + " flags a member (FPR on non-members " + pct(v.fpr) + (isNum(v.tpr) ? ", TPR " + pct(v.tpr) : "") + ")." + (isNum(v.tpr) && v.caveat ? " † TPR " + v.caveat + "." : "");
    } else if (!(meta.n_nonmembers > 0)) {
      msg += " No verdicts: they need labelled non-members to set a threshold.";
    }
    status.textContent = msg;
    if (levelSel) levelSel.disabled = state.vmethod === "audit";
  }
  const OPEN_MAX = 100;
  openAll.addEventListener("click", () => {
    for (const i of shown().slice(0, OPEN_MAX)) state.open.add(i);
    render();
  });
  closeAll.addEventListener("click", () => { state.open.clear(); render(); });
  render();

  const foot = [];
  if (meta.source) foot.push("source: " + meta.source);
  if (meta.tokenizer) foot.push("tokens: " + meta.tokenizer);
  foot.push("results: " + (meta.out_dir || ""));
  app.appendChild(el("footer", null, foot.map((f) => el("div", { text: f }))));
})();
