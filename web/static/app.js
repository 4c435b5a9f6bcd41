// The armdi status page: polls GET /v1/pipeline, listens to GET /v1/events (SSE), classifies
// dropped images with POST /v1/classify. Plain DOM, no framework; uPlot (vendored) draws the
// charts. Every string from the server is put in the page as text, never as markup.
"use strict";

const POLL_MS = 1000;
const HISTORY = 300;  // chart samples kept: five minutes at one a second
const MAX_EVENTS = 500;
const TOKEN_KEY = "armdi-api-token";
const PALETTE = ["#5b6b7c", "#2f7ebc", "#2e8b57", "#8e5bb5", "#d2691e", "#1aa3a3",
                 "#b5487a", "#6b8e23", "#4169e1", "#a0522d"];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const fmtMs = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`);
const range = (a, b) => `[${a}, ${b})`;

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1e3) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(n < 1e4 ? 1 : 0)} kB`;
  return `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} MB`;
}

function fmtRate(bytesPerS) {
  if (bytesPerS === null || bytesPerS === undefined) return null;
  if (bytesPerS >= 1e9) return `${(bytesPerS / 1e9).toFixed(1)} GB/s`;
  if (bytesPerS >= 1e6) return `${(bytesPerS / 1e6).toFixed(1)} MB/s`;
  return `${(bytesPerS / 1e3).toFixed(0)} kB/s`;
}

const fmtFactor = (f) => (Number.isInteger(f) ? `${f}` : f.toFixed(1));
const SLOW_SPEED = 1.5;  // measured / profiled time at which a node counts as slow

// up | slow | down | starting | idle | refused: "slow" also when the node runs under an
// emulated slowdown or measures well above its profile
function stateOf(n) {
  if (n.state !== "up") return n.state;
  const slow = (n.slowdown && n.slowdown > 1) || (n.speed && n.speed >= SLOW_SPEED);
  return slow ? "slow" : "up";
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});

// --- state ---------------------------------------------------------------------------------

const state = {
  model: null,        // GET /v1/model
  status: null,       // the last GET /v1/pipeline
  colors: new Map(),  // node name -> colour, fixed on first sight
  history: {t: [], throughput: [], p50: [], p99: [], optimum: [], stage: new Map()},
  events: [],
  token: sessionStorage.getItem(TOKEN_KEY),
  locked: false,
  stream: null,
};

function colorOf(name) {
  if (!state.colors.has(name)) state.colors.set(name, PALETTE[state.colors.size % PALETTE.length]);
  return state.colors.get(name);
}

// --- the API, with the token when there is one ------------------------------------------------

class Locked extends Error {}

async function api(path, options = {}) {
  const headers = {...(options.headers || {})};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, {cache: "no-store", ...options, headers});
  if (response.status === 401) {
    askForToken(state.token ? "The token was not accepted." : "");
    throw new Locked("an API token is needed");
  }
  return response;
}

function askForToken(message) {
  if (state.locked) return;
  state.locked = true;
  closeStream();
  $("token-error").textContent = message || "";
  $("token-panel").hidden = false;
  $("token-input").focus();
}

async function openSession(token) {
  // The HttpOnly cookie EventSource needs (it cannot send an Authorization header).
  return fetch("/v1/session", {method: "POST", headers: {Authorization: `Bearer ${token}`}});
}

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  const response = await openSession(token).catch(() => null);
  if (!response || !response.ok) {
    $("token-error").textContent = response && response.status === 401
      ? "That token was not accepted." : "Cannot reach the server.";
    return;
  }
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  state.locked = false;
  $("token-input").value = "";
  $("token-panel").hidden = true;
  start();
});

// --- the chain over the model ---------------------------------------------------------------

function renderSummary(s) {
  $("model").textContent = `${s.model_id} · ${s.blocks} blocks · ${s.mode}` +
    (s.auto ? " (auto)" : "");
  if (s.auto) $("model").title = s.auto.reason;  // mode auto: why this mode
  $("ready").textContent = s.ready ? "yes" : "no";
  $("throughput").textContent = `${(s.throughput_per_s || 0).toFixed(1)} /s`;
  $("latency").textContent = `${fmtMs(s.latency_p50_ms)} / ${fmtMs(s.latency_p99_ms)}`;
  $("inflight").textContent = s.in_flight;
  $("totals").textContent = `${s.completed} / ${s.failed} / ${s.retried}`;
}

