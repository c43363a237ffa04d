// A real OpenID Provider for the tests (panva/oidc-provider, OpenID Certified): authorization code with PKCE,
// discovery, JWKS, userinfo with a `groups` claim, RP-initiated logout. It never reaches the network.
//
// node provider.mjs CONFIG.json — CONFIG: {"port", "issuer", "clients": [...], "keys": [private JWKs],
// "accounts_file": "accounts.json"}. The accounts file ({"alice": {"password", "email", "preferred_username",
// "groups": [...]}}) is read at every sign-in, so a test changes someone's groups by rewriting it.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const accounts = () => JSON.parse(readFileSync(config.accounts_file, 'utf8'));
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const page = (title, body) => `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escape(title)}</title></head>
<body><main><h1>${escape(title)}</h1>${body}</main></body></html>`;

const provider = new Provider(config.issuer, {
  clients: config.clients,
  jwks: { keys: config.keys },
  cookies: { keys: ['adaptery-test-provider-cookie-key'] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username', 'name'],
    groups: ['groups'],
  },
  scopes: ['openid', 'email', 'profile', 'groups'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = page('Sign out of the test provider?', `${form}
<button id="op-logout" type="submit" form="op.logoutForm" value="yes" name="logout">Yes, sign me out</button>
<button type="submit" form="op.logoutForm">No, stay signed in</button>`);
      },
    },
  },
  async findAccount(ctx, id) {
    const account = accounts()[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return {
          sub: id,
          email: account.email,
          email_verified: true,
          preferred_username: account.preferred_username ?? id,
          name: account.name ?? id,
          groups: account.groups ?? [],
        };
      },
    };
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = page('Provider error', `<pre id="op-error">${escape(JSON.stringify(out))}</pre>`);
  },
});

async function formBody(req) {
  let text = '';
  for await (const chunk of req) text += chunk;
  return new URLSearchParams(text);
}

// The interaction pages: a login form; consent is given at once (a first-party client of the institution).
async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (details.prompt.name === 'login') {
    if (req.method === 'POST') {
      const form = await formBody(req);
      const login = form.get('login') ?? '';
      const account = accounts()[login];
      if (account && account.password === form.get('password')) {
        return provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
      }
      return html(res, 200, loginForm(uid, 'Wrong login or password.'));
    }
    return html(res, 200, loginForm(uid, ''));
  }
  const { prompt, params, session, grantId } = details;
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
  if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
  const saved = await grant.save();
  return provider.interactionFinished(req, res, { consent: { grantId: saved } }, { mergeWithLastSubmission: true });
}

function loginForm(uid, error) {
  return page('Test provider sign-in', `<p id="op-login-error">${escape(error)}</p>
<form method="post" action="/interaction/${escape(uid)}">
<label>Login <input id="op-login" name="login" autocomplete="off"></label>
<label>Password <input id="op-password" name="password" type="password"></label>
<button id="op-submit" type="submit">Sign in</button></form>`);
}

function html(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8' });
  res.end(body);
}

const callback = provider.callback();
const server = createServer(async (req, res) => {
  const match = /^\/interaction\/([\w-]+)$/.exec(req.url.split('?')[0]);
  if (!match) return callback(req, res);
  try {
    await interaction(req, res, match[1]);
  } catch (error) {
    html(res, 400, page('Interaction failed', `<pre id="op-error">${escape(error.message)}</pre>`));
  }
});
server.listen(config.port, '127.0.0.1', () => console.log(`oidc-provider listening on ${config.issuer}`));
