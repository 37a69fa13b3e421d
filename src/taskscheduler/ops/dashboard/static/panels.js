// taskscheduler dashboard, the panels beside the job table: runs ended per minute (an SVG chart the page draws
// itself), per-class trends, limits and pauses with pause and resume, schedules, and bulk requeue. Every action
// here asks for confirmation in a dialog first. Uses the helpers of app.js (el, api, post, say, when, duration...).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
// Statuses drawn in the chart, bottom up, with their colours (the status badges' colours).
const CHART = [["done", "#16a34a"], ["failed", "#dc2626"], ["timeout", "#ea580c"], ["canceled", "#9333ea"]];

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// Ask before an action: resolves true when the operator confirms (Escape or "cancel": false).
function confirmAction(title, text, yes) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = yes;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").removeEventListener("click", onYes);
      $("confirm-no").removeEventListener("click", onNo);
      dialog.removeEventListener("cancel", onNo);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const onYes = () => done(true);
    const onNo = () => done(false);
    $("confirm-yes").addEventListener("click", onYes);
    $("confirm-no").addEventListener("click", onNo);
    dialog.addEventListener("cancel", onNo);
    dialog.showModal();
    $("confirm-no").focus();  // the safe answer is the default one
  });
}

function percent(rate) { return rate === null || rate === undefined ? "-" : (rate * 100).toFixed(rate > 0 && rate < 0.1 ? 1 : 0) + "%"; }

