/* Chat (saved conversations, streaming, stop, regenerate, copy) and side-by-side compare. */

import { api, clear, confirmDialog, copyText, errorBox, field, fmtNumber, fmtTime, h, modelLabel, showError, streamChat } from "/static/lib.js";
import { renderMarkdown } from "/static/markdown.js";

const LAST_MODEL = "adaptery.model";
const LAST_PARAMS = "adaptery.chat-params"; // the settings a new chat starts with: the last ones used

function lastParams() {
  try {
    const params = JSON.parse(recall(LAST_PARAMS) || "{}");
    return params && typeof params === "object" ? params : {};
  } catch (_) {
    return {};
  }
}

function remember(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch (_) {
    /* storage unavailable */
  }
}

function recall(key) {
  try {
    return localStorage.getItem(key);
  } catch (_) {
    return null;
  }
}

/** Focus the message box once the page is built, unless the user has already moved on to another control. */
function focusUnlessBusy(node) {
  const active = document.activeElement;
  if (!active || active === document.body || active.id === "view") node.focus();
}

/** A <select> of the models the caller may chat with: base models, adapters (labelled by suffix), stable names. */
export function modelSelect(catalog, { id, selected, label = "Model" }) {
  const chat = catalog.filter((x) => ["base", "adapter", "name"].includes(x.kind));
  const select = h(
    "select",
    { id, name: id },
    h("optgroup", { label: "Base models" }, chat.filter((x) => x.kind === "base").map((x) => h("option", { value: x.id }, x.display_name || x.id))),
    chat.some((x) => x.kind === "adapter")
      ? h("optgroup", { label: "Fine-tuned adapters" }, chat.filter((x) => x.kind === "adapter").map((x) => h("option", { value: x.id, title: x.id }, modelLabel(x.id))))
      : null,
    chat.some((x) => x.kind === "name")
      ? h("optgroup", { label: "Stable names" }, chat.filter((x) => x.kind === "name").map((x) => h("option", { value: x.id, title: x.id }, modelLabel(x.id))))
      : null,
  );
  if (selected && chat.some((x) => x.id === selected)) select.value = selected;
  return field(label, select);
}

/**
 * `contextOf()`: the chosen model's context length in tokens (null when unknown); an answer may not
 * ask for more than it holds, and the page says so before sending rather than after the server refuses.
 */
function settingsPanel(prefix, params = {}, systemPrompt = "", contextOf = () => null) {
  const num = (name, attrs, value) => h("input", { id: `${prefix}${name}`, type: "number", inputmode: "decimal", value: String(value), ...attrs });
  const system = h("textarea", { id: `${prefix}system-prompt`, rows: "2", placeholder: "e.g. You are a helpful assistant. Answer briefly." }, systemPrompt);
  const temperature = num("temperature", { min: "0", max: "2", step: "0.1" }, params.temperature ?? 0.7);
  const maxTokens = num("max-tokens", { min: "1", max: "32768", step: "1", inputmode: "numeric" }, params.max_tokens ?? 256);
  const topP = num("top-p", { min: "0", max: "1", step: "0.05" }, params.top_p ?? 1);
  const error = errorBox();
  const panel = h(
    "details",
    { class: "settings", id: `${prefix}settings` },
    h("summary", {}, "Settings: system prompt, temperature, length"),
    h(
      "div",
      { class: "settings-grid" },
      h("div", { class: "field-wide" }, field("System prompt (optional)", system, "Instructions the model follows for the whole conversation.")),
      field("Temperature", temperature, "0 always picks the likeliest word; higher is more varied (0–2)."),
      field("Max tokens", maxTokens, "The longest answer, in tokens (about ¾ of a word each); the model's context holds the message and the answer together."),
      field("Top-p", topP, "Sample only from the likeliest words making up this share (0–1; 1 = all)."),
    ),
    error,
  );
  const read = () => {
    const value = (input, low, high, name, integer) => {
      const n = Number(input.value);
      if (input.value === "" || !Number.isFinite(n) || n < low || n > high || (integer && !Number.isInteger(n))) {
        panel.open = true;
        input.focus();
        const context = input === maxTokens ? contextOf() : null;
        const why = context ? `: this model's context holds ${fmtNumber(context)} tokens, the message and the answer together` : "";
        throw new Error(`${name} must be ${integer ? "a whole number" : "a number"} from ${low} to ${fmtNumber(high)}${why}.`);
      }
      return n;
    };
    showError(error, null);
    try {
      const context = contextOf();
      const limit = context ? context - 1 : 32768; // at least one token of the context is the message
      const tokens = value(maxTokens, 1, limit, "Max tokens", true);
      return {
        system: system.value.trim(),
        params: {
          temperature: value(temperature, 0, 2, "Temperature"),
          max_tokens: tokens,
          top_p: value(topP, 0, 1, "Top-p"),
        },
      };
    } catch (err) {
      showError(error, err);
      throw err;
    }
  };
  const bound = () => {
    const context = contextOf();
    maxTokens.max = String(context ? context - 1 : 32768);
  };
  bound();
  return { panel, read, bound, inputs: [system, temperature, maxTokens, topP] };
}

