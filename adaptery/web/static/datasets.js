/* Datasets: upload with progress, detected format, validation report, statistics and histogram,
 * preview, dedup / PII scrub / split with their reports, versions and lineage, the dataset card. */

import { histogram } from "/static/charts.js";
import { api, badge, clear, redraw, confirmDialog, errorBox, field, fmtBytes, fmtNumber, fmtTime, h, section, shortSha, showError, table, uploadWithProgress } from "/static/lib.js";

const FORMATS = ["openai-chat", "alpaca", "sharegpt", "text-lines", "text-document", "csv", "tsv"];
const PII_KINDS = ["email", "phone", "ip_address", "card_number", "national_id", "url_credentials"];

function latest(dataset) {
  return dataset.versions[dataset.versions.length - 1];
}

const KEEP_GOING = "Allow leaving invalid records out";

/**
 * The API names its parameters (`allow_invalid=true`); the page names its controls. An error about
 * leaving invalid records out says which box to tick, and where it is when the page has none.
 */
export function pageMessage(err, { fromFineTune = false } = {}) {
  if (!err || err.param !== "allow_invalid") return err;
  const where = fromFineTune ? ` on the dataset's page (under “Train”), then pick the version here again` : "";
  const text = err.message.replace(/,? ?or export with allow_invalid=true to train on the valid records only/, "");
  const mapped = new Error(`${text.replace(/\.?$/, ".")} To train on the valid records only, tick “${KEEP_GOING}”${where}.`);
  mapped.param = err.param;
  mapped.status = err.status;
  return mapped;
}

/** "ready", or "ready, 2 dropped" (a link to why) for a version that left invalid records out. */
function versionStatus(dataset, version) {
  const dropped = version.report && version.report.validation ? version.report.validation.records_invalid : 0;
  if (version.status !== "ready" || !dropped) return badge(version.status);
  return h(
    "a",
    { href: `#/datasets/${encodeURIComponent(dataset.id)}/${version.version}`, class: "dropped-link", title: "See which records were left out and why" },
    badge(`ready, ${fmtNumber(dropped)} dropped`, "warn"),
  );
}

function lineage(version) {
  if (version.operation === "upload") return `upload of ${version.source_filename || "a file"}`;
  return `${version.operation}(v${version.parent_version})`;
}

// ====================================================================== list + upload

