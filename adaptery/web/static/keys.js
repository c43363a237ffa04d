/* API keys: create (environment, expiry, scopes, allowed models), the secret shown once, rotate, revoke. */

import { api, badge, clear, confirmDialog, copyText, errorBox, field, fmtTime, h, modelLabel, section, showError, table } from "/static/lib.js";

const SCOPES = [
  ["inference", "Chat, completions, embeddings"],
  ["files", "Upload and read files and datasets"],
  ["fine-tuning", "Create and follow fine-tunes"],
  ["models", "List, download, import, delete models"],
  ["admin", "Manage keys and the workspace"],
];

function secretBox(title, value) {
  const copy = h("button", { type: "button", class: "btn btn-small", id: "copy-secret" }, "Copy");
  copy.addEventListener("click", () => copyText(value, copy));
  return h(
    "div",
    { class: "secret", id: "new-key", role: "status" },
    h("p", {}, h("strong", {}, title), " Copy it now: it is shown only once, and only its hash is kept."),
    h("div", { class: "secret-row" }, h("code", { id: "new-key-value", class: "wrap" }, value), copy),
  );
}

function keyState(k) {
  const now = Date.now() / 1000;
  if (k.revoked_at) return badge("revoked");
  if (k.expires_at && k.expires_at <= now) return badge("expired");
  return badge("active");
}

export async function renderKeys(root, ctx) {
  const catalog = await ctx.models();
  const name = h("input", { type: "text", id: "key-name", maxlength: "128", placeholder: "e.g. notebook on my laptop" });
  const environment = h("select", { id: "key-env" }, ["dev", "staging", "prod"].map((e) => h("option", { value: e }, e)));
  const expiry = h("select", { id: "key-expiry" }, [["", "Never"], ["7", "In 7 days"], ["30", "In 30 days"], ["90", "In 90 days"], ["365", "In a year"]].map(([v, label]) => h("option", { value: v }, label)));
  const scopes = SCOPES.map(([scope, label]) => h("label", { class: "check" }, h("input", { type: "checkbox", value: scope, checked: scope !== "admin" }), ` ${scope} `, h("span", { class: "muted" }, `— ${label}`)));
  const models = catalog.map((x) => h("label", { class: "check" }, h("input", { type: "checkbox", value: x.id }), ` ${x.kind === "adapter" ? modelLabel(x.id) : x.id}`));
  const created = h("div", { "aria-live": "polite" });
  const error = errorBox();
  const form = h(
    "form",
    { class: "card", id: "key-form", novalidate: true },
    h("h2", { class: "card-title" }, "Create a key"),
    h("p", { class: "muted" }, "Use it with any OpenAI client: base URL ", h("code", {}, `${location.origin}/v1`), "."),
    h("div", { class: "form-grid" }, field("Name", name), field("Environment", environment), field("Expires", expiry)),
    h("fieldset", { class: "checks" }, h("legend", {}, "What it may do"), scopes),
    h("details", {}, h("summary", {}, "Limit to some models (default: every model you can use)"), h("fieldset", { class: "checks", id: "key-models" }, h("legend", { class: "visually-hidden" }, "Allowed models"), models)),
    error,
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary", id: "key-create" }, "Create key")),
    created,
  );
  form.hidden = !ctx.canWrite();
  const listBox = h("div", { id: "keys" });
  clear(root, h("h1", { class: "page-title" }, "API keys"), form, section("Keys", listBox));

  async function drawList() {
    const { data } = await api("/api/keys");
    clear(
      listBox,
      table(
        ["Name", "Key", "Environment", "May do", "State", "Created", "Last used", "Expires", ""],
        data.map((k) => {
          const actions = [];
          const mine = k.owner === ctx.me.user.id; // a key is its person's: only they rotate it
          if (!k.revoked_at && ctx.canWrite()) {
            const rotate = h("button", { type: "button", class: "btn btn-small", "aria-label": `Rotate ${k.name || k.redacted_value}` }, "Rotate");
            rotate.addEventListener("click", async () => {
              if (!(await confirmDialog({ title: "Rotate this key?", message: "A new secret replaces it; the old one keeps working for an hour so you can switch over.", confirm: "Rotate", danger: false }))) return;
              try {
                const rotated = await api(`/api/keys/${encodeURIComponent(k.id)}/rotate`, { method: "POST", body: {} });
                clear(created, secretBox("The key's new secret:", rotated.value));
                drawList();
              } catch (err) {
                showError(error, err.status === 404 || err.status === 405 ? new Error("Rotation is not available on this server.") : err);
              }
            });
            const revoke = h("button", { type: "button", class: "btn btn-small btn-danger revoke", "aria-label": `Revoke ${k.name || k.redacted_value}` }, "Revoke");
            revoke.addEventListener("click", async () => {
              if (!(await confirmDialog({ title: "Revoke this key?", message: `${k.name || k.redacted_value} stops working at once, everywhere it is used.`, confirm: "Revoke" }))) return;
              try {
                await api(`/api/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
                ctx.toast("Key revoked.");
                drawList();
              } catch (err) {
                showError(error, err);
              }
            });
            actions.push(...(mine ? [rotate] : []), revoke);
          }
          return [
            k.name || h("span", { class: "muted" }, "unnamed"),
            h("code", {}, k.redacted_value),
            badge(k.environment, "neutral"),
            h("span", { class: "key-scopes" }, (k.scopes || ["every scope"]).join(", "), k.platform ? " · platform" : "", k.allowed_models ? ` · ${k.allowed_models.length} model${k.allowed_models.length === 1 ? "" : "s"}` : ""),
            keyState(k),
            fmtTime(k.created_at),
            k.last_used_at ? fmtTime(k.last_used_at) : "never",
            k.expires_at ? fmtTime(k.expires_at) : "never",
            h("span", { class: "row-actions", dataset: { key: k.id } }, actions),
          ];
        }),
        { caption: "API keys", empty: "No keys yet." },
      ),
    );
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    const chosenScopes = scopes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (!chosenScopes.length) {
      showError(error, new Error("Pick at least one thing the key may do."));
      return;
    }
    const body = { name: name.value.trim(), environment: environment.value, scopes: chosenScopes };
    if (expiry.value) body.expires_in_days = Number(expiry.value);
    const allowed = models.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (allowed.length) body.allowed_models = allowed;
    try {
      const key = await api("/api/keys", { method: "POST", body });
      clear(created, secretBox(`Your new key “${key.name || key.redacted_value}”:`, key.value));
      name.value = "";
      drawList();
    } catch (err) {
      showError(error, err);
    }
  });
  await drawList();
  return null;
}
