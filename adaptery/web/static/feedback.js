/* The feedback loop's pages: the blind arena with its leaderboard, and collected feedback with the workspace's
   policy and the "build a dataset" action. */

import { api, clear, errorBox, field, fmtTime, h, modelLabel, showError, streamChat, table } from "/static/lib.js";
import { renderMarkdown } from "/static/markdown.js";

function policyLine(policy) {
  return h("p", { class: "muted feedback-policy", id: "feedback-policy" }, policy.description);
}

// ====================================================================== arena

export async function renderArena(root, ctx) {
  const catalog = await ctx.models(true);
  const bases = catalog.filter((x) => x.kind === "base");
  const policy = await api("/api/feedback/policy");
  const base = h("select", { id: "arena-base" }, bases.map((b) => h("option", { value: b.id }, b.display_name || b.id)));
  const prompt = h("textarea", { id: "arena-prompt", rows: "3", placeholder: "One message; two models of this base answer it blind…" });
  const maxTokens = h("input", { id: "arena-max-tokens", type: "number", min: "1", max: "4096", value: "128" });
  const run = h("button", { type: "submit", class: "btn btn-primary", id: "arena-run" }, "Ask both");
  const error = errorBox();
  const form = h("form", { class: "card compare-form", novalidate: true }, h("div", { class: "compare-pickers" }, field("Base model", base), field("Max tokens", maxTokens)), field("Message", prompt), h("div", { class: "composer-bar" }, error, h("div", { class: "composer-buttons" }, run)));
  const column = (side) => h("section", { class: "compare-col card", id: `arena-col-${side}`, dataset: { done: "true" } }, h("h2", { class: "compare-model" }, `Model ${side.toUpperCase()}`), h("div", { class: "content" }, h("p", { class: "muted" }, "The answer appears here.")));
  const columns = { a: column("a"), b: column("b") };
  const votes = h("div", { class: "arena-votes", id: "arena-votes", hidden: true });
  const reveal = h("p", { class: "arena-reveal", id: "arena-reveal", "aria-live": "polite" });
  const board = h("div", { id: "leaderboard" });
  clear(
    root,
    h("h1", { class: "page-title" }, "Arena"),
    h("p", { class: "muted page-intro" }, "The same message goes to two models of one base (the base, or your adapters on it), shown blind. Pick the better answer, or a tie: the names appear after your vote, and the vote counts in the leaderboard."),
    h("p", { class: "muted feedback-policy", id: "feedback-policy" }, policy.description, " ", h("a", { href: "#/feedback" }, "Collected feedback and datasets…")),
    form,
    h("div", { class: "compare-grid" }, columns.a, columns.b),
    votes,
    reveal,
    h("h2", {}, "Leaderboard"),
    board,
  );
  if (policy.collect === "off") {
    run.disabled = true;
    showError(error, new Error("Arena votes are feedback, and this workspace collects none. A tenant admin can turn collection on under Feedback."));
  }

  async function drawBoard() {
    const data = await api(`/api/arena/leaderboard?base=${encodeURIComponent(base.value)}`);
    clear(
      board,
      h("p", { class: "muted" }, `${data.votes} vote(s). ${data.method}.`),
      table(
        ["Model", "Rating", "95% interval", "Won", "Lost", "Tied"],
        data.data.map((r) => [h("span", { title: r.model }, modelLabel(r.model)), String(r.rating), `${r.ci_low} – ${r.ci_high}`, String(r.wins), String(r.losses), String(r.ties)]),
        { caption: `Bradley–Terry ratings for ${base.value}`, empty: "No votes yet." },
      ),
    );
  }

  async function stream(battle, side) {
    const col = columns[side];
    col.dataset.done = "false";
    const target = col.querySelector(".content");
    clear(target, h("span", { class: "typing" }, "…"));
    try {
      const url = `/api/arena/battles/${encodeURIComponent(battle.id)}/answers/${side}`;
      const result = await streamChat({}, { url, onDelta: (_, all) => (target.textContent = all) });
      clear(target, renderMarkdown(result.content));
      return true;
    } catch (err) {
      clear(target, h("p", { class: "form-error", role: "alert" }, err.message));
      return false;
    } finally {
      col.dataset.done = "true";
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    const text = prompt.value.trim();
    if (!text) {
      showError(error, new Error("Type a message to send."));
      return;
    }
    run.disabled = true;
    clear(reveal);
    votes.hidden = true;
    for (const side of ["a", "b"]) {
      clear(columns[side].querySelector(".compare-model"), `Model ${side.toUpperCase()}`);
      columns[side].querySelector(".arena-thumbs")?.remove();
    }
    try {
      const battle = await api("/api/arena/battles", { method: "POST", body: { prompt: text, base: base.value, params: { max_tokens: Number(maxTokens.value) || 128 } } });
      const done = await Promise.all([stream(battle, "a"), stream(battle, "b")]); // both stream together
      if (done.every(Boolean)) {
        const vote = (winner, label) =>
          h("button", { type: "button", class: "btn", id: `vote-${winner}`, onclick: () => cast(battle, winner) }, label);
        clear(votes, vote("a", "A is better"), vote("tie", "Tie"), vote("b", "B is better"));
        votes.hidden = false;
      }
    } catch (err) {
      showError(error, err);
    } finally {
      run.disabled = false;
    }
  });

  /** Thumbs on one side's answer, offered once the vote is in (a rating names the model: before, it would unblind). */
  function arenaThumbs(battle, side) {
    const url = `/api/arena/battles/${encodeURIComponent(battle.id)}/answers/${side}/feedback`;
    const box = h("div", { class: "message-actions arena-thumbs", id: `arena-thumbs-${side}` });
    const draw = (mine) => {
      const thumb = (rating, label, glyph) =>
        h("button", { type: "button", class: `btn btn-small btn-quiet thumb${mine && mine.rating === rating ? " chosen" : ""}`, "aria-pressed": String(Boolean(mine && mine.rating === rating)), "aria-label": label, title: label, onclick: () => send(rating) }, glyph);
      clear(box, thumb(1, "Good answer", "✓ Good"), thumb(-1, "Bad answer", "✗ Bad"));
    };
    const send = async (rating) => {
      try {
        draw(await api(url, { method: "POST", body: { rating } }));
      } catch (err) {
        showError(error, err);
      }
    };
    columns[side].querySelector(".arena-thumbs")?.remove();
    draw(null);
    return box;
  }

  async function cast(battle, winner) {
    try {
      const voted = await api(`/api/arena/battles/${encodeURIComponent(battle.id)}/vote`, { method: "POST", body: { winner } });
      votes.hidden = true;
      for (const side of ["a", "b"]) {
        const title = columns[side].querySelector(".compare-model");
        title.textContent = `${side.toUpperCase()}: ${modelLabel(voted.models[side])}`;
        title.title = voted.models[side];
      }
      reveal.textContent = `You voted ${winner === "tie" ? "a tie" : winner.toUpperCase()}. A was ${modelLabel(voted.models.a)}, B was ${modelLabel(voted.models.b)}.`;
      for (const side of ["a", "b"]) columns[side].append(arenaThumbs(battle, side));
      await drawBoard();
    } catch (err) {
      showError(error, err);
    }
  }

  base.addEventListener("change", drawBoard);
  await drawBoard();
}