function messageNode(role, { model, content = "", id, stopped, completion_id: completionId } = {}) {
  const body = h("div", { class: "content" });
  if (role === "assistant") body.append(renderMarkdown(content));
  else body.textContent = content;
  const node = h(
    "article",
    { class: `message ${role}`, dataset: { done: "true", id: id || "", completionId: completionId || "" } },
    h("div", { class: "message-head" }, h("strong", {}, role === "user" ? "You" : "Assistant"), model ? h("span", { class: "muted model-tag", title: model }, modelLabel(model)) : null),
    body,
    h("div", { class: "message-meta muted" }, stopped ? "Stopped" : ""),
    h("div", { class: "message-actions" }),
  );
  node.contentText = content;
  return node;
}

/** Re-render streamed markdown at most once per animation frame. */
function liveMarkdown(target, afterRender = () => {}) {
  let pending = null;
  return (text) => {
    pending = text;
    requestAnimationFrame(() => {
      if (pending === null) return;
      clear(target, renderMarkdown(pending));
      pending = null;
      afterRender();
    });
  };
}

/** The context length of a model in the catalog (an adapter's is its base's). */
function contextOfModel(catalog, id) {
  const entry = catalog.find((x) => x.id === id);
  return entry && entry.context_length ? entry.context_length : null;
}

// ====================================================================== chat

