/* Models: base models and adapters, an adapter's details, download as a PEFT zip, import one,
 * sharing within the tenant, delete with confirmation. */

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
    ctx.canWrite() ? importForm(ctx, bases) : null,
  );
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
