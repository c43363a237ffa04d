/* Federations: the coordinating tenant's federated fine-tunings. A federation's page shows its sites (joined by
 * invitation or added by key, online, dropped out of the last round), the round and secure-aggregation stage under
 * way, the loss of every finished round, and the adapter it produced; it refreshes itself while the run is live.
 * An admin invites a site here: the one-time token is shown once, in the command the site runs. */

import { lineChart } from "/static/charts.js";
import { api, badge, clear, errorBox, field, fmtDuration, fmtNumber, fmtTime, h, modelLabel, redraw, section, showError, table } from "/static/lib.js";

const REFRESH_MS = 1500;
const STAGES = { training: "local training", advertise: "keys advertised", share: "key shares exchanged", masked: "masked updates in", consistency: "survivors signed", unmask: "unmasking" };

const url = (id, tail = "") => `/api/federations/${encodeURIComponent(id)}${tail}`;

export async function renderFederations(root, ctx, { args }) {
  if (args[0]) return renderFederation(root, ctx, args[0]);
  const listed = (await api("/api/federations")).data;
  clear(
    root,
    h("h1", { class: "page-title" }, "Federations"),
    h("p", { class: "muted" }, "Fine-tune one adapter with sites whose data never leaves them: the coordinator sees only the securely aggregated update. Create one with ", h("code", {}, "adaptery fed create NAME --base-model BASE"), "."),
    section(
      "Your federations",
      table(
        ["Federation", "Base", "Status", "Sites", "Rounds", "Created"],
        listed.map((f) => [
          h("a", { href: `#/federations/${encodeURIComponent(f.id)}`, class: "federation-link" }, f.name),
          f.base_model,
          badge(f.status),
          String(f.sites.length),
          `${f.history.length} of ${f.rounds ?? "—"}`,
          fmtTime(f.created_at),
        ]),
        { caption: "Federations", empty: "No federations yet." },
      ),
    ),
  );
}

function progressText(fed) {
  if (fed.status === "done") return `all ${fed.history.length} rounds done`;
  if (fed.status === "failed") return "failed";
  if (fed.status === "created") return fed.superlink ? "waiting for the sites to connect" : "waiting for the coordinator";
  const p = fed.progress || {};
  return `round ${p.round ?? "?"} of ${fed.rounds ?? "?"} · ${STAGES[p.stage] || p.stage || "starting"}`;
}

function sitesTable(fed) {
  return table(
    ["Site", "Name", "Status", "Joined", "Key fingerprint", "Last seen"],
    fed.sites.map((s) => [
      String(s.number),
      s.name,
      h("span", { class: "site-status", dataset: { site: s.number } }, badge(s.status, s.status === "dropped" ? "failed" : s.status === "online" ? "succeeded" : "neutral")),
      s.joined ? "by invitation" : "added by key",
      h("code", { title: s.fingerprint }, `${s.fingerprint.slice(0, 16)}…`),
      s.last_seen ? fmtTime(s.last_seen) : "—",
    ]),
    { caption: "Sites", empty: "No sites yet: invite one below." },
  );
}

function roundsTable(fed) {
  const all = fed.sites.map((s) => s.number);
  return table(
    ["Round", "Mean loss", "Survivors", "Dropped", "Time", "Privacy spent (ε)"],
    fed.history.map((r) => [
      String(r.number),
      r.loss === null ? h("span", { class: "muted" }, "hidden (DP)") : fmtNumber(r.loss, 4),
      r.survivors.join(", "),
      all.filter((n) => !r.survivors.includes(n)).join(", ") || "—",
      fmtDuration(r.seconds),
      r.epsilon === null ? "—" : fmtNumber(r.epsilon, 2),
    ]),
    { caption: "Rounds", empty: "No round has finished yet." },
  );
}