export async function renderDatasets(root, ctx, { args }) {
  if (args[0]) return renderDataset(root, ctx, args[0], args[1] ? Number(args[1]) : null);
  const catalog = await ctx.models();
  const file = h("input", { type: "file", id: "dataset-file", accept: ".jsonl,.json,.csv,.tsv,.txt,.md" });
  const name = h("input", { type: "text", id: "dataset-name", maxlength: "128", placeholder: "Default: the file's name" });
  const format = h("select", { id: "dataset-format" }, h("option", { value: "" }, "Detect automatically"), FORMATS.map((f) => h("option", { value: f }, f)));
  const mapping = h("input", { type: "text", id: "dataset-mapping", placeholder: "e.g. prompt=question,response=answer" });
  const model = h("select", { id: "dataset-model" }, catalog.filter((x) => x.kind === "base").map((x) => h("option", { value: x.id }, x.display_name || x.id)));
  const progress = h("progress", { id: "upload-progress", max: "100", value: "0", "aria-label": "Upload progress" });
  const progressText = h("span", { class: "muted", id: "upload-progress-text" });
  const progressRow = h("div", { class: "progress-row" }, progress, progressText);
  progressRow.hidden = true;
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "dataset-upload" }, "Upload");
  const error = errorBox();
  const form = h(
    "form",
    { class: "card", id: "upload-form", novalidate: true },
    h("h2", { class: "card-title" }, "Upload a dataset"),
    h("p", { class: "muted" }, "A spreadsheet (CSV/TSV), chat JSONL, Alpaca or ShareGPT JSON, or plain text. Every record is checked and the report lists each problem with its line number."),
    h(
      "div",
      { class: "form-grid" },
      field("File", file),
      field("Name", name),
      field("Format", format, "Detection reads the start of the file; pick one to override it."),
      field("Column mapping (CSV/TSV)", mapping, "Which columns hold the prompt and the response, if not named so."),
      field("Check against base model", model, "Records must fit this model's context (its own tokenizer counts)."),
    ),
    progressRow,
    error,
    h("div", { class: "form-actions" }, submit),
  );
  form.hidden = !ctx.canWrite();
  const listBox = h("div", {});
  clear(root, h("h1", { class: "page-title" }, "Datasets"), form, section("Your datasets", listBox));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    const chosen = file.files[0];
    if (!chosen) {
      showError(error, new Error("Choose a file to upload."));
      file.focus();
      return;
    }
    const params = new URLSearchParams({ filename: chosen.name, model: model.value });
    if (name.value.trim()) params.set("name", name.value.trim());
    if (format.value) params.set("format", format.value);
    if (mapping.value.trim()) params.set("mapping", mapping.value.trim());
    progressRow.hidden = false;
    submit.disabled = true;
    try {
      const created = await uploadWithProgress(`/api/datasets?${params}`, chosen, (loaded, total) => {
        progress.value = Math.round((loaded / total) * 100);
        // Once sent, the server reads and checks every record before it answers (a file with none valid makes no dataset).
        progressText.textContent = loaded >= total ? `${fmtBytes(total)} sent; checking every record…` : `${fmtBytes(loaded)} of ${fmtBytes(total)} (${progress.value}%)`;
      });
      progress.value = 100;
      ctx.navigate(`#/datasets/${encodeURIComponent(created.id)}`);
    } catch (err) {
      showError(error, err);
      progressRow.hidden = true;
    } finally {
      submit.disabled = false;
    }
  });

  const { data } = await api("/api/datasets");
  clear(
    listBox,
    table(
      ["Name", "Versions", "Latest", "Records", "Format", "Updated"],
      data.map((d) => {
        const v = latest(d);
        return [
          h("a", { href: `#/datasets/${encodeURIComponent(d.id)}` }, d.name),
          String(d.versions.length),
          v ? h("span", { class: "version-status" }, `v${v.version} `, versionStatus(d, v)) : "—",
          v ? fmtNumber(v.records) : "—",
          v ? v.format || "—" : "—",
          fmtTime(d.updated_at),
        ];
      }),
      { caption: "Datasets", empty: "No datasets yet: upload one above." },
    ),
  );
}

// ====================================================================== one dataset

