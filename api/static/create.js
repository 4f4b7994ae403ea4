// The create view: the prompt and its options, image inputs, and this session's jobs, live.

import {ApiError, ENDED, follow, get, post, upload} from "./api.js";
import {$, h, image, progressBar, sizeOf, standing, stateChip} from "./ui.js";

const TASKS = {txt2img: "Text → image", img2img: "Image → image", inpaint: "Inpaint"};
const PRESETS = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 768], [768, 512], [768, 768], [1024, 1024]];
// The random-weight test models the service builds: their images are noise, and say so.
const TEST_MODELS = /^(tiny|tiny-sd2|tiny-xl|sd15-random)$/;

let models = [];
let model = null; // the chosen model's entry of GET /v1/models
let task = "txt2img";
let count = 1;
const refs = {image: null, mask: null}; // upload refs (or a job's own inputs, when reused)
const followers = new Map(); // job id -> AbortController of its stream
let pending = null; // a request to fill the form with ("again with this seed")
let wired = false;

export function enter() {
  if (!wired) wire();
  loadModels();
}

export function leave() {}

// "Again with this seed": the job view hands its request over; the form shows it.
export function prefill(request) {
  pending = request;
}

function wire() {
  wired = true;
  $("form").addEventListener("submit", submit);
  $("model").addEventListener("change", () => choose($("model").value, true));
  $("size").addEventListener("change", sizeChanged);
  $("add-lora").addEventListener("click", () => addLora());
  for (const [input, out, format] of [["steps", "steps-out", String], ["guidance_scale", "guidance-out", (v) => Number(v).toFixed(1)], ["strength", "strength-out", (v) => Number(v).toFixed(2)]]) {
    const show = () => { $(out).textContent = format($(input).value); };
    $(input).addEventListener("input", show);
    $(input).addEventListener("change", show);
  }
  for (const name of ["image", "mask"]) $(name).addEventListener("change", () => picked(name));
  segmented($("num_images"), [1, 2, 3, 4].map((n) => [n, String(n)]), () => count, (n) => { count = n; });
  $("form").addEventListener("input", (e) => clearProblem(e.target.closest(".field")));
}

async function loadModels() {
  try {
    const answer = await get("/v1/models");
    models = answer.models;
  } catch (e) {
    showError(e);
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...models.map((m) => h("option", {value: m.name, text: m.name + (m.default && models.length > 1 ? " (default)" : "")})));
  const keep = pending ? pending.model : chosen;
  choose(models.some((m) => m.name === keep) ? keep : models[0].name, !pending && !chosen);
  if (pending) fill(pending);
  pending = null;
}

// Show a model's tasks, sizes, steps and LoRAs; with `defaults`, put its defaults in the form.
function choose(name, defaults) {
  model = models.find((m) => m.name === name) || models[0];
  $("model").value = model.name;
  const note = $("model-note");
  note.hidden = !TEST_MODELS.test(model.name);
  note.textContent = `${model.name} is a test model with random weights: its images are noise, by design. Serve a real model to get pictures (README: “Real models”).`;
  if (!model.tasks.includes(task)) task = "txt2img";
  segmented($("task"), Object.entries(TASKS).map(([k, label]) => [k, label, !model.tasks.includes(k)]), () => task, (t) => { task = t; showInputs(); });
  sizes(defaults);
  $("steps").min = model.min_steps;
  $("steps").max = model.max_steps;
  if (defaults) {
    set("steps", model.defaults.steps);
    set("guidance_scale", model.defaults.guidance_scale);
    set("strength", model.defaults.strength);
  }
  $("loras-block").hidden = model.loras.length === 0;
  $("loras").replaceChildren();
  showInputs();
}

function set(id, value) {
  $(id).value = value;
  $(id).dispatchEvent(new Event("change"));
}

