// taskscheduler dashboard: a live job table fed by server-sent events, a job page, the nodes. The panels beside
// the table (trends, limits and pauses, schedules, bulk actions) are in panels.js.
// Every value that comes from the server is put into the page as text (textContent), never as markup. Every
// failed request or action shows a message (say); none is swallowed.
"use strict";

const STATUSES = ["waiting", "postponed", "processing", "done", "failed", "canceled", "timeout"];
const ACTIVE = ["waiting", "postponed", "processing"];
const ENDED_BADLY = ["failed", "timeout", "canceled"];
const MAX_ROWS = 200;
// Shortest pause between two reloads of the job page while its job changes (progress moves often).
const JOB_RELOAD_MS = 1000;
// Pause before a page whose live stream was refused (too many pages open: 503) asks for one again.
const STREAM_RETRY_MS = 15000;

const state = { config: null, rows: new Map(), view: "list", jobId: null, online: false, total: 0, served: null };

function $(id) { return document.getElementById(id); }

// A DOM element with properties (never innerHTML) and children (strings become text nodes).
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "on") for (const [name, fn] of Object.entries(value)) node.addEventListener(name, fn);
    else if (key === "attrs") for (const [name, v] of Object.entries(value)) node.setAttribute(name, String(v));
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

// A message for the operator: an error (kind "error", the default) or the outcome of an action ("info").
function say(text, kind) {
  const box = $("message");
  $("message-text").textContent = text || "";
  box.className = "message " + (kind || "error");
  box.hidden = !text;
}

// Any error nothing else caught still reaches the operator.
window.addEventListener("error", (event) => say("page error: " + event.message));
window.addEventListener("unhandledrejection", (event) => say("page error: " + ((event.reason && event.reason.message) || event.reason)));

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
  } catch (err) {
    throw new Error("the dashboard cannot be reached (" + err.message + ")");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}

// -- times as an operator reads them: the browser's zone, saying which; relative ages; durations -------------------

const ZONE = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "UTC";
const ZONE_NAME = new Intl.DateTimeFormat("en-US", { timeZone: ZONE, timeZoneName: "short" });

function moment(value) {
  if (value === null || value === undefined || value === "") return null;
  const ms = typeof value === "number" ? value * 1000 : Date.parse(value);
  return Number.isFinite(ms) ? new Date(ms) : null;
}

function two(n) { return String(n).padStart(2, "0"); }

function zoneOf(date) {
  const part = ZONE_NAME.formatToParts(date).find((p) => p.type === "timeZoneName");
  return part ? part.value : ZONE;
}

// "2026-12-07 07:00:00 CET": the date, the time to the second and the zone, in the browser's zone.
function when(value) {
  const date = moment(value);
  if (!date) return "-";
  return date.getFullYear() + "-" + two(date.getMonth() + 1) + "-" + two(date.getDate()) + " " +
    two(date.getHours()) + ":" + two(date.getMinutes()) + ":" + two(date.getSeconds()) + " " + zoneOf(date);
}

// "850 ms", "12.3 s", "4 min 5 s", "2 h 5 min", "3 d 4 h".
function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "-";
  const s = Math.max(0, seconds);
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min" + (Math.round(s % 60) ? " " + Math.round(s % 60) + " s" : "");
  if (s < 86400) return Math.floor(s / 3600) + " h" + (Math.floor((s % 3600) / 60) ? " " + Math.floor((s % 3600) / 60) + " min" : "");
  return Math.floor(s / 86400) + " d" + (Math.floor((s % 86400) / 3600) ? " " + Math.floor((s % 86400) / 3600) + " h" : "");
}

// "3 min ago", "in 2 h", "now".
function relative(value) {
  const date = moment(value);
  if (!date) return "-";
  const seconds = (date.getTime() - Date.now()) / 1000;
  if (Math.abs(seconds) < 1) return "now";
  const abs = Math.abs(seconds);
  const text = abs < 60 ? Math.round(abs) + " s" : duration(abs).replace(/ \d+ (s|min|h)$/, "");
  return seconds > 0 ? "in " + text : text + " ago";
}

function between(start, end) {
  const a = moment(start), b = moment(end);
  return a && b ? (b.getTime() - a.getTime()) / 1000 : null;
}

// A time shown relative, its date and zone on hover; refreshed every second (data-time).
function timeCell(value, prefix) {
  const date = moment(value);
  return el("time", { className: "rel", title: when(value), dateTime: date ? date.toISOString() : "",
    dataset: { time: date ? date.toISOString() : "", prefix: prefix || "" } }, (prefix || "") + relative(value));
}