function renderBlockBar(s) {
  const bar = $("blockbar");
  const K = s.blocks || 1;
  let ticks = bar.querySelector(".ticks");
  if (!ticks) {
    ticks = el("div", {class: "ticks"});
    bar.append(ticks);
  }
  ticks.style.backgroundImage = "linear-gradient(to right, rgba(0,0,0,.18) 1px, transparent 1px)";
  ticks.style.backgroundSize = `${100 / K}% 100%`;
  const seen = new Set();
  for (const n of s.nodes) {
    seen.add(n.name);
    let seg = bar.querySelector(`.seg[data-node="${CSS.escape(n.name)}"]`);
    if (!seg) {
      seg = el("div", {class: "seg", "data-node": n.name});
      seg.style.left = `${(100 * n.start) / K}%`;
      seg.style.width = "0%";
      bar.append(seg);
    }
    const moved = seg.dataset.start !== undefined &&
      (Number(seg.dataset.start) !== n.start || Number(seg.dataset.end) !== n.end);
    seg.dataset.start = n.start;
    seg.dataset.end = n.end;
    seg.className = `seg ${stateOf(n)}${n.start === n.end ? " empty" : ""}`;
    if (moved) {  // restart the flash animation
      void seg.offsetWidth;
      seg.classList.add("moved");
    }
    seg.style.backgroundColor = colorOf(n.name);
    seg.style.left = `${(100 * n.start) / K}%`;
    seg.style.width = `${(100 * (n.end - n.start)) / K}%`;
    const slow = n.slowdown && n.slowdown > 1 ? ` ×${fmtFactor(n.slowdown)}` : "";
    seg.textContent = `${n.name} ${range(n.start, n.end)}${slow}`;
    seg.title = `${n.name} (${stateOf(n)}) runs blocks ${range(n.start, n.end)}`;
  }
  for (const seg of bar.querySelectorAll(".seg")) {
    if (!seen.has(seg.dataset.node)) seg.remove();
  }
  renderOptimum(s, bar, K);
  renderCuts(s);
}

// the exact optimum at the measured speeds, as markers over the bar (where the runtime says)
function renderOptimum(s, bar, K) {
  for (const old of bar.querySelectorAll(".opt-mark")) old.remove();
  const optimum = s.optimum || [];
  const now = (s.boundaries || []).join();
  optimum.slice(1, -1).forEach((b) => {
    const mark = el("div", {class: "opt-mark", "data-boundary": b,
                            title: `optimum boundary ${b}` + (s.optimum_bottleneck_ms
                              ? ` (bottleneck ${fmtMs(s.optimum_bottleneck_ms)})` : "")});
    mark.style.left = `${(100 * b) / K}%`;
    bar.append(mark);
  });
  $("optimum-note").textContent = optimum.length
    ? `▼ the exact optimum at the measured speeds: [${optimum.join(", ")}]` +
      (s.optimum_bottleneck_ms ? `, bottleneck ${fmtMs(s.optimum_bottleneck_ms)}` : "") +
      (optimum.join() === now ? " (the chain is there)" : "")
    : "";
}

function renderCuts(s) {
  const K = s.blocks || 1;
  const cuts = state.model ? state.model.cut_points : [];
  const at = new Set(s.boundaries && s.boundaries.length ? s.boundaries
    : [0, ...s.nodes.filter((n) => n.end > n.start).map((n) => n.end)]);
  const box = $("cuts");
  const labels = $("cut-labels");
  box.replaceChildren();
  labels.replaceChildren();
  if (!cuts.length) return;
  const logs = cuts.map((c) => Math.log10(Math.max(c.bytes, 1)));
  const lo = Math.min(...logs) - 0.3;
  const hi = Math.max(...logs);
  let lastLabel = -Infinity;  // labels closer than 6% of the bar would overlap: keep the first
  for (const c of cuts) {
    const height = hi > lo ? 15 + (85 * (Math.log10(Math.max(c.bytes, 1)) - lo)) / (hi - lo) : 50;
    const tick = el("div", {class: `cut${at.has(c.index) ? " at" : ""}`, "data-cut": c.index,
      title: `cut ${c.index}: ${c.tensor} ${JSON.stringify(c.shape)} ${c.dtype}, ` +
             `${fmtBytes(c.bytes)} per sample`});
    tick.style.left = `${(100 * c.index) / K}%`;
    tick.style.height = `${height}%`;
    box.append(tick);
    if (at.has(c.index) && (c.index - lastLabel) / K >= 0.06) {
      lastLabel = c.index;
      const cls = c.index === 0 ? "first" : c.index === K ? "last" : "";
      const label = el("span", {class: cls, "data-cut": c.index}, fmtBytes(c.bytes));
      label.style.left = `${(100 * c.index) / K}%`;
      labels.append(label);
    }
  }
}