// The size menu: the model's sizes, or common ones within its limits, and "custom".
function sizes(defaults) {
  const select = $("size");
  const before = select.value;
  let options;
  if (model.sizes) {
    options = model.sizes.map((s) => s.split("x").map(Number));
  } else {
    const fits = ([w, hh]) => Math.max(w, hh) <= model.max_side && Math.min(w, hh) >= model.min_side && w * hh <= model.max_pixels;
    options = PRESETS.filter(fits);
    const d = [model.defaults.width, model.defaults.height];
    if (!options.some(([w, hh]) => w === d[0] && hh === d[1])) options.unshift(d);
  }
  select.replaceChildren(
    ...options.map(([w, hh]) => h("option", {value: `${w}x${hh}`, text: `${w} × ${hh}` + (w === model.defaults.width && hh === model.defaults.height ? "  (default)" : "")})),
    model.sizes ? null : h("option", {value: "custom", text: "custom…"}),
  );
  const want = defaults ? `${model.defaults.width}x${model.defaults.height}` : before;
  select.value = [...select.options].some((o) => o.value === want) ? want : `${model.defaults.width}x${model.defaults.height}`;
  sizeChanged();
}

function sizeChanged() {
  const custom = $("size").value === "custom";
  $("width-field").hidden = $("height-field").hidden = !custom;
  if (!custom) {
    const [w, hh] = $("size").value.split("x");
    $("width").value = w;
    $("height").value = hh;
  }
}

function showInputs() {
  $("inputs").hidden = task === "txt2img";
  $("mask-field").hidden = task !== "inpaint";
  for (const b of $("task").children) b.classList.toggle("on", b.dataset.value === task);
}

// A row of toggle buttons standing for a radio group.
function segmented(el, items, current, pick) {
  el.replaceChildren(...items.map(([value, label, disabled]) => h("button", {
    type: "button", text: label, disabled: Boolean(disabled), "data-value": value, role: "radio",
    class: String(current()) === String(value) ? "on" : "",
    onclick: () => {
      pick(value);
      for (const b of el.children) b.classList.toggle("on", b.dataset.value === String(value));
    },
  })));
}

function addLora(name, scale) {
  const row = h("div.lora", {},
    h("select", {}, model.loras.map((n) => h("option", {value: n, text: n}))),
    h("input", {type: "number", min: "-4", max: "4", step: "0.05", value: String(scale ?? 0.8), title: "scale"}),
    h("button.link", {type: "button", text: "remove", onclick: () => row.remove()}),
  );
  if (name) row.querySelector("select").value = name;
  $("loras").append(row);
}

async function picked(name) {
  const file = $(name).files[0];
  const state = $(name + "-state"), preview = $(name + "-preview");
  refs[name] = null;
  clearProblem($(name).closest(".field"));
  if (!file) return;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  state.textContent = "uploading " + file.name + "…";
  try {
    refs[name] = await upload(file);
    state.textContent = file.name + " ✓";
  } catch (e) {
    state.textContent = file.name;
    problem(name, e.message);
  }
}

// The form as a request: every value the user sees, so the job runs with exactly those.
function request() {
  const body = {
    prompt: $("prompt").value,
    model: model ? model.name : undefined,
    width: Number($("width").value),
    height: Number($("height").value),
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance_scale").value),
    num_images: count,
    scheduler: $("scheduler").value,
    priority: $("priority").value,
    output_format: $("output_format").value,
  };
  if ($("negative_prompt").value.trim()) body.negative_prompt = $("negative_prompt").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (task !== "txt2img") {
    body.task = task;
    body.strength = Number($("strength").value);
    if (refs.image) body.image = refs.image;
    if (task === "inpaint" && refs.mask) body.mask = refs.mask;
  }
  const loras = [...$("loras").children].map((row) => ({name: row.querySelector("select").value, scale: Number(row.querySelector("input").value)}));
  if (loras.length) body.loras = loras;
  return body;
}

// Fill the form from a job's request (again with this seed).
function fill(r) {
  $("prompt").value = r.prompt;
  $("negative_prompt").value = r.negative_prompt || "";
  task = model.tasks.includes(r.task) ? r.task : "txt2img";
  showInputs();
  const size = `${r.width}x${r.height}`;
  $("size").value = [...$("size").options].some((o) => o.value === size) ? size : "custom";
  sizeChanged();
  $("width").value = r.width;
  $("height").value = r.height;
  set("steps", r.steps);
  set("guidance_scale", r.guidance_scale);
  if (r.strength) set("strength", r.strength);
  $("seed").value = r.seed;
  count = r.num_images;
  for (const b of $("num_images").children) b.classList.toggle("on", b.dataset.value === String(count));
  $("scheduler").value = r.scheduler || "default";
  $("priority").value = r.priority || "normal";
  $("output_format").value = r.output_format || "png";
  $("more").open = Boolean(r.negative_prompt) || r.scheduler !== "default" || r.priority !== "normal";
  $("loras").replaceChildren();
  for (const l of r.loras || []) addLora(l.name, l.scale);
  for (const name of ["image", "mask"]) {
    refs[name] = r[name] || null;
    $(name + "-preview").hidden = true;
    $(name + "-state").textContent = r[name] ? "the job's own input" : "choose an image";
  }
  $("status").textContent = `seed ${r.seed} kept: change the prompt or the options, then Generate`;
  $("prompt").focus();
}

