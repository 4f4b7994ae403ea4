// Small helpers every view uses: making elements, words for numbers and times.

// h("div.card", {onclick}, child, "text", …): an element with a class, attributes and children.
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export const $ = (id) => document.getElementById(id);

export function stateChip(status) {
  return h("span.state." + status, {text: status});
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60);
  return m + " min " + Math.round(s - m * 60) + " s";
}

export function ago(iso) {
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 45) return "just now";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toLocaleDateString();
}

export function clock(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "–";
}

export function ordinal(n) {
  const tail = n % 100 >= 11 && n % 100 <= 13 ? "th" : {1: "st", 2: "nd", 3: "rd"}[n % 10] || "th";
  return n + tail;
}

// Where a queued or running job stands, in words (queue position and ETA, or steps).
export function standing(job) {
  if (job.status === "queued" && job.queue) {
    const q = job.queue;
    if (q.waiting_for) return [h("b", {text: "waiting: "}), q.waiting_for];
    const place = q.position <= 1 ? "next in line" : ordinal(q.position) + " in line";
    const eta = q.eta_s === null || q.eta_s === undefined ? "" : " · about " + seconds(q.eta_s);
    return [h("b", {text: place}), eta];
  }
  if (job.status === "queued") return [h("b", {text: "queued"})];
  if (job.status === "running") {
    const p = job.progress;
    if (!p) return [h("b", {text: "starting"})];
    return [h("b", {text: `step ${p.step} of ${p.total_steps}`})];
  }
  return [];
}

// A progress bar: steps while running, a pulse while queued.
export function progressBar(job) {
  const fill = h("div.bar-fill");
  if (job.status === "running" && job.progress) {
    fill.style.width = (100 * job.progress.step / job.progress.total_steps).toFixed(1) + "%";
  } else {
    fill.classList.add("waiting");
  }
  return h("div.bar-track", {role: "progressbar"}, fill);
}

// A small image shows its pixels (the tiny test model's 64² images), not a blur of them.
export function image(url, alt, width) {
  const img = h("img", {src: url, alt, loading: "lazy"});
  if (width && width <= 256) img.classList.add("pixelated");
  return img;
}

export function sizeOf(request) {
  return `${request.width}×${request.height}`;
}
