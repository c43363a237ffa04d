/* A job's evaluation report: the new adapter, its predecessor and the base side by side (table and chart), the
 * examples that got better and worse, lm-eval task scores, and the evaluations still running with their progress. */

import { groupedBarChart } from "/static/charts.js";
import { api, badge, errorBox, fmtNumber, h, redraw, showError, table } from "/static/lib.js";

const METRICS = [
  ["exact_match", "Exact match"],
  ["token_f1", "Token F1"],
  ["rouge_l", "ROUGE-L"],
  ["check_pass_rate", "Checks passed"],
];
const DONE = ["succeeded", "failed"];

function scoreColumns(report) {
  // lm-eval scores become columns beside the held-out metrics: "task: metric".
  const columns = [];
  for (const task of report.lm_eval) {
    const names = new Set(Object.values(task.scores).flatMap((s) => Object.keys(s.metrics || {})));
    for (const metric of names) columns.push({ key: `${task.task}: ${metric}`, value: (label) => task.scores[label]?.metrics?.[metric] });
  }
  return columns;
}

function reportTable(report) {
  const held = report.held_out ? report.held_out.table : {};
  const extra = scoreColumns(report);
  const metrics = METRICS.filter(([key]) => Object.values(held).some((row) => typeof row[key] === "number"));
  return table(
    ["", "Model", "Loss", ...metrics.map(([, title]) => title), ...extra.map((c) => `lm-eval ${c.key}`)],
    report.models.map((m) => {
      const row = held[m.label] || {};
      return [
        badge(m.label, m.label),
        h("code", { class: "wrap" }, m.model),
        fmtNumber(row.loss, 4),
        ...metrics.map(([key]) => fmtNumber(row[key], 3)),
        ...extra.map((c) => fmtNumber(c.value(m.label), 3)),
      ];
    }),
    { caption: "Evaluation", empty: "No evaluation has finished yet." },
  );
}

function reportChart(report) {
  const held = report.held_out ? report.held_out.table : {};
  const groups = METRICS.filter(([key]) => Object.values(held).some((row) => typeof row[key] === "number")).map(([key, label]) => ({
    label,
    values: Object.fromEntries(Object.entries(held).map(([model, row]) => [model, row[key]])),
  }));
  for (const c of scoreColumns(report)) groups.push({ label: c.key, values: Object.fromEntries(report.models.map((m) => [m.label, c.value(m.label)])) });
  const series = report.models.map((m) => ({ key: m.label, name: m.label, className: `s-${m.label}` }));
  return groupedBarChart(groups, series, { title: "Scores by model (higher is better)" });
}

function changesTable(rows, against, kind) {
  return table(
    ["Prompt", "Reference", "New adapter", `The ${against}`],
    rows.map((row) => [row.prompt, row.reference, row.models.candidate.answer, row.models[against]?.answer ?? "—"]),
    { caption: `Examples that got ${kind}`, empty: `No example got ${kind}.` },
  );
}

function progressLine(evaluation) {
  const p = evaluation.progress || {};
  const what = evaluation.kind === "lm_eval" ? `lm-eval ${evaluation.source.task}` : "held-out set";
  return h(
    "li",
    { class: "eval-run", dataset: { status: evaluation.status } },
    badge(evaluation.status),
    ` ${what}`,
    evaluation.status === "running" && p.total ? [" ", h("progress", { max: p.total, value: p.done || 0 }), ` ${p.done || 0}/${p.total}`] : null,
    p.message && !DONE.includes(evaluation.status) ? h("span", { class: "muted" }, ` · ${p.message}`) : null,
    evaluation.error ? h("span", { class: "form-error" }, ` ${evaluation.error}`) : null,
  );
}

/** Promote or not, and why; with a one-click promotion when the adapter is a version of a stable name. */
function recommendationLine(report, ctx, error) {
  const { promote, reason } = report.recommendation;
  const named = report.model_name;
  const current = named && named.version === named.current_version;
  const button =
    promote && named && !current && ctx.canWrite()
      ? h("button", {
          type: "button",
          class: "btn btn-primary",
          id: "eval-promote",
          onclick: async () => {
            showError(error, null);
            try {
              await api(`/api/model_names/${encodeURIComponent(named.name)}/promote`, { method: "POST", body: { version: named.version } });
              ctx.forgetModels();
              ctx.toast(`Version ${named.version} now answers ${named.name}.`);
              ctx.navigate("#/models");
            } catch (err) {
              showError(error, err);
            }
          },
        }, `Promote to ${named.name} (v${named.version})`)
      : null;
  return h(
    "div",
    { class: `eval-recommendation ${promote ? "promote" : "hold"}`, id: "eval-recommendation", dataset: { promote: String(promote) } },
    h("p", {}, h("strong", {}, promote ? "Promote: " : "Do not promote: "), `the new adapter is ${reason}.`, current ? ` It is ${named.name}'s current version.` : ""),
    button,
  );
}

/** The evaluation card of a job's page (`{ jobId }`) or an adapter's (`{ model }`); it refreshes itself while an
 * evaluation is queued or running. */
export function evaluationSection({ jobId, model }, ctx) {
  const reportPath = jobId ? `/api/fine_tuning/jobs/${encodeURIComponent(jobId)}/evaluation` : `/api/models/${encodeURIComponent(model)}/evaluation`;
  const root = h("section", { class: "card", id: "evaluation-report" }, h("h2", { class: "card-title" }, "Evaluation"), h("p", { class: "muted" }, "Loading…"));
  const error = errorBox();
  let timer = null;

  async function runTask(model, task) {
    showError(error, null);
    try {
      await api("/api/evaluations", { method: "POST", body: { model, kind: "lm_eval", task } });
    } catch (err) {
      showError(error, err);
    }
    draw();
  }

  async function draw() {
    clearTimeout(timer);
    if (!root.isConnected && timer !== null) return;
    const [report, tasks] = await Promise.all([api(reportPath), api("/api/evaluation_tasks").catch(() => ({ data: [] }))]);
    const picker = h("select", { id: "eval-task", "aria-label": "Evaluation task" }, tasks.data.map((t) => h("option", { value: t.name }, `${t.name} (${t.records} documents)`)));
    const against = report.changes.against;
    redraw(
      root,
      h("h2", { class: "card-title" }, "Evaluation"),
      h("p", { class: "muted" }, report.held_out ? `Held-out set: ${report.held_out.source.kind.replace(/_/g, " ")}. ` : "", `Predecessor: ${report.predecessor_rule}.`),
      report.evaluations.length ? h("ul", { class: "eval-runs", id: "eval-runs" }, report.evaluations.map(progressLine)) : h("p", { class: "muted" }, "Not evaluated (see the job's events)."),
      report.recommendation ? recommendationLine(report, ctx, error) : null,
      h("div", { id: "eval-table" }, reportTable(report)),
      report.held_out || report.lm_eval.length ? h("div", { id: "eval-chart" }, reportChart(report)) : null,
      against ? h("div", { class: "two-col eval-examples", id: "eval-changes" }, changesTable(report.changes.better, against, "better"), changesTable(report.changes.worse, against, "worse")) : null,
      ctx.canWrite() && report.model && tasks.data.length
        ? h("div", { class: "form-actions" }, picker, h("button", { type: "button", class: "btn", id: "eval-run-task", onclick: () => runTask(report.model, picker.value) }, "Run lm-eval task"))
        : null,
      error,
    );
    if (report.evaluations.some((e) => !DONE.includes(e.status))) timer = setTimeout(() => draw().catch((err) => showError(error, err)), 1500);
  }
  draw().catch((err) => showError(error, err));
  return root;
}