function meter(value, max, optimum) {
  const box = el("div", {class: "meter"});
  const fill = el("i");
  fill.style.width = `${Math.min(100, (100 * (value || 0)) / (max || 1))}%`;
  box.append(fill);
  if (optimum !== null && optimum !== undefined && max) {
    const mark = el("span", {class: "opt", title: `optimum ${fmtMs(optimum)}`});
    mark.style.left = `${Math.min(100, (100 * optimum) / max)}%`;
    box.append(mark);
  }
  return box;
}

function renderChain(s) {
  const chain = $("chain");
  chain.replaceChildren();
  const maxStage = Math.max(1e-9, ...s.nodes.map((n) => Math.max(n.stage_ms || 0,
                                                                  n.optimum_stage_ms || 0)));
  const controls = s.controls || [];
  s.nodes.forEach((n, i) => {
    if (i > 0) chain.append(el("span", {class: "arrow"}, "→"));
    const blocks = n.start === n.end ? "no blocks" : `blocks ${range(n.start, n.end)}`;
    const stage = n.optimum_stage_ms !== null && n.optimum_stage_ms !== undefined
      ? `stage ${fmtMs(n.stage_ms)} · optimum ${fmtMs(n.optimum_stage_ms)}`
      : `stage ${fmtMs(n.stage_ms)}`;
    const link = fmtRate(n.link_Bps);
    const extras = [link ? `link ${link}` : null,
                    n.speed ? `speed ${n.speed.toFixed(2)}× profile` : null,
                    n.moves ? `${n.moves} moves` : null].filter((x) => x);
    const card = el("div", {class: `node ${stateOf(n)}`, "data-node": n.name,
                            title: n.address || n.name},
      el("div", {class: "name"}, n.name,
         el("span", {class: "muted"}, ` · ${n.role}`)),
      el("div", {class: "state"}, el("span", {class: "state-dot"}), stateOf(n) +
         (n.slowdown && n.slowdown > 1 ? ` · ×${fmtFactor(n.slowdown)} (emulated)` : "")),
      el("div", {class: "blocks"}, blocks),
      el("div", {}, stage),
      meter(n.stage_ms, maxStage, n.optimum_stage_ms),
      el("div", {}, `queue ${n.queue_depth}/${n.queue_capacity} · ${n.processed} done`),
      meter(n.queue_depth, n.queue_capacity || 1, null),
      extras.length ? el("div", {}, extras.join(" · ")) : null,
      n.reason ? el("div", {class: "muted reason"}, n.reason) : null,
      n.role === "worker" && controls.length ? controlButtons(n.name, controls) : null);
    card.style.borderTopColor = colorOf(n.name);
    chain.append(card);
  });
  $("controls-note").textContent = controls.length
    ? "Demo controls: slowdowns are emulated; a pause lasts 3 s; all need the API token " +
      "when one is set." : "";
}

function controlButtons(name, controls) {
  const box = el("div", {class: "controls"});
  const path = `/v1/nodes/${encodeURIComponent(name)}`;
  const add = (label, action, request) => {
    const button = el("button", {type: "button", "data-action": action}, label);
    button.addEventListener("click", () => control(request.path, request.method, request.body));
    box.append(button);
  };
  if (controls.includes("slowdown")) {
    add("slow ×4", "slow", {path: `${path}/slowdown`, method: "PUT", body: {factor: 4}});
    add("full speed", "fast", {path: `${path}/slowdown`, method: "PUT", body: {factor: 1}});
  }
  for (const action of ["pause", "kill", "resume"]) {
    if (controls.includes(action)) {
      add(action, action, {path: `${path}/fault`, method: "POST", body: {action}});
    }
  }
  return box;
}

