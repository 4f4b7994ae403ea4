// The operator view: the queue (GET /v1/queue) and models (GET /v1/models), polled, with a
// short in-page history for depth over time; the admin part only for a key that may read it.

import {ApiError, get} from "./api.js";
import {$, h, seconds} from "./ui.js";

const EVERY_MS = 2000;
const KEEP = 300; // samples: ten minutes at one every two seconds
const history = []; // {t, queued, running, workers}
const decisions = []; // the scaler's decisions, each kept when it changes
let timer = null;
let ticks = 0;
let admin = null; // null: not asked yet; false: this key may not (or the server has no such route)

export function enter() {
  leave();
  tick();
  timer = setInterval(tick, EVERY_MS);
}

export function leave() {
  if (timer) clearInterval(timer);
  timer = null;
}

async function tick() {
  const asks = [get("/v1/queue")];
  if (ticks % 3 === 0) asks.push(get("/v1/models"));
  if (ticks % 3 === 0 && admin !== false) asks.push(get("/v1/admin/queue").catch((e) => e));
  ticks += 1;
  let queue, models, depth;
  try {
    [queue, models, depth] = await Promise.all(asks);
  } catch (e) {
    $("op-updated").textContent = "not updated: " + e.message;
    return;
  }
  history.push({t: Date.now(), queued: queue.queued, running: queue.running, workers: queue.workers});
  if (history.length > KEEP) history.shift();
  remember(queue.scaler);
  $("op-updated").textContent = "updated " + new Date().toLocaleTimeString();
  tiles(queue);
  chart();
  scaler(queue.scaler);
  if (models) modelsTable(models.models);
  if (depth !== undefined) adminPart(depth);
}

function tiles(q) {
  const items = [
    ["Queued", q.queued, "jobs waiting"],
    ["Running", q.running, "jobs in a batch"],
    ["Workers", q.workers, "live, heartbeating"],
    ["Throughput", q.images_per_s === null ? "–" : q.images_per_s.toFixed(2), "images / s, measured"],
    ["A new job waits", q.eta_s === null ? "–" : seconds(q.eta_s), "estimated"],
  ];
  $("tiles").replaceChildren(...items.map(([label, value, sub]) => h("div.card", {},
    h("div.label", {text: label}), h("div.value", {text: String(value)}), h("div.sub", {text: sub}))));
}

function remember(decision) {
  if (!decision) return;
  const last = decisions[decisions.length - 1];
  if (last && last.current === decision.current && last.desired === decision.desired && last.reason === decision.reason) return;
  decisions.push({...decision, t: new Date()});
  if (decisions.length > 50) decisions.shift();
}

function scaler(decision) {
  const box = $("scaler");
  if (!decision) {
    box.replaceChildren(h("p.muted", {text: "No scaler is deciding (workers are managed by hand, or by KEDA)."}));
  } else {
    const word = decision.desired > decision.current ? "scaling up" : decision.desired < decision.current ? "scaling down" : "steady";
    box.replaceChildren(
      h("div.scaler-now", {}, `${decision.current} → ${decision.desired}`, h("small", {text: word})),
      h("p.muted", {text: decision.reason}),
    );
  }
  $("decisions").replaceChildren(...decisions.slice().reverse().map((d) => h("li", {},
    h("b", {text: d.t.toLocaleTimeString() + "  " + d.current + " → " + d.desired}), " " + d.reason)));
}