export async function renderChat(root, ctx, { args, query }) {
  const catalog = await ctx.models(true);
  let conversation = null;
  const history = []; // [{role, content, id, node}]
  let controller = null;
  const policy = await api("/api/feedback/policy").catch(() => null);
  const given = new Map(); // message id -> the caller's feedback on it

  const list = h("ul", { class: "conversation-list", id: "conversations", "aria-label": "Saved conversations" });
  const newChat = h("button", { type: "button", class: "btn btn-primary btn-block", id: "new-chat" }, "New chat");
  const initialModel = query.get("model") || recall(LAST_MODEL);
  const picker = modelSelect(catalog, { id: "model-select", selected: initialModel });
  const select = picker.querySelector("select");
  const settings = settingsPanel("", lastParams(), "", () => contextOfModel(catalog, select.value));
  select.addEventListener("change", settings.bound);
  const messages = h("div", { id: "messages", class: "messages", "aria-busy": "false", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: "0" });
  const prompt = h("textarea", { id: "prompt", rows: "2", placeholder: "Type your message… (Enter to send, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", class: "btn btn-primary", id: "send" }, "Send");
  const stop = h("button", { type: "button", class: "btn", id: "stop", disabled: true }, "Stop");
  const error = errorBox();
  const composer = h("form", { class: "composer", id: "composer", novalidate: true }, h("label", { for: "prompt", class: "visually-hidden" }, "Message"), prompt, h("div", { class: "composer-bar" }, error, h("div", { class: "composer-buttons" }, stop, send)));

  const emptyState = () => h("div", { class: "empty-state" }, h("p", { class: "empty-title" }, "Start a conversation"), h("p", { class: "muted" }, "Pick a model, type a message below and press Enter. Conversations are saved for you alone."));

  clear(
    root,
    h(
      "div",
      { class: "chat-layout" },
      h(
        "aside",
        { class: "sidebar", "aria-label": "Conversations" },
        newChat,
        // What the workspace collects: beside the chats (below the message box on a phone)
        policy ? h("p", { class: "muted feedback-policy", id: "feedback-policy" }, policy.description, " ", h("a", { href: "#/feedback" }, "Your feedback…")) : null,
        h("h2", { class: "sidebar-title" }, "Saved chats"),
        list,
      ),
      h(
        "section",
        { class: "chat-main", "aria-label": "Chat" },
        h("div", { class: "toolbar" }, picker, h("a", { class: "btn btn-quiet btn-small", href: "#/compare" }, "Compare two models…"), h("a", { class: "btn btn-quiet btn-small", href: "#/arena", id: "open-arena" }, "Blind arena…")),
        settings.panel,
        messages,
        composer,
      ),
    ),
  );

  // The pane follows a streaming answer to its end, unless the reader has scrolled up to read something.
  let following = true;
  messages.addEventListener("scroll", () => {
    following = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  });
  const follow = () => {
    if (following) messages.scrollTop = messages.scrollHeight;
  };

  const setBusy = (busy) => {
    messages.setAttribute("aria-busy", String(busy));
    send.disabled = busy;
    stop.disabled = !busy;
    select.disabled = busy;
  };

  async function loadList() {
    const { data } = await api("/api/conversations");
    clear(
      list,
      data.length
        ? data.map((c) => {
            const open = h(
              "a",
              { href: `#/chat/${encodeURIComponent(c.id)}`, class: "conversation-open", title: c.title },
              h("span", { class: "conversation-title" }, c.title),
              h("span", { class: "muted conversation-model" }, h("time", { class: "conversation-date", datetime: new Date(c.updated_at * 1000).toISOString() }, fmtTime(c.updated_at)), c.model ? ` · ${modelLabel(c.model)}` : ""),
            );
            const rename = h("button", { type: "button", class: "btn-icon", "aria-label": `Rename “${c.title}”`, title: "Rename" }, "✎");
            const remove = h("button", { type: "button", class: "btn-icon", "aria-label": `Delete “${c.title}”`, title: "Delete" }, "×");
            const item = h("li", { class: conversation && conversation.id === c.id ? "conversation active" : "conversation", dataset: { id: c.id } }, open, rename, remove);
            rename.addEventListener("click", () => startRename(item, c));
            remove.addEventListener("click", async () => {
              if (!(await confirmDialog({ title: "Delete this conversation?", message: `“${c.title}” and its ${c.message_count} message(s) will be gone for good.` }))) return;
              await api(`/api/conversations/${encodeURIComponent(c.id)}`, { method: "DELETE" });
              if (conversation && conversation.id === c.id) ctx.navigate("#/chat");
              else loadList();
            });
            return item;
          })
        : h("li", { class: "muted empty" }, "No saved chats yet."),
    );
  }

  function startRename(item, c) {
    const input = h("input", { type: "text", value: c.title, "aria-label": "New title", maxlength: "200" });
    const finish = async (save) => {
      if (save && input.value.trim() && input.value.trim() !== c.title) {
        await api(`/api/conversations/${encodeURIComponent(c.id)}`, { method: "PATCH", body: { title: input.value.trim() } });
      }
      loadList();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true), { once: true });
    clear(item, input);
    input.focus();
    input.select();
  }

  function refreshActions() {
    history.forEach((entry, index) => {
      const actions = entry.node.querySelector(".message-actions");
      const copy = h("button", { type: "button", class: "btn btn-small btn-quiet copy" }, "Copy");
      copy.addEventListener("click", () => copyText(entry.content, copy));
      const buttons = [copy];
      if (entry.role === "assistant" && index === history.length - 1) {
        buttons.push(h("button", { type: "button", class: "btn btn-small btn-quiet regenerate", onclick: regenerate }, "Regenerate"));
      }
      if (entry.role === "assistant" && entry.id && policy && policy.collect !== "off") buttons.push(...feedbackControls(entry));
      if (entry.role === "user" && index === history.length - 1) {
        // No answer to this message (the send failed, or the page closed meanwhile): ask again.
        buttons.push(h("button", { type: "button", class: "btn btn-small retry", onclick: retry }, "Retry"));
      }
      clear(actions, buttons);
    });
  }

  /** Thumbs up/down (then an optional reason) and "Edit answer" (the correction is kept beside the original). */
  function feedbackControls(entry) {
    const mine = given.get(entry.id);
    const url = `/api/conversations/${encodeURIComponent(conversation.id)}/messages/${encodeURIComponent(entry.id)}/feedback`;
    const send = async (fields) => {
      const current = given.get(entry.id) || {};
      const body = { rating: current.rating ?? null, reason: current.reason || "", correction: current.correction ?? null, ...fields };
      try {
        given.set(entry.id, await api(url, { method: "POST", body }));
      } catch (err) {
        showError(error, err);
        return false;
      }
      refreshActions();
      return true;
    };
    const thumb = (rating, label, glyph) =>
      h("button", { type: "button", class: `btn btn-small btn-quiet thumb${mine && mine.rating === rating ? " chosen" : ""}`, "aria-pressed": String(Boolean(mine && mine.rating === rating)), "aria-label": label, title: label, onclick: () => send({ rating }) }, glyph);
    const controls = [thumb(1, "Good answer", "✓ Good"), thumb(-1, "Bad answer", "✗ Bad")];
    const edit = h("button", { type: "button", class: "btn btn-small btn-quiet edit-answer" }, mine && mine.correction ? "Edit correction" : "Edit answer");
    edit.addEventListener("click", () => {
      const box = h("textarea", { class: "correction-input", rows: "4", "aria-label": "Corrected answer" }, (mine && mine.correction) || entry.content);
      const save = h("button", { type: "button", class: "btn btn-small btn-primary save-correction" }, "Save correction");
      const cancel = h("button", { type: "button", class: "btn btn-small btn-quiet", onclick: refreshActions }, "Cancel");
      save.addEventListener("click", () => box.value.trim() && send({ correction: box.value }));
      clear(entry.node.querySelector(".message-actions"), h("div", { class: "correction-form" }, box, h("div", { class: "composer-buttons" }, cancel, save)));
      box.focus();
    });
    controls.push(edit);
    if (mine && mine.rating !== null) {
      const reason = h("input", { type: "text", class: "feedback-reason", maxlength: "2000", placeholder: "Why? (optional)", "aria-label": "Reason", value: mine.reason || "" });
      const keep = h("button", { type: "button", class: "btn btn-small save-reason" }, mine.reason ? "Saved" : "Save reason");
      keep.addEventListener("click", () => send({ reason: reason.value.trim() }));
      controls.push(reason, keep);
    }
    entry.node.querySelector(".correction")?.remove();
    if (mine && mine.correction) {
      entry.node.querySelector(".message-actions").before(
        h("details", { class: "correction", open: true }, h("summary", {}, "Your correction (kept beside the original)"), h("div", { class: "content" }, renderMarkdown(mine.correction))),
      );
    }
    return controls;
  }

  function addEntry(entry) {
    messages.querySelector(".empty-state")?.remove();
    messages.append(entry.node);
    history.push(entry);
    following = true;
    follow();
  }

  async function ensureConversation(model, system, params) {
    if (conversation) {
      if (conversation.model !== model || conversation.system_prompt !== system || JSON.stringify(conversation.params) !== JSON.stringify(params)) {
        conversation = await api(`/api/conversations/${encodeURIComponent(conversation.id)}`, { method: "PATCH", body: { model, system_prompt: system, params } });
      }
      return;
    }
    conversation = await api("/api/conversations", { method: "POST", body: { model, system_prompt: system, params } });
    window.history.replaceState(null, "", `#/chat/${encodeURIComponent(conversation.id)}`);
  }

  async function answer(model, system, params) {
    const node = messageNode("assistant", { model });
    node.dataset.done = "false";
    const entry = { role: "assistant", content: "", node };
    addEntry(entry);
    const target = node.querySelector(".content");
    target.append(h("span", { class: "typing", "aria-label": "The model is writing" }, "…"));
    const render = liveMarkdown(target, follow);
    controller = new AbortController();
    setBusy(true);
    const sent = [...(system ? [{ role: "system", content: system }] : []), ...history.slice(0, -1).map((x) => ({ role: x.role, content: x.content }))];
    try {
      const result = await streamChat({ model, messages: sent, ...params }, { onDelta: (_, all) => render(all), signal: controller.signal });
      entry.content = result.content;
      clear(target, renderMarkdown(result.content));
      follow();
      const tokens = result.usage ? result.usage.completion_tokens : null;
      node.querySelector(".message-meta").textContent = [
        result.stopped ? "Stopped" : null,
        tokens !== null ? `${tokens} tokens in ${result.seconds.toFixed(1)} s (${fmtNumber(tokens / (result.seconds || 1), 1)} tokens/s)` : null,
        result.finishReason === "length" ? "hit the max tokens limit" : null,
      ]
        .filter(Boolean)
        .join(" · ");
      const saved = await api(`/api/conversations/${encodeURIComponent(conversation.id)}/messages`, { method: "POST", body: { role: "assistant", content: result.content, model, stopped: result.stopped, completion_id: result.id } });
      entry.id = saved.id;
      entry.completionId = saved.completion_id;
      if (saved.completion_id) node.dataset.completionId = saved.completion_id;
    } catch (err) {
      history.pop();
      node.remove();
      showError(error, new Error(`${err.message} Your message is kept: press Retry to ask again.`));
    } finally {
      controller = null;
      setBusy(false);
      refreshActions();
      follow(); // the meta line and the buttons below the answer too
      node.dataset.done = "true";
      loadList();
    }
  }

  async function onSend(event) {
    event.preventDefault();
    if (controller) return;
    const text = prompt.value.trim();
    if (!text) return;
    showError(error, null);
    let read;
    try {
      read = settings.read();
    } catch (_) {
      return;
    }
    const model = select.value;
    if (!model) {
      showError(error, new Error("There is no model to chat with yet."));
      return;
    }
    remember(LAST_MODEL, model);
    remember(LAST_PARAMS, JSON.stringify(read.params));
    setBusy(true);
    try {
      await ensureConversation(model, read.system, read.params);
      const saved = await api(`/api/conversations/${encodeURIComponent(conversation.id)}/messages`, { method: "POST", body: { role: "user", content: text } });
      prompt.value = "";
      addEntry({ role: "user", content: text, id: saved.id, node: messageNode("user", { content: text, id: saved.id }) });
    } catch (err) {
      showError(error, err);
      setBusy(false);
      return;
    }
    await answer(model, read.system, read.params);
  }

  async function retry() {
    if (controller) return;
    const last = history[history.length - 1];
    if (!last || last.role !== "user") return;
    let read;
    try {
      read = settings.read();
    } catch (_) {
      return;
    }
    showError(error, null);
    setBusy(true);
    try {
      await ensureConversation(select.value, read.system, read.params);
    } catch (err) {
      showError(error, err);
      setBusy(false);
      return;
    }
    await answer(select.value, read.system, read.params);
  }

  async function regenerate() {
    if (controller) return;
    const last = history[history.length - 1];
    if (!last || last.role !== "assistant") return;
    let read;
    try {
      read = settings.read();
    } catch (_) {
      return;
    }
    setBusy(true);
    showError(error, null);
    try {
      if (last.id) await api(`/api/conversations/${encodeURIComponent(conversation.id)}/messages/${encodeURIComponent(last.id)}`, { method: "DELETE" });
      history.pop();
      last.node.remove();
      await ensureConversation(select.value, read.system, read.params);
    } catch (err) {
      showError(error, err);
      setBusy(false);
      return;
    }
    await answer(select.value, read.system, read.params);
  }

  composer.addEventListener("submit", onSend);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  newChat.addEventListener("click", () => ctx.navigate("#/chat"));

  if (args[0]) {
    try {
      conversation = await api(`/api/conversations/${encodeURIComponent(args[0])}`);
    } catch (err) {
      messages.append(h("p", { class: "form-error", role: "alert" }, err.message));
    }
  }
  if (conversation) {
    if (conversation.model && [...select.options].some((o) => o.value === conversation.model)) select.value = conversation.model;
    const [system, temperature, maxTokens, topP] = settings.inputs;
    system.value = conversation.system_prompt || "";
    if (conversation.params.temperature !== undefined) temperature.value = conversation.params.temperature;
    if (conversation.params.max_tokens !== undefined) maxTokens.value = conversation.params.max_tokens;
    if (conversation.params.top_p !== undefined) topP.value = conversation.params.top_p;
    settings.bound();
    if (policy && policy.collect !== "off") {
      const { data } = await api(`/api/conversations/${encodeURIComponent(conversation.id)}/feedback`);
      for (const item of data) given.set(item.message_id, item);
    }
    for (const message of conversation.messages) {
      addEntry({ role: message.role, content: message.content, id: message.id, node: messageNode(message.role, message) });
    }
    refreshActions();
  }
  if (!history.length) messages.append(emptyState());
  await loadList();
  focusUnlessBusy(prompt);
  return () => controller && controller.abort();
}

