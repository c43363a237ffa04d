/* Charts drawn as inline SVG from data the page already has (no library, no network). */

import { fmtNumber, h, svg } from "/static/lib.js";

const W = 640;
const H = 260;
const PAD = { left: 52, right: 16, top: 14, bottom: 38 };

function niceTicks(low, high, count = 5) {
  if (low === high) {
    low -= 1;
    high += 1;
  }
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) || raw;
  const ticks = [];
  // From the last tick at or below `low` to the first at or above `high`, so every point is inside.
  const last = Math.ceil(high / step - 1e-9) * step;
  for (let t = Math.floor(low / step + 1e-9) * step; t <= last + step * 1e-9; t += step) ticks.push(Number(t.toFixed(10)));
  return ticks;
}

function axes(xTicks, yTicks, sx, sy, xLabel, yLabel, format = (v) => fmtNumber(v, 3)) {
  return [
    yTicks.map((t) => [
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, format(t)),
    ]),
    xTicks.map((t) => svg("text", { x: sx(t), y: H - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, fmtNumber(t, 2))),
    svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom, class: "axis" }),
    svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, xLabel),
    svg("text", { x: 12, y: (PAD.top + H - PAD.bottom) / 2, transform: `rotate(-90 12 ${(PAD.top + H - PAD.bottom) / 2})`, "text-anchor": "middle", class: "axis-label" }, yLabel),
  ];
}

/** Powers of ten (and 2×, 5× between them when the range is short) covering [low, high], both > 0. */
function logTicks(low, high) {
  const first = Math.floor(Math.log10(low));
  const last = Math.ceil(Math.log10(high));
  const steps = last - first <= 2 ? [1, 2, 5] : [1];
  const ticks = [];
  for (let e = first; e <= last; e += 1) for (const m of steps) ticks.push(Number((m * 10 ** e).toPrecision(6)));
  const inside = ticks.filter((t) => t >= low && t <= high);
  const below = ticks.filter((t) => t < low).pop();
  const above = ticks.find((t) => t > high);
  return [below ?? low, ...inside, above ?? high];
}

/**
 * series: [{name, points: [[x, y], ...], className}] → a figure with an SVG line chart and a legend.
 * Series with one point are drawn as dots. The figure's text alternative lists the last values.
 * `xMax`: the x axis spans 0 to it however far the points have come (a run's total steps), so the
 * chart does not rescale at every step. `logY`: a logarithmic y axis (values ≤ 0 are left out).
 */
export function lineChart(series, { xLabel = "step", yLabel = "loss", title = "Chart", xMax = null, logY = false } = {}) {
  if (logY) series = series.map((s) => ({ ...s, points: s.points.filter((p) => p[1] > 0) }));
  const all = series.flatMap((s) => s.points);
  const figure = h("figure", { class: "chart", dataset: { scale: logY ? "log" : "linear" } });
  if (!all.length) {
    figure.append(h("p", { class: "muted chart-empty" }, "No points yet: the chart fills in as training reports its loss."));
    return figure;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const xTicks = xMax ? niceTicks(0, xMax) : niceTicks(Math.min(...xs), Math.max(...xs));
  const yTicks = logY ? logTicks(Math.min(...ys), Math.max(...ys)) : niceTicks(Math.min(0, Math.min(...ys)), Math.max(...ys));
  const [x0, x1] = [Math.min(xTicks[0], ...xs), Math.max(xTicks[xTicks.length - 1], ...xs)];
  const [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0 || 1)) * (W - PAD.left - PAD.right);
  const ly = (y) => (logY ? Math.log10(y) : y);
  const sy = (y) => H - PAD.bottom - ((ly(y) - ly(y0)) / (ly(y1) - ly(y0) || 1)) * (H - PAD.top - PAD.bottom);
  const summary = series
    .filter((s) => s.points.length)
    .map((s) => `${s.name}: last ${fmtNumber(s.points[s.points.length - 1][1], 4)} at ${xLabel} ${s.points[s.points.length - 1][0]}`)
    .join("; ");
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}. ${summary}`, preserveAspectRatio: "xMidYMid meet", "data-x-max": String(x1) },
    axes(xTicks, yTicks, sx, sy, xLabel, logY ? `${yLabel} (log scale)` : yLabel, logY ? (v) => String(v) : undefined),
    series.map((s) => [
      s.points.length > 1
        ? svg("polyline", { points: s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "), class: `line ${s.className}` })
        : null,
      s.points.map(([x, y]) => svg("circle", { cx: sx(x), cy: sy(y), r: s.points.length > 40 ? 0 : 3, class: `dot ${s.className}` })),
    ]),
  );
  figure.append(
    chart,
    h(
      "figcaption",
      { class: "legend" },
      series.map((s) =>
        h("span", { class: "legend-item" }, h("span", { class: `swatch ${s.className}` }), `${s.name}`, s.points.length ? ` (${fmtNumber(s.points[s.points.length - 1][1], 4)})` : " (none yet)"),
      ),
    ),
  );
  return figure;
}

/** A histogram of {edges, counts} (counts[i] records have edges[i] ≤ length < edges[i+1]). */
export function histogram({ edges, counts }, { xLabel = "tokens per record", title = "Length histogram" } = {}) {
  const figure = h("figure", { class: "chart" });
  if (!counts || !counts.length) {
    figure.append(h("p", { class: "muted chart-empty" }, "No lengths to show."));
    return figure;
  }
  const max = Math.max(...counts);
  const yTicks = niceTicks(0, max, 4).filter((t) => Number.isInteger(t));
  const top = Math.max(max, yTicks[yTicks.length - 1]);
  const band = (W - PAD.left - PAD.right) / counts.length;
  const sy = (y) => H - PAD.bottom - (y / (top || 1)) * (H - PAD.top - PAD.bottom);
  const label = (i) => (edges[i + 1] - edges[i] <= 1 ? `${edges[i]}` : `${edges[i]}–${edges[i + 1] - 1}`);
  const everyNth = Math.ceil(counts.length / 8);
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${counts.map((c, i) => `${label(i)}: ${c}`).join(", ")}` },
    yTicks.map((t) => [
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, fmtNumber(t)),
    ]),
    counts.map((c, i) =>
      svg(
        "rect",
        { x: PAD.left + i * band + 1, y: sy(c), width: Math.max(1, band - 2), height: H - PAD.bottom - sy(c), class: "bar" },
        svg("title", {}, `${label(i)} tokens: ${c} record(s)`),
      ),
    ),
    counts.map((_, i) =>
      i % everyNth === 0 ? svg("text", { x: PAD.left + i * band + band / 2, y: H - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, label(i)) : null,
    ),
    svg("line", { x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom, class: "axis" }),
    svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, xLabel),
    svg("text", { x: 12, y: (PAD.top + H - PAD.bottom) / 2, transform: `rotate(-90 12 ${(PAD.top + H - PAD.bottom) / 2})`, "text-anchor": "middle", class: "axis-label" }, "records"),
  );
  figure.append(chart);
  return figure;
}

