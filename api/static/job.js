// The job view: its images, parameters, seed, timings and webhook deliveries; cancel, again.

import {ApiError, ENDED, follow, get, post} from "./api.js";
import {prefill} from "./create.js";
import {$, ago, clock, h, image, progressBar, seconds, sizeOf, standing, stateChip} from "./ui.js";

let controller = null;
let shown = null; // the id on screen

export async function enter(id) {
  leave();
  shown = id;
  $("job").replaceChildren(h("p.empty", {text: "loading " + id + "…"}));
  let job;
  try {
    job = await get("/v1/jobs/" + id);
  } catch (e) {
    $("job").replaceChildren(h("div.alert", {text: e instanceof ApiError && e.status === 404 ? `No job ${id} here: it expired, or it belongs to another key.` : e.message}));
    return;
  }
  draw(job);
  if (!ENDED.includes(job.status)) {
    controller = new AbortController();
    follow(id, (j) => { if (shown === id) draw(j); }, controller.signal).catch(() => {});
  }
}

export function leave() {
  if (controller) controller.abort();
  controller = null;
  shown = null;
}

function draw(job) {
  const r = job.request;
  const head = h("div", {},
    h("div.idline", {}, stateChip(job.status), h("span.mono", {text: job.id}), h("span", {text: "· " + ago(job.created_at)})),
    h("h1", {text: r.prompt}),
    r.negative_prompt ? h("p.muted", {text: "not: " + r.negative_prompt}) : null,
  );
  const live = ENDED.includes(job.status) ? null : h("div", {}, h("div.job-line.muted", {}, standing(job)), progressBar(job));
  const shots = h("div.shots", {}, job.outputs.length
    ? job.outputs.map((o, i) => h("figure", {},
        h("a", {href: o.url, target: "_blank", rel: "noopener"}, image(o.url, `${r.prompt} (${i + 1})`, o.width)),
        h("figcaption", {}, h("span", {text: `seed ${o.seed}`}), h("span", {text: `${o.width}×${o.height}`}))))
    : Array.from({length: r.num_images}, () => h("div.placeholder", {text: job.status === "failed" || job.status === "canceled" ? job.status : "…"})));
  const error = job.error ? h("div.alert", {}, h("b", {text: job.error.code + ": "}), job.error.message) : null;
  const buttons = h("div.buttons", {},
    ENDED.includes(job.status) ? null : h("button.danger", {type: "button", text: "Cancel", id: "cancel", onclick: () => cancel(job.id)}),
    h("button", {type: "button", text: "Again with this seed", id: "again", onclick: () => again(job)}),
    h("a", {href: "#/gallery", text: "← gallery"}),
  );
  const main = h("div", {}, head, live, h("div.card", {}, shots), error, buttons);
  const side = h("div", {},
    h("div.card", {}, h("h2", {text: "Parameters"}), table(parameters(job))),
    h("div.card", {}, h("h2", {text: "Timings"}), timeline(job), table(timings(job))),
    job.webhook ? h("div.card", {}, h("h2", {text: "Webhook"}), table([["URL", job.webhook.url], ["events", job.webhook.events.join(", ")]]), deliveries(job.webhook.deliveries)) : null,
  );
  $("job").replaceChildren(h("div.jobview", {}, main, side));
}

function parameters(job) {
  const r = job.request;
  const rows = [
    ["model", r.model || "default"],
    ["task", r.task],
    ["size", sizeOf(r)],
    ["steps", r.steps],
    ["guidance", r.guidance_scale],
    ["seed", r.num_images > 1 ? `${r.seed} … ${r.seed + r.num_images - 1}` : r.seed],
    ["images", r.num_images],
    ["scheduler", r.scheduler],
  ];
  if (r.task !== "txt2img") rows.push(["strength", r.strength], ["image", r.image], ["mask", r.mask]);
  if (r.loras && r.loras.length) rows.push(["LoRAs", r.loras.map((l) => `${l.name} × ${l.scale}`).join(", ")]);
  rows.push(["priority", r.priority], ["format", r.output_format]);
  if (r.metadata && Object.keys(r.metadata).length) rows.push(["metadata", JSON.stringify(r.metadata)]);
  return rows.filter(([, v]) => v !== null && v !== undefined);
}

function timings(job) {
  const m = job.metrics;
  return [
    ["submitted", clock(job.created_at)],
    ["started", clock(job.started_at)],
    ["finished", clock(job.finished_at)],
    ["batch", m.batch_size ? `${m.batch_size} image${m.batch_size > 1 ? "s" : ""} in one model call` : "–"],
    ["attempts", m.attempts],
  ];
}

// Waiting and running, side by side.
function timeline(job) {
  const m = job.metrics;
  return h("div.timeline", {},
    h("div", {}, "in the queue", h("b", {text: seconds(m.queue_s)})),
    h("div", {}, "running", h("b", {text: seconds(m.run_s)})),
  );
}

function table(rows) {
  return h("table.kv", {}, rows.map(([k, v]) => h("tr", {}, h("th", {text: k}), h("td", {text: short(String(v ?? "–"))}))));
}

// A data: URI input is up to a megabyte of text: its start says enough.
function short(text) {
  return text.length > 120 ? text.slice(0, 60) + "…" : text;
}

function deliveries(list) {
  if (!list.length) return h("p.muted", {text: "No deliveries yet."});
  return h("table.list", {},
    h("tr", {}, ["when", "event", "try", "outcome", "status"].map((t) => h("th", {text: t}))),
    list.map((d) => h("tr", {},
      h("td", {text: clock(d.at)}), h("td", {text: d.event}), h("td", {text: d.attempt}),
      h("td", {text: d.outcome + (d.error ? ` (${d.error})` : "")}), h("td", {text: d.status_code ?? "–"}))));
}

async function cancel(id) {
  try {
    draw(await post(`/v1/jobs/${id}/cancel`));
  } catch (e) {
    $("job").prepend(h("div.alert", {text: e.message}));
  }
}

function again(job) {
  prefill(job.request);
  location.hash = "#/";
}
