/* Adaptery web UI: the shell (sign-in, navigation, hash routes) that loads each page's module.
 *
 * Plain ES modules, no dependencies, nothing loaded from outside this server.
 */

import { $, api, clear, h, onUnauthenticated, showError } from "/static/lib.js";

const PAGES = {
  chat: () => import("/static/chat.js").then((m) => m.renderChat),
  compare: () => import("/static/chat.js").then((m) => m.renderCompare),
  datasets: () => import("/static/datasets.js").then((m) => m.renderDatasets),
  "fine-tune": () => import("/static/finetune.js").then((m) => m.renderFineTune),
  jobs: () => import("/static/finetune.js").then((m) => m.renderJob),
  models: () => import("/static/models.js").then((m) => m.renderModels),
  keys: () => import("/static/keys.js").then((m) => m.renderKeys),
  admin: () => import("/static/admin.js").then((m) => m.renderAdmin),
  arena: () => import("/static/feedback.js").then((m) => m.renderArena),
  feedback: () => import("/static/feedback.js").then((m) => m.renderFeedback),
  federations: () => import("/static/federations.js").then((m) => m.renderFederations),
};
const NAV_OF = { jobs: "fine-tune", federations: "fine-tune" };

const state = { me: null, catalog: null, cleanup: null, renderId: 0 };

/** An invitation's accept link (/invitations/accept?invitation=…&token=…), from the inviting admin: kept while
 * the person signs in, and sent only when they press Accept (opening the link changes nothing). */
let acceptLink = readAcceptLink();

function readAcceptLink() {
  if (location.pathname !== "/invitations/accept") return null;
  const params = new URLSearchParams(location.search);
  return params.get("invitation") && params.get("token") ? { invitation: params.get("invitation"), token: params.get("token") } : null;
}

/** A one-time sign-in link (/auth/link?token=…): its page says whom it signs in, and only its button spends it
 * (a mail scanner or a chat's link preview that fetches the link spends nothing). */
let signInLink = location.pathname === "/auth/link" ? new URLSearchParams(location.search).get("token") : null;

async function showSignInLink() {
  let holder;
  try {
    holder = await api("/api/auth/link/holder", { method: "POST", body: { token: signInLink }, quiet401: true });
  } catch (err) {
    signInLink = null;
    history.replaceState(null, "", "/?link=invalid");
    if (err.status === 401) showLogin();
    else $("#boot").textContent = err.message;
    return;
  }
  showLogin();
  $("#login-title").textContent = "Sign in with your link";
  $("#link-username").textContent = holder.username;
  $("#link-tenant").textContent = holder.tenant;
  $("#link-submit").textContent = `Sign in as ${holder.username}`;
  $("#link-card").hidden = false;
  $("#login-hint").hidden = true;
  $("#login-form").hidden = true;
  $("#sso-choices").hidden = true;
  $("#link-submit").focus();
}

async function onSignInLink() {
  const error = $("#link-submit-error");
  showError(error, null);
  $("#link-submit").disabled = true;
  try {
    const me = await api("/api/auth/link", { method: "POST", body: { token: signInLink }, quiet401: true });
    signInLink = null;
    history.replaceState(null, "", "/");
    $("#link-card").hidden = true;
    $("#login-hint").hidden = false;
    $("#login-form").hidden = false;
    $("#login-title").textContent = "Sign in";
    showApp(me);
  } catch (err) {
    showError(error, err);
  } finally {
    $("#link-submit").disabled = false;
  }
}

function forgetAcceptLink() {
  acceptLink = null;
  history.replaceState(null, "", `/${location.hash}`);
}

// ---------------------------------------------------------------- context given to every page

const ctx = {
  get me() {
    return state.me;
  },
  isAdmin() {
    return ["owner", "admin"].includes(state.me.role) || state.me.can_administer_platform;
  },
  canWrite() {
    return state.me.role !== "viewer";
  },
  /** The model catalog (/api/models): bases with defaults, adapters with details. */
  async models(refresh = false) {
    if (!state.catalog || refresh) state.catalog = (await api("/api/models")).data;
    return state.catalog;
  },
  forgetModels() {
    state.catalog = null;
  },
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  toast(message) {
    const box = $("#toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(ctx._toastTimer);
    ctx._toastTimer = setTimeout(() => (box.hidden = true), 3500);
  },
};

// ---------------------------------------------------------------- routing

function parseHash() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "chat", args: parts.slice(1), query: new URLSearchParams(query || "") };
}

