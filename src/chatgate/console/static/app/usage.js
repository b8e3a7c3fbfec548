// Usage: requests, tokens, time to first byte and error rate per day, drawn by Chart.js (a
// classic script: window.Chart), with the numbers in a table below.
import { api } from "./api.js";
import { clear, errorBox, h } from "./dom.js";

const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

export function usageView(main, me) {
  const range = h("select", { id: "usage-range", name: "range" },
    [7, 30, 90].map((days) => h("option", { value: days, selected: days === 30 }, `Last ${days} days`)));
  const status = h("div", { className: "status", "aria-live": "polite" });
  const charts = h("div", { className: "charts" });
  const table = h("div", { className: "table-wrap" });
  main.append(h("section", { className: "usage" },
    h("div", { className: "bar" },
      h("h1", {}, me.is_admin ? "Usage (everyone)" : "Your usage"),
      h("label", { htmlFor: "usage-range", className: "visually-hidden" }, "Period"), range,
    ),
    status, charts, table,
  ));
  let drawn = [];

  async function load() {
    clear(status);
    for (const chart of drawn) chart.destroy();
    drawn = [];
    clear(charts);
    clear(table);
    const since = new Date(Date.now() - Number(range.value) * 86400_000).toISOString();
    let rows;
    try {
      ({ data: rows } = await api("GET", `/api/usage/summary?since=${encodeURIComponent(since)}`));
    } catch (error) {
      status.append(errorBox(error.message));
      return;
    }
    if (!rows.length) {
      status.append(h("p", { className: "empty" }, "No chats in this period."));
      return;
    }
    const days = [...new Set(rows.map((row) => row.day))].sort();
    const models = [...new Set(rows.map((row) => row.model))].sort();
    const cell = new Map(rows.map((row) => [`${row.model}\u0000${row.day}`, row]));
    const series = (model, value) => days.map((day) => {
      const row = cell.get(`${model}\u0000${day}`);
      return row ? value(row) : null;
    });
    const color = (index) => PALETTE[index % PALETTE.length];
    const perDay = (field) => days.map((day) => rows.filter((row) => row.day === day).reduce((sum, row) => sum + (field(row) ?? 0), 0));

    chart("requests", "Requests per day", "bar", days, models.map((model, i) => ({
      label: model, data: series(model, (row) => row.requests).map((v) => v ?? 0), backgroundColor: color(i), stack: "r",
    })), { stacked: true });
    chart("tokens", "Tokens per day", "bar", days, models.map((model, i) => ({
      label: model,
      data: series(model, (row) => (row.prompt_tokens ?? 0) + (row.completion_tokens ?? 0)).map((v) => v ?? 0),
      backgroundColor: color(i), stack: "t",
    })), { stacked: true });
    chart("ttfb", "Time to first byte (ms)", "line", days, models.flatMap((model, i) => [
      { label: `${model} P50`, data: series(model, (row) => ms(row.ttfb_p50)), borderColor: color(i), backgroundColor: color(i), spanGaps: true },
      { label: `${model} P95`, data: series(model, (row) => ms(row.ttfb_p95)), borderColor: color(i), borderDash: [6, 4], backgroundColor: color(i), spanGaps: true },
    ]));
    const requests = perDay((row) => row.requests);
    const errors = perDay((row) => row.errors);
    chart("errors", "Error rate (%)", "line", days, [{
      label: "Errors", data: days.map((_, i) => Math.round((1000 * errors[i]) / requests[i]) / 10),
      borderColor: PALETTE[3], backgroundColor: PALETTE[3],
    }], { max: 100 });

    table.append(h("table", {},
      h("caption", {}, "Per model and day (UTC)"),
      h("thead", {}, h("tr", {}, ["Day", "Model", "Requests", "Errors", "Prompt tokens", "Completion tokens", "TTFB P50", "TTFB P95"]
        .map((title) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, rows.map((row) => h("tr", {},
        h("td", {}, row.day), h("td", {}, row.model), h("td", {}, row.requests), h("td", {}, row.errors),
        h("td", {}, row.prompt_tokens ?? "–"), h("td", {}, row.completion_tokens ?? "–"),
        h("td", {}, fmt(row.ttfb_p50)), h("td", {}, fmt(row.ttfb_p95)),
      ))),
    ));
  }

  function chart(id, title, type, labels, datasets, { stacked = false, max } = {}) {
    const canvas = h("canvas", { id: `chart-${id}`, role: "img", "aria-label": title });
    charts.append(h("figure", { className: "card chart" }, h("figcaption", {}, title), h("div", { className: "canvas-box" }, canvas)));
    const style = getComputedStyle(document.body);
    const ink = style.getPropertyValue("--ink").trim() || "#222";
    const grid = style.getPropertyValue("--line").trim() || "#ddd";
    drawn.push(new window.Chart(canvas, {
      type,
      data: { labels, datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        color: ink,
        plugins: { legend: { labels: { color: ink } } },
        scales: {
          x: { stacked, ticks: { color: ink }, grid: { color: grid } },
          y: { stacked, beginAtZero: true, max, ticks: { color: ink }, grid: { color: grid } },
        },
      },
    }));
  }

  range.addEventListener("change", load);
  load();
  return () => drawn.forEach((chart) => chart.destroy());
}

function ms(seconds) {
  return seconds == null ? null : Math.round(seconds * 1000);
}

function fmt(seconds) {
  return seconds == null ? "–" : `${Math.round(seconds * 1000)} ms`;
}