// ====================================================================== feedback

export async function renderFeedback(root, ctx) {
  const policy = await api("/api/feedback/policy");
  const policyBox = h("section", { class: "card", id: "policy-card" }, h("h2", {}, "What this workspace collects"), policyLine(policy));
  if (ctx.isAdmin()) {
    const collect = h("select", { id: "policy-collect" }, [
      ["off", "Nothing (no feedback, no chats kept)"],
      ["feedback", "Feedback only: what people rate, correct or vote on"],
      ["all", "Every chat completion, and feedback (API feedback by completion id)"],
    ].map(([value, label]) => h("option", { value, selected: policy.collect === value }, label)));
    const readers = h("select", { id: "policy-readers" }, [
      ["admins", "Admins only"],
      ["owners", "Admins and the answering adapter's owner"],
      ["members", "Every member"],
    ].map(([value, label]) => h("option", { value, selected: policy.readers === value }, label)));
    const save = h("button", { type: "submit", class: "btn btn-primary", id: "policy-save" }, "Save policy");
    const error = errorBox();
    const form = h("form", { class: "compare-pickers", novalidate: true }, field("Collect", collect), field("Who reads it (besides its author)", readers), h("div", {}, save, error));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api("/api/feedback/policy", { method: "PUT", body: { collect: collect.value, readers: readers.value } });
        ctx.navigate("#/feedback");
      } catch (err) {
        showError(error, err);
      }
    });
    policyBox.append(form);
  }

  const { data } = await api("/api/feedback");
  const rows = data.map((x) => [
    fmtTime(x.updated_at),
    h("span", { title: x.model }, modelLabel(x.model)),
    x.rating === 1 ? "✓ good" : x.rating === -1 ? "✗ bad" : "",
    x.reason || "",
    x.correction ? "corrected" : "",
    x.message_id ? "chat" : x.battle_id ? "arena" : x.completion_id ? "API" : "",
  ]);
  const name = h("input", { id: "build-name", type: "text", maxlength: "128", value: "feedback" });
  const kind = h("select", { id: "build-kind" }, h("option", { value: "sft" }, "SFT: thumbs-up answers and corrections"), h("option", { value: "dpo" }, "DPO pairs: corrections and arena votes"));
  const build = h("button", { type: "submit", class: "btn btn-primary", id: "build-run" }, "Build dataset");
  const result = h("div", { id: "build-result", "aria-live": "polite" });
  const error = errorBox();
  const form = h("form", { class: "card", id: "build-form", novalidate: true }, h("h2", {}, "Make a dataset of it"), h("p", { class: "muted" }, "A new dataset version, with each record's lineage back to its chat, completion or arena battle; validated, deduplicated and PII-scrubbed like any upload, ready to fine-tune on."), h("div", { class: "compare-pickers" }, field("Dataset name", name), field("Records", kind)), h("div", { class: "composer-bar" }, error, h("div", { class: "composer-buttons" }, build)), result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError(error, null);
    build.disabled = true;
    clear(result, h("p", { class: "muted" }, "Building…"));
    try {
      const dataset = await api("/api/feedback/datasets", { method: "POST", body: { name: name.value.trim(), kind: kind.value } });
      const last = dataset.versions[dataset.versions.length - 1];
      clear(result, h("p", {}, `Version ${last.version} of `, h("a", { href: `#/datasets/${encodeURIComponent(dataset.id)}` }, dataset.name), ` is ${last.status}: ${last.records ?? 0} record(s) (${dataset.versions.filter((v) => v.operation === "feedback").length} feedback version(s) so far).`));
    } catch (err) {
      clear(result);
      showError(error, err);
    } finally {
      build.disabled = false;
    }
  });
  clear(
    root,
    h("h1", { class: "page-title" }, "Feedback"),
    policyBox,
    form,
    h("section", { class: "card" }, h("h2", {}, "Collected feedback you may read"), table(["When", "Model", "Rating", "Reason", "Correction", "From"], rows, { caption: "Newest first", empty: "No feedback yet." })),
  );
}
