/* Fine-tune: the form (defaults from the base model, an advanced section, an estimate before
 * starting), the jobs list, and a job's page (live loss chart, events, checkpoints, cancel). */

import { lineChart } from "/static/charts.js";
import { api, badge, clear, redraw, confirmDialog, errorBox, field, fmtDuration, fmtNumber, fmtTime, h, modelLabel, section, showError, table, valueTable } from "/static/lib.js";
import { pageMessage } from "/static/datasets.js";
import { evaluationSection } from "/static/evaluation.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const METHODS = [
  ["lora", "LoRA: low-rank matrices (the standard)"],
  ["rslora", "rsLoRA: LoRA with rank-stabilised scaling"],
  ["dora", "DoRA: LoRA plus a learned magnitude"],
  ["loha", "LoHa: Hadamard product of low-rank pairs"],
  ["lokr", "LoKr: Kronecker product"],
  ["ia3", "IA³: learned per-feature scales (no rank)"],
];
const GENERIC = { n_epochs: 3, batch_size: 4, learning_rate: 2e-4, lora_r: 16, lora_alpha: 32 };

async function trainingSources() {
  const [datasets, files] = await Promise.all([api("/api/datasets"), api("/v1/files?purpose=fine-tune&limit=100").catch(() => ({ data: [] }))]);
  const versions = [];
  for (const d of datasets.data) {
    for (const v of d.versions) {
      if (v.status === "ready" && v.records) versions.push({ key: `dv:${d.id}:${v.version}`, dataset: d, version: v, fileId: v.training_file, label: `${d.name} v${v.version} — ${fmtNumber(v.records)} records` });
    }
  }
  // A dataset version exported for training is offered once, as the version (its file is reused).
  const exported = new Set(versions.map((v) => v.fileId).filter(Boolean));
  const uploaded = files.data.filter((f) => f.purpose === "fine-tune" && !exported.has(f.id)).map((f) => ({ key: `file:${f.id}`, file: f, label: `${f.filename} (${f.id})` }));
  return { versions: versions.reverse(), files: uploaded };
}

function sourceSelect(id, sources, { optional, selected }) {
  const select = h(
    "select",
    { id },
    optional ? h("option", { value: "" }, "None") : null,
    sources.versions.length ? h("optgroup", { label: "Dataset versions" }, sources.versions.map((s) => h("option", { value: s.key }, s.label))) : null,
    sources.files.length ? h("optgroup", { label: "Uploaded training files" }, sources.files.map((s) => h("option", { value: s.key }, s.label))) : null,
  );
  if (selected && [...select.options].some((o) => o.value === selected)) select.value = selected;
  return select;
}

async function fileIdOf(key, sources) {
  if (!key) return null;
  if (key.startsWith("file:")) return key.slice(5);
  const source = sources.versions.find((s) => s.key === key);
  if (source && source.fileId) return source.fileId; // exported before: the same file, not a second one
  const [, datasetId, number] = key.split(":");
  try {
    const file = await api(`/api/datasets/${encodeURIComponent(datasetId)}/versions/${number}/export`, { method: "POST", body: { allow_invalid: false } });
    return file.id;
  } catch (err) {
    throw pageMessage(err, { fromFineTune: true });
  }
}

// ====================================================================== form + jobs