async function control(path, method, body) {
  try {
    const response = await api(path, {method, body: JSON.stringify(body),
                                       headers: {"Content-Type": "application/json"}});
    if (!response.ok) {
      const detail = await response.json().catch(() => ({}));
      addEvent({type: "control_failed", time: Date.now() / 1000,
                reason: `${response.status}: ${detail.detail || response.statusText}`});
    }
    poll();
  } catch (err) {
    if (!(err instanceof Locked)) addEvent({type: "control_failed", time: Date.now() / 1000,
                                            reason: err.message});
  }
}

// --- charts ----------------------------------------------------------------------------------

const charts = {};

function chartWidth(id) {
  return Math.max(280, $(id).clientWidth || 360);
}

function makeChart(id, series) {
  if (typeof uPlot === "undefined") {
    $(id).replaceChildren(el("p", {class: "note muted"}, "charts unavailable (uPlot did not load)"));
    return null;
  }
  const opts = {
    width: chartWidth(id), height: 170, legend: {live: false},
    scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(max * 1.15, 1)]}},
    axes: [{}, {size: 46}],
    series: [{}, ...series.map((s) => ({label: s.label, stroke: s.color, width: s.dash ? 1 : 2,
                                         dash: s.dash, spanGaps: false,
                                         points: {show: false}}))],
  };
  $(id).replaceChildren();
  return new uPlot(opts, [[], ...series.map(() => [])], $(id));
}

function recordHistory(s) {
  const h = state.history;
  h.t.push(Date.now() / 1000);
  h.throughput.push(s.throughput_per_s || 0);
  h.p50.push(s.latency_p50_ms);
  h.p99.push(s.latency_p99_ms);
  h.optimum.push(s.optimum_bottleneck_ms === undefined ? null : s.optimum_bottleneck_ms);
  const names = new Set(s.nodes.map((n) => n.name));
  for (const n of s.nodes) {
    if (!h.stage.has(n.name)) h.stage.set(n.name, new Array(h.t.length - 1).fill(null));
  }
  for (const [name, values] of h.stage) {
    const node = s.nodes.find((n) => n.name === name);
    values.push(names.has(name) && node.start < node.end ? node.stage_ms : null);
  }
  if (h.t.length > HISTORY) {
    for (const key of ["t", "throughput", "p50", "p99", "optimum"]) h[key].shift();
    for (const values of h.stage.values()) values.shift();
  }
}

function renderCharts() {
  const h = state.history;
  if (!charts.throughput) {
    charts.throughput = makeChart("chart-throughput", [{label: "requests/s", color: "#2f7ebc"}]);
    charts.latency = makeChart("chart-latency", [{label: "p50", color: "#2e8b57"},
                                                 {label: "p99", color: "#c0392b"}]);
  }
  const stageNames = [...h.stage.keys()];
  if (!charts.stage || charts.stageNames.join() !== stageNames.join()) {
    if (charts.stage) charts.stage.destroy();
    charts.stage = makeChart("chart-stage", [
      ...stageNames.map((n) => ({label: n, color: colorOf(n)})),
      {label: "optimum bottleneck", color: "#1d2733", dash: [4, 4]}]);
    charts.stageNames = stageNames;
  }
  if (charts.throughput) charts.throughput.setData([h.t, h.throughput]);
  if (charts.latency) charts.latency.setData([h.t, h.p50, h.p99]);
  if (charts.stage) {
    charts.stage.setData([h.t, ...stageNames.map((n) => h.stage.get(n)), h.optimum]);
  }
}

window.addEventListener("resize", () => {
  for (const [key, id] of [["throughput", "chart-throughput"], ["latency", "chart-latency"],
                           ["stage", "chart-stage"]]) {
    if (charts[key]) charts[key].setSize({width: chartWidth(id), height: 170});
  }
});

// --- polling ---------------------------------------------------------------------------------

let polling = null;

