/* Shared helpers of the web UI: building DOM safely, talking to the API, streaming chat.
 *
 * Text from users, models and the server only ever reaches the page as text nodes (h() turns
 * every string child into one); nothing here assigns innerHTML.
 */

export const $ = (selector, root = document) => root.querySelector(selector);

/** h("button", {class: "btn", onclick}, "Save") — attributes, event handlers and children; strings become text. */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name === "value" || name === "checked" || name === "selected" || name === "disabled") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

/** Replace a live-updating region's content, keeping keyboard focus on the control (by id) that had it. */
export function redraw(node, ...children) {
  const focused = document.activeElement && node.contains(document.activeElement) ? document.activeElement.id : null;
  clear(node, ...children);
  if (focused) document.getElementById(focused)?.focus({ preventScroll: true });
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---------------------------------------------------------------- formatting

export function fmtNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function fmtTime(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 1) return "under a second";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function shortSha(sha) {
  return sha ? sha.slice(0, 12) : "—";
}

/** "ft:adaptery-demo:default:lab:ftjob-abc" → "lab (on adaptery-demo)" */
export function modelLabel(id) {
  if (!id || !id.startsWith("ft:")) return id || "";
  const parts = id.split(":");
  const base = parts[1] || "";
  if (parts.length === 4) return `${parts[3]} (on ${base})`; // a stable name: ft:<base>:<tenant>:<name>
  const suffix = parts.length >= 5 ? parts[3] : "";
  const tail = (parts[parts.length - 1] || "").slice(-6);
  return `${suffix || tail} (on ${base})` + (suffix ? ` · ${tail}` : "");
}

export function badge(text, kind) {
  return h("span", { class: `badge badge-${kind || String(text).replace(/[^a-z_-]/gi, "")}` }, text);
}

// ---------------------------------------------------------------- API

export class ApiError extends Error {
  constructor(message, status, param, code) {
    super(message);
    this.status = status;
    this.param = param || null;
    this.code = code || null;
  }
}

export function readCookie(name) {
  for (const part of document.cookie ? document.cookie.split(";") : []) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return decodeURIComponent(part.slice(eq + 1).trim());
  }
  return null;
}

export function csrfHeaders() {
  const token = readCookie("adaptery_csrf");
  return token ? { "X-CSRF-Token": token } : {};
}

const listeners = { unauthenticated: [] };
export function onUnauthenticated(fn) {
  listeners.unauthenticated.push(fn);
}

export async function errorFrom(res) {
  let message = `Request failed (HTTP ${res.status}).`;
  let param = null;
  let code = null;
  try {
    const body = await res.json();
    const err = body && body.error;
    if (err && typeof err === "object") {
      message = err.message || message;
      param = err.param;
      code = err.code;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch (_) {
    /* not JSON */
  }
  if (res.status >= 500 && message.startsWith("Request failed")) message = `The server had a problem (HTTP ${res.status}).`;
  return new ApiError(message, res.status, param, code);
}

/** JSON request with the session cookie and CSRF header; throws ApiError with the server's message. */
export async function api(path, { method = "GET", body, signal, quiet401 = false } = {}) {
  const headers = { Accept: "application/json", ...(method === "GET" ? {} : csrfHeaders()) };
  const init = { method, headers, credentials: "same-origin", cache: "no-store", signal };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const session = readCookie("adaptery_csrf");  // each session has its own: it tells which one this request went out with
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Could not reach the Adaptery server. Is it running?", 0);
  }
  if (!res.ok) {
    const err = await errorFrom(res);
    // A 401 for a session the browser has since replaced (a tenant switch, a new sign-in ends the one it held) says
    // nothing of the current one: a request still in flight then must not send the page to the sign-in form.
    const stale = readCookie("adaptery_csrf") !== session;
    if (res.status === 401 && !quiet401 && !stale) listeners.unauthenticated.forEach((fn) => fn(err));
    throw err;
  }
  if (res.status === 204) return null;
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

/** Like api(), but a missing route (404/405 of the route itself) or a refusal resolves to null: "not available". */
export async function optionalApi(path) {
  try {
    return await api(path);
  } catch (err) {
    if ([403, 404, 405].includes(err.status)) return null;
    throw err;
  }
}

/** Upload a raw body with XHR so the page can show upload progress (fetch has no upload progress). */
export function uploadWithProgress(url, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    for (const [name, value] of Object.entries(csrfHeaders())) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch (_) {
        /* not JSON */
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        const err = body && body.error;
        reject(new ApiError((err && err.message) || `Upload failed (HTTP ${xhr.status}).`, xhr.status, err && err.param));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError("The upload was interrupted.", 0)));
    xhr.addEventListener("abort", () => reject(new ApiError("The upload was cancelled.", 0)));
    xhr.send(file);
  });
}