// ====================================================================== compare

export async function renderCompare(root, ctx, { query }) {
  const catalog = await ctx.models(true);
  const adapters = catalog.filter((x) => x.kind === "adapter");
  const bases = catalog.filter((x) => x.kind === "base");
  const firstAdapter = adapters.length ? adapters[adapters.length - 1] : null;
  const pickA = modelSelect(catalog, { id: "compare-a", label: "Model A", selected: query.get("a") || (firstAdapter ? firstAdapter.base_model : bases[0] && bases[0].id) });
  const pickB = modelSelect(catalog, { id: "compare-b", label: "Model B", selected: query.get("b") || (firstAdapter ? firstAdapter.id : bases[0] && bases[0].id) });
  const smallerContext = () => {
    const known = [pickA, pickB].map((p) => contextOfModel(catalog, p.querySelector("select").value)).filter(Boolean);
    return known.length ? Math.min(...known) : null;
  };
  const settings = settingsPanel("compare-", lastParams(), "", smallerContext);
  for (const p of [pickA, pickB]) p.querySelector("select").addEventListener("change", settings.bound);
  settings.bound();
  const prompt = h("textarea", { id: "compare-prompt", rows: "3", placeholder: "The same message goes to both models…" });
  const run = h("button", { type: "submit", class: "btn btn-primary", id: "compare-run" }, "Send to both");
  const stop = h("button", { type: "button", class: "btn", id: "compare-stop", disabled: true }, "Stop");
  const error = errorBox();
  const column = (side) =>
    h("section", { class: "compare-col card", id: `compare-col-${side}`, "aria-live": "polite", dataset: { done: "true" } }, h("h2", { class: "compare-model" }, `Model ${side.toUpperCase()}`), h("div", { class: "content" }, h("p", { class: "muted" }, "The answer appears here.")), h("p", { class: "message-meta muted" }));
  const columns = { a: column("a"), b: column("b") };
  const form = h("form", { class: "card compare-form", novalidate: true }, h("div", { class: "compare-pickers" }, pickA, pickB), settings.panel, field("Message", prompt), h("div", { class: "composer-bar" }, error, h("div", { class: "composer-buttons" }, stop, run)));
  clear(root, h("h1", { class: "page-title" }, "Compare two models"), h("p", { class: "muted page-intro" }, "Send one message to two models (say the base and your adapter) and watch both answers stream side by side. ", h("a", { href: "#/arena" }, "Compare them blind in the arena…")), form, h("div", { class: "compare-grid" }, columns.a, columns.b));

  let controller = null;
  async function stream(side, model, payload) {
    const col = columns[side];
    col.dataset.done = "false";
    col.querySelector(".compare-model").textContent = `${side.toUpperCase()}: ${modelLabel(model)}`;
    col.querySelector(".compare-model").title = model;
    const target = col.querySelector(".content");
    clear(target, h("span", { class: "typing" }, "…"));
    const meta = col.querySelector(".message-meta");
    meta.textContent = "";
    const render = liveMarkdown(target);
    try {
      const result = await streamChat({ model, ...payload }, { onDelta: (_, all) => render(all), signal: controller.signal });
      clear(target, renderMarkdown(result.content));
      const tokens = result.usage ? result.usage.completion_tokens : null;
      meta.textContent = [result.stopped ? "Stopped" : null, tokens !== null ? `${tokens} tokens in ${result.seconds.toFixed(1)} s` : `${result.seconds.toFixed(1)} s`].filter(Boolean).join(" · ");
    } catch (err) {
      clear(target, h("p", { class: "form-error", role: "alert" }, err.message));
    } finally {
      col.dataset.done = "true";
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (controller) return;
    showError(error, null);
    const text = prompt.value.trim();
    if (!text) {
      showError(error, new Error("Type a message to send."));
      return;
    }
    let read;
    try {
      read = settings.read();
    } catch (_) {
      return;
    }
    const messages = [...(read.system ? [{ role: "system", content: read.system }] : []), { role: "user", content: text }];
    controller = new AbortController();
    run.disabled = true;
    stop.disabled = false;
    // Both requests start now and stream together; the engine batches them.
    await Promise.all([stream("a", pickA.querySelector("select").value, { messages, ...read.params }), stream("b", pickB.querySelector("select").value, { messages, ...read.params })]);
    controller = null;
    run.disabled = false;
    stop.disabled = true;
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  focusUnlessBusy(prompt);
  return () => controller && controller.abort();
}