async function renderDataset(root, ctx, datasetId, wanted) {
  let timer = null;
  let stopped = false;
  const path = `/api/datasets/${encodeURIComponent(datasetId)}`;

  async function draw() {
    const dataset = await api(path);
    if (stopped) return;
    const numbers = dataset.versions.map((v) => v.version);
    const number = numbers.includes(wanted) ? wanted : numbers[numbers.length - 1];
    const version = dataset.versions.find((v) => v.version === number);
    redraw(
      root,
      h("p", { class: "crumbs" }, h("a", { href: "#/datasets" }, "Datasets"), " / ", dataset.name),
      h("h1", { class: "page-title" }, dataset.name, " ", h("span", { class: "muted" }, `v${number}`)),
      h("div", { class: "two-col" }, versionsCard(dataset, number), cardForm(dataset, ctx, draw)),
      await versionPanel(dataset, version, ctx),
    );
    if (dataset.versions.some((v) => v.status === "processing")) timer = setTimeout(draw, 1000);
  }
  await draw();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function versionsCard(dataset, current) {
  return section(
    "Versions and lineage",
    table(
      ["Version", "Made by", "Status", "Records", "Content hash"],
      dataset.versions.map((v) => [
        v.version === current ? h("strong", { "aria-current": "true" }, `v${v.version}`) : h("a", { href: `#/datasets/${encodeURIComponent(dataset.id)}/${v.version}` }, `v${v.version}`),
        lineage(v),
        versionStatus(dataset, v),
        fmtNumber(v.records),
        h("code", { title: v.sha256 || "" }, shortSha(v.sha256)),
      ]),
      { caption: "Versions" },
    ),
  );
}

function cardForm(dataset, ctx, refresh) {
  const description = h("textarea", { id: "card-description", rows: "3" }, dataset.description);
  const source = h("input", { type: "text", id: "card-source", value: dataset.source });
  const license = h("input", { type: "text", id: "card-license", value: dataset.license });
  const protectedData = h("input", { type: "checkbox", id: "card-protected", checked: dataset.contains_protected_data });
  const error = errorBox();
  const save = h("button", { type: "submit", class: "btn btn-primary" }, "Save card");
  const remove = h("button", { type: "button", class: "btn btn-danger", id: "dataset-delete" }, "Delete dataset");
  const form = h(
    "form",
    { class: "card", id: "card-form", novalidate: true },
    h("h2", { class: "card-title" }, "Dataset card"),
    field("Description", description),
    h("div", { class: "form-grid" }, field("Source", source), field("License", license)),
    h("label", { class: "check" }, protectedData, " Contains protected or personal data"),
    error,
    ctx.canWrite() ? h("div", { class: "form-actions" }, save, remove) : null,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api(`/api/datasets/${encodeURIComponent(dataset.id)}`, {
        method: "PATCH",
        body: { description: description.value, source: source.value, license: license.value, contains_protected_data: protectedData.checked },
      });
      ctx.toast("Card saved.");
      refresh();
    } catch (err) {
      showError(error, err);
    }
  });
  remove.addEventListener("click", async () => {
    if (!(await confirmDialog({ title: `Delete ${dataset.name}?`, message: "Every version and report goes. Files already exported for fine-tuning and trained adapters stay." }))) return;
    try {
      await api(`/api/datasets/${encodeURIComponent(dataset.id)}`, { method: "DELETE" });
      ctx.navigate("#/datasets");
    } catch (err) {
      showError(error, err);
    }
  });
  return form;
}

async function versionPanel(dataset, version, ctx) {
  const box = h("div", { class: "version-panel", id: "version-panel" });
  if (version.status === "processing") {
    box.append(section(`Processing v${version.version}`, h("p", { role: "status" }, `Reading and checking records… ${fmtNumber(version.progress)} so far.`), h("progress", { "aria-label": "Processing" })));
    return box;
  }
  if (version.status === "failed") {
    box.append(section(`v${version.version} failed`, h("p", { class: "form-error", role: "alert", id: "version-error" }, version.error || "Processing failed.")));
    return box;
  }
  const report = version.report || {};
  box.append(
    h(
      "div",
      { class: "summary-strip" },
      h("div", {}, h("span", { class: "muted" }, "Format"), h("strong", { id: "detected-format" }, version.format || "—")),
      h("div", {}, h("span", { class: "muted" }, "Records"), h("strong", {}, fmtNumber(version.records))),
      h("div", {}, h("span", { class: "muted" }, "Size"), h("strong", {}, fmtBytes(version.bytes))),
      h("div", {}, h("span", { class: "muted" }, "Made by"), h("strong", {}, lineage(version))),
    ),
  );
  if (report.validation) box.append(validationReport(report.validation, "validation-report"));
  box.append(statsCard(version.stats));
  if (report.dedup) box.append(dedupReport(report.dedup));
  if (report.pii) box.append(piiReport(report.pii));
  if (report.split) box.append(section("Split", h("p", {}, `The ${report.split.part} part: ${fmtNumber(report.split.records)} of ${fmtNumber(report.split.of)} records (validation fraction ${report.split.validation_fraction}, seed ${report.split.seed}).`)));
  if (ctx.canWrite()) box.append(await actionsCard(dataset, version, ctx));
  box.append(previewCard(dataset, version));
  return box;
}