// Depth over time: queued (area), running and workers (lines), drawn in SVG.
function chart() {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const el = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  };
  const W = 640, H = 220, L = 34, R = 8, T = 10, B = 24;
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "queue depth over time"});
  const top = Math.max(4, ...history.map((s) => Math.max(s.queued, s.running, s.workers)));
  const ceiling = niceCeiling(top);
  // "now" at the right edge; the span grows with the history, one minute at least.
  const end = history.length ? history[history.length - 1].t : Date.now();
  const span = Math.max(60000, end - (history.length ? history[0].t : end));
  const t0 = end - span;
  const x = (t) => L + (W - L - R) * ((t - t0) / span);
  const y = (v) => T + (H - T - B) * (1 - v / ceiling);
  for (let i = 0; i <= 4; i++) {
    const v = (ceiling * i) / 4;
    root.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    const label = svg("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"});
    label.textContent = Number.isInteger(v) ? v : v.toFixed(1);
    root.append(label);
  }
  const ago = svg("text", {x: L, y: H - 6});
  ago.textContent = history.length > 1 ? `${Math.round(span / 1000)} s ago` : "collecting…";
  const now = svg("text", {x: W - R, y: H - 6, "text-anchor": "end"});
  now.textContent = "now";
  root.append(ago, now);
  if (history.length > 1) {
    const line = (key) => history.map((s, i) => `${i ? "L" : "M"}${x(s.t).toFixed(1)},${y(s[key]).toFixed(1)}`).join(" ");
    const area = `${line("queued")} L${x(end).toFixed(1)},${y(0)} L${x(history[0].t).toFixed(1)},${y(0)} Z`;
    root.append(svg("path", {class: "queued-area", d: area}), svg("path", {class: "queued", d: line("queued")}));
    root.append(svg("path", {class: "running", d: line("running")}), svg("path", {class: "workers", d: line("workers")}));
  }
  $("chart").replaceChildren(root);
  $("chart-span").textContent = history.length > 1 ? `last ${seconds(span / 1000)}, every ${EVERY_MS / 1000} s` : "";
}

function niceCeiling(v) {
  for (const step of [4, 8, 12, 20, 40, 80, 100, 200, 400, 800, 1000, 2000, 5000, 10000]) if (v <= step) return step;
  return Math.ceil(v / 10000) * 10000;
}

function modelsTable(models) {
  const head = ["model", "tasks", "workers", "starting", "queued", "running", "images/s"];
  $("models-table").replaceChildren(h("table.list", {},
    h("tr", {}, head.map((t, i) => h("th", {text: t, class: i > 1 ? "num" : ""}))),
    models.map((m) => h("tr", {},
      h("td", {}, h("b", {text: m.name}), m.default && models.length > 1 ? " (default)" : ""),
      h("td", {text: m.tasks.join(", ")}),
      ...[m.state.workers_serving, m.state.workers_starting, m.state.queued_images, m.state.running_images,
        m.state.images_per_s === null ? "–" : m.state.images_per_s.toFixed(2)].map((v) => h("td.num", {text: String(v)})),
    )),
  ));
}

// GET /v1/admin/queue answers an admin key only: shown when it does, left out when it doesn't.
function adminPart(answer) {
  if (answer instanceof ApiError) {
    if (answer.status === 403 || answer.status === 404 || answer.status === 405) {
      admin = false;
      $("admin").hidden = true;
      $("admin-note").hidden = answer.status !== 403;
      $("admin-note").textContent = "Depth per model, priority and tenant, and the workers' details, need an admin key.";
    }
    return;
  }
  admin = true;
  $("admin").hidden = false;
  $("admin-note").hidden = true;
  $("admin-body").replaceChildren(render(answer));
}

// Any JSON as tables: a list of objects as rows, an object as names and values.
function render(value) {
  if (Array.isArray(value) && value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
    const keys = [...new Set(value.flatMap(Object.keys))];
    return h("table.list", {},
      h("tr", {}, keys.map((k) => h("th", {text: k}))),
      value.map((row) => h("tr", {}, keys.map((k) => h("td", {}, cell(row[k]))))));
  }
  if (value && typeof value === "object" && !Array.isArray(value)) {
    return h("table.kv", {}, Object.entries(value).map(([k, v]) => h("tr", {}, h("th", {text: k}), h("td", {}, cell(v)))));
  }
  return document.createTextNode(Array.isArray(value) ? value.join(", ") || "–" : String(value ?? "–"));
}

function cell(v) {
  return v && typeof v === "object" ? render(v) : document.createTextNode(String(v ?? "–"));
}