function inviteForm(fed) {
  const name = h("input", { id: "invite-name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._-]{0,63}", placeholder: "clinic-a" });
  const result = h("div", { id: "invite-result" });
  const error = errorBox();
  const form = h(
    "form",
    { class: "inline-form", id: "invite-form" },
    field("Site name", name),
    h("button", { class: "btn btn-primary", type: "submit", id: "invite-submit" }, "Invite a site"),
    error,
    result,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    try {
      const made = await api(url(fed.id, "/invitations"), { method: "POST", body: { name: name.value } });
      const command = `adaptery fed join --server ${location.origin} --token ${made.token} --data local.jsonl --base-model DIR`;
      clear(result, h("p", {}, `Give this to ${made.name}; the token works once, until ${fmtTime(made.expires_at)}, and is not shown again:`), h("pre", { class: "wrap", id: "invite-command" }, command));
      name.value = "";
    } catch (err) {
      showError(error, err);
    }
  });
  return section("Invite a site", form);
}

async function renderFederation(root, ctx, id) {
  let timer = null;
  let stopped = false;
  const error = errorBox();
  let inviteSection = null; // made once: a redraw keeps the token it shows

  async function draw() {
    clearTimeout(timer);
    const fed = await api(url(id));
    if (stopped) return;
    if (!inviteSection && ctx.canWrite()) inviteSection = inviteForm(fed);
    const live = !(fed.status === "failed" || (fed.status === "done" && fed.adapter));
    const finished = fed.history.length;
    redraw(
      root,
      h("p", { class: "crumbs" }, h("a", { href: "#/federations" }, "Federations"), " / ", fed.name),
      h("h1", { class: "page-title" }, fed.name, " ", h("span", { id: "federation-status", dataset: { status: fed.status } }, badge(fed.status))),
      fed.adapter
        ? h(
            "p",
            { class: "notice", id: "federation-adapter" },
            "The federated adapter is ready: ",
            h("a", { href: `#/models/${encodeURIComponent(fed.adapter)}`, title: fed.adapter }, modelLabel(fed.adapter)),
            " ",
            h("a", { class: "btn btn-primary btn-small", href: `#/chat?model=${encodeURIComponent(fed.adapter)}`, id: "chat-with-federated" }, "Chat with it"),
          )
        : null,
      fed.error ? h("p", { class: "form-error", role: "alert", id: "federation-error" }, fed.error) : null,
      error,
      h(
        "div",
        { class: "summary-strip" },
        h("div", {}, h("span", { class: "muted" }, "Base"), h("strong", {}, fed.base_model)),
        h("div", {}, h("span", { class: "muted" }, "Sites"), h("strong", {}, `${fed.sites.length} (threshold ${fed.threshold ?? "a majority"})`)),
        h("div", {}, h("span", { class: "muted" }, "Progress"), h("strong", { id: "federation-progress" }, progressText(fed))),
        fed.rounds ? h("div", {}, h("span", { class: "muted" }, "Rounds"), h("progress", { id: "rounds-progress", max: fed.rounds, value: finished }), ` ${finished}/${fed.rounds}`) : null,
      ),
      section("Sites", h("div", { id: "federation-sites" }, sitesTable(fed))),
      h(
        "section",
        { class: "card", id: "federation-loss" },
        h("h2", { class: "card-title" }, "Loss by round"),
        lineChart([{ key: "loss", name: "mean loss", className: "s-train", points: fed.history.filter((r) => r.loss !== null).map((r) => [r.number, r.loss]) }], { xLabel: "round", title: "Mean training loss by round", xMax: fed.rounds }),
        h("div", { id: "federation-rounds" }, roundsTable(fed)),
      ),
      fed.invitations.length ? section("Open invitations", h("ul", { id: "federation-invitations" }, fed.invitations.map((i) => h("li", {}, `${i.name}, until ${fmtTime(i.expires_at)}`)))) : null,
      inviteSection,
    );
    if (live) timer = setTimeout(() => draw().catch((err) => showError(error, err)), REFRESH_MS);
  }
  await draw();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