const panels = {
  start() {
    if (canAct()) {
      $("pause-form").hidden = false;
      $("pause-form").addEventListener("submit", (event) => {
        event.preventDefault();
        const key = $("pause-key").value.trim();
        if (key) panels.pause(key);
      });
      $("bulk-requeue").hidden = false;
      $("bulk-requeue").addEventListener("click", () => panels.bulkRequeue());
    }
  },

  // Everything the panels show, read once (then kept current by the live stream).
  async load() {
    const [trends, flow, found] = await Promise.all([api("/api/trends"), api("/api/flow"), api("/api/schedules")]);
    panels.renderTrends(trends);
    panels.renderFlow(flow);
    panels.renderSchedules(found);
  },

  // -- trends ----------------------------------------------------------------------------------------------------

  renderTrends(trends) {
    panels.renderChart(trends);
    const classes = trends.classes;
    if (!classes.length) {
      $("trends-classes").replaceChildren(el("p", { className: "muted" }, "no run ended in the last hour"));
      return;
    }
    const more = trends.classes_total > classes.length
      ? el("p", { className: "muted" }, "the " + classes.length + " classes with the most runs of " + trends.classes_total) : null;
    const head = el("tr", {}, ...["class", "runs", "failure rate", "p50 duration", "p95 duration", "ended"]
      .map((name) => el("th", { scope: "col" }, name)));
    const rows = classes.map((c) => el("tr", { dataset: { class: c.class } },
      el("td", { className: "class" }, c.class),
      el("td", { className: "runs" }, c.runs),
      el("td", { className: "failure-rate" + (c.failure_rate ? " bad" : "") }, percent(c.failure_rate)),
      el("td", { className: "p50" }, c.p50 === null ? "-" : duration(c.p50)),
      el("td", { className: "p95" }, c.p95 === null ? "-" : duration(c.p95)),
      el("td", { className: "muted" }, Object.entries(c.counts).map(([s, n]) => n + " " + s).join(", "))));
    $("trends-classes").replaceChildren(...[el("table", { className: "classes" }, el("thead", {}, head), el("tbody", {}, ...rows)), more].filter(Boolean));
  },

  // Stacked bars, one a minute, drawn with DOM calls (no library, nothing from another origin).
  renderChart(trends) {
    const width = 600, height = 150, left = 34, bottom = 18, top = 8;
    const minutes = trends.minutes;
    const totals = minutes.map((m) => CHART.reduce((sum, [status]) => sum + (m[status] || 0), 0));
    const most = Math.max(1, ...totals);
    const scale = (height - bottom - top) / most;
    const slot = (width - left) / minutes.length;
    const ended = totals.reduce((a, b) => a + b, 0);
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, class: "trend-chart", role: "img",
      "aria-label": ended + " runs ended in the last hour, at most " + most + " in one minute" });
    chart.append(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    chart.append(svg("text", { x: left - 4, y: top + 8, class: "tick", "text-anchor": "end" }, String(most)));
    chart.append(svg("text", { x: left - 4, y: height - bottom, class: "tick", "text-anchor": "end" }, "0"));
    minutes.forEach((minute, i) => {
      let y = height - bottom;
      const x = left + i * slot + 1;
      const parts = [];
      for (const [status, colour] of CHART) {
        const n = minute[status] || 0;
        if (!n) continue;
        parts.push(n + " " + status);
        const h = n * scale;
        y -= h;
        chart.append(svg("rect", { x: x, y: y, width: Math.max(1, slot - 2), height: h, fill: colour,
          class: "bar-" + status, "data-minute": i }));
      }
      const start = moment(minute.start);
      const label = two(start.getHours()) + ":" + two(start.getMinutes()) + " " + zoneOf(start) + ": " + (parts.join(", ") || "none");
      // An invisible column per minute carries its tooltip, even for a minute without runs.
      chart.append(svg("rect", { x: x - 1, y: top, width: slot, height: height - bottom - top, class: "hover" }, svg("title", {}, label)));
    });
    for (const [i, text] of [[0, "60 min ago"], [30, "30 min ago"], [minutes.length - 1, "now"]]) {
      chart.append(svg("text", { x: left + i * slot + slot / 2, y: height - 4, class: "tick",
        "text-anchor": i === 0 ? "start" : i === minutes.length - 1 ? "end" : "middle" }, text));
    }
    $("trends-chart").replaceChildren(chart);
    $("trends-legend").replaceChildren(...CHART.map(([status]) => el("span", { className: "key" },
      el("span", { className: "swatch " + status, attrs: { "aria-hidden": "true" } }),
      status + " " + minutes.reduce((sum, m) => sum + (m[status] || 0), 0))));
  },

  // -- limits and pauses -----------------------------------------------------------------------------------------

  renderFlow(flow) {
    const box = $("flow");
    const parts = [];
    if (flow.limits.length) {
      const head = el("tr", {}, ...["limit", "at most", "running", "waiting", ""].map((n) => el("th", { scope: "col" }, n)));
      const rows = flow.limits.map((limit) => el("tr", { dataset: { key: limit.key } },
        el("td", { className: "key" }, limit.key),
        el("td", {}, limit.malformed ? "malformed: limits nothing" :
          [limit.concurrency !== null ? limit.concurrency + " at once" : null, limit.rate].filter(Boolean).join(", ")),
        el("td", { className: "running" }, limit.running),
        el("td", { className: "waiting" }, limit.waiting),
        el("td", {}, canAct() && !flow.paused.some((p) => p.key === limit.key)
          ? el("button", { type: "button", className: "pause", on: { click: () => panels.pause(limit.key) } }, "pause…") : null)));
      parts.push(el("table", { className: "limits" }, el("thead", {}, head), el("tbody", {}, ...rows)));
    }
    if (flow.paused.length) {
      const head = el("tr", {}, ...["paused", "waiting", ""].map((n) => el("th", { scope: "col" }, n)));
      const rows = flow.paused.map((pause) => el("tr", { dataset: { key: pause.key } },
        el("td", { className: "key" }, pause.key === "*" ? "* (every job)" : pause.key),
        el("td", { className: "waiting" }, pause.waiting),
        el("td", {}, canAct()
          ? el("button", { type: "button", className: "resume", on: { click: () => panels.resume(pause.key) } }, "resume…") : null)));
      parts.push(el("table", { className: "paused" }, el("thead", {}, head), el("tbody", {}, ...rows)));
    }
    if (!parts.length) parts.push(el("p", { className: "muted" }, "no limit, nothing paused"));
    if (flow.limits_total > flow.limits.length || flow.paused_total > flow.paused.length) {
      parts.push(el("p", { className: "muted" }, "showing " + flow.limits.length + " of " + flow.limits_total + " limits, " +
        flow.paused.length + " of " + flow.paused_total + " pauses"));
    }
    box.replaceChildren(...parts);
  },

  async pause(key) {
    const what = key === "*" ? "every job" : key;
    const sure = await confirmAction("Pause " + what + "?",
      "No new run of " + what + " starts anywhere in the cluster until it is resumed; running runs finish.", "pause");
    if (!sure) return;
    const flow = await post("/api/flow/pause?" + new URLSearchParams({ key: key }).toString(), "pause " + key);
    if (flow) { panels.renderFlow(flow); $("pause-key").value = ""; say("paused " + what, "info"); }
  },

  async resume(key) {
    const what = key === "*" ? "every job" : key;
    const sure = await confirmAction("Resume " + what + "?", "Its due jobs start within a second.", "resume");
    if (!sure) return;
    const flow = await post("/api/flow/resume?" + new URLSearchParams({ key: key }).toString(), "resume " + key);
    if (flow) { panels.renderFlow(flow); say("resumed " + what, "info"); }
  },

  // -- bulk requeue ----------------------------------------------------------------------------------------------

  async bulkRequeue() {
    const params = filterParams();
    let preview;
    try { preview = await api("/api/bulk/requeue?" + params.toString()); } catch (err) { say("requeue: " + err.message); return; }
    const f = filters();
    const filter = [f.status ? "status " + f.status : null, f.cls ? "class " + f.cls : null, f.id ? "id " + f.id : null]
      .filter(Boolean).join(", ") || "no filter";
    if (!preview.count) { say("no FAILED or TIMEOUT job matches the filter (" + filter + ")", "info"); return; }
    const n = preview.will_requeue;
    const text = (preview.count > n ? "The newest " + n + " of the " + preview.count : "All " + n) +
      " FAILED and TIMEOUT jobs matching the filter (" + filter + ") run again, each with its next run number.";
    const sure = await confirmAction("Requeue " + n + (n === 1 ? " job?" : " jobs?"), text, "requeue " + n);
    if (!sure) return;
    params.set("expected", String(n));
    const done = await post("/api/bulk/requeue?" + params.toString(), "requeue");
    if (!done) return;
    let report = "requeued " + done.requeued + (done.requeued === 1 ? " job" : " jobs");
    if (done.failed_total) {
      report += "; " + done.failed_total + " could not be: " + done.failed.map((x) => x.id + " (" + x.error + ")").join("; ");
    }
    if (done.remaining) report += "; " + done.remaining + " still match";
    say(report, done.failed_total ? "error" : "info");
    reloadJobs();
  },

  // -- schedules -------------------------------------------------------------------------------------------------

  renderSchedules(found) {
    const schedules = found.schedules;
    if (!schedules.length) { $("schedules").replaceChildren(el("p", { className: "muted" }, "no recurring job")); return; }
    const head = el("tr", {}, ...["id", "class", "recurs", "next start", "last run", "runs", "paused"]
      .map((n) => el("th", { scope: "col" }, n)));
    const rows = schedules.map((s) => el("tr", { dataset: { id: s.id } },
      el("td", { className: "id" }, jobLink(s.id)),
      el("td", { className: "class" }, s.job_class),
      el("td", { className: "expression" }, s.kind === "cron" ? "cron " + s.expression + " (" + (s.timezone || "UTC") + ")" : s.expression),
      el("td", { className: "next" }, s.next_start ? el("span", {}, when(s.next_start) + " (", timeCell(s.next_start), ")") : "after the current run"),
      el("td", { className: "last" }, s.last_status ? el("span", {}, statusBadge(s.last_status.toLowerCase()), " ", timeCell(s.last_end, "ended ")) : "-"),
      el("td", { className: "runs" }, s.runs),
      el("td", { className: "paused" }, s.paused ? "paused" : "no")));
    const more = found.total > schedules.length ? el("p", { className: "muted" }, "the first " + schedules.length + " of " + found.total) : null;
    $("schedules").replaceChildren(...[el("table", { className: "schedules" }, el("thead", {}, head), el("tbody", {}, ...rows)), more].filter(Boolean));
  },
};
