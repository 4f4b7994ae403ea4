// The page: which view shows (from the URL's #), and the API key (asked once per tab).

import {ApiError, get, key, setKey} from "./api.js";
import {$, h} from "./ui.js";
import * as create from "./create.js";
import * as gallery from "./gallery.js";
import * as jobView from "./job.js";
import * as operator from "./operator.js";

const VIEWS = {create, gallery, job: jobView, operator};
let current = null;
let open = false; // the server takes no key

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, arg] = hash.split("/");
  if (name === "jobs" && arg) return ["job", arg];
  if (name === "gallery" || name === "operator") return [name, null];
  return ["create", null];
}

function show() {
  const [name, arg] = route();
  if (current && current !== VIEWS[name]) current.leave?.();
  for (const view of Object.keys(VIEWS)) $("view-" + view).hidden = view !== name;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("on", link.dataset.view === name || (name === "job" && link.dataset.view === "gallery"));
  }
  current = VIEWS[name];
  current.enter(arg);
}

// A problem no view owns (the server went away, say), shown above the views.
export function notice(message) {
  const el = $("notice");
  el.textContent = message || "";
  el.hidden = !message;
}

function who() {
  const el = $("who");
  el.replaceChildren();
  if (open) {
    el.append(h("span.dot.open"), "open API: no key needed");
    return;
  }
  const shown = key() ? "key …" + key().slice(-4) : "no key";
  el.append(h("span.dot"), shown, h("button.link", {type: "button", text: "change", onclick: askKey}));
}

function askKey() {
  $("key-dialog").hidden = false;
  $("key").value = "";
  $("key").focus();
}

async function useKey(event) {
  event.preventDefault();
  const field = $("key-form").querySelector(".field");
  const value = $("key").value.trim();
  const before = key();
  setKey(value);
  try {
    await get("/v1/models");
    $("key-dialog").hidden = true;
    field.classList.remove("invalid");
    start();
  } catch (e) {
    setKey(before);
    field.classList.add("invalid");
    field.querySelector(".problem").textContent =
      e instanceof ApiError && e.status === 401 ? "this key is not valid here" : e.message;
  }
}

// Check the key kept for this tab (or, with none, whether the server needs one), then show the
// view. One request: a request without a key counts as a failed one against this address.
async function start() {
  notice("");
  try {
    await get("/v1/models");
    open = !key();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      setKey("");
      who();
      askKey();
      return;
    }
    notice(e.message);
  }
  who();
  show();
}

window.addEventListener("hashchange", show);
document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  start();
});
