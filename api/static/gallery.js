// The gallery: the caller's jobs, newest first, a page at a time (GET /v1/jobs?cursor=).

import {get} from "./api.js";
import {$, ago, h, image, sizeOf, stateChip} from "./ui.js";

const PAGE = 24;
const FILTERS = [["", "all"], ["succeeded", "succeeded"], ["running", "running"], ["queued", "queued"], ["failed", "failed"], ["canceled", "canceled"]];
let cursors = [null]; // the cursor of each page seen: back is the one before
let next = null;
let status = "";
let wired = false;

export function enter() {
  if (!wired) {
    wired = true;
    $("older").addEventListener("click", () => { cursors.push(next); load(); });
    $("newer").addEventListener("click", () => { cursors.pop(); load(); });
    $("refresh").addEventListener("click", () => load());
    $("filter").replaceChildren(...FILTERS.map(([value, label]) => h("button", {
      type: "button", text: label, "data-value": value, class: value === status ? "on" : "",
      onclick: () => {
        status = value;
        cursors = [null];
        for (const b of $("filter").children) b.classList.toggle("on", b.dataset.value === value);
        load();
      },
    })));
  }
  load();
}

export function leave() {}

async function load() {
  const cursor = cursors[cursors.length - 1];
  const query = new URLSearchParams({limit: String(PAGE)});
  if (cursor) query.set("cursor", cursor);
  if (status) query.set("status", status);
  const grid = $("gallery");
  let page;
  try {
    page = await get("/v1/jobs?" + query);
  } catch (e) {
    grid.replaceChildren(h("div.alert", {text: e.message}));
    return;
  }
  next = page.next_cursor;
  grid.replaceChildren(...page.jobs.map(tile));
  if (!page.jobs.length) grid.append(h("p.empty", {text: nothing()}));
  $("older").disabled = !next;
  $("newer").disabled = cursors.length <= 1;
  $("page-no").textContent = "page " + cursors.length;
}

// An empty page: a status filter reads a bounded stretch of the jobs per request, so an empty
// page with a cursor means "none in this stretch", not "none at all".
function nothing() {
  if (next) return "None in this stretch of your jobs: Older → looks further back.";
  if (status) return `No ${status} jobs` + (cursors.length > 1 ? " further back." : ".");
  return cursors.length > 1 ? "Nothing further back." : "No jobs yet: make one on the Create page.";
}

function tile(job) {
  const first = job.outputs[0];
  const thumb = h("div.thumb", {},
    first ? image(first.url, job.request.prompt, first.width) : h("span.muted", {text: placeholder(job)}),
    job.outputs.length > 1 ? h("span.count", {text: "×" + job.outputs.length}) : null,
  );
  return h("a.tile", {href: "#/jobs/" + job.id, "data-job": job.id},
    thumb,
    h("div.body", {},
      h("div.prompt", {text: job.request.prompt}),
      h("div.meta", {}, stateChip(job.status), h("span.when", {text: ago(job.created_at)})),
      h("div.meta", {text: `${sizeOf(job.request)} · ${job.request.steps} steps`}),
    ),
  );
}

function placeholder(job) {
  if (job.status === "running" && job.progress) return `step ${job.progress.step} of ${job.progress.total_steps}`;
  if (job.status === "queued" || job.status === "running") return job.status + "…";
  return "no image";
}
