// The JSON API as the page uses it: the key, errors as ApiError, the event stream, uploads.

const KEY = "dq.key";

export function key() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

function headers(json) {
  const h = {};
  if (key()) h.Authorization = "Bearer " + key();
  if (json) h["Content-Type"] = "application/json";
  return h;
}

// The server's `{"error": {code, message, field}}`, as an exception.
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code || "http_" + status;
    this.field = error.field || null;
    this.details = error.details || [];
    this.retryAfter = retryAfter ? Number(retryAfter) : null;
  }
}

const UNREACHABLE = {error: {code: "network", message: "the server cannot be reached: is it still running?"}};

export async function call(method, path, body, options = {}) {
  let reply;
  try {
    reply = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: options.signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, UNREACHABLE);
  }
  const text = await reply.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!reply.ok) throw new ApiError(reply.status, data, reply.headers.get("retry-after"));
  return data;
}

export const get = (path, options) => call("GET", path, undefined, options);
export const post = (path, body, options) => call("POST", path, body, options);

export const ENDED = ["succeeded", "failed", "canceled"];

// The job's event stream (fetch, not EventSource, so that the key header goes along): `onJob`
// gets the job at each change. Resolves with the last job seen when the stream ends.
async function stream(id, onJob, signal) {
  const reply = await fetch(`/v1/jobs/${id}/events`, {headers: headers(false), signal});
  if (!reply.ok) {
    let data = null;
    try { data = await reply.json(); } catch (e) { data = null; }
    throw new ApiError(reply.status, data, reply.headers.get("retry-after"));
  }
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", last = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return last;
    buffer += value;
    for (let end; (end = buffer.indexOf("\n\n")) >= 0; buffer = buffer.slice(end + 2)) {
      const data = buffer.slice(0, end).split("\n").find((l) => l.startsWith("data: "));
      if (data) {
        last = JSON.parse(data.slice(6));
        onJob(last);
      }
    }
  }
}

// Follow a job until it ends: the stream, and long polls if the stream breaks.
export async function follow(id, onJob, signal) {
  let job = null;
  try {
    job = await stream(id, onJob, signal);
  } catch (e) {
    if (e.name === "AbortError") return null;
    if (e instanceof ApiError && e.status === 404) throw e;
  }
  while (!job || !ENDED.includes(job.status)) {
    if (signal && signal.aborted) return job;
    try {
      job = await get(`/v1/jobs/${id}?wait=20`, {signal});
      onJob(job);
    } catch (e) {
      if (e.name === "AbortError") return job;
      if (e instanceof ApiError && e.status && e.status !== 429 && e.status < 500) throw e;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  return job;
}

// Upload an image input: ask for a place, PUT the file there; the job names it by `ref`.
export async function upload(file) {
  const place = await post("/v1/uploads", {content_type: file.type || "application/octet-stream"});
  if (file.size > place.max_bytes) {
    throw new ApiError(413, {error: {code: "too_large", message: `the image is ${mb(file.size)}; at most ${mb(place.max_bytes)}`}});
  }
  let reply;
  try {
    reply = await fetch(sameGateway(place.url), {method: place.method, headers: place.headers, body: file});
  } catch (e) {
    throw new ApiError(0, UNREACHABLE);
  }
  if (!reply.ok) {
    let data = null;
    try { data = await reply.json(); } catch (e) { data = null; }
    throw new ApiError(reply.status, data);
  }
  return place.ref;
}

// A local-storage upload URL is this gateway's own path, whatever name DQ_PUBLIC_URL gives the
// host: send it to the origin the page came from (the browser would refuse another one).
function sameGateway(url) {
  const parsed = new URL(url, location.href);
  return parsed.pathname.startsWith("/v1/uploads/") ? parsed.pathname + parsed.search : url;
}

function mb(bytes) {
  return (bytes / 1048576).toFixed(1) + " MB";
}