export async function renderFineTune(root, ctx, { query }) {
  const [catalog, sources] = await Promise.all([ctx.models(true), trainingSources()]);
  const bases = catalog.filter((x) => x.kind === "base");
  const model = h("select", { id: "ft-model" }, bases.map((b) => h("option", { value: b.id }, b.display_name || b.id)));
  const asVersion = query.get("file") ? sources.versions.find((s) => s.fileId === query.get("file")) : null;
  const wantedFile = asVersion ? asVersion.key : query.get("file") ? `file:${query.get("file")}` : null;
  if (wantedFile && !asVersion && !sources.files.some((s) => s.key === wantedFile)) sources.files.unshift({ key: wantedFile, label: query.get("file") });
  const training = sourceSelect("ft-training", sources, { selected: wantedFile });
  const validation = sourceSelect("ft-validation", sources, { optional: true });
  const suffix = h("input", { type: "text", id: "ft-suffix", maxlength: "40", placeholder: "e.g. support-bot", pattern: "[A-Za-z0-9_.-]+" });
  const epochs = h("input", { type: "number", id: "ft-epochs", min: "0", max: "50", step: "1" });
  const method = h("select", { id: "ft-method" }, METHODS.map(([v, label]) => h("option", { value: v }, label)));
  const rank = h("input", { type: "number", id: "ft-rank", min: "1", max: "512", step: "1" });
  const alpha = h("input", { type: "number", id: "ft-alpha", min: "1", max: "1024", step: "1" });
  const lr = h("input", { type: "number", id: "ft-lr", min: "0", step: "any" });
  const batch = h("input", { type: "number", id: "ft-batch", min: "1", max: "256", step: "1" });
  const seed = h("input", { type: "number", id: "ft-seed", min: "0", step: "1", placeholder: "random" });
  const holdOut = h("input", { type: "number", id: "ft-holdout", min: "0", max: "49", step: "1", value: "0" });
  const keep = h("input", { type: "number", id: "ft-keep", min: "1", max: "1000", step: "1", value: "3" });
  const estimate = h("div", { class: "estimate", id: "ft-estimate", "aria-live": "polite" });
  const error = errorBox();
  const submit = h("button", { type: "submit", class: "btn btn-primary", id: "ft-start" }, "Start fine-tuning");
  let defaults = GENERIC;

  const applyDefaults = () => {
    const base = bases.find((b) => b.id === model.value);
    defaults = { ...GENERIC, ...((base && base.finetune_defaults) || {}) };
    epochs.value = defaults.n_epochs;
    rank.value = defaults.lora_r;
    alpha.value = defaults.lora_alpha;
    lr.value = defaults.learning_rate;
    batch.value = defaults.batch_size;
    method.value = "lora";
    updateEstimate();
  };

  const isAutoEpochs = () => epochs.value.trim() === "" || Number(epochs.value) === 0;

  function updateEstimate() {
    const base = bases.find((b) => b.id === model.value);
    const source = sources.versions.find((s) => s.key === training.value);
    // 0 or empty is "auto": the server uses the base model's recommended number (as OpenAI's "auto").
    const auto = isAutoEpochs();
    const n = auto ? defaults.n_epochs : Number(epochs.value);
    const epochText = auto ? `${n} epochs: auto, this base model's default` : `${n} epoch${n === 1 ? "" : "s"}`;
    const records = source ? source.version.records : (sources.files.find((s) => s.key === training.value) || {}).file?.records;
    const perEpoch = source && source.version.stats && source.version.stats.tokens ? source.version.stats.tokens.total : null;
    const steps = records ? Math.ceil(records / Math.max(1, Number(batch.value) || 1)) * n : null;
    const speed = base && base.observed_tokens_per_second;
    const lines = [];
    if (perEpoch !== null) lines.push(h("li", {}, h("strong", {}, fmtNumber(perEpoch * n)), ` tokens to train (${fmtNumber(perEpoch)} per epoch × ${epochText})`));
    else if (auto) lines.push(h("li", {}, `Epochs: ${epochText}.`));
    else lines.push(h("li", {}, "Token count unknown for an uploaded file: pick a dataset version to see it."));
    if (steps) lines.push(h("li", {}, h("strong", {}, fmtNumber(steps)), ` optimizer steps (${fmtNumber(records)} records, batch ${batch.value})`));
    if (perEpoch !== null && speed) lines.push(h("li", {}, "About ", h("strong", {}, fmtDuration((perEpoch * n) / speed)), ` of training, at the ${fmtNumber(speed, 0)} tokens/s your earlier runs on this model reached (plus start-up).`));
    else lines.push(h("li", { class: "muted" }, "No time estimate yet: none of your fine-tunes on this model has finished to measure its speed."));
    clear(estimate, h("h3", {}, "Estimate"), h("ul", {}, lines));
  }

  const form = h(
    "form",
    { class: "card", id: "ft-form", novalidate: true },
    h("h2", { class: "card-title" }, "New fine-tune"),
    h("p", { class: "muted" }, "The defaults come from the base model and work for most data. Pick your data, name the result and start."),
    h(
      "div",
      { class: "form-grid" },
      field("Base model", model),
      field("Training data", training, "A dataset version (exported for you) or an uploaded file."),
      field("Validation data (optional)", validation, "Held-out examples for the eval loss curve."),
      field("Name (suffix)", suffix, "Letters, digits, - _ . — it becomes part of the model's id."),
      field("Epochs", epochs, "How many times the model sees every example (0: auto, the base model's default)."),
    ),
    h(
      "details",
      { class: "advanced", id: "ft-advanced" },
      h("summary", {}, "Advanced: method, rank, alpha, learning rate…"),
      h(
        "div",
        { class: "form-grid" },
        field("Method", method, "The adapter kind (PEFT)."),
        field("Rank", rank, "Capacity of the adapter; higher learns more and is larger."),
        field("Alpha", alpha, "Scale of the adapter's update (often 2 × rank)."),
        field("Learning rate", lr, "Step size of training."),
        field("Batch size", batch),
        field("Seed", seed, "Fix it to make a run repeatable."),
        field("Hold out for evaluation (%)", holdOut, "Without validation data: keep this share of the examples aside to draw the eval loss."),
        field("Checkpoints to keep", keep, "The latest this many are kept, and the best one besides (keep_checkpoints)."),
      ),
    ),
    estimate,
    error,
    h("div", { class: "form-actions" }, submit),
  );
  form.hidden = !ctx.canWrite() || !bases.length;
  if (!sources.versions.length && !sources.files.length) {
    training.disabled = true;
    submit.disabled = true;
    form.insertBefore(h("p", { class: "notice" }, "You have no training data yet. ", h("a", { href: "#/datasets" }, "Upload a dataset"), " first."), estimate);
  }
  const jobsBox = h("div", { id: "jobs" });
  const federated = h("p", { class: "muted" }, "Sites that cannot share their data? ", h("a", { href: "#/federations", id: "federations-link" }, "Federated fine-tuning"), ": one adapter, trained where the data is.");
  clear(root, h("h1", { class: "page-title" }, "Fine-tune"), federated, form, section("Jobs", jobsBox));

  model.addEventListener("change", applyDefaults);
  for (const input of [training, epochs, batch]) input.addEventListener("input", updateEstimate);
  applyDefaults();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    const numbers = { n_epochs: [epochs, 0, 50], batch_size: [batch, 1, 256], lora_r: [rank, 1, 512], lora_alpha: [alpha, 1, 1024], keep_checkpoints: [keep, 1, 1000] };
    for (const [name, [input, low, high]] of Object.entries(numbers)) {
      if (input === epochs && isAutoEpochs()) continue;
      const n = Number(input.value);
      if (!Number.isInteger(n) || n < low || n > high) {
        if (input !== epochs) form.querySelector("#ft-advanced").open = true;
        input.focus();
        showError(error, new Error(`${input.labels[0].textContent} must be a whole number from ${low} to ${high} (${name}).`));
        return;
      }
    }
    const rate = Number(lr.value);
    if (!(rate > 0)) {
      form.querySelector("#ft-advanced").open = true;
      lr.focus();
      showError(error, new Error("Learning rate must be a number greater than 0."));
      return;
    }
    if (suffix.value && !/^[A-Za-z0-9_.-]{1,40}$/.test(suffix.value)) {
      suffix.focus();
      showError(error, new Error("The name may use letters, digits, '-', '_' and '.' only."));
      return;
    }
    const hyperparameters = { n_epochs: isAutoEpochs() ? "auto" : Number(epochs.value), batch_size: Number(batch.value), learning_rate_multiplier: rate / defaults.learning_rate };
    if (Number(keep.value) !== 3) hyperparameters.keep_checkpoints = Number(keep.value);
    // Method options beyond OpenAI's three knobs go only when changed, so a server without them still takes the defaults.
    if (method.value !== "lora") hyperparameters.peft_method = method.value;
    if (Number(rank.value) !== defaults.lora_r) hyperparameters.lora_r = Number(rank.value);
    if (Number(alpha.value) !== defaults.lora_alpha) hyperparameters.lora_alpha = Number(alpha.value);
    const heldOut = Number(holdOut.value);
    if (!(heldOut >= 0 && heldOut < 50)) {
      form.querySelector("#ft-advanced").open = true;
      holdOut.focus();
      showError(error, new Error("Hold out for evaluation must be a percentage from 0 to 49."));
      return;
    }
    if (heldOut > 0 && !validation.value) hyperparameters.validation_split = heldOut / 100;
    submit.disabled = true;
    try {
      const body = { model: model.value, training_file: await fileIdOf(training.value, sources), hyperparameters };
      const validationFile = await fileIdOf(validation.value, sources);
      if (validationFile) body.validation_file = validationFile;
      if (suffix.value) body.suffix = suffix.value;
      if (seed.value !== "") body.seed = Number(seed.value);
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
      ctx.navigate(`#/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      showError(error, err);
    } finally {
      submit.disabled = false;
    }
  });

  let timer = null;
  const drawJobs = async () => {
    const { data } = await api("/v1/fine_tuning/jobs?limit=50");
    clear(
      jobsBox,
      table(
        ["Job", "Base", "Status", "Name", "Created", "Result"],
        data.map((j) => [
          h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id),
          j.model,
          badge(j.status),
          j.user_provided_suffix || "—",
          fmtTime(j.created_at),
          j.fine_tuned_model ? h("a", { href: `#/chat?model=${encodeURIComponent(j.fine_tuned_model)}`, title: j.fine_tuned_model }, `Chat with ${modelLabel(j.fine_tuned_model)}`) : "—",
        ]),
        { caption: "Fine-tuning jobs", empty: "No fine-tunes yet." },
      ),
    );
    if (data.some((j) => !TERMINAL.includes(j.status))) timer = setTimeout(drawJobs, 2000);
  };
  await drawJobs();
  return () => clearTimeout(timer);
}

