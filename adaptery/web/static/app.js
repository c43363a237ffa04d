/* Adaptery web UI: sign-in and streaming chat.
 *
 * Plain ES2020, no dependencies, no external resources.
 * Security: model output and server messages are only ever inserted with
 * textContent / text nodes, never as HTML.
 */
"use strict";

(() => {
  // ------------------------------------------------------------------
  // Small helpers
  // ------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  };

  const CSRF_COOKIE = "adaptery_csrf";
  const MODEL_STORAGE_KEY = "adaptery.model";
  const BANNER_STORAGE_KEY = "adaptery.passwordBannerDismissed";

  function readCookie(name) {
    const parts = document.cookie ? document.cookie.split(";") : [];
    for (const part of parts) {
      const eq = part.indexOf("=");
      if (eq < 0) continue;
      const key = part.slice(0, eq).trim();
      if (key === name) {
        const raw = part.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
        try {
          return decodeURIComponent(raw);
        } catch (_) {
          return raw;
        }
      }
    }
    return null;
  }

  function storageGet(store, key) {
    try {
      return store.getItem(key);
    } catch (_) {
      return null;
    }
  }

  function storageSet(store, key, value) {
    try {
      store.setItem(key, value);
    } catch (_) {
      /* storage may be unavailable (private mode); ignore */
    }
  }

  class ApiError extends Error {
    constructor(message, status, type, code) {
      super(message);
      this.name = "ApiError";
      this.status = status || 0;
      this.type = type || null;
      this.code = code || null;
    }
  }

  function friendlyStatus(status) {
    if (status === 401) return "You are not signed in.";
    if (status === 403) return "You do not have permission to do that.";
    if (status === 404) return "Not found.";
    if (status === 429) return "Too many requests. Please wait a moment and try again.";
    if (status >= 500) return `The server had a problem (HTTP ${status}). Please try again.`;
    return `Request failed (HTTP ${status}).`;
  }

  /** Turn a non-2xx response into an ApiError using the OpenAI error shape. */
  async function errorFromResponse(res) {
    let message = null;
    let type = null;
    let code = null;
    try {
      const text = await res.text();
      if (text) {
        const data = JSON.parse(text);
        const err = data && data.error;
        if (err && typeof err === "object") {
          if (typeof err.message === "string" && err.message) message = err.message;
          type = err.type || null;
          code = err.code || null;
        } else if (typeof err === "string" && err) {
          message = err;
        } else if (data && typeof data.detail === "string") {
          message = data.detail;
        }
      }
    } catch (_) {
      /* not JSON; fall through to a generic message */
    }
    return new ApiError(message || friendlyStatus(res.status), res.status, type, code);
  }

  function networkError(err) {
    if (err && err.name === "AbortError") return err;
    return new ApiError("Could not reach the Adaptery server. Check that it is running and try again.", 0);
  }

  /** fetch() wrapper: same-origin cookies, JSON body, CSRF header on non-GET requests. */
  async function apiFetch(path, { method = "GET", body, signal, accept = "application/json" } = {}) {
    const headers = { Accept: accept };
    const upper = method.toUpperCase();
    if (upper !== "GET" && upper !== "HEAD") {
      const csrf = readCookie(CSRF_COOKIE);
      if (csrf) headers["X-CSRF-Token"] = csrf;
    }
    const init = { method: upper, headers, credentials: "same-origin", cache: "no-store", signal };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (err) {
      throw networkError(err);
    }
    return res;
  }

  /** JSON request that throws ApiError on non-2xx; returns parsed JSON or null (204). */
  async function apiJson(path, options = {}) {
    const res = await apiFetch(path, options);
    if (!res.ok) {
      const err = await errorFromResponse(res);
      if (res.status === 401 && state.user && !options.noSessionRedirect) {
        sessionExpired();
      }
      throw err;
    }
    if (res.status === 204) return null;
    const text = await res.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      throw new ApiError("The server sent an unexpected response.", res.status);
    }
  }

  // ------------------------------------------------------------------
  // State
  // ------------------------------------------------------------------

  const state = {
    user: null, // /api/me body
    history: [], // [{role, content}] — user/assistant turns sent to the model
    streaming: false,
    controller: null,
    bannerDismissed: false,
  };

  // ------------------------------------------------------------------
  // Elements
  // ------------------------------------------------------------------

  const ui = {};

  function bindElements() {
    for (const id of [
      "boot",
      "login-view",
      "login-form",
      "username",
      "password",
      "login-error",
      "login-submit",
      "app",
      "tenant-name",
      "user-name",
      "logout",
      "password-banner",
      "set-password-form",
      "password-username",
      "new-password",
      "set-password-submit",
      "password-error",
      "password-saved",
      "dismiss-banner",
      "model-select",
      "refresh-models",
      "new-chat",
      "settings",
      "settings-error",
      "system-prompt",
      "temperature",
      "max-tokens",
      "top-p",
      "messages",
      "empty-state",
      "composer",
      "prompt",
      "send",
      "stop",
    ]) {
      ui[id.replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = $(id);
    }
  }

  function showError(node, message) {
    if (message) {
      node.textContent = message;
      node.hidden = false;
    } else {
      node.textContent = "";
      node.hidden = true;
    }
  }

  // ------------------------------------------------------------------
  // Views
  // ------------------------------------------------------------------

  function showLogin(message) {
    state.user = null;
    document.body.classList.remove("is-loading", "is-signed-in");
    document.body.classList.add("is-signed-out");
    ui.app.hidden = true;
    ui.loginView.hidden = false;
    showError(ui.loginError, message || "");
    ui.loginSubmit.disabled = false;
    document.title = "Sign in · Adaptery";
    const target = ui.username.value ? ui.password : ui.username;
    target.focus();
  }

  function showApp(me) {
    state.user = me;
    document.body.classList.remove("is-loading", "is-signed-out");
    document.body.classList.add("is-signed-in");
    ui.loginView.hidden = true;
    ui.app.hidden = false;
    ui.password.value = "";
    showError(ui.loginError, "");

    const username = (me && me.user && me.user.username) || "";
    const tenant = (me && me.tenant && me.tenant.name) || "";
    ui.userName.textContent = username;
    ui.passwordUsername.value = username;
    ui.userName.title = me && me.role ? `${username} (${me.role})` : username;
    ui.tenantName.textContent = tenant;
    ui.tenantName.title = tenant;
    document.title = tenant ? `Chat · ${tenant} · Adaptery` : "Chat · Adaptery";

    const dismissKey = `${BANNER_STORAGE_KEY}:${(me && me.user && me.user.id) || ""}`;
    state.bannerDismissed = storageGet(window.sessionStorage, dismissKey) === "1";
    ui.passwordBanner.hidden = Boolean(me && me.has_password) || state.bannerDismissed;
    ui.passwordSaved.hidden = true;
    showError(ui.passwordError, "");

    loadModels();
    autoGrow();
    ui.prompt.focus();
  }

  function sessionExpired() {
    stopStreaming();
    resetConversation();
    showLogin("Your session has ended. Please sign in again.");
  }

  // ------------------------------------------------------------------
  // Auth
  // ------------------------------------------------------------------

  /** Message for `/?link=invalid` (the server's redirect after a bad sign-in link); cleans the URL. */
  function takeLinkMessage() {
    let message = "";
    try {
      const url = new URL(window.location.href);
      const link = url.searchParams.get("link");
      if (link) {
        if (link === "invalid") {
          message = "That sign-in link is invalid, expired or already used. " +
            "Sign in with your password, or ask for a new sign-in link.";
        }
        url.searchParams.delete("link");
        window.history.replaceState(null, "", url.pathname + url.search + url.hash);
      }
    } catch (_) {
      /* ignore */
    }
    return message;
  }

  async function checkSession() {
    const linkMessage = takeLinkMessage();
    try {
      const res = await apiFetch("/api/me");
      if (res.ok) {
        showApp(await res.json());
        return;
      }
      if (res.status === 401) {
        showLogin(linkMessage);
        return;
      }
      const err = await errorFromResponse(res);
      showLogin(err.message);
    } catch (err) {
      showLogin(err.message || "Could not reach the Adaptery server.");
    }
  }

  async function onLogin(event) {
    event.preventDefault();
    const username = ui.username.value.trim();
    const password = ui.password.value;
    ui.username.removeAttribute("aria-invalid");
    ui.password.removeAttribute("aria-invalid");
    if (!username || !password) {
      const missing = !username ? ui.username : ui.password;
      missing.setAttribute("aria-invalid", "true");
      showError(ui.loginError, "Please enter your username and password.");
      missing.focus();
      return;
    }
    showError(ui.loginError, "");
    ui.loginSubmit.disabled = true;
    ui.loginSubmit.textContent = "Signing in…";
    try {
      const me = await apiJson("/api/auth/login", {
        method: "POST",
        body: { username, password },
        noSessionRedirect: true,
      });
      if (me && me.user) {
        showApp(me);
      } else {
        // Unexpected body: ask the server who we are.
        await checkSession();
      }
    } catch (err) {
      ui.password.value = "";
      showError(ui.loginError, err.message || "Sign-in failed.");
      ui.password.focus();
    } finally {
      ui.loginSubmit.disabled = false;
      ui.loginSubmit.textContent = "Sign in";
    }
  }

  async function onLogout() {
    ui.logout.disabled = true;
    stopStreaming();
    try {
      await apiJson("/api/auth/logout", { method: "POST", noSessionRedirect: true });
    } catch (_) {
      /* even if the server call fails, forget the session locally */
    } finally {
      ui.logout.disabled = false;
    }
    resetConversation();
    ui.username.value = "";
    showLogin("");
  }

  async function onSetPassword(event) {
    event.preventDefault();
    const password = ui.newPassword.value;
    if (password.length < 8) {
      ui.newPassword.setAttribute("aria-invalid", "true");
      showError(ui.passwordError, "The password must be at least 8 characters long.");
      ui.newPassword.focus();
      return;
    }
    ui.newPassword.removeAttribute("aria-invalid");
    showError(ui.passwordError, "");
    ui.setPasswordSubmit.disabled = true;
    try {
      await apiJson("/api/auth/password", { method: "POST", body: { password } });
      ui.newPassword.value = "";
      if (state.user) state.user.has_password = true;
      ui.passwordBanner.hidden = true;
      ui.passwordSaved.hidden = false;
      window.setTimeout(() => {
        ui.passwordSaved.hidden = true;
      }, 8000);
      ui.prompt.focus();
    } catch (err) {
      ui.newPassword.setAttribute("aria-invalid", "true");
      showError(ui.passwordError, err.message || "Could not save the password.");
      ui.newPassword.focus();
    } finally {
      ui.setPasswordSubmit.disabled = false;
    }
  }

  function onDismissBanner() {
    ui.passwordBanner.hidden = true;
    state.bannerDismissed = true;
    const id = (state.user && state.user.user && state.user.user.id) || "";
    storageSet(window.sessionStorage, `${BANNER_STORAGE_KEY}:${id}`, "1");
    ui.prompt.focus();
  }

  // ------------------------------------------------------------------
  // Models
  // ------------------------------------------------------------------

  /** Friendly label for `ft:<base>:<tenant>:<suffix>:<id>`; falls back to the raw id. */
  function adapterLabel(id) {
    const parts = id.slice(3).split(":");
    if (parts.length >= 4) {
      const suffix = parts[parts.length - 2];
      const base = parts.slice(0, parts.length - 3).join(":");
      if (suffix && base) return `${suffix} (on ${base})`;
    }
    return id;
  }

  let modelsRequest = 0;

  async function loadModels() {
    const request = ++modelsRequest;
    const select = ui.modelSelect;
    const previous = select.value || storageGet(window.localStorage, MODEL_STORAGE_KEY);
    ui.refreshModels.disabled = true;
    if (!select.options.length) {
      select.replaceChildren(new Option("Loading models…", ""));
      select.disabled = true;
    }
    try {
      const data = await apiJson("/v1/models");
      if (request !== modelsRequest) return;
      const models = (data && Array.isArray(data.data) ? data.data : [])
        .filter((m) => m && typeof m.id === "string" && m.id)
        .map((m) => m.id);
      const base = models.filter((id) => !id.startsWith("ft:")).sort((a, b) => a.localeCompare(b));
      const adapters = models.filter((id) => id.startsWith("ft:")).sort((a, b) => a.localeCompare(b));

      const nodes = [];
      if (base.length) {
        const group = document.createElement("optgroup");
        group.label = "Base models";
        for (const id of base) group.append(new Option(id, id));
        nodes.push(group);
      }
      if (adapters.length) {
        const group = document.createElement("optgroup");
        group.label = "Your adapters";
        for (const id of adapters) {
          const option = new Option(adapterLabel(id), id);
          option.title = id;
          group.append(option);
        }
        nodes.push(group);
      }
      if (!nodes.length) {
        select.replaceChildren(new Option("No models available yet", ""));
        select.disabled = true;
      } else {
        select.replaceChildren(...nodes);
        select.disabled = false;
        if (previous && models.includes(previous)) select.value = previous;
      }
      updateControls();
    } catch (err) {
      if (request !== modelsRequest) return;
      if (!select.value) {
        select.replaceChildren(new Option("Could not load models", ""));
        select.disabled = true;
      }
      if (state.user) addErrorMessage(`Could not load the list of models: ${err.message}`);
    } finally {
      if (request === modelsRequest) ui.refreshModels.disabled = false;
    }
  }

  // ------------------------------------------------------------------
  // Conversation rendering
  // ------------------------------------------------------------------

  function isNearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function scrollToBottom(force) {
    if (force || stickToBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  let stickToBottom = true;

  function appendMessageNode(node) {
    ui.emptyState.hidden = true;
    ui.messages.append(node);
    scrollToBottom(true);
    stickToBottom = true;
  }

  function addUserMessage(text) {
    const msg = el("div", "message user");
    msg.append(el("div", "role", "You"));
    const bubble = el("div", "bubble");
    bubble.append(el("div", "content", text));
    msg.append(bubble);
    appendMessageNode(msg);
    return msg;
  }

  function addAssistantMessage(model) {
    const msg = el("div", "message assistant");
    msg.dataset.done = "false";
    const role = el("div", "role");
    role.append(el("span", null, "Assistant"));
    if (model) role.append(el("span", "model-name", model));
    msg.append(role);
    const bubble = el("div", "bubble");
    const content = el("div", "content");
    const textNode = document.createTextNode("");
    content.append(textNode);
    const typing = el("div", "typing");
    typing.setAttribute("role", "status");
    typing.setAttribute("aria-label", "Assistant is typing");
    typing.append(el("span"), el("span"), el("span"));
    bubble.append(content, typing);
    msg.append(bubble);
    appendMessageNode(msg);
    return { msg, content, textNode, typing, bubble };
  }

  function addNote(msg, text) {
    msg.append(el("p", "message-note", text));
  }

  function addErrorMessage(text) {
    const msg = el("div", "message error");
    msg.setAttribute("role", "alert");
    msg.append(el("div", "role", "Error"));
    const bubble = el("div", "bubble");
    bubble.append(el("div", "content", text));
    msg.append(bubble);
    appendMessageNode(msg);
    return msg;
  }

  function resetConversation() {
    state.history = [];
    for (const node of Array.from(ui.messages.children)) {
      if (node !== ui.emptyState) node.remove();
    }
    ui.emptyState.hidden = false;
    stickToBottom = true;
  }

  // ------------------------------------------------------------------
  // Settings
  // ------------------------------------------------------------------

  function readNumber(input, { min, max, integer, label }) {
    const raw = input.value.trim();
    const value = Number(raw);
    const ok = raw !== "" && Number.isFinite(value) && value >= min && value <= max &&
      (!integer || Number.isInteger(value));
    if (!ok) {
      input.setAttribute("aria-invalid", "true");
      const kind = integer ? "a whole number" : "a number";
      throw Object.assign(new Error(`${label} must be ${kind} between ${min} and ${max}.`), { input });
    }
    input.removeAttribute("aria-invalid");
    return value;
  }

  function readSettings() {
    return {
      temperature: readNumber(ui.temperature, { min: 0, max: 2, label: "Temperature" }),
      max_tokens: readNumber(ui.maxTokens, { min: 1, max: 32768, integer: true, label: "Max tokens" }),
      top_p: readNumber(ui.topP, { min: 0, max: 1, label: "Top-p" }),
    };
  }

  // ------------------------------------------------------------------
  // Streaming
  // ------------------------------------------------------------------

  /**
   * Incremental Server-Sent Events parser. Feeds decoded text, buffers
   * partial lines, and calls onData(dataString) for every complete event.
   */
  function createSseParser(onData) {
    let buffer = "";
    let dataLines = [];

    const dispatch = () => {
      if (dataLines.length) {
        const data = dataLines.join("\n");
        dataLines = [];
        onData(data);
      }
    };

    const handleLine = (line) => {
      if (line === "") {
        dispatch();
        return;
      }
      if (line.startsWith(":")) return; // comment / keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") dataLines.push(value);
      // "event", "id", "retry" are not used by this API.
    };

    return {
      push(text) {
        buffer += text;
        let start = 0;
        for (;;) {
          const nl = buffer.indexOf("\n", start);
          if (nl < 0) break;
          let line = buffer.slice(start, nl);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          start = nl + 1;
          handleLine(line);
        }
        buffer = buffer.slice(start);
      },
      end() {
        if (buffer) {
          const rest = buffer.endsWith("\r") ? buffer.slice(0, -1) : buffer;
          buffer = "";
          handleLine(rest);
        }
        dispatch();
      },
    };
  }

  class StreamDone extends Error {}

  function chunkError(chunk) {
    const err = chunk && chunk.error;
    if (!err) return null;
    const message = typeof err === "string" ? err : err.message || "The model reported an error.";
    return new ApiError(message, 0, err.type || null, err.code || null);
  }

  /** Send the conversation and stream the answer into `view`. Returns {text, finishReason}. */
  async function streamCompletion(payload, view, signal) {
    const res = await apiFetch("/v1/chat/completions", {
      method: "POST",
      body: payload,
      signal,
      accept: "text/event-stream",
    });
    if (!res.ok) {
      const err = await errorFromResponse(res);
      if (res.status === 401) err.sessionExpired = true;
      throw err;
    }

    let text = "";
    let finishReason = null;
    let gotFirstToken = false;

    const appendText = (piece) => {
      if (!piece) return;
      if (!gotFirstToken) {
        gotFirstToken = true;
        view.typing.remove();
      }
      text += piece;
      view.textNode.appendData(piece);
      scrollToBottom(false);
    };

    const contentType = (res.headers.get("content-type") || "").toLowerCase();
    if (!contentType.includes("text/event-stream")) {
      // Server answered without streaming: accept a regular chat.completion body.
      const data = await res.json().catch(() => null);
      const err = chunkError(data);
      if (err) throw err;
      const choice = data && Array.isArray(data.choices) ? data.choices[0] : null;
      const content = choice && choice.message ? choice.message.content : "";
      appendText(typeof content === "string" ? content : "");
      return { text, finishReason: (choice && choice.finish_reason) || "stop" };
    }

    if (!res.body || !res.body.getReader) {
      throw new ApiError("This browser cannot read streamed responses.", 0);
    }

    const parser = createSseParser((data) => {
      if (data.trim() === "[DONE]") throw new StreamDone();
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch (_) {
        return; // ignore malformed lines
      }
      const err = chunkError(chunk);
      if (err) throw err;
      const choices = chunk && Array.isArray(chunk.choices) ? chunk.choices : [];
      for (const choice of choices) {
        if (!choice || (choice.index !== undefined && choice.index !== 0)) continue;
        const delta = choice.delta || {};
        if (typeof delta.content === "string") appendText(delta.content);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    });

    const reader = res.body.getReader();
    const decoder = new TextDecoder("utf-8");
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          parser.push(decoder.decode());
          parser.end();
          break;
        }
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (err) {
      if (!(err instanceof StreamDone)) throw err;
      try {
        await reader.cancel();
      } catch (_) {
        /* ignore */
      }
    } finally {
      try {
        reader.releaseLock();
      } catch (_) {
        /* ignore */
      }
    }
    return { text, finishReason };
  }

  function updateControls() {
    const streaming = state.streaming;
    ui.stop.disabled = !streaming;
    ui.send.disabled = streaming || !ui.modelSelect.value;
    ui.messages.setAttribute("aria-busy", streaming ? "true" : "false");
  }

  function stopStreaming() {
    if (state.controller) state.controller.abort();
  }

  async function onSend(event) {
    if (event) event.preventDefault();
    if (state.streaming) return;

    const text = ui.prompt.value;
    if (!text.trim()) {
      ui.prompt.focus();
      return;
    }
    const model = ui.modelSelect.value;
    if (!model) {
      addErrorMessage("Please choose a model first. If the list is empty, no models are available yet.");
      ui.modelSelect.focus();
      return;
    }

    let settings;
    try {
      settings = readSettings();
      showError(ui.settingsError, "");
    } catch (err) {
      ui.settings.open = true;
      showError(ui.settingsError, err.message);
      if (err.input) err.input.focus();
      return;
    }

    storageSet(window.localStorage, MODEL_STORAGE_KEY, model);

    const userTurn = { role: "user", content: text };
    const messages = [];
    const system = ui.systemPrompt.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history, userTurn);

    const userNode = addUserMessage(text);
    state.history.push(userTurn);
    ui.prompt.value = "";
    autoGrow();

    const view = addAssistantMessage(model);
    const controller = new AbortController();
    state.controller = controller;
    state.streaming = true;
    updateControls();

    const payload = {
      model,
      messages,
      stream: true,
      temperature: settings.temperature,
      max_tokens: settings.max_tokens,
      top_p: settings.top_p,
    };

    let result = { text: "", finishReason: null };
    let failure = null;
    let aborted = false;
    try {
      result = await streamCompletion(payload, view, controller.signal);
    } catch (err) {
      if (controller.signal.aborted || (err && err.name === "AbortError")) {
        aborted = true;
      } else {
        failure = err;
      }
    }

    // A conversation that was reset (New chat / sign out) while streaming is gone.
    const stillCurrent = state.history.includes(userTurn);
    const partial = view.textNode.data;
    view.typing.remove();

    if (partial) {
      if (stillCurrent) state.history.push({ role: "assistant", content: partial });
    } else if (stillCurrent) {
      // Nothing came back: drop this turn so user/assistant roles keep alternating,
      // and give the text back so it can be sent again.
      state.history.splice(state.history.indexOf(userTurn), 1);
      userNode.classList.add("not-answered");
      addNote(userNode, "Not answered, so it is not part of the conversation.");
      if (!ui.prompt.value) {
        ui.prompt.value = text;
        autoGrow();
      }
    }

    if (failure && failure.sessionExpired && stillCurrent) {
      view.msg.dataset.done = "true";
      state.streaming = false;
      state.controller = null;
      updateControls();
      sessionExpired();
      return;
    }

    if (failure) {
      view.msg.classList.add("error");
      view.msg.dataset.error = "true";
      const errorText = el("div", "error-text", failure.message || "Something went wrong while generating the answer.");
      errorText.setAttribute("role", "alert");
      view.bubble.append(errorText);
    } else if (aborted) {
      view.msg.dataset.stopped = "true";
      if (partial) addNote(view.msg, "Stopped.");
      else view.bubble.append(el("div", "bubble-note", "Stopped before the model answered."));
    } else if (!partial) {
      view.bubble.append(el("div", "bubble-note", "The model returned an empty answer."));
    } else if (result.finishReason === "length") {
      addNote(view.msg, "The answer was cut off at the Max tokens limit. Increase “Max tokens” in Settings for longer answers.");
    }
    if (result.finishReason) view.msg.dataset.finishReason = result.finishReason;
    view.msg.dataset.done = "true";

    if (state.controller === controller) state.controller = null;
    state.streaming = false;
    updateControls();
    scrollToBottom(false);
    if (document.activeElement === ui.stop || document.activeElement === document.body) ui.prompt.focus();
  }

  function onNewChat() {
    stopStreaming();
    resetConversation();
    ui.prompt.value = "";
    autoGrow();
    ui.prompt.focus();
  }

  function autoGrow() {
    const ta = ui.prompt;
    ta.style.height = "auto";
    ta.style.height = `${Math.min(ta.scrollHeight + 2, 220)}px`;
  }

  function onPromptKeydown(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey) {
      if (event.isComposing || event.keyCode === 229) return; // IME composition in progress
      event.preventDefault();
      if (!state.streaming) onSend();
    }
  }

  // ------------------------------------------------------------------
  // Init
  // ------------------------------------------------------------------

  function init() {
    bindElements();

    ui.loginForm.addEventListener("submit", onLogin);
    ui.logout.addEventListener("click", onLogout);
    ui.setPasswordForm.addEventListener("submit", onSetPassword);
    ui.dismissBanner.addEventListener("click", onDismissBanner);
    ui.refreshModels.addEventListener("click", () => loadModels());
    ui.modelSelect.addEventListener("change", () => {
      storageSet(window.localStorage, MODEL_STORAGE_KEY, ui.modelSelect.value);
      updateControls();
    });
    ui.newChat.addEventListener("click", onNewChat);
    ui.composer.addEventListener("submit", onSend);
    ui.stop.addEventListener("click", stopStreaming);
    ui.prompt.addEventListener("keydown", onPromptKeydown);
    ui.prompt.addEventListener("input", autoGrow);
    ui.messages.addEventListener("scroll", () => {
      stickToBottom = isNearBottom();
    }, { passive: true });
    for (const input of [ui.temperature, ui.maxTokens, ui.topP]) {
      input.addEventListener("input", () => {
        input.removeAttribute("aria-invalid");
        showError(ui.settingsError, "");
      });
    }
    ui.newPassword.addEventListener("input", () => {
      ui.newPassword.removeAttribute("aria-invalid");
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.streaming) stopStreaming();
    });

    updateControls();
    checkSession();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
