/* A small Markdown renderer for model answers that builds DOM nodes directly.
 *
 * It never produces HTML strings: every piece of text becomes a text node, so markup in the
 * source (<script>, <img onerror>) is shown as the characters it is. Links keep only http(s)
 * and mailto targets. Supported: fenced code (```lang), headings, lists (- * 1.), block quotes,
 * horizontal rules, paragraphs; inline `code`, **bold**, *italic* / _italic_, ~~strike~~, [links](url).
 */

import { copyText, h } from "/static/lib.js";

const SAFE_URL = /^(https?:\/\/|mailto:)/i;

/** Inline spans of one line of text → nodes. */
export function renderInline(text) {
  const out = [];
  const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|__([^_]+)__|~~([^~]+)~~|\*([^*\s][^*]*)\*|(?<![\w])_([^_\s][^_]*)_(?![\w])|\[([^\]]+)\]\(([^)\s]+)\)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) out.push(text.slice(last, match.index));
    const [whole, , code, bold1, bold2, strike, em1, em2, linkText, url] = match;
    if (code !== undefined) out.push(h("code", {}, code));
    else if (bold1 !== undefined || bold2 !== undefined) out.push(h("strong", {}, renderInline(bold1 ?? bold2)));
    else if (strike !== undefined) out.push(h("del", {}, renderInline(strike)));
    else if (em1 !== undefined || em2 !== undefined) out.push(h("em", {}, renderInline(em1 ?? em2)));
    else if (linkText !== undefined) {
      out.push(SAFE_URL.test(url) ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, renderInline(linkText)) : whole);
    }
    last = match.index + whole.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

function paragraph(lines) {
  const parts = [];
  lines.forEach((line, i) => {
    if (i) parts.push(h("br"));
    parts.push(renderInline(line));
  });
  return h("p", {}, parts);
}

function codeBlock(lang, code) {
  const copy = h("button", { type: "button", class: "btn btn-small btn-quiet code-copy", onclick: () => copyText(code, copy) }, "Copy");
  return h(
    "div",
    { class: "code-block" },
    h("div", { class: "code-head" }, h("span", { class: "muted" }, lang || "code"), copy),
    h("pre", { tabindex: "0" }, h("code", { class: lang ? `language-${lang}` : null }, code)),
  );
}

/** Markdown text → a DocumentFragment of safe nodes. An unclosed fence (mid-stream) renders as code so far. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) fragment.append(paragraph(para));
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      fragment.append(codeBlock(fence[2], body.join("\n")));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      fragment.append(h(`h${Math.min(6, heading[1].length + 2)}`, { class: "md-heading" }, renderInline(heading[2])));
      i += 1;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      fragment.append(h("hr"));
      i += 1;
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      fragment.append(h("blockquote", {}, renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = h(ordered ? "ol" : "ul", ordered && parseInt(item[1], 10) !== 1 ? { start: parseInt(item[1], 10) } : {});
      while (i < lines.length) {
        const next = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!next || /\d/.test(next[1]) !== ordered) break;
        const body = [next[2]];
        i += 1;
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) body.push(lines[i++].trim());
        list.append(h("li", {}, renderInline(body.join(" "))));
      }
      fragment.append(list);
      continue;
    }
    if (!line.trim()) {
      flush();
      i += 1;
      continue;
    }
    para.push(line);
    i += 1;
  }
  flush();
  return fragment;
}