async function submit(event) {
  event.preventDefault();
  clearProblems();
  const go = $("go");
  go.disabled = true;
  $("status").textContent = "submitting…";
  try {
    const job = await post("/v1/jobs", request());
    $("status").textContent = "submitted " + job.id;
    track(job);
  } catch (e) {
    $("status").textContent = "";
    showError(e);
  } finally {
    go.disabled = false;
  }
}

// A refusal in words: the field it names is marked, and the message stands above the button.
function showError(e) {
  const alert = $("form-error");
  let text = e.message;
  if (e instanceof ApiError && e.status === 429 && e.retryAfter) text += ` (retry in ${e.retryAfter} s)`;
  alert.replaceChildren(h("b", {text: e.status ? `Refused (${e.status}): ` : "Error: "}), text);
  alert.hidden = false;
  if (e.field) {
    const named = e.field.split(".")[0];
    const lora = e.field.match(/^loras\.(\d+)/);
    if (lora && $("loras").children[Number(lora[1])]) $("loras").children[Number(lora[1])].classList.add("invalid");
    problem(named === "width" || named === "height" ? ($("size").value === "custom" ? named : "size") : named, e.message);
  }
}

function problem(field, message) {
  const el = $("form").querySelector(`.field[data-field="${field}"]`);
  if (!el) return;
  el.classList.add("invalid");
  el.querySelector(".problem").textContent = message;
  if (el.closest("details")) el.closest("details").open = true;
}

function clearProblem(el) {
  if (!el || !el.classList.contains("invalid")) return;
  el.classList.remove("invalid");
  el.querySelector(".problem").textContent = "";
}

function clearProblems() {
  $("form-error").hidden = true;
  for (const el of $("form").querySelectorAll(".invalid")) {
    el.classList.remove("invalid");
    const p = el.querySelector(".problem");
    if (p) p.textContent = "";
  }
}

// A job of this session: its card, kept up to date from its event stream.
function track(job) {
  const list = $("jobs");
  list.querySelector(".empty")?.remove();
  draw(job);
  const controller = new AbortController();
  followers.set(job.id, controller);
  follow(job.id, draw, controller.signal)
    .catch((e) => draw({...job, status: "failed", error: {message: e.message}}))
    .finally(() => followers.delete(job.id));
}

export function card(job, actions) {
  const el = h("div.job", {"data-job": job.id},
    h("div.head", {}, h("div.prompt", {text: job.request.prompt}), stateChip(job.status)),
    h("div.meta", {text: `${job.request.model || ""} · ${sizeOf(job.request)} · ${job.request.steps} steps · seed ${job.request.seed}`}),
  );
  if (!ENDED.includes(job.status)) {
    el.append(h("div.line", {}, standing(job)), progressBar(job));
  }
  if (job.outputs && job.outputs.length) {
    el.append(h("div.images", {}, job.outputs.map((o) => h("a", {href: o.url, target: "_blank", rel: "noopener"}, image(o.url, job.request.prompt, o.width)))));
  }
  if (job.error) el.append(h("div.error", {text: job.error.message}));
  if (actions) el.append(actions(job));
  return el;
}

function draw(job) {
  const fresh = card(job, (j) => h("div.foot", {},
    ENDED.includes(j.status) ? null : h("button.danger", {type: "button", text: "Cancel", onclick: () => cancel(j.id)}),
    h("a", {href: "#/jobs/" + j.id, text: "details →"}),
  ));
  const old = $("jobs").querySelector(`[data-job="${job.id}"]`);
  if (old) old.replaceWith(fresh);
  else $("jobs").prepend(fresh);
}

async function cancel(id) {
  try {
    draw(await post(`/v1/jobs/${id}/cancel`));
  } catch (e) {
    $("status").textContent = e.message;
  }
}