// ====================================================================== one job

function lossSeries(events, checkpoints) {
  const train = [];
  const evalPoints = new Map();
  for (const e of events) {
    const d = e.data || {};
    if (typeof d.train_loss === "number" && typeof d.step === "number") train.push([d.step, d.train_loss]);
    for (const key of ["valid_loss", "eval_loss"]) {
      if (typeof d[key] === "number" && typeof d.step === "number") evalPoints.set(d.step, d[key]);
    }
  }
  for (const c of checkpoints) {
    const loss = c.metrics.valid_loss ?? c.metrics.full_valid_loss;
    if (typeof loss === "number" && !evalPoints.has(c.step_number)) evalPoints.set(c.step_number, loss);
  }
  train.sort((a, b) => a[0] - b[0]);
  return [
    { name: "training loss", points: train, className: "s-train" },
    { name: "eval loss", points: [...evalPoints.entries()].sort((a, b) => a[0] - b[0]), className: "s-eval" },
  ];
}

function checkpointsTable(checkpoints) {
  // Newest first; the first few in view, the rest folded away.
  const rows = (list) =>
    table(
      ["Step", "Checkpoint model", "Metrics"],
      list.map((c) => [
        String(c.step_number),
        h("code", { class: "wrap" }, c.fine_tuned_model_checkpoint),
        Object.entries(c.metrics)
          .filter(([k]) => k !== "step")
          .map(([k, v]) => `${k.replace(/_/g, " ")} ${fmtNumber(v, 4)}`)
          .join(", "),
      ]),
      { caption: "Checkpoints", empty: "No checkpoints yet." },
    );
  const shown = 5;
  return [rows(checkpoints.slice(0, shown)), checkpoints.length > shown ? h("details", { class: "more" }, h("summary", {}, `${checkpoints.length - shown} older checkpoints`), rows(checkpoints.slice(shown))) : null];
}