async function poll() {
  if (state.locked) return;
  try {
    const response = await api("/v1/pipeline");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    state.status = s;
    renderSummary(s);
    renderBlockBar(s);
    renderChain(s);
    settleMoves(s);
    recordHistory(s);
    renderCharts();
    $("conn").textContent = `updated ${new Date().toLocaleTimeString([], {hour12: false})}`;
    $("conn").className = "muted";
  } catch (err) {
    if (err instanceof Locked) return;
    $("conn").textContent = `cannot reach the server (${err.message})`;
    $("conn").className = "error";
  }
}

async function loadModel() {
  try {
    const response = await api("/v1/model");
    if (response.ok) state.model = await response.json();
    if (state.status) renderCuts(state.status);
  } catch (err) {
    if (!(err instanceof Locked)) console.warn("GET /v1/model:", err);
  }
}

// --- classify dropped images -----------------------------------------------------------------

function pathBar(hops, K) {
  const bar = el("div", {class: "pathbar"});
  for (const h of hops) {
    const hop = el("div", {class: "hop", "data-node": h.node, "data-start": h.blocks[0],
                           "data-end": h.blocks[1],
                           title: `${h.node} ran ${range(h.blocks[0], h.blocks[1])} ` +
                                  `in ${h.ms.toFixed(1)} ms`}, h.node);
    hop.style.left = `${(100 * h.blocks[0]) / K}%`;
    hop.style.width = `${(100 * (h.blocks[1] - h.blocks[0])) / K}%`;
    hop.style.backgroundColor = colorOf(h.node);
    bar.append(hop);
  }
  return bar;
}

function showLastPath(hops, K) {
  const strip = $("pathstrip");
  strip.replaceChildren();
  for (const h of hops) {
    const hop = el("div", {class: "hop", title: `last image: ${h.node} ` +
                           `${range(h.blocks[0], h.blocks[1])} ${h.ms.toFixed(1)} ms`});
    hop.style.left = `${(100 * h.blocks[0]) / K}%`;
    hop.style.width = `calc(${(100 * (h.blocks[1] - h.blocks[0])) / K}% - 2px)`;
    hop.style.backgroundColor = colorOf(h.node);
    strip.append(hop);
  }
}

function renderAnswer(card, r) {
  const K = (state.status && state.status.blocks) || (state.model && state.model.blocks) ||
            Math.max(1, ...r.path.map((h) => h.blocks[1]));
  const top = el("div", {class: "top"});
  r.top.forEach((p, i) => {
    const fill = el("i");
    fill.style.width = `${Math.max(1, Math.round(p.score * 100))}%`;
    top.append(el("div", {class: `label${i === 0 ? " first" : ""}`, title: `class ${p.index}`},
                  `${p.label}`),
               el("div", {class: "score", title: p.score.toFixed(4)}, fill));
  });
  const path = r.path.map((h) => `${h.node} ${range(h.blocks[0], h.blocks[1])} ` +
                                 `${h.ms.toFixed(1)} ms`).join(" → ");
  card.querySelector(".body").replaceChildren(top);
  card.append(
    el("div", {class: "meta"}, `${r.latency_ms.toFixed(1)} ms end to end · request ` +
       `${r.request_id}` + (r.attempts > 1 ? ` · ${r.attempts} attempts` : "")),
    pathBar(r.path, K),
    el("div", {class: "path muted"}, `path: ${path}`));
  card.dataset.label = r.top.length ? r.top[0].label : "";
  showLastPath(r.path, K);
}

async function classifyFile(file) {
  const thumb = el("img", {class: "thumb", alt: file.name, src: URL.createObjectURL(file)});
  const card = el("div", {class: "answer", "data-file": file.name}, thumb,
                  el("div", {class: "body"}, el("div", {class: "name"}, file.name),
                     el("div", {class: "muted"}, "classifying…")));
  $("answers").prepend(card);
  const form = new FormData();
  form.append("file", file);
  try {
    const response = await api("/v1/classify?top_k=5", {method: "POST", body: form});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new Error(`${response.status}: ${detail || response.statusText}`);
    }
    renderAnswer(card, body);
  } catch (err) {
    card.querySelector(".body").replaceChildren(el("div", {class: "name"}, file.name),
                                                el("div", {class: "error"}, err.message));
  }
}

