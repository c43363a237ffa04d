/* Models: base models and adapters, an adapter's details, download as a PEFT zip, import one,
 * sharing within the tenant, delete with confirmation; stable names with their versions, promote,
 * roll back, canary and history. */

import { evaluationSection } from "/static/evaluation.js";
import { api, badge, clear, confirmDialog, errorBox, field, fmtNumber, fmtTime, h, modelLabel, optionalApi, section, shortSha, showError, table, uploadWithProgress } from "/static/lib.js";

const downloadUrl = (id) => `/api/models/${encodeURIComponent(id)}/download`;

export async function renderModels(root, ctx, { args }) {
  if (args[0]) return renderModel(root, ctx, args[0]);
  const catalog = await ctx.models(true);
  const bases = catalog.filter((x) => x.kind === "base");
  const adapters = catalog.filter((x) => x.kind === "adapter");
  clear(
    root,
    h("h1", { class: "page-title" }, "Models"),
    section(
      "Base models",
      table(
        ["Model", "Fine-tuning defaults", ""],
        bases.map((b) => [
          h("strong", {}, b.display_name || b.id),
          Object.entries(b.finetune_defaults || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "generic",
          h("a", { class: "btn btn-small", href: `#/chat?model=${encodeURIComponent(b.id)}` }, "Chat"),
        ]),
        { caption: "Base models" },
      ),
    ),
    section(
      "Your adapters",
      table(
        ["Adapter", "Base", "Method", "Created", "Visibility", ""],
        adapters.map((a) => [
          h("a", { href: `#/models/${encodeURIComponent(a.id)}`, title: a.id, class: "adapter-link" }, modelLabel(a.id)),
          a.base_model,
          a.method === "ia3" ? "ia3" : `${a.method} r${a.rank}`,
          fmtTime(a.created),
          badge(a.visibility, "neutral"),
          h(
            "span",
            { class: "row-actions" },
            h("a", { class: "btn btn-small", href: `#/chat?model=${encodeURIComponent(a.id)}` }, "Chat"),
            h("a", { class: "btn btn-small btn-quiet", href: downloadUrl(a.id), download: "" }, "Download"),
          ),
        ]),
        { caption: "Adapters", empty: "No adapters yet: fine-tune one, or import one trained elsewhere." },
      ),
    ),
    await namesSection(ctx, adapters),
    ctx.canWrite() ? importForm(ctx, bases) : null,
  );
}

const nameUrl = (name, tail = "") => `/api/model_names/${encodeURIComponent(name)}${tail}`;

/** Stable names: what clients call while the adapter behind it changes (promote, roll back, canary). */
async function namesSection(ctx, adapters) {
  const [listed, sets, uploaded] = await Promise.all([
    optionalApi("/api/model_names"),
    ctx.canWrite() ? optionalApi("/api/datasets") : null,
    ctx.canWrite() ? optionalApi("/v1/files?purpose=fine-tune&limit=100") : null,
  ]);
  const names = listed ? listed.data : [];
  const datasets = sets ? sets.data : [];
  const files = uploaded ? uploaded.data : [];
  return h(
    "section",
    { class: "card", id: "model-names" },
    h("h2", { class: "card-title" }, "Stable names"),
    h("p", { class: "muted" }, "Clients call a name; promote a version to it, or roll back, and every client follows at its next request. Each change is audited."),
    names.length ? names.map((name) => nameCard(ctx, name, adapters, datasets, files)) : h("p", { class: "muted empty" }, "No names yet."),
    ctx.canWrite() && adapters.length ? newNameForm(ctx, adapters) : null,
  );
}

function nameCard(ctx, name, adapters, datasets, files) {
  const error = errorBox();
  const act = async (path, { method = "POST", body, done, confirm } = {}) => {
    showError(error, null);
    if (confirm && !(await confirmDialog({ ...confirm, danger: false }))) return;
    try {
      await api(nameUrl(name.name, path), { method, body });
      ctx.forgetModels();
      ctx.toast(done);
      ctx.navigate("#/models");
    } catch (err) {
      showError(error, err);
    }
  };
  const status = (v) => {
    if (v.deleted) return badge("deleted", "failed");
    if (v.version === name.current_version) return badge("current", "succeeded");
    if (name.canary && v.version === name.canary.version) return badge(`canary ${name.canary.share}%`, "running");
    return "";
  };
  const promote = (v) =>
    h(
      "button",
      {
        type: "button",
        class: "btn btn-small",
        id: `promote-${name.name}-v${v.version}`,
        onclick: () => act("/promote", { body: { version: v.version }, done: `Version ${v.version} now answers ${name.name}.`, confirm: { title: `Promote version ${v.version}?`, message: `${name.id} will answer from ${v.model} from its next request on.`, confirm: "Promote" } }),
      },
      "Promote",
    );
  const writable = ctx.canWrite();
  // Each version's own requests, ratings and arena results (a canary's apart from the current one's): its owner
  // compares them before promoting. Only the owner and admins get them.
  const counted = name.versions.some((v) => v.feedback);
  const tally = (v) => {
    const f = v.feedback;
    if (!f) return ["", "", ""];
    const approval = f.approval === null ? "" : ` (${Math.round(f.approval * 100)}% good)`;
    return [
      `${f.requests}${f.canary_requests ? ` (${f.canary_requests} as canary)` : ""}`,
      `✓ ${f.thumbs_up} · ✗ ${f.thumbs_down} · ✎ ${f.corrections}${approval}`,
      `${f.arena_wins} won · ${f.arena_losses} lost · ${f.arena_ties} tied`,
    ];
  };
  const versions = table(
    ["Version", "Adapter", "Status", ...(counted ? ["Requests", "Feedback", "Arena"] : []), ""],
    name.versions.map((v) => [
      `v${v.version}`,
      h("a", { href: `#/models/${encodeURIComponent(v.model)}`, title: v.model, class: "adapter-link" }, modelLabel(v.model)),
      status(v),
      ...(counted ? tally(v) : []),
      writable && !v.deleted && v.version !== name.current_version ? promote(v) : "",
    ]),
    { caption: `Versions of ${name.name}` },
  );
  const candidates = name.versions.filter((v) => !v.deleted && v.version !== name.current_version);
  const canaryVersion = h("select", { id: `canary-version-${name.name}` }, candidates.map((v) => h("option", { value: String(v.version) }, `v${v.version}`)));
  const canaryShare = h("input", { type: "number", id: `canary-share-${name.name}`, min: "0", max: "100", step: "any", value: String(name.canary ? name.canary.share : 10) });
  const canary = writable && candidates.length
    ? h(
        "div",
        { class: "form-grid" },
        field("Canary version", canaryVersion),
        field("Share of requests (%)", canaryShare),
        h("div", { class: "form-actions" },
          h("button", { type: "button", class: "btn", id: `canary-start-${name.name}`, onclick: () => act("/canary", { method: "PUT", body: { version: Number(canaryVersion.value), share: Number(canaryShare.value) }, done: "Canary set." }) }, name.canary ? "Change canary" : "Start canary"),
          name.canary ? h("button", { type: "button", class: "btn btn-quiet", id: `canary-end-${name.name}`, onclick: () => act("/canary", { method: "DELETE", done: "Canary ended." }) }, "End canary") : null),
      )
    : null;
  const others = adapters.filter((a) => a.base_model === name.base_model && !name.versions.some((v) => v.model === a.id));
  const pick = h("select", { id: `promote-pick-${name.name}` }, others.map((a) => h("option", { value: a.id, title: a.id }, modelLabel(a.id))));
  const promoteOther = writable && others.length
    ? h(
        "div",
        { class: "form-grid" },
        field("Another adapter of this base", pick, "Promoting it numbers it as the next version."),
        h("div", { class: "form-actions" },
          h("button", { type: "button", class: "btn", id: `promote-adapter-${name.name}`, onclick: () => act("/promote", { body: { version: pick.value }, done: `${name.name} now answers from ${modelLabel(pick.value)}.`, confirm: { title: "Promote this adapter?", message: `${name.id} will answer from ${pick.value} from its next request on.`, confirm: "Promote" } }) }, "Promote")),
      )
    : null;
  const history = h(
    "details",
    { class: "name-history" },
    h("summary", {}, `History (${name.history.length})`),
    table(
      ["When", "Action", "From", "To", "Share", "By"],
      [...name.history].reverse().map((e) => [fmtTime(e.created_at), e.action, e.from_version ? `v${e.from_version}` : "—", e.to_version ? `v${e.to_version}` : "—", e.share === null ? "—" : `${e.share}%`, e.actor || "—"]),
      { caption: `History of ${name.name}` },
    ),
  );
  return h(
    "article",
    { class: "name-card", id: `name-${name.name}`, "data-current": String(name.current_version) },
    h("h3", {}, name.name, " ", h("span", { class: "muted" }, `on ${name.base_model} · answers from v${name.current_version}`)),
    h("p", {}, h("code", { class: "wrap" }, name.id)),
    h(
      "div",
      { class: "form-actions" },
      h("a", { class: "btn btn-small", href: `#/chat?model=${encodeURIComponent(name.id)}` }, "Chat"),
      writable ? h("button", { type: "button", class: "btn btn-small", id: `rollback-${name.name}`, onclick: () => act("/rollback", { done: `${name.name} rolled back.`, confirm: { title: `Roll ${name.name} back?`, message: "It answers again from the version its latest promotion replaced.", confirm: "Roll back" } }) }, "Roll back") : null,
    ),
    versions,
    promoteOther,
    canary,
    writable ? improveForm(ctx, name, datasets, files) : null,
    history,
    error,
  );
}

/** One action: fine-tune (SFT or DPO) on a dataset (a feedback dataset, say), starting from the weights of the
 * version answering now; the job's page shows its evaluation report, which says whether to promote. */
function improveForm(ctx, name, datasets, files) {
  const ready = datasets.filter((d) => d.versions.some((v) => v.status === "ready"));
  if (!ready.length) return h("p", { class: "muted" }, "Build a dataset of feedback (Feedback page) to fine-tune this name's current version on it.");
  const dataset = h("select", { id: `improve-dataset-${name.name}` }, ready.map((d) => h("option", { value: d.id }, d.name)));
  const method = h("select", { id: `improve-method-${name.name}` }, h("option", { value: "supervised" }, "SFT: answers as they should be"), h("option", { value: "dpo" }, "DPO: preferred over rejected answers"));
  const held = h("select", { id: `improve-validation-${name.name}` }, h("option", { value: "" }, "The set kept beside the current version"), files.map((f) => h("option", { value: f.id }, f.filename)));
  const error = errorBox();
  const start = h("button", { type: "button", class: "btn btn-primary", id: `improve-start-${name.name}` }, `Fine-tune v${name.current_version} on it`);
  start.addEventListener("click", async () => {
    showError(error, null);
    start.disabled = true;
    try {
      const body = { dataset: dataset.value, method: { type: method.value } };
      if (held.value) body.validation_file = held.value;
      const job = await api(nameUrl(name.name, "/fine_tune"), { method: "POST", body });
      ctx.toast(`Fine-tuning ${job.id}: its evaluation report says whether to promote.`);
      ctx.navigate(`#/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      showError(error, err);
      start.disabled = false;
    }
  });
  return h(
    "div",
    { class: "form-grid improve-form" },
    field("Dataset", dataset, "Its latest ready version; a feedback dataset's lineage leads back to the answers."),
    field("Method", method),
    field("Held-out set", held, "Evaluated on it afterwards, against this version and the base."),
    h("div", { class: "form-actions" }, start),
    error,
  );
}

function newNameForm(ctx, adapters) {
  const name = h("input", { type: "text", id: "name-new", maxlength: "64", placeholder: "e.g. lab-assistant" });
  const version = h("select", { id: "name-version" }, adapters.map((a) => h("option", { value: a.id, title: a.id }, modelLabel(a.id))));
  const error = errorBox();
  const form = h(
    "form",
    { class: "name-new", novalidate: true },
    h("h3", {}, "New name"),
    h("div", { class: "form-grid" }, field("Name", name), field("Answers first from", version)),
    error,
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary", id: "name-create" }, "Create name")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    try {
      await api("/api/model_names", { method: "POST", body: { name: name.value.trim(), version: version.value } });
      ctx.forgetModels();
      ctx.toast("Name created.");
      ctx.navigate("#/models");
    } catch (err) {
      showError(error, err);
    }
  });
  return form;
}

function importForm(ctx, bases) {
  const file = h("input", { type: "file", id: "import-file", accept: ".zip" });
  const base = h("select", { id: "import-base" }, bases.map((b) => h("option", { value: b.id }, b.display_name || b.id)));
  const suffix = h("input", { type: "text", id: "import-suffix", maxlength: "64", placeholder: "e.g. from-lab-b" });
  const progress = h("progress", { max: "100", value: "0", "aria-label": "Upload progress", hidden: true });
  const error = errorBox();
  const form = h(
    "form",
    { class: "card", novalidate: true },
    h("h2", { class: "card-title" }, "Import an adapter"),
    h("p", { class: "muted" }, "A zip of a PEFT LoRA directory trained elsewhere (safetensors only; shapes are checked against the base)."),
    h("div", { class: "form-grid" }, field("Adapter zip", file), field("Trained on", base), field("Name (suffix)", suffix)),
    progress,
    error,
    h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary" }, "Import")),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    if (!file.files[0]) {
      showError(error, new Error("Choose a zip file."));
      return;
    }
    const params = new URLSearchParams({ base_model: base.value });
    if (suffix.value.trim()) params.set("suffix", suffix.value.trim());
    progress.hidden = false;
    try {
      const created = await uploadWithProgress(`/api/models/import?${params}`, file.files[0], (done, total) => (progress.value = Math.round((done / total) * 100)));
      ctx.forgetModels();
      ctx.navigate(`#/models/${encodeURIComponent(created.id)}`);
    } catch (err) {
      showError(error, err);
    } finally {
      progress.hidden = true;
    }
  });
  return form;
}

async function renderModel(root, ctx, modelId) {
  const catalog = await ctx.models(true);
  const model = catalog.find((x) => x.id === modelId);
  if (!model) {
    clear(root, h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models")), h("p", { class: "form-error", role: "alert" }, `The model '${modelId}' does not exist or you do not have access to it.`));
    return null;
  }
  const job = model.job;
  const error = errorBox();
  const remove = h("button", { type: "button", class: "btn btn-danger", id: "model-delete" }, "Delete adapter");
  remove.addEventListener("click", async () => {
    const ok = await confirmDialog({ title: "Delete this adapter?", message: `${model.id} will no longer answer requests, for anyone in your workspace. Download it first if you may need it again.` });
    if (!ok) return;
    try {
      await api(`/v1/models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
      ctx.forgetModels();
      ctx.toast("Adapter deleted.");
      ctx.navigate("#/models");
    } catch (err) {
      showError(error, err);
    }
  });
  const dl = (pairs) => h("dl", { class: "stats" }, pairs.filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  clear(
    root,
    h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models"), " / ", modelLabel(model.id)),
    h("h1", { class: "page-title" }, modelLabel(model.id)),
    h("p", {}, h("code", { class: "wrap", id: "model-id" }, model.id)),
    h(
      "div",
      { class: "form-actions" },
      h("a", { class: "btn btn-primary", href: `#/chat?model=${encodeURIComponent(model.id)}` }, "Chat with it"),
      h("a", { class: "btn", href: `#/compare?a=${encodeURIComponent(model.base_model)}&b=${encodeURIComponent(model.id)}` }, "Compare with the base"),
      h("a", { class: "btn", href: downloadUrl(model.id), download: "", id: "model-download" }, "Download PEFT zip"),
      ctx.canWrite() ? remove : null,
    ),
    error,
    h(
      "div",
      { class: "two-col" },
      section(
        "Details",
        dl([
          ["Base model", model.base_model],
          ["Method", model.method],
          ["Rank", model.method === "ia3" ? "—" : String(model.rank)],
          ["Created", fmtTime(model.created)],
          ["Created by", model.created_by || "—"],
          ["Content hash", h("code", { title: model.sha256 }, shortSha(model.sha256))],
          ["Training job", job ? h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id) : "imported"],
          ["Training data", job ? job.training_filename || job.training_file : null],
          ["Trained tokens", job ? fmtNumber(job.trained_tokens) : null],
          ["Hyperparameters", job ? Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k} ${v}`).join(", ") : null],
          ["Final metrics", job && Object.keys(job.metrics).length ? Object.entries(job.metrics).map(([k, v]) => `${k} ${fmtNumber(v, 4)}`).join(", ") : null],
        ]),
      ),
      await sharingCard(model, ctx),
    ),
    model.id.startsWith("ft:") ? evaluationSection({ model: model.id }, ctx) : null,
  );
  return null;
}

async function sharingCard(model, ctx) {
  const current = await optionalApi(`/api/models/${encodeURIComponent(model.id)}/sharing`);
  if (!current) return section("Sharing", h("p", { class: "muted" }, "Sharing is not available."));
  const visibility = h(
    "select",
    { id: "share-visibility" },
    h("option", { value: "private" }, "Private: only me (and workspace admins)"),
    h("option", { value: "shared" }, "Shared with the members named below"),
    h("option", { value: "tenant" }, "Everyone in the workspace"),
  );
  visibility.value = current.visibility;
  const members = h("input", { type: "text", id: "share-members", value: (current.members || []).join(", "), placeholder: "usernames, comma-separated" });
  const error = errorBox();
  const form = h(
    "form",
    { class: "card", novalidate: true },
    h("h2", { class: "card-title" }, "Sharing"),
    field("Who may use it", visibility),
    field("Members", members, "Used when shared with named members."),
    error,
    ctx.canWrite() ? h("div", { class: "form-actions" }, h("button", { type: "submit", class: "btn btn-primary" }, "Save sharing")) : null,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    try {
      const names = members.value.split(",").map((x) => x.trim()).filter(Boolean);
      await api(`/api/models/${encodeURIComponent(model.id)}/sharing`, { method: "PUT", body: { visibility: visibility.value, members: visibility.value === "shared" ? names : [] } });
      ctx.toast("Sharing saved.");
    } catch (err) {
      showError(error, err);
    }
  });
  return form;
}