const PHASES = {
  queued: "Waiting in the queue for a free trainer",
  validating_files: "Checking the training data",
  started: "Starting: handing the job to a trainer",
  starting: "Starting the training process",
  loading_base: "Loading the base model",
  preparing_data: "Preparing the training data",
  first_step: "Running the first step",
  training: "Training",
  saving: "Saving the adapter",
};
const LOG_SCALE = "adaptery.loss-log-scale";

/** What a running job is doing now, since when this attempt started, and how long it has left (from its steps so far). */
export function runState(job, ordered, now = Date.now() / 1000) {
  if (TERMINAL.includes(job.status) || job.status === "paused") return null;
  if (job.status !== "running") return { phase: job.status, text: PHASES[job.status] || job.status, elapsed: null, remaining: null };
  let startIndex = -1;
  ordered.forEach((e, i) => {
    if (e.data && e.data.phase === "started") startIndex = i;
  });
  const attempt = startIndex >= 0 ? ordered.slice(startIndex) : ordered;
  const started = startIndex >= 0 ? ordered[startIndex].created_at : job.created_at;
  let phase = "started";
  for (const e of attempt) {
    if (e.data && e.data.phase) phase = e.data.phase;
    else if (e.type === "metrics" && phase !== "saving") phase = "training";
  }
  const steps = attempt.filter((e) => e.type === "metrics" && e.data && typeof e.data.step === "number" && e.data.total_steps);
  const last = steps[steps.length - 1];
  let remaining = null;
  if (steps.length >= 2 && last.data.step > steps[0].data.step && last.created_at > steps[0].created_at) {
    const perStep = (last.created_at - steps[0].created_at) / (last.data.step - steps[0].data.step);
    remaining = Math.max(0, (last.data.total_steps - last.data.step) * perStep);
  }
  const text = phase === "training" && last ? `Training: step ${last.data.step} of ${last.data.total_steps}` : PHASES[phase] || phase;
  return { phase, text, elapsed: Math.max(0, now - started), remaining };
}