async function route() {
  if (!state.me) return;
  const { page, args, query } = parseHash();
  const load = PAGES[page] || PAGES.chat;
  const renderId = ++state.renderId;
  if (state.cleanup) state.cleanup();
  state.cleanup = null;
  const current = NAV_OF[page] || (PAGES[page] ? page : "chat");
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const view = $("#view");
  view.dataset.page = current;
  clear(view, h("p", { class: "muted loading" }, "Loading…"));
  try {
    const render = await load();
    if (renderId !== state.renderId) return;
    const host = h("div", { class: "page" });
    clear(view, host);
    state.cleanup = (await render(host, ctx, { args, query })) || null;
  } catch (err) {
    if (renderId !== state.renderId) return;
    clear(view, h("section", { class: "card" }, h("h1", {}, "Something went wrong"), h("p", { class: "form-error", role: "alert" }, err.message)));
  }
}

// ---------------------------------------------------------------- sign-in

function showLogin() {
  state.me = null;
  state.catalog = null;
  if (state.cleanup) state.cleanup();
  document.body.classList.remove("is-loading");
  document.body.classList.add("is-signed-out");
  $("#boot").hidden = true;
  $("#app").hidden = true;
  $("#login-view").hidden = false;
  const params = new URLSearchParams(location.search);
  if (params.get("link") === "invalid") showError($("#link-error"), new Error("That sign-in link is invalid, already used or expired. Ask for a new one, or sign in with your password."));
  if (params.get("sso")) showError($("#sso-error"), new Error(ssoMessage(params.get("sso"))));
  $("#invitation-hint").hidden = !acceptLink;
  if (signInLink) return;  // its own card (showSignInLink) stands in for the form
  drawSignInChoices();
  $("#username").focus();
}

/** Why a sign-in through an identity provider came back refused (the reason code is in the audit log too). */
function ssoMessage(code) {
  const messages = {
    no_role: "Your account at the identity provider gives you no role in any workspace here. Ask your workspace admin to add a rule for one of your groups.",
    bad_state: "That sign-in is unknown, expired or already used. Start again.",
    missing_state: "That sign-in is unknown, expired or already used. Start again.",
    browser_mismatch: "That sign-in was started in another browser. Start again here.",
    provider_error: "The identity provider did not sign you in.",
    provider_not_found: "That identity provider is not configured here.",
  };
  return messages[code] || `Single sign-on failed (${code}). Try again, or ask your workspace admin.`;
}

async function drawSignInChoices() {
  let choices = [];
  try {
    choices = (await api("/api/auth/providers", { quiet401: true })).data;
  } catch {
    choices = [];
  }
  const buttons = choices.map((c) => h("a", { class: "btn btn-block", id: `sso-${c.name}`, href: c.start_url }, `Sign in with ${c.display_name || c.name}`));
  clear($("#sso-buttons"), ...buttons);
  $("#sso-choices").hidden = !buttons.length;
}

function showApp(me) {
  state.me = me;
  document.body.classList.remove("is-loading", "is-signed-out");
  $("#boot").hidden = true;
  $("#login-view").hidden = true;
  $("#app").hidden = false;
  $("#tenant-name").textContent = me.tenant.name;
  $("#user-name").textContent = me.user.username;
  $("#user-role").textContent = me.is_platform_admin ? `${me.role}, platform admin` : me.role;
  $("#password-username").value = me.user.username;
  $("#nav-admin").hidden = !ctx.isAdmin();
  const viaSso = me.sign_in_method === "sso";  // the identity provider vouches for them: no local password
  $("#change-password").hidden = viaSso;
  showPasswordForm(!me.has_password && !viaSso);
  const switcher = $("#tenant-switch");
  switcher.hidden = (me.tenants || []).length < 2;
  clear(switcher, ...(me.tenants || []).map((t) => h("option", { value: t.id, selected: t.id === me.tenant.id }, `${t.name} (${t.role})`)));
  drawInvitations(me);
  if (location.search && !acceptLink) history.replaceState(null, "", `/${location.hash}`);
  route();
}

async function checkSession() {
  try {
    showApp(await api("/api/me", { quiet401: true }));
  } catch (err) {
    if (err.status === 401) showLogin();
    else {
      $("#boot").textContent = err.message;
    }
  }
}

async function onLogin(event) {
  event.preventDefault();
  const error = $("#login-error");
  showError(error, null);
  const username = $("#username").value.trim();
  const password = $("#password").value;
  if (!username || !password) {
    showError(error, new Error("Enter your username and password."));
    return;
  }
  $("#login-submit").disabled = true;
  try {
    await api("/api/auth/login", { method: "POST", body: { username, password }, quiet401: true });
    $("#password").value = "";
    showApp(await api("/api/me"));
  } catch (err) {
    showError(error, err);
    $("#password").select();
  } finally {
    $("#login-submit").disabled = false;
  }
}

async function onLogout() {
  try {
    const out = await api("/api/auth/logout", { method: "POST" });
    if (out && out.end_session_url) {  // signed in through a provider that ends its own session too
      location.assign(out.end_session_url);
      return;
    }
  } finally {
    location.hash = "";
    showLogin();
  }
}