/** Horizontal bars of [{label, value}] (the usage by model, by user): one row each, longest first. */
export function barChart(items, { title = "Chart", unit = "" } = {}) {
  const figure = h("figure", { class: "chart" });
  const rows = items.filter((i) => i.value > 0).sort((a, b) => b.value - a.value);
  if (!rows.length) {
    figure.append(h("p", { class: "muted chart-empty" }, "Nothing yet."));
    return figure;
  }
  const row = 24;
  const height = PAD.top + rows.length * row + 8;
  const left = 200;
  const max = Math.max(...rows.map((r) => r.value));
  const width = (v) => Math.max(1, (v / max) * (W - left - 90));
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${height}`, role: "img", "aria-label": `${title}: ${rows.map((r) => `${r.label}: ${fmtNumber(r.value, 3)}${unit}`).join(", ")}` },
    rows.map((r, i) => [
      svg("text", { x: left - 8, y: PAD.top + i * row + 15, "text-anchor": "end", class: "tick" }, r.label.length > 30 ? `${r.label.slice(0, 29)}…` : r.label),
      svg("rect", { x: left, y: PAD.top + i * row + 3, width: width(r.value), height: row - 8, class: "bar" }, svg("title", {}, `${r.label}: ${fmtNumber(r.value, 3)}${unit}`)),
      svg("text", { x: left + width(r.value) + 6, y: PAD.top + i * row + 15, class: "tick" }, `${fmtNumber(r.value, 3)}${unit}`),
    ]),
  );
  figure.append(chart);
  return figure;
}

/** Bars grouped by metric, one bar per series in each group (values in [0, 1]: scores and pass rates). */
export function groupedBarChart(groups, series, { title = "Chart" } = {}) {
  const figure = h("figure", { class: "chart" });
  if (!groups.length || !series.length) {
    figure.append(h("p", { class: "muted chart-empty" }, "Nothing yet."));
    return figure;
  }
  const yTicks = [0, 0.25, 0.5, 0.75, 1];
  const slot = (W - PAD.left - PAD.right) / groups.length;
  const bar = Math.min(28, (slot - 16) / series.length);
  const sy = (y) => H - PAD.bottom - y * (H - PAD.top - PAD.bottom);
  const summary = groups.map((g) => `${g.label}: ${series.map((s) => `${s.name} ${fmtNumber(g.values[s.key], 3)}`).join(", ")}`).join("; ");
  const chart = svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}. ${summary}` },
    yTicks.map((t) => [
      svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: t ? "grid" : "axis" }),
      svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, String(t)),
    ]),
    groups.map((g, i) => {
      const x0 = PAD.left + i * slot + (slot - bar * series.length) / 2;
      return [
        series.map((s, j) => {
          const value = g.values[s.key];
          if (typeof value !== "number") return null;
          const y = sy(Math.max(0, Math.min(1, value)));
          return svg("rect", { x: x0 + j * bar, y, width: bar - 2, height: Math.max(1, sy(0) - y), class: `bar ${s.className}` }, svg("title", {}, `${g.label}, ${s.name}: ${fmtNumber(value, 3)}`));
        }),
        svg("text", { x: PAD.left + i * slot + slot / 2, y: H - PAD.bottom + 16, "text-anchor": "middle", class: "tick" }, g.label.length > 18 ? `${g.label.slice(0, 17)}…` : g.label),
      ];
    }),
  );
  figure.append(chart, h("figcaption", { class: "legend" }, series.map((s) => h("span", { class: "legend-item" }, h("span", { class: `swatch ${s.className}` }), s.name))));
  return figure;
}
