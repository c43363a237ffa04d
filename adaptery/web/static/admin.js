/* Admin: members and roles (invite with a one-time sign-in or accept link, change role, remove), single sign-on rules, usage (charts by day,
 * model and user, CSV) and limits, agents, the inference engine, the audit log (paged, filtered, CSV); every tenant for platform admins. A part whose route
 * this server does not have says so instead of failing. */

import { barChart, lineChart } from "/static/charts.js";
import { api, badge, clear, confirmDialog, copyText, errorBox, field, fmtNumber, fmtTime, h, optionalApi, section, showError, table, valueTable } from "/static/lib.js";

const ROLES = ["owner", "admin", "member", "viewer"];

function notAvailable(what) {
  return h("p", { class: "muted not-available" }, `${what}: not available on this server (or not for your role).`);
}

function scalar(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return fmtNumber(value, 3);
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.length ? value.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(", ") : "none";
  if (typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== null && v !== undefined);
    return entries.length ? entries.map(([k, v]) => `${k.replace(/_/g, " ")} ${typeof v === "number" ? fmtNumber(v, 3) : typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ") : "none";
  }
  return String(value);
}

/** A table of objects whose fields this page does not know in advance (agents, usage). */
function objectTable(rows, caption, empty) {
  if (!rows.length) return h("p", { class: "muted empty" }, empty);
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((c) => c !== "object");
  return table(columns.map((c) => c.replace(/_/g, " ")), rows.map((r) => columns.map((c) => (/_at$|heartbeat$/.test(c) && typeof r[c] === "number" ? fmtTime(r[c]) : scalar(r[c])))), { caption, empty });
}

/** A new person's one-time sign-in link, or an existing account's one-time accept link: shown once. */
function linkBox(result) {
  const url = result.login_url || result.accept_url;
  if (!url) {
    return h("p", { class: "notice", id: "invite-link", role: "status" }, result.message || `${result.username} is invited; they join once they accept.`);
  }
  const copy = h("button", { type: "button", class: "btn btn-small" }, "Copy");
  copy.addEventListener("click", () => copyText(url, copy));
  const what = result.login_url
    ? h("p", {}, h("strong", {}, `Sign-in link for ${result.username}`), ` (works once, for ${fmtNumber(result.expires_in_hours)} hours). Send it to them privately; it is not shown again.`)
    : h("p", {}, h("strong", {}, `Accept link for ${result.username}`), ` (works once, for ${fmtNumber(result.expires_in_hours / 24)} days). ${result.username} already has an account: send the link privately to the person you mean; they open it signed in as themself to join. It is not shown again.`);
  return h("div", { class: "secret", id: "invite-link", role: "status" }, what, h("div", { class: "secret-row" }, h("code", { class: "wrap", id: "invite-link-value" }, url), copy));
}

async function membersCard(ctx) {
  const listBox = h("div", { id: "members" });
  const shown = h("div", { "aria-live": "polite" });
  const error = errorBox();
  const username = h("input", { type: "text", id: "invite-username", maxlength: "63", autocapitalize: "none", spellcheck: "false", placeholder: "e.g. ada" });
  const role = h("select", { id: "invite-role" }, ROLES.map((r) => h("option", { value: r, selected: r === "member" }, r)));
  const form = h("form", { class: "inline-form", id: "invite-form", novalidate: true }, field("Username", username), field("Role", role), h("button", { type: "submit", class: "btn btn-primary", id: "invite-submit" }, "Invite"));

  async function draw() {
    const members = await optionalApi("/api/admin/members");
    if (!members) {
      clear(listBox, notAvailable("Members"));
      return;
    }
    clear(
      listBox,
      table(
        ["Member", "Role", "Joined", ""],
        members.data.map((m) => {
          const me = m.username === ctx.me.user.username;
          const select = h("select", { "aria-label": `Role of ${m.username}`, disabled: me }, ROLES.map((r) => h("option", { value: r, selected: r === m.role }, r)));
          select.addEventListener("change", async () => {
            showError(error, null);
            try {
              await api(`/api/admin/members/${encodeURIComponent(m.username)}`, { method: "PUT", body: { role: select.value } });
              ctx.toast(`${m.username} is now ${select.value}.`);
            } catch (err) {
              showError(error, err);
            }
            draw();
          });
          const actions = [];
          if (!me) {
            const link = h("button", { type: "button", class: "btn btn-small", hidden: m.set_up }, "New sign-in link");
            link.addEventListener("click", async () => {
              showError(error, null);
              try {
                clear(shown, linkBox(await api(`/api/admin/members/${encodeURIComponent(m.username)}/link`, { method: "POST" })));
              } catch (err) {
                showError(error, err);
              }
            });
            const remove = h("button", { type: "button", class: "btn btn-small btn-danger" }, "Remove");
            remove.addEventListener("click", async () => {
              if (!(await confirmDialog({ title: `Remove ${m.username}?`, message: "They lose access to this workspace at once: their sessions end and their API keys here are revoked. Their adapters and datasets stay.", confirm: "Remove" }))) return;
              try {
                await api(`/api/admin/members/${encodeURIComponent(m.username)}`, { method: "DELETE" });
                draw();
              } catch (err) {
                showError(error, err);
              }
            });
            actions.push(link, remove);
          }
          const joined = m.set_up ? fmtTime(m.created_at) : h("span", { class: "muted" }, "not signed in yet");
          return [h("strong", {}, m.username, me ? " (you)" : ""), select, joined, h("span", { class: "row-actions" }, actions)];
        }),
        { caption: "Members" },
      ),
      (members.invitations || []).length
        ? table(
            ["Invited", "Role", "Until", ""],
            members.invitations.map((inv) => {
              const link = h("button", { type: "button", class: "btn btn-small" }, "New accept link");
              link.addEventListener("click", async () => {
                showError(error, null);
                try {
                  clear(shown, linkBox(await api(`/api/admin/members/${encodeURIComponent(inv.username)}/link`, { method: "POST" })));
                  draw();
                } catch (err) {
                  showError(error, err);
                }
              });
              const withdraw = h("button", { type: "button", class: "btn btn-small" }, "Withdraw");
              withdraw.addEventListener("click", async () => {
                try {
                  await api(`/api/admin/members/${encodeURIComponent(inv.username)}`, { method: "DELETE" });
                  draw();
                } catch (err) {
                  showError(error, err);
                }
              });
              return [h("strong", {}, inv.username), inv.role, fmtTime(inv.expires_at), h("span", { class: "row-actions" }, link, withdraw)];
            }),
            { caption: "Invitations waiting for an answer" },
          )
        : null,
    );
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    if (!username.value.trim()) {
      showError(error, new Error("Enter the new member's username."));
      username.focus();
      return;
    }
    try {
      const result = await api("/api/admin/members", { method: "POST", body: { username: username.value.trim(), role: role.value } });
      clear(shown, linkBox(result));
      username.value = "";
      draw();
    } catch (err) {
      showError(error, err.status === 404 || err.status === 405 ? new Error("Inviting is not available on this server.") : err);
    }
  });
  await draw();
  return h("section", { class: "card", id: "members-card" }, h("h2", { class: "card-title" }, "Members and roles"), h("p", { class: "muted" }, "Invite someone by username (lowercase letters, digits and '-'). Someone new gets a one-time sign-in link for you to send them; for someone who already has an account you get a one-time accept link to send them, which they open signed in as themself to join."), form, error, shown, listBox);
}

const DAY = 86400;

/** Usage from the ledger: totals of the period, tokens per day, by model and by user (charts), by key (table),
 * and the period's rows as CSV. */
async function usageCard() {
  const now = Math.floor(Date.now() / 1000);
  const box = h("div", { id: "usage-view" });
  const days = h("select", { id: "usage-days", "aria-label": "Period" }, [7, 30, 90].map((d) => h("option", { value: String(d), selected: d === 30 }, `last ${d} days`)));
  const exportLink = h("a", { class: "btn btn-small", id: "usage-export", download: "usage.csv" }, "Export CSV");
  const [limits, keys] = await Promise.all([optionalApi("/api/admin/limits"), optionalApi("/api/keys")]);
  const names = new Map(((keys && keys.data) || []).map((k) => [k.id, `${k.name || "unnamed"} (${k.redacted_value})`]));

  async function draw() {
    const start = now - (now % DAY) - (Number(days.value) - 1) * DAY;
    exportLink.href = `/api/admin/usage/export?start_time=${start}`;
    const usage = await optionalApi(`/api/admin/usage?start_time=${start}`);
    if (!usage) {
      clear(box, notAvailable("Usage"));
      return;
    }
    const ledger = usage.ledger || { totals: {}, by_day: {}, by_model: {}, by_user: {}, by_key: {} };
    const tokens = (f) =>
      (f.prompt_tokens || 0) + (f.completion_tokens || 0) + (f.embedding_tokens || 0) + (f.evaluation_tokens || 0) +
      (f.trained_tokens || 0);
    const dayPoints = [];
    for (let d = 0; d < Number(days.value); d += 1) {
      const day = new Date((start + d * DAY) * 1000).toISOString().slice(0, 10);
      dayPoints.push([d - Number(days.value) + 1, tokens(ledger.by_day[day] || {})]);
    }
    const bars = (groups) => Object.entries(groups).map(([label, f]) => ({ label, value: tokens(f) }));
    const keyRows = Object.entries(ledger.by_key || {}).map(([id, f]) => ({ key: names.get(id) || id, ...f }));
    clear(
      box,
      objectTable([{ ...ledger.totals, currency: ledger.currency }], "Totals of the period", "No usage yet."),
      h("h3", {}, "Tokens per day"),
      lineChart([{ name: "tokens", points: dayPoints, className: "s-train" }], { xLabel: "days ago", yLabel: "tokens", title: "Tokens per day" }),
      h("h3", {}, "By model"),
      barChart(bars(ledger.by_model || {}), { title: "Tokens by model" }),
      h("h3", {}, "By user"),
      barChart(bars(ledger.by_user || {}), { title: "Tokens by user" }),
      h("h3", {}, "By API key"),
      objectTable(keyRows, "Usage by key", "No key has been used in this period."),
      h("h3", {}, `Live counters (${usage.period})`),
      objectTable([usage.tenant || {}], "This month's counters of the limits", "No usage yet."),
    );
  }

  days.addEventListener("change", () => draw());
  await draw();
  return section(
    "Usage",
    h("div", { class: "inline-form" }, days, exportLink),
    box,
    limits ? [h("h3", {}, "Limits set by the platform"), objectTable([Object.fromEntries(Object.entries(limits).filter(([k]) => k !== "tenant_id"))], "Limits", "No limits.")] : null,
  );
}

const AGENT_COLUMNS = ["Name", "State", "Roles", "Bases", "Resident adapters", "Tokens/s", "Queue", "Running", "Job", "Last heartbeat", "Scope"];
const AGENT_REFRESH_MS = 2000;

function residentAdapters(tiers) {
  if (!tiers) return "—";
  const count = (v) => (Array.isArray(v) ? v.length : Number(v) || 0);
  return ["active", "memory", "disk", "loading"].filter((t) => count(tiers[t])).map((t) => `${count(tiers[t])} ${t}`).join(" · ") || "none";
}

function agentRows(rows) {
  return rows.map((a) => [
    h("span", { title: a.id }, a.name),
    badge(a.state, a.state === "lost" || a.state === "revoked" || a.state === "offline" ? "failed" : a.state === "busy" ? "running" : "succeeded"),
    (a.roles || []).join(", ") || "—",
    (a.bases || []).join(", ") || "—",
    residentAdapters(a.adapters),
    // null: a machine shared with other tenants, whose load is theirs to know
    a.tokens_per_second == null ? "—" : fmtNumber(a.tokens_per_second, 3),
    a.queue_depth == null ? "—" : String(a.queue_depth),
    a.running == null ? "—" : String(a.running),
    a.current_job || "—",
    fmtTime(a.last_heartbeat_at),
    a.tenant_scope ? "tenant" : "platform",
  ]);
}

/** Agents, live: redrawn every AGENT_REFRESH_MS while the card is on the page; a lost infer agent says so. */
async function agentsCard() {
  const agents = await optionalApi("/api/admin/agents");
  if (!agents) return section("Agents", notAvailable("Agents"));
  const body = h("div", { "aria-live": "polite" });
  const card = h("section", { class: "card", id: "agents" }, h("h2", { class: "card-title" }, "Agents"), body);
  const draw = (data) => {
    const rows = Array.isArray(data) ? data : data.data || [];
    clear(body, table(AGENT_COLUMNS, agentRows(rows), { caption: "Agents", empty: "No agents have enrolled." }));
  };
  draw(agents);
  let shown = false;
  const timer = setInterval(async () => {
    shown = shown || card.isConnected;
    if (!card.isConnected) {
      if (shown) clearInterval(timer); // the page moved on
      return;
    }
    const fresh = await optionalApi("/api/admin/agents").catch(() => null);
    if (fresh) draw(fresh);
  }, AGENT_REFRESH_MS);
  return card;
}

async function engineCard() {
  const engine = await optionalApi("/api/admin/engine");
  if (!engine) return section("Inference engine", notAvailable("Engine state"));
  return h("section", { class: "card", id: "engine-state" }, h("h2", { class: "card-title" }, "Inference engine"), valueTable(engine, { caption: "Inference engine" }));
}

/** The audit log, newest first, a page at a time (the API's cursor), filtered by actor and action; CSV export. */
async function auditCard() {
  const list = h("div", { id: "audit-events" });
  const actor = h("input", { type: "text", id: "audit-actor", placeholder: "actor (username)", autocapitalize: "none", spellcheck: "false" });
  const action = h("input", { type: "text", id: "audit-action", placeholder: "action, or prefix like job." , autocapitalize: "none", spellcheck: "false" });
  const exportLink = h("a", { class: "btn btn-small", id: "audit-export", download: "audit.csv", href: "/api/admin/audit/export" }, "Export CSV");
  const more = h("button", { type: "button", class: "btn btn-small", id: "audit-more" }, "Older events");
  const form = h("form", { class: "inline-form", id: "audit-filter" }, actor, action, h("button", { type: "submit", class: "btn btn-small" }, "Filter"), exportLink);
  let rows = [];
  let after = null;

  const query = () => {
    const params = new URLSearchParams();
    if (actor.value.trim()) params.set("actor", actor.value.trim());
    if (action.value.trim()) params.set("action", action.value.trim());
    return params;
  };

  async function load(reset) {
    const params = query();
    exportLink.href = `/api/admin/audit/export?${params}`;
    params.set("limit", "30");
    if (!reset && after !== null) params.set("after", String(after));
    const page = await optionalApi(`/api/admin/audit?${params}`);
    if (!page) {
      clear(list, notAvailable("Audit log"));
      more.hidden = true;
      return;
    }
    rows = reset ? page.data : rows.concat(page.data);
    after = page.last_id;
    more.hidden = !page.has_more;
    clear(
      list,
      table(
        ["When", "Who", "Action", "Target", "From", "Outcome"],
        rows.map((e) => [fmtTime(e.created_at), e.actor || "—", e.action, e.target ? h("code", { class: "wrap" }, e.target) : "—", e.ip || "—", badge(e.outcome, e.outcome === "success" ? "succeeded" : "failed")]),
        { caption: "Audit events", empty: "No events match." },
      ),
    );
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load(true);
  });
  more.addEventListener("click", () => load(false));
  await load(true);
  return section("Audit log", form, list, more);
}

/** Single sign-on: the identity providers this workspace trusts (a platform admin binds them), the rules that
 * turn a provider's groups into roles here (applied at each person's next sign-in), and whether local passwords
 * and one-time links still sign in. */
async function ssoCard(ctx) {
  const current = await optionalApi("/api/admin/sso");
  if (!current) return section("Single sign-on", notAvailable("Single sign-on"));
  const box = h("div", { id: "sso" });
  const error = errorBox();
  let rules = current.rules;

  async function save(body, path) {
    showError(error, null);
    try {
      const answer = await api(path, { method: "PUT", body });
      rules = answer.rules;
      draw(answer);
      ctx.toast("Single sign-on saved.");
    } catch (err) {
      showError(error, err);
    }
  }

  function draw(sso) {
    if (!sso.providers.length) {
      clear(box, h("p", { class: "muted" }, "This workspace trusts no identity provider yet: a platform admin binds one."));
      return;
    }
    const ruleRows = rules.map((rule) => {
      const remove = h("button", { type: "button", class: "btn btn-small btn-danger" }, "Remove");
      remove.addEventListener("click", () => save({ rules: rules.filter((r) => r !== rule) }, "/api/admin/sso/rules"));
      return [rule.provider, h("code", {}, rule.group), rule.role, remove];
    });
    const provider = h("select", { id: "sso-rule-provider" }, sso.providers.map((p) => h("option", { value: p.name }, p.display_name || p.name)));
    const group = h("input", { type: "text", id: "sso-rule-group", maxlength: "255", placeholder: "e.g. lab-staff", spellcheck: "false" });
    const role = h("select", { id: "sso-rule-role" }, ROLES.map((r) => h("option", { value: r, selected: r === "member" }, r)));
    const add = h("form", { class: "inline-form", id: "sso-rule-form", novalidate: true }, field("Provider", provider), field("Group", group), field("Role", role), h("button", { type: "submit", class: "btn btn-primary", id: "sso-rule-add" }, "Add rule"));
    add.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!group.value.trim()) {
        showError(error, new Error("Name the group (a value of the provider's groups claim)."));
        return;
      }
      save({ rules: [...rules, { provider: provider.value, group: group.value.trim(), role: role.value }] }, "/api/admin/sso/rules");
    });
    const password = h("input", { type: "checkbox", id: "sso-password-sign-in", checked: sso.password_sign_in });
    const link = h("input", { type: "checkbox", id: "sso-link-sign-in", checked: sso.link_sign_in });
    const policy = h(
      "form",
      { class: "inline-form", id: "sso-policy-form", novalidate: true },
      h("label", { class: "check" }, password, " Passwords sign in"),
      h("label", { class: "check" }, link, " One-time links sign in"),
      h("button", { type: "submit", class: "btn", id: "sso-policy-save" }, "Save"),
    );
    policy.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!(password.checked && link.checked) && !(await confirmDialog({ title: "Turn local sign-in off?", message: "Sessions opened that way end at once, yours too if you signed in with a password.", confirm: "Turn off", danger: true }))) return;
      save({ password_sign_in: password.checked, link_sign_in: link.checked }, "/api/admin/sso/policy");
    });
    clear(
      box,
      h("p", { class: "muted" }, "Trusted identity providers: ", sso.providers.map((p) => p.display_name || p.name).join(", "), ". People signing in through one get the highest role of their groups' rules, at each sign-in; with none, no access (their sessions and keys here end)."),
      table(["Provider", "Group", "Role", ""], ruleRows, { caption: "Group → role rules", empty: "No rules: nobody signs in through a provider yet." }),
      add,
      policy,
    );
  }

  draw(current);
  return h("section", { class: "card", id: "sso-card" }, h("h2", { class: "card-title" }, "Single sign-on"), box, error);
}

async function tenantsCard() {
  const tenants = await optionalApi("/api/platform/tenants");
  if (!tenants) return section("Tenants", notAvailable("Tenants"));
  return h(
    "section",
    { class: "card", id: "tenants" },
    h("h2", { class: "card-title" }, "All tenants"),
    table(
      ["Tenant", "Id", "Limits", "Usage"],
      tenants.data.map((t) => [h("strong", {}, t.name), h("code", {}, t.id), scalar(Object.fromEntries(Object.entries(t.limits || {}).filter(([, v]) => v !== null))), scalar(t.usage)]),
      { caption: "Tenants" },
    ),
  );
}

/** Platform administration is a step-up: the password again, for a few minutes, in this session only. */
function platformCard(ctx, rerender) {
  const error = errorBox();
  if (ctx.me.is_platform_admin) {
    const leave = h("button", { type: "button", class: "btn btn-small", id: "platform-leave" }, "Leave platform administration");
    leave.addEventListener("click", async () => {
      await api("/api/auth/platform", { method: "DELETE" });
      ctx.me.is_platform_admin = false;
      rerender();
    });
    return section("Platform administration", h("p", { class: "muted" }, `You administer the platform until ${fmtTime(ctx.me.platform_admin_until)}. `, leave));
  }
  const password = h("input", { type: "password", id: "platform-password", autocomplete: "current-password", placeholder: "Your password" });
  const form = h("form", { class: "inline-form", id: "platform-form", novalidate: true }, field("Password", password), h("button", { type: "submit", class: "btn btn-primary" }, "Enter platform administration"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    try {
      Object.assign(ctx.me, await api("/api/auth/platform", { method: "POST", body: { password: password.value } }));
      rerender();
    } catch (err) {
      showError(error, err);
    }
  });
  return section("Platform administration", h("p", { class: "muted" }, "Every tenant's limits and usage. Enter your password again to administer the platform for a few minutes."), form, error);
}

export async function renderAdmin(root, ctx) {
  if (!ctx.isAdmin()) {
    clear(root, h("h1", { class: "page-title" }, "Admin"), h("p", { class: "notice" }, "Administration is for workspace owners, admins and platform administrators."));
    return null;
  }
  const tenantAdmin = ["owner", "admin"].includes(ctx.me.role);
  const rerender = () => renderAdmin(root, ctx);
  const parts = await Promise.all([
    tenantAdmin ? membersCard(ctx) : null,
    tenantAdmin ? ssoCard(ctx) : null,
    ctx.me.can_administer_platform ? platformCard(ctx, rerender) : null,
    ctx.me.is_platform_admin ? tenantsCard() : null,
    agentsCard(),
    tenantAdmin ? usageCard() : null,
    engineCard(),
    tenantAdmin ? auditCard() : null,
  ]);
  clear(root, h("h1", { class: "page-title" }, "Admin"), h("p", { class: "muted page-intro" }, `Workspace ${ctx.me.tenant.name}.`), parts);
  return null;
}