function validationReport(validation, id) {
  const ok = validation.records_invalid === 0;
  const counts = Object.entries(validation.error_counts || {});
  return h(
    "section",
    { class: `card ${ok ? "" : "card-warn"}`, id },
    h("h2", { class: "card-title" }, "Validation report"),
    h("p", { class: ok ? "ok-text" : "warn-text" }, ok ? `All ${fmtNumber(validation.records_total)} records are valid.` : `${fmtNumber(validation.records_invalid)} of ${fmtNumber(validation.records_total)} records are invalid and were left out.`),
    validation.model ? h("p", { class: "muted" }, `Checked against ${validation.model}${validation.context ? ` (context ${fmtNumber(validation.context)} tokens)` : ""}.`) : null,
    counts.length ? h("p", { class: "muted" }, "By problem: ", counts.map(([k, n]) => `${k} ${n}`).join(", ")) : null,
    validation.errors && validation.errors.length
      ? table(
          ["Line", "Field", "Problem"],
          validation.errors.map((e) => [h("span", { class: "line-no" }, `${e.unit || "line"} ${e.line}`), e.field ? h("code", {}, e.field) : "—", e.message]),
          { caption: "Invalid records" },
        )
      : null,
    validation.errors_truncated ? h("p", { class: "muted" }, "Only the first problems are listed.") : null,
  );
}