async function classifyFiles(files) {
  const queue = [...files].filter((f) => !f.type || f.type.startsWith("image/"));
  const workers = Array.from({length: Math.min(4, queue.length)}, async () => {
    while (queue.length) await classifyFile(queue.shift());
  });
  await Promise.all(workers);
}

$("file").addEventListener("change", () => {
  classifyFiles($("file").files);
  $("file").value = "";
});
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classifyFiles(event.dataTransfer.files);
});

// --- the event log ---------------------------------------------------------------------------

const CATEGORIES = {
  ready: "moves", boundary_moved: "moves", rebalanced: "moves", boundaries_set: "moves",
  rerouted: "moves",
  slow: "health", node_down: "health", node_dead: "health", node_up: "health",
  rejoined: "health", refused: "health", unreachable: "health",
  slowdown: "controls", fault: "controls", control_failed: "controls",
  retry: "requests",
};
const MOVES = new Set(["boundary_moved", "rebalanced", "boundaries_set", "rerouted"]);

function rangesOf(boundaries, route) {
  const out = new Map();
  if (!boundaries || !route) return out;
  route.forEach((name, i) => {
    if (i + 1 < boundaries.length) out.set(name, [boundaries[i], boundaries[i + 1]]);
  });
  return out;
}

function rangesNow(s) {
  return new Map((s ? s.nodes : []).map((n) => [n.name, [n.start, n.end]]));
}

// "blocks [23, 36) → [27, 36); w1 blocks [10, 23) → [10, 27)": ``first`` (the node the
// event is about) first and unnamed, as its line already names it
function changes(before, after, first) {
  const out = [];
  for (const [name, [a, b]] of after) {
    const old = before.get(name);
    if (old && (old[0] !== a || old[1] !== b)) {
      const blocks = `blocks ${range(old[0], old[1])} → ${range(a, b)}`;
      out.push({name, text: name === first ? blocks : `${name} ${blocks}`});
    }
  }
  out.sort((x, y) => (y.name === first) - (x.name === first));
  return out.map((c) => c.text).join("; ");
}

function moveHead(e) {
  if (e.reason) return e.reason;
  if (e.type === "rebalanced") return "rebalanced to the optimum";
  if (e.type === "boundaries_set") return "boundaries set by hand";
  if (e.type === "rerouted") return `rerouted${e.why ? `: ${e.why}` : ""}`;
  if (e.node && e.factor) return `${e.node} slowed to ${fmtFactor(e.factor)}x`;
  const moved = /boundary (\d+) -> (\d+)/.exec(e.detail || "");
  if (e.node && moved) return `${e.node} moved boundary ${moved[1]} → ${moved[2]}`;
  return e.node ? `${e.node} moved a boundary` : "boundaries moved";
}

function moveTail(e) {
  const pair = /pair bottleneck ([\d.]+) -> ([\d.]+) ms/.exec(e.detail || "");
  return pair ? ` (pair bottleneck ${pair[1]} → ${pair[2]} ms)` : "";
}

const FAULT_WORDS = {kill: "killed", pause: "paused", resume: "resumed", cut: "link cut"};

function describe(e) {
  const who = e.node || "";
  switch (e.type) {
    case "ready":
      return `ready: ${(e.route || []).join(" → ")}, boundaries [${(e.boundaries || []).join(", ")}]`;
    case "slow":
      return e.factor ? `${who} slowed to ${fmtFactor(e.factor)}x` : `${who} is slow`;
    case "slowdown":
      return e.factor > 1 ? `${who} slowed to ${fmtFactor(e.factor)}x (emulated)`
                          : `${who} back to full speed (emulated)`;
    case "node_down": return `${who} is down${e.reason ? `: ${e.reason}` : ""}`;
    case "node_dead": return `${who} is dead${e.reason ? `: ${e.reason}` : ""}`;
    case "node_up": return `${who} is up again`;
    case "unreachable": return `${who} is unreachable${e.address ? ` at ${e.address}` : ""}`;
    case "rejoined":
      return `${who} rejoined` + (e.blocks ? ` with blocks ${range(e.blocks[0], e.blocks[1])}` : "");
    case "refused": return `${who} refused${e.reason ? `: ${e.reason}` : ""}`;
    case "retry": return `request ${e.request_id} re-sent (attempt ${e.attempt})`;
    case "fault": return `${who} ${FAULT_WORDS[e.action] || e.action}`;
    case "control_failed": return `control failed: ${e.reason}`;
    default: {
      const rest = Object.entries(e).filter(([k]) => k !== "type" && k !== "time")
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
      return `${e.type}${rest.length ? ` ${rest.join(" ")}` : ""}`;
    }
  }
}