function settingsTable(job, hp) {
  const rows = { method: job.method ? job.method.type : "supervised", ...hp, training_file: job.training_file, validation_file: job.validation_file, seed: job.seed === null ? null : String(job.seed) };
  return h("div", { id: "job-settings" }, valueTable(rows, { caption: "Job settings" }));
}

export async function renderJob(root, ctx, { args }) {
  const jobId = args[0];
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  let timer = null;
  let stopped = false;
  let evaluation = null; // made once: it refreshes itself
  const error = errorBox();

  async function control(action) {
    showError(error, null);
    try {
      await api(`${path}/${action}`, { method: "POST" });
    } catch (err) {
      showError(error, err.status === 404 || err.status === 405 ? new Error(`${action} is not available on this server.`) : err);
    }
    draw();
  }

  async function draw() {
    clearTimeout(timer);
    const [job, events, checkpoints] = await Promise.all([api(path), api(`${path}/events?limit=1000`), api(`${path}/checkpoints?limit=100`)]);
    if (stopped) return;
    const ordered = [...events.data].reverse();
    const last = [...ordered].reverse().find((e) => e.data && typeof e.data.step === "number" && e.data.total_steps);
    const done = TERMINAL.includes(job.status);
    const state = runState(job, ordered);
    let logScale = false;
    try {
      logScale = localStorage.getItem(LOG_SCALE) === "1";
    } catch (_) {
      /* storage unavailable */
    }
    const logToggle = h("input", { type: "checkbox", id: "loss-log", checked: logScale });
    logToggle.addEventListener("change", () => {
      try {
        localStorage.setItem(LOG_SCALE, logToggle.checked ? "1" : "0");
      } catch (_) {
        /* storage unavailable */
      }
      draw();
    });
    const buttons = [];
    if (!done && ctx.canWrite()) {
      if (job.status === "paused") buttons.push(h("button", { type: "button", class: "btn", id: "job-resume", onclick: () => control("resume") }, "Resume"));
      else if (job.status === "running" || job.status === "queued") buttons.push(h("button", { type: "button", class: "btn", id: "job-pause", onclick: () => control("pause") }, "Pause"));
      buttons.push(
        h(
          "button",
          {
            type: "button",
            class: "btn btn-danger",
            id: "job-cancel",
            onclick: async () => {
              if (await confirmDialog({ title: "Cancel this fine-tune?", message: "Training stops; checkpoints made so far are kept.", confirm: "Cancel job" })) control("cancel");
            },
          },
          "Cancel job",
        ),
      );
    }
    // The method's hyperparameters hold every option the run used (method, rank, …); the top level only OpenAI's three.
    const hp = (job.method && job.method[job.method.type] && job.method[job.method.type].hyperparameters) || job.hyperparameters || {};
    redraw(
      root,
      h("p", { class: "crumbs" }, h("a", { href: "#/fine-tune" }, "Fine-tune"), " / ", job.id),
      h("h1", { class: "page-title" }, job.user_provided_suffix || job.id, " ", h("span", { id: "job-status", dataset: { status: job.status } }, badge(job.status))),
      job.status === "succeeded" && job.fine_tuned_model
        ? h(
            "p",
            { class: "notice", id: "job-adapter" },
            "Your adapter is ready: ",
            h("code", { class: "wrap" }, job.fine_tuned_model),
            " ",
            h("a", { class: "btn btn-primary btn-small", href: `#/chat?model=${encodeURIComponent(job.fine_tuned_model)}`, id: "chat-with-adapter" }, "Chat with it"),
            " ",
            h("a", { class: "btn btn-small", href: `#/compare?a=${encodeURIComponent(job.model)}&b=${encodeURIComponent(job.fine_tuned_model)}` }, "Compare with the base"),
          )
        : null,
      job.error ? h("p", { class: "form-error", role: "alert", id: "job-error" }, job.error.message || JSON.stringify(job.error)) : null,
      error,
      state
        ? h(
            "p",
            { class: "notice run-state", id: "job-phase", role: "status", dataset: { phase: state.phase } },
            h("span", { class: "typing", "aria-hidden": "true" }, "● "),
            h("strong", {}, state.text),
            state.elapsed !== null ? h("span", { id: "job-elapsed" }, ` · running for ${fmtDuration(state.elapsed)}`) : null,
            state.remaining !== null ? h("span", { id: "job-remaining" }, ` · about ${fmtDuration(state.remaining)} left`) : state.elapsed !== null ? h("span", { class: "muted" }, " · time left shown after a few steps") : null,
          )
        : null,
      h(
        "div",
        { class: "summary-strip" },
        h("div", {}, h("span", { class: "muted" }, "Base"), h("strong", {}, job.model)),
        h("div", {}, h("span", { class: "muted" }, "Progress"), h("strong", { id: "job-progress" }, last ? `step ${last.data.step} of ${last.data.total_steps}` : done ? "—" : "waiting")),
        h("div", {}, h("span", { class: "muted" }, "Epochs"), h("strong", {}, `${hp.n_epochs ?? "—"}`)),
        h("div", {}, h("span", { class: "muted" }, "Trained tokens"), h("strong", {}, fmtNumber(job.trained_tokens))),
        h("div", {}, h("span", { class: "muted" }, "Started / finished"), h("strong", {}, `${fmtTime(job.created_at)} → ${job.finished_at ? fmtTime(job.finished_at) : "…"}`)),
      ),
      buttons.length ? h("div", { class: "form-actions" }, buttons) : null,
      job.status === "succeeded" ? (evaluation ||= evaluationSection({ jobId: job.id }, ctx)) : null,
      h(
        "section",
        { class: "card", id: "loss-chart" },
        h("div", { class: "card-head" }, h("h2", { class: "card-title" }, "Loss"), h("label", { class: "check" }, logToggle, " Log scale")),
        lineChart(lossSeries(ordered, checkpoints.data), { title: "Loss by step", xMax: last ? last.data.total_steps : null, logY: logToggle.checked }),
      ),
      h(
        "div",
        { class: "two-col" },
        section(
          "Events",
          h(
            "ol",
            { class: "events", id: "job-events", reversed: true },
            events.data.map((e) => h("li", { class: `event level-${e.level}` }, h("time", { class: "muted" }, fmtTime(e.created_at)), " ", e.message)),
          ),
        ),
        h(
          "div",
          {},
          section("Checkpoints", checkpointsTable(checkpoints.data), h("p", { class: "muted", id: "checkpoints-kept" }, `The latest ${hp.keep_checkpoints ?? 3} and the best (lowest validation loss, else training loss) are kept; older ones are deleted.`)),
          section("Settings", settingsTable(job, hp)),
        ),
      ),
    );
    if (!done) timer = setTimeout(() => draw().catch((err) => showError(error, err)), 1000);
  }
  await draw();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