function statsCard(stats) {
  if (!stats) return section("Statistics", h("p", { class: "muted" }, "No statistics for this version."));
  const tokens = stats.tokens;
  const dl = (pairs) => h("dl", { class: "stats" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  return h(
    "section",
    { class: "card", id: "stats" },
    h("h2", { class: "card-title" }, "Statistics"),
    h(
      "div",
      { class: "two-col" },
      dl([
        ["Records", fmtNumber(stats.records)],
        ["Turns (mean / max)", `${fmtNumber(stats.turns.mean, 1)} / ${fmtNumber(stats.turns.max)}`],
        ["Messages by role", Object.entries(stats.role_counts).map(([r, n]) => `${r} ${fmtNumber(n)}`).join(", ")],
        ["Characters per record (mean / max)", `${fmtNumber(stats.characters.mean, 0)} / ${fmtNumber(stats.characters.max)}`],
        ["Duplicate rate", `${fmtNumber(stats.duplicate_rate * 100, 1)} %`],
        ...(tokens
          ? [
              ["Tokens (total)", fmtNumber(tokens.total)],
              ["Tokens per record (mean / median / p95 / max)", `${fmtNumber(tokens.mean, 1)} / ${fmtNumber(tokens.p50)} / ${fmtNumber(tokens.p95)} / ${fmtNumber(tokens.max)}`],
            ]
          : []),
      ]),
      tokens ? h("div", { id: "length-histogram" }, histogram(tokens.histogram, { title: "Tokens per record" })) : h("p", { class: "muted" }, "Token lengths were not counted for this version."),
    ),
  );
}

function dedupReport(dedup) {
  return h(
    "section",
    { class: "card", id: "dedup-report" },
    h("h2", { class: "card-title" }, "Deduplication report"),
    h("p", {}, `${fmtNumber(dedup.records_in)} records in, ${fmtNumber(dedup.records_out)} kept: ${fmtNumber(dedup.exact_duplicates)} exact and ${fmtNumber(dedup.near_duplicates)} near duplicates removed (similarity ≥ ${dedup.threshold}).`),
    table(
      ["Kept record", "Removed records", "Kind", "Similarity"],
      (dedup.clusters || []).map((c) => [`#${c.kept + 1}`, c.removed.map((r) => `#${r + 1}`).join(", ") + (c.removed_total > c.removed.length ? ` and ${c.removed_total - c.removed.length} more` : ""), c.kind, fmtNumber(c.similarity, 2)]),
      { caption: "Duplicate clusters", empty: "No duplicates found." },
    ),
    dedup.clusters_truncated ? h("p", { class: "muted" }, `Showing ${dedup.clusters.length} of ${dedup.clusters_total} clusters.`) : null,
  );
}

function piiReport(pii) {
  return h(
    "section",
    { class: "card", id: "pii-report" },
    h("h2", { class: "card-title" }, "Personal data scrub report"),
    h("p", {}, `${fmtNumber(pii.records_changed)} of ${fmtNumber(pii.records_total)} records had something redacted.`),
    table(
      ["Kind", "Redacted", "Examples (already redacted)"],
      Object.entries(pii.counts_by_kind).map(([kind, n]) => [kind, fmtNumber(n), (pii.examples[kind] || []).map((x) => h("code", { class: "example" }, x))]),
      { caption: "Redactions by kind" },
    ),
  );
}

async function actionsCard(dataset, version, ctx) {
  const base = `/api/datasets/${encodeURIComponent(dataset.id)}/versions/${version.version}`;
  const error = errorBox();
  const result = h("div", { id: "action-result", "aria-live": "polite" });
  const run = async (button, work) => {
    showError(error, null);
    button.disabled = true;
    try {
      await work();
    } catch (err) {
      showError(error, err);
    } finally {
      button.disabled = false;
    }
  };
  const openCreated = (created) => ctx.navigate(`#/datasets/${encodeURIComponent(dataset.id)}/${created.data[0].version}`);

  const threshold = h("input", { type: "number", id: "dedup-threshold", min: "0.1", max: "1", step: "0.05", value: "0.8" });
  const dedup = h("button", { type: "button", class: "btn", id: "dedup-run" }, "Remove duplicates");
  dedup.addEventListener("click", () => run(dedup, async () => openCreated(await api(`${base}/dedup`, { method: "POST", body: { threshold: Number(threshold.value) } }))));

  const kinds = PII_KINDS.map((k) => h("input", { type: "checkbox", value: k, checked: true, id: `pii-${k}` }));
  const scrub = h("button", { type: "button", class: "btn", id: "scrub-run" }, "Scrub personal data");
  scrub.addEventListener("click", () => run(scrub, async () => openCreated(await api(`${base}/scrub`, { method: "POST", body: { kinds: kinds.filter((k) => k.checked).map((k) => k.value) } }))));

  const fraction = h("input", { type: "number", id: "split-fraction", min: "0.01", max: "0.5", step: "0.01", value: "0.1" });
  const seed = h("input", { type: "number", id: "split-seed", min: "0", step: "1", value: "42" });
  const split = h("button", { type: "button", class: "btn", id: "split-run" }, "Split train / validation");
  split.addEventListener("click", () => run(split, async () => openCreated(await api(`${base}/split`, { method: "POST", body: { validation_fraction: Number(fraction.value), seed: Number(seed.value) } }))));

  const catalog = await ctx.models();
  const model = h("select", { id: "validate-model" }, catalog.filter((x) => x.kind === "base").map((x) => h("option", { value: x.id }, x.display_name || x.id)));
  const validate = h("button", { type: "button", class: "btn", id: "validate-run" }, "Check");
  validate.addEventListener("click", () => run(validate, async () => clear(result, validationReport(await api(`${base}/validate?model=${encodeURIComponent(model.value)}`, { method: "POST" }), "model-validation"))));

  const allowInvalid = h("input", { type: "checkbox", id: "export-allow-invalid" });
  const exporter = h("button", { type: "button", class: "btn btn-primary", id: "export-run" }, "Use for fine-tuning");
  exporter.addEventListener("click", () =>
    run(exporter, async () => {
      const file = await api(`${base}/export`, { method: "POST", body: { allow_invalid: allowInvalid.checked } }).catch((err) => {
        throw pageMessage(err);
      });
      clear(result, h("p", { class: "notice", role: "status" }, `Exported as ${file.id} (${file.filename}). `, h("a", { href: `#/fine-tune?file=${encodeURIComponent(file.id)}`, id: "fine-tune-link" }, "Fine-tune on it →")));
    }),
  );

  return h(
    "section",
    { class: "card", id: "dataset-actions" },
    h("h2", { class: "card-title" }, "Curate"),
    h("p", { class: "muted" }, "Each action makes a new version; this one stays as it is."),
    h(
      "div",
      { class: "actions-grid" },
      h("div", { class: "action" }, h("h3", {}, "Duplicates"), field("Similarity threshold", threshold, "1 = exact duplicates only."), dedup),
      h("div", { class: "action" }, h("h3", {}, "Personal data"), h("fieldset", { class: "checks" }, h("legend", { class: "visually-hidden" }, "Kinds to redact"), kinds.map((k) => h("label", { class: "check" }, k, ` ${k.value.replace("_", " ")}`))), scrub),
      h("div", { class: "action" }, h("h3", {}, "Split"), h("div", { class: "form-grid" }, field("Validation fraction", fraction), field("Seed", seed)), split),
      h("div", { class: "action" }, h("h3", {}, "Fit a model"), field("Base model", model), validate),
      h(
        "div",
        { class: "action" },
        h("h3", {}, "Train"),
        h("p", { class: "muted" }, "Make this version a training file."),
        h("label", { class: "check" }, allowInvalid, ` ${KEEP_GOING}`),
        exporter,
        h("a", { class: "btn btn-quiet", href: `${base}/content`, download: `${dataset.name}-v${version.version}.jsonl` }, "Download JSONL"),
      ),
    ),
    error,
    result,
  );
}


// One canonical record as people read it: tool calls as calls (function and arguments, not raw JSON text),
// tool results labelled with the call they answer, the record's tools listed, a document marked as one.
function recordView(record) {
  const names = {};
  const bubble = (role, label, ...content) => h("div", { class: `bubble bubble-${role}` }, h("span", { class: "bubble-role" }, label), ...content);
  const call = (c) => {
    names[c.id] = c.function.name;
    let args = c.function.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // shown as written
    }
    return h("div", { class: "tool-call" }, h("code", {}, `${c.function.name}(`), h("pre", { class: "bubble-text" }, args), h("code", {}, ")"));
  };
  const parts = [];
  if (record.tools && record.tools.length) {
    parts.push(h("div", { class: "muted" }, `tools: ${record.tools.map((t) => t.function.name).join(", ")}`));
  }
  for (const m of record.messages) {
    if (record.document) {
      parts.push(bubble("assistant", "document", h("span", { class: "bubble-text" }, m.content)));
    } else if (m.role === "tool") {
      parts.push(bubble("system", `result of ${names[m.tool_call_id] || m.tool_call_id}`, h("span", { class: "bubble-text" }, m.content)));
    } else if (m.tool_calls && m.tool_calls.length) {
      const text = m.content ? [h("span", { class: "bubble-text" }, m.content)] : [];
      parts.push(bubble(m.role, m.tool_calls.length > 1 ? "assistant calls (in parallel)" : "assistant calls", ...text, ...m.tool_calls.map(call)));
    } else {
      parts.push(bubble(m.role, m.role, h("span", { class: "bubble-text" }, m.content)));
    }
  }
  return parts;
}

function previewCard(dataset, version) {
  const body = h("div", { class: "preview", id: "preview" });
  const pageSize = 10;
  let offset = 0;
  const prev = h("button", { type: "button", class: "btn btn-small" }, "← Previous");
  const next = h("button", { type: "button", class: "btn btn-small" }, "Next →");
  const position = h("span", { class: "muted" });
  const load = async () => {
    const page = await api(`/api/datasets/${encodeURIComponent(dataset.id)}/versions/${version.version}/records?offset=${offset}&limit=${pageSize}`);
    clear(
      body,
      page.data.map((record, i) =>
        h(
          "div",
          { class: "record" },
          h("div", { class: "record-no muted" }, `#${offset + i + 1}`),
          recordView(record),
        ),
      ),
    );
    position.textContent = page.total ? `Records ${offset + 1}–${Math.min(offset + pageSize, page.total)} of ${fmtNumber(page.total)}` : "No records.";
    prev.disabled = offset === 0;
    next.disabled = offset + pageSize >= (page.total || 0);
  };
  prev.addEventListener("click", () => {
    offset = Math.max(0, offset - pageSize);
    load();
  });
  next.addEventListener("click", () => {
    offset += pageSize;
    load();
  });
  load().catch((err) => clear(body, h("p", { class: "form-error" }, err.message)));
  return h("section", { class: "card" }, h("h2", { class: "card-title" }, "Preview of normalised records"), body, h("div", { class: "pager" }, prev, position, next));
}