function addEvent(e) {
  const category = CATEGORIES[e.type] || "other";
  const time = typeof e.time === "number" ? e.time : Date.now() / 1000;
  const entry = {time, type: e.type, category, node: e.node || "", title: e.detail || "",
                 down: ["node_down", "node_dead"].includes(e.type) || e.action === "kill"};
  if (MOVES.has(e.type)) {
    entry.head = moveHead(e);
    entry.tail = moveTail(e);
    const previous = e.previous || e.before;
    if (previous && e.route) {  // the event says which node ran what, before and after
      const text = changes(rangesOf(previous, e.route), rangesOf(e.boundaries, e.route), e.node);
      entry.text = `${entry.head}${text ? `: ${text}` : ""}${entry.tail}`;
    } else {  // compare the ranges the page shows now with the next snapshots
      entry.before = rangesNow(state.status);
      entry.pair = pairOf(e.detail);
      entry.text = `${entry.head}${entry.tail}`;
      entry.pendingSince = Date.now();
    }
  } else {
    entry.text = describe(e);
  }
  state.events.unshift(entry);
  if (state.events.length > MAX_EVENTS) state.events.pop();
  renderLog();
}

// The two nodes a pairwise move is between ("w1 | w2: boundary 23 -> 27, ..."), else null.
function pairOf(detail) {
  const pair = /^(\S+) \| (\S+):/.exec(detail || "");
  return pair ? new Set([pair[1], pair[2]]) : null;
}

// Fill in a move's block ranges once a snapshot shows them (within a few seconds); for a
// pairwise move, only the pair's (other moves between two snapshots are their own lines).
function settleMoves(s) {
  let changed = false;
  for (const entry of state.events) {
    if (entry.pendingSince === undefined) continue;
    let after = rangesNow(s);
    if (entry.pair) after = new Map([...after].filter(([name]) => entry.pair.has(name)));
    const text = changes(entry.before, after, entry.node);
    if (text || Date.now() - entry.pendingSince > 5000) {
      entry.text = `${entry.head}${text ? `: ${text}` : ""}${entry.tail}`;
      delete entry.pendingSince;
      delete entry.before;
      delete entry.pair;
      changed = true;
    }
  }
  if (changed) renderLog();
}

function renderLog() {
  const shown = new Set([...document.querySelectorAll("#filters input[type=checkbox]")]
    .filter((box) => box.checked).map((box) => box.value));
  const needle = $("event-search").value.trim().toLowerCase();
  const items = state.events
    .filter((e) => shown.has(e.category))
    .filter((e) => !needle || e.text.toLowerCase().includes(needle) || e.node === needle)
    .slice(0, 200)
    .map((e) => el("li", {class: `${e.category}${e.down ? " down" : ""}`, "data-type": e.type,
                          title: e.title || null},
                   el("time", {}, clock(e.time)), e.text));
  $("log").replaceChildren(...items);
}

$("filters").addEventListener("input", renderLog);

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
}

function openStream() {
  closeStream();
  const stream = new EventSource("/v1/events");
  state.stream = stream;
  stream.onmessage = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    addEvent(event);
    setTimeout(poll, 50);  // show what the event changed without waiting for the next poll
  };
  stream.onerror = () => {
    if (stream.readyState !== EventSource.CLOSED) return;  // the browser reconnects by itself
    // Refused (401) or gone: find out which with a poll, then try again a little later.
    closeStream();
    poll().then(() => setTimeout(() => { if (!state.locked && !state.stream) openStream(); },
                                 3000));
  };
}

// --- start -----------------------------------------------------------------------------------

async function start() {
  if (state.token) {
    const response = await openSession(state.token).catch(() => null);
    if (response && response.status === 401) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
    }
  }
  await loadModel();
  await poll();
  if (state.locked) return;
  openStream();
  if (!polling) polling = setInterval(poll, POLL_MS);
}

start();