function statusBadge(status) { return el("span", { className: "status " + status }, status); }

// The bar of a run: how far it got, in its status colour (a failed run's bar stops where the run stopped).
function progressBar(row) {
  const value = Math.max(0, Math.min(100, Number(row.progress) || 0));
  const label = ENDED_BADLY.includes(row.status) ? "stopped at " + Math.round(value) + "%" : Math.round(value) + "%";
  return el("progress", { className: "bar " + row.status, max: 100, value: value, title: label,
    attrs: { "aria-label": "progress: " + label } });
}

// -- actions ------------------------------------------------------------------------------------------------------

function actionHeaders() {
  const headers = { "X-Taskscheduler-Action": "1" };
  const token = sessionStorage.getItem("taskscheduler-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  return headers;
}

// POST an action; its answer, or null after saying why it failed.
async function post(path, what) {
  try {
    const answer = await api(path, { method: "POST", headers: actionHeaders() });
    say("");
    return answer;
  } catch (err) {
    say(what + ": " + err.message);
    return null;
  }
}

function act(id, action) { return post("/api/jobs/" + encodeURIComponent(id) + "/" + action, action + " " + id); }

function canAct() { return state.config && !state.config.read_only; }

function actionButtons(row) {
  if (!canAct()) return [];
  const buttons = [];
  if (ACTIVE.includes(row.status)) {
    buttons.push(el("button", { className: "cancel", type: "button", on: { click: () => act(row.id, "cancel") } }, "cancel"));
  }
  if (ENDED_BADLY.includes(row.status)) {
    buttons.push(el("button", { className: "requeue", type: "button", on: { click: () => act(row.id, "requeue") } }, "requeue"));
  }
  return buttons;
}

// -- the job table ------------------------------------------------------------------------------------------------

function filters() {
  return { status: $("filter-status").value, cls: $("filter-class").value.trim(), id: $("filter-id").value.trim() };
}

function matches(row) {
  const f = filters();
  return (!f.status || row.status === f.status) && (!f.cls || row.class === f.cls) && (!f.id || row.id === f.id);
}

// What the "when" column says of a job: when it starts, how long it has run, how long its last run took.
function whenCell(row) {
  if (row.status === "postponed" || (row.status === "waiting" && moment(row.next_start) > Date.now())) {
    return timeCell(row.next_start, "starts ");
  }
  if (row.status === "waiting") return timeCell(row.created, "queued ");
  if (row.status === "processing") return timeCell(row.started, "started ");
  const took = between(row.started, row.ended);
  const parts = [timeCell(row.ended, "ended ")];
  if (took !== null) parts.push(el("span", { className: "muted" }, " · took " + duration(took)));
  return el("span", {}, ...parts);
}

function unservedMark() {
  return el("span", { className: "warn", title: "no live queue node serves this job's module: it waits until one does",
    attrs: { role: "img", "aria-label": "warning: no live queue node serves this class" } }, "⚠");
}

function rowElement(row) {
  const link = el("a", { href: "#/job/" + row.id }, row.id);
  return el("tr", { dataset: { id: row.id, status: row.status } },
    el("td", { className: "id" }, link),
    el("td", { className: "class" }, row.class, row.unserved ? " " : null, row.unserved ? unservedMark() : null),
    el("td", { className: "status-cell" }, statusBadge(row.status)),
    el("td", { className: "progress" }, progressBar(row)),
    el("td", { className: "run" }, row.run),
    el("td", { className: "age" }, timeCell(row.created)),
    el("td", { className: "when" }, whenCell(row)),
    el("td", { className: "node" }, row.node || (row.worker ? "worker " + row.worker.slice(-6) : "-")),
    el("td", { className: "error" }, el("div", { className: "clip", title: row.error_line || "" }, row.error_line || "")),
    el("td", { className: "row-actions" }, ...actionButtons(row)));
}

function renderShown() { $("shown").textContent = state.rows.size + " of " + state.total + " shown"; }

// The newest MAX_ROWS rows (ids start with their creation time), dropping older ones: the table stays bounded.
function renderRows() {
  const body = $("jobs").tBodies[0];
  const ids = Array.from(state.rows.keys()).sort().reverse();
  for (const id of ids.splice(MAX_ROWS)) state.rows.delete(id);
  body.replaceChildren(...ids.map((id) => rowElement(state.rows.get(id))));
  renderShown();
}

function oldestRow() {
  let oldest = null;
  for (const id of state.rows.keys()) if (oldest === null || id < oldest) oldest = id;
  return oldest;
}

function upsertRow(row) {
  const known = state.rows.has(row.id);
  if (!matches(row)) {
    if (known) { state.rows.delete(row.id); state.total = Math.max(0, state.total - 1); renderRows(); }
    return;
  }
  if (!known) {
    // A job older than every row shown while some are not loaded: one of those (a change, not a new job), and
    // not one the table shows. The total is set exactly by the next counts.
    const oldest = oldestRow();
    if (oldest !== null && row.id < oldest && state.total > state.rows.size) return;
    state.total += 1;
  }
  state.rows.set(row.id, row);
  if (!known) {
    // Bounded at once, drawn once for a burst: rebuilding 200 rows per new job made a burst of jobs cost
    // rows x jobs elements, and a busy machine's page fell seconds behind.
    if (state.rows.size > MAX_ROWS) state.rows.delete(oldestRow());
    scheduleRows();
    return;
  }
  const body = $("jobs").tBodies[0];
  const current = body.querySelector('tr[data-id="' + CSS.escape(row.id) + '"]');
  if (current) current.replaceWith(rowElement(row));
  else scheduleRows();
}

let rowsPending = false;
// One redraw of the table for every change that came within a few milliseconds.
function scheduleRows() {
  if (rowsPending) return;
  rowsPending = true;
  setTimeout(() => { rowsPending = false; renderRows(); }, 20);
}

// The exact total of the table's filter from the counts per status (the server sends them after changes); with a
// class filter, asked of the server (as often as counts come, at most about once a second).
function updateTotal(counts) {
  const f = filters();
  if (state.view !== "list" || f.id) return;
  if (f.cls) {
    const params = new URLSearchParams({ class: f.cls, limit: "1" });
    if (f.status) params.set("status", f.status);
    api("/api/jobs?" + params.toString()).then((found) => {
      const now = filters();
      if (now.cls === f.cls && now.status === f.status && !now.id) { state.total = found.total; renderShown(); }
    }).catch((err) => say("the total of the filter: " + err.message));
    return;
  }
  state.total = f.status ? (counts[f.status] || 0) : STATUSES.reduce((sum, status) => sum + (counts[status] || 0), 0);
  renderShown();
}

function filterParams() {
  const f = filters();
  const params = new URLSearchParams();
  if (f.status) params.set("status", f.status);
  if (f.cls) params.set("class", f.cls);
  if (f.id) params.set("id", f.id);
  return params;
}

async function loadJobs() {
  const params = filterParams();
  params.set("limit", String(MAX_ROWS));
  const found = await api("/api/jobs?" + params.toString());
  state.rows = new Map(found.jobs.map((row) => [row.id, row]));
  state.total = found.total;
  renderRows();
}

function reloadJobs() { loadJobs().catch((err) => say("jobs: " + err.message)); }

function renderCounts(counts) {
  const box = $("counts");
  box.replaceChildren(...STATUSES.map((status) => el("button", {
    type: "button", className: "count", dataset: { status: status }, title: "show only " + status + " jobs",
    on: { click: () => { $("filter-status").value = status; reloadJobs(); } },
  }, el("span", { className: "n" }, counts[status] || 0), statusBadge(status))));
}

function renderNodes(nodes) {
  // The modules served decide the table's warnings: reload the rows when they change (a node came or went).
  const served = JSON.stringify(Array.from(new Set(nodes.flatMap((n) => n.modules))).sort());
  if (state.served !== null && served !== state.served && state.view === "list") reloadJobs();
  state.served = served;
  const box = $("nodes");
  if (!nodes.length) { box.replaceChildren(el("p", { className: "muted" }, "no live queue node")); return; }
  box.replaceChildren(...nodes.map((node) => el("div", { className: "node-card", dataset: { id: node.id } },
    el("strong", {}, node.host + " (pid " + node.pid + ")"),
    el("div", { className: "muted" }, "id " + node.id + " · v" + node.version + " · ", timeCell(node.started, "started ")),
    el("div", {}, "modules: " + node.modules.join(", ")),
    el("div", {}, node.busy + " busy, " + (node.workers.length - node.busy) + " idle"),
    el("ul", {}, ...node.workers.map((w) => el("li", { className: "mono" }, "worker pid " + w.pid + ": ",
      w.job ? el("a", { href: "#/job/" + w.job }, w.job) : "idle"))))));
}

// -- the job page -------------------------------------------------------------------------------------------------

function field(name, value, label) {
  return el("tr", {}, el("th", { scope: "row" }, label || name),
    el("td", { className: "field-" + name }, value === null || value === undefined || value === "" ? "-" : value));
}

function pretty(value) { return value === undefined ? "" : JSON.stringify(value, null, 2); }

function dateAndAge(value) {
  if (!moment(value)) return null;
  return el("span", {}, when(value) + " (", timeCell(value), ")");
}

function jobLink(id) { return el("a", { href: "#/job/" + id, className: "mono" }, id); }

function links(ids) {
  const parts = [];
  ids.forEach((id, i) => { if (i) parts.push(", "); parts.push(jobLink(id)); });
  return el("span", {}, ...parts);
}

function scheduleText(schedule) {
  if (!schedule) return null;
  if (schedule.kind === "cron") return "cron " + schedule.cron + " (" + schedule.timezone + ")";
  if (schedule.seconds < 0) return "again at once after each run";
  return "every " + duration(schedule.seconds) + " from each run's " + schedule.reference;
}

// When the job's next run may start: its start time when it waits for one; after the running one otherwise.
function nextStart(job) {
  if (job.next_start) return dateAndAge(job.next_start);
  if (job.schedule && job.status === "processing") return "after this run ends (" + scheduleText(job.schedule) + ")";
  return null;
}

// Options as an operator reads them; the stored form is one click away.
const OPTION_TEXT = {
  at: (v) => (v ? when(v) : "at once"),
  interval: (v) => (v > 0 ? "every " + duration(v) : v < 0 ? "again at once after each run" : "none"),
  retry: (v) => (v < 0 ? "endless" : v + (v === 1 ? " retry left" : " retries left")),
  retry_interval: (v) => duration(v),
  retry_max_interval: (v) => duration(v),
  retry_backoff: (v) => "× " + v + " per retry",
  retry_jitter: (v) => (v ? "yes" : "no"),
  timeout: (v) => (v ? duration(v) : "none"),
  force_spawn: (v) => (v ? "yes" : "no"),
  ignore_data: (v) => (v ? "yes" : "no"),
  depends_on: (v) => (Array.isArray(v) && v.length ? links(v) : "none"),
  cron: (v) => v || "none",
};

function optionRows(options) {
  return Object.entries(options || {}).map(([name, value]) => {
    const format = OPTION_TEXT[name];
    let shown;
    try { shown = format ? format(value) : (typeof value === "string" ? value : JSON.stringify(value)); }
    catch (e) { shown = JSON.stringify(value); }  // a malformed stored option: as it is
    return field("option-" + name, shown, name.replace(/_/g, " "));
  });
}

function runElement(run) {
  const took = between(run.started, run.ended);
  const parts = [el("div", {}, el("strong", {}, "run " + run.run + " "), statusBadge(run.status),
    el("span", { className: "muted" }, " " + (run.started ? "started " + when(run.started) : "never started") +
      (run.ended ? " · ended " + when(run.ended) : "") + (took !== null ? " · took " + duration(took) : "") +
      (run.worker ? " · worker " + run.worker : "")))];
  if (run.error) {
    parts.push(el("div", { className: "error" }, (run.error.class || "") + ": " + (run.error.message || "")));
    if (run.error.traceback) parts.push(el("pre", { className: "traceback" }, run.error.traceback));
  } else if (run.has_result) {
    parts.push(el("div", {}, "result:"), el("pre", { className: "result" }, pretty(run.result)));
  }
  return el("div", { className: "run-card", dataset: { run: run.run } }, ...parts);
}

async function loadJob(id) {
  let job;
  try { job = await api("/api/jobs/" + encodeURIComponent(id)); } catch (err) { say("job " + id + ": " + err.message); return; }
  if (state.view !== "job" || state.jobId !== id) return;
  $("job-id").textContent = job.id;
  $("job-actions").replaceChildren(...actionButtons(job));
  const took = between(job.started, job.ended);
  $("job-fields").tBodies[0].replaceChildren(
    field("class", el("span", {}, job.class, job.unserved ? " " : null, job.unserved ? unservedMark() : null)),
    field("status", statusBadge(job.status)),
    field("progress", progressBar(job)), field("run", job.run),
    field("next", nextStart(job), "next start"),
    field("schedule", scheduleText(job.schedule)),
    field("blocked", job.blocked_by.length ? links(job.blocked_by) : null, "blocked by"),
    field("created", dateAndAge(job.created)), field("started", dateAndAge(job.started)),
    field("ended", dateAndAge(job.ended)),
    field("duration", ACTIVE.includes(job.status) || took === null ? null : duration(took), "took"),
    field("worker", job.worker), field("node", job.node),
    field("error", job.error ? (job.error.class || "") + ": " + (job.error.message || "") : null),
    field("result", job.result === null ? null : pretty(job.result)));
  $("job-data").textContent = pretty(job.data);
  $("job-options").tBodies[0].replaceChildren(...optionRows(job.options));
  $("job-options-raw").textContent = pretty(job.options);
  const total = job.runs_total || job.runs.length;
  $("job-runs-shown").textContent = !total ? "" : total > job.runs.length
    ? "newest " + job.runs.length + " of " + total + " runs" : total + (total === 1 ? " run" : " runs");
  const runs = job.runs.length ? job.runs.map(runElement) : [el("p", { className: "muted" }, "no run has ended yet")];
  $("job-runs").replaceChildren(...runs);
}

// Reload the job page after its job changed, at most once per JOB_RELOAD_MS (the last change always shows).
const jobReload = { timer: null, last: 0 };
function reloadJobSoon(id) {
  if (jobReload.timer !== null) return;
  const wait = Math.max(0, jobReload.last + JOB_RELOAD_MS - Date.now());
  jobReload.timer = setTimeout(() => {
    jobReload.timer = null;
    jobReload.last = Date.now();
    if (state.view === "job" && state.jobId === id) loadJob(id);
  }, wait);
}

// -- live updates and navigation ----------------------------------------------------------------------------------

function setOnline(on) {
  state.online = on;
  const live = $("live");
  live.textContent = on ? "live" : "offline";
  live.className = "live " + (on ? "on" : "off");
}

// A server-sent event's handler whose failure (bad data, a bug) is said, never lost.
function handler(name, fn) {
  return (event) => {
    try { fn(JSON.parse(event.data)); } catch (err) { say("live update (" + name + "): " + err.message); }
  };
}

function connect() {
  const source = new EventSource("/api/stream");
  // "ready": subscribed; what is loaded from now on misses no change (also after a reconnect, and when the server
  // may have missed changes: its feed was interrupted).
  source.addEventListener("ready", () => { setOnline(true); refresh(); });
  source.addEventListener("job", handler("job", (row) => {
    if (state.view === "list") upsertRow(row);
    else if (row.id === state.jobId) reloadJobSoon(row.id);
  }));
  source.addEventListener("counts", handler("counts", (counts) => { renderCounts(counts); updateTotal(counts); }));
  source.addEventListener("nodes", handler("nodes", renderNodes));
  source.addEventListener("flow", handler("flow", (flow) => panels.renderFlow(flow)));
  source.addEventListener("trends", handler("trends", (trends) => panels.renderTrends(trends)));
  source.addEventListener("schedules", handler("schedules", (found) => panels.renderSchedules(found)));
  source.onerror = () => {
    setOnline(false);
    // Refused (e.g. 503: too many live pages open): the browser gives up on it, so try again later ourselves.
    if (source.readyState === EventSource.CLOSED) {
      say("live updates stopped; trying again in " + STREAM_RETRY_MS / 1000 + " s");
      setTimeout(connect, STREAM_RETRY_MS);
    }
  };
}

async function refresh() {
  try {
    if (state.view === "job") { await loadJob(state.jobId); return; }
    const summary = await api("/api/summary");
    renderCounts(summary.counts);
    renderNodes(summary.nodes);
    await loadJobs();
    await panels.load();
  } catch (err) {
    say(err.message);
  }
}

function route() {
  const match = /^#\/job\/([0-9a-fA-F]{24})$/.exec(location.hash);
  state.view = match ? "job" : "list";
  state.jobId = match ? match[1].toLowerCase() : null;
  $("list-view").hidden = state.view !== "list";
  $("job-view").hidden = state.view !== "job";
  refresh();
}

async function start() {
  state.config = await api("/api/config");
  $("database").textContent = "database " + state.config.database + " · v" + state.config.version;
  $("zone").textContent = "times in " + ZONE;
  $("mode").textContent = state.config.read_only ? "read-only" : "";
  $("message-close").addEventListener("click", () => say(""));
  if (state.config.token_required && !state.config.read_only) {
    $("token-box").hidden = false;
    $("token").value = sessionStorage.getItem("taskscheduler-token") || "";
    $("token").addEventListener("change", () => sessionStorage.setItem("taskscheduler-token", $("token").value));
  }
  for (const status of STATUSES) $("filter-status").append(el("option", { value: status }, status));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  for (const id of ["filter-status", "filter-class", "filter-id"]) $(id).addEventListener("change", reloadJobs);
  panels.start();
  window.addEventListener("hashchange", route);
  setInterval(() => {
    for (const node of document.querySelectorAll("time.rel")) node.textContent = node.dataset.prefix + relative(node.dataset.time);
  }, 1000);
  state.view = null;
  connect();
  route();
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => say("the dashboard could not start: " + err.message)));