/** The first password (just after a one-time link: no current one asked), or a change (the current one). */
function showPasswordForm(visible) {
  const changing = Boolean(state.me && state.me.has_password);
  $("#password-banner").hidden = !visible;
  $("#current-password").hidden = !changing;
  $("#password-banner-title").textContent = changing ? "Change your password" : "Set a password";
  $("#password-banner-desc").textContent = changing
    ? "Give your current password and a new one (at least 8 characters). Your other sessions end."
    : "You signed in with a one-time link. Choose a password (at least 8 characters) to sign in again later.";
}

async function onSetPassword(event) {
  event.preventDefault();
  const error = $("#password-error");
  showError(error, null);
  const password = $("#new-password").value;
  if (password.length < 8) {
    showError(error, new Error("Use at least 8 characters."));
    return;
  }
  const body = { password };
  if (state.me.has_password) body.current_password = $("#current-password").value;
  try {
    await api("/api/auth/password", { method: "POST", body });
    $("#password-banner").hidden = true;
    $("#new-password").value = "";
    $("#current-password").value = "";
    state.me.has_password = true;
    ctx.toast("Password saved. Next time, sign in with your username and password.");
  } catch (err) {
    showError(error, err);
  }
}

/** Pending invitations: each is declined here, but accepted only with its accept link (the account of this
 * username may not be the person the workspace's admin meant), which shows its invitation with an Accept button. */
async function drawInvitations(me) {
  const banner = $("#invitations-banner");
  banner.hidden = !me.invitations && !acceptLink;
  if (banner.hidden) return;
  const invitations = me.invitations ? (await api("/api/invitations")).data : [];
  const linked = acceptLink && invitations.find((inv) => inv.id === acceptLink.invitation);
  const rows = invitations.map((inv) => {
    const answer = (verb) => async () => {
      try {
        const body = verb === "accept" ? { token: acceptLink.token } : undefined;
        const answered = await api(`/api/invitations/${encodeURIComponent(inv.id)}/${verb}`, { method: "POST", body });
        if (inv === linked) forgetAcceptLink();
        showApp(answered);
        ctx.toast(verb === "accept" ? `You joined ${inv.tenant.name}; switch to it at the top.` : `Invitation from ${inv.tenant.name} declined.`);
      } catch (err) {
        ctx.toast(err.message);
      }
    };
    const decline = h("button", { type: "button", class: "btn btn-quiet btn-small" }, "Decline");
    decline.addEventListener("click", answer("decline"));
    if (inv !== linked) {
      return h("p", { class: "invitation" }, h("strong", {}, inv.tenant.name), ` invites you as ${inv.role}. To accept, open the link its admin sent you. `, decline);
    }
    const accept = h("button", { type: "button", class: "btn btn-primary btn-small", id: "accept-invitation" }, "Accept");
    accept.addEventListener("click", answer("accept"));
    return h("p", { class: "invitation linked" }, h("strong", {}, inv.tenant.name), ` invites you as ${inv.role}. `, accept, " ", decline);
  });
  if (acceptLink && !linked) {
    const dismiss = h("button", { type: "button", class: "btn btn-quiet btn-small" }, "Dismiss");
    dismiss.addEventListener("click", () => {
      forgetAcceptLink();
      drawInvitations(me);
    });
    rows.unshift(h("p", { class: "form-error", id: "invitation-link-error", role: "alert" }, `That invitation link is not for ${me.user.username}, or it was answered, replaced or has expired. Sign in as the account you were invited as, or ask the workspace's admin for a new link. `, dismiss));
  }
  clear($("#invitations-list"), ...rows);
}

async function onSwitchTenant() {
  state.catalog = null;
  try {
    showApp(await api("/api/auth/switch", { method: "POST", body: { tenant_id: $("#tenant-switch").value } }));
    ctx.toast(`Now in ${state.me.tenant.name}.`);
  } catch (err) {
    ctx.toast(err.message);
  }
}

function init() {
  $("#login-form").addEventListener("submit", onLogin);
  $("#logout").addEventListener("click", onLogout);
  $("#set-password-form").addEventListener("submit", onSetPassword);
  $("#dismiss-banner").addEventListener("click", () => ($("#password-banner").hidden = true));
  $("#change-password").addEventListener("click", () => showPasswordForm($("#password-banner").hidden));
  $("#tenant-switch").addEventListener("change", onSwitchTenant);
  window.addEventListener("hashchange", route);
  onUnauthenticated(() => {
    if (state.me) showLogin();
  });
  $("#link-submit").addEventListener("click", onSignInLink);
  if (signInLink) showSignInLink();
  else checkSession();
}

init();