// ---------------------------------------------------------------- streaming chat

/**
 * POST /v1/chat/completions with stream=true and call onDelta(text) for each piece as it arrives.
 * Resolves {content, finishReason, usage, seconds}; rejects ApiError; an abort resolves with stopped=true.
 */
export async function streamChat(payload, { onDelta, signal, url = "/v1/chat/completions" }) {
  const started = performance.now();
  const res = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...csrfHeaders() },
    body: JSON.stringify({ ...payload, stream: true, stream_options: { include_usage: true } }),
    signal,
  }).catch((err) => {
    if (err.name === "AbortError") return null;
    throw new ApiError("Could not reach the Adaptery server. Is it running?", 0);
  });
  const result = { id: null, content: "", finishReason: null, usage: null, stopped: false, seconds: 0 };
  if (res === null) return { ...result, stopped: true };
  if (!res.ok) throw await errorFrom(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const handle = (data) => {
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.message || "The model failed.", 500);
    if (chunk.usage) result.usage = chunk.usage;
    if (chunk.id && !result.id) result.id = chunk.id; // the completion's chatcmpl- id: feedback names it
    for (const choice of chunk.choices || []) {
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        result.content += piece;
        onDelta(piece, result.content);
      }
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
    }
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (data) handle(data);
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
    result.stopped = true;
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}

// ---------------------------------------------------------------- small UI pieces

export function errorBox(err) {
  const box = h("p", { class: "form-error", role: "alert" }, err ? err.message || String(err) : "");
  if (!err) box.hidden = true;
  return box;
}

export function showError(box, err) {
  box.textContent = err ? err.message || String(err) : "";
  box.hidden = !err;
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const area = h("textarea", { class: "visually-hidden" }, text);
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const before = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = before), 1200);
  }
}

/** A modal confirmation (a native <dialog>: focus trapped, Escape cancels). Resolves true on confirm. */
export function confirmDialog({ title, message, confirm = "Delete", danger = true }) {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": "dialog-title" },
      h("h2", { id: "dialog-title" }, title),
      h("p", {}, message),
      h(
        "div",
        { class: "dialog-buttons" },
        h("button", { type: "button", class: "btn", value: "cancel", onclick: () => dialog.close("cancel") }, "Cancel"),
        h(
          "button",
          { type: "button", class: danger ? "btn btn-danger" : "btn btn-primary", id: "dialog-confirm", onclick: () => dialog.close("ok") },
          confirm,
        ),
      ),
    );
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok");
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
    dialog.querySelector(".btn").focus();
  });
}

export function field(label, control, help) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  const parts = [h("label", { for: id }, label), control];
  if (help) {
    const helpId = `${id}-help`;
    control.setAttribute("aria-describedby", helpId);
    parts.push(h("p", { class: "help", id: helpId }, help));
  }
  return h("div", { class: "field" }, parts);
}

export function table(headers, rows, { caption, empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("p", { class: "muted empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      caption ? h("caption", { class: "visually-hidden" }, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))),
    ),
  );
}

/** A readable label for an API field name: "lora_alpha" → "lora alpha". */
export function fieldLabel(name) {
  return String(name).replace(/_/g, " ");
}

function plainValue(value) {
  if (value === null || value === undefined || value === "") return "—";
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "number") return Number.isInteger(value) ? fmtNumber(value) : String(Number(value.toPrecision(6)));
  return String(value);
}

/**
 * Any JSON value as tables, not a JSON dump: an object is a table of field and value (nested objects
 * nest), a list of objects a table with a column per field, a list of plain values one line.
 */
export function valueTable(value, { caption, empty = "None." } = {}) {
  if (Array.isArray(value)) {
    if (!value.length) return h("span", { class: "muted" }, empty);
    if (!value.every((x) => x && typeof x === "object" && !Array.isArray(x))) return value.map(plainValue).join(", ");
    const columns = [...new Set(value.flatMap((row) => Object.keys(row)))].filter((c) => c !== "object");
    return table(columns.map(fieldLabel), value.map((row) => columns.map((c) => (row[c] && typeof row[c] === "object" ? valueTable(row[c]) : plainValue(row[c])))), { caption, empty });
  }
  if (value && typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    if (!entries.length) return h("span", { class: "muted" }, empty);
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "kv" },
        caption ? h("caption", { class: "visually-hidden" }, caption) : null,
        h("tbody", {}, entries.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, fieldLabel(k)), h("td", {}, v && typeof v === "object" ? valueTable(v, { caption: fieldLabel(k) }) : plainValue(v))))),
      ),
    );
  }
  return plainValue(value);
}

export function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", { class: "card-title" }, title), children);
}
