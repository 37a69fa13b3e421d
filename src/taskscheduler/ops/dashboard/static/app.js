// taskscheduler dashboard: a live job table fed by server-sent events, a job page, the nodes.
// Every value that comes from the server is put into the page as text (textContent), never as markup.
"use strict";

const STATUSES = ["waiting", "postponed", "processing", "done", "failed", "canceled", "timeout"];
const ACTIVE = ["waiting", "postponed", "processing"];
const ENDED_BADLY = ["failed", "timeout", "canceled"];
const MAX_ROWS = 200;
// Shortest pause between two reloads of the job page while its job changes (progress moves often).
const JOB_RELOAD_MS = 1000;
// Pause before a page whose live stream was refused (too many pages open: 503) asks for one again.
const STREAM_RETRY_MS = 15000;

const state = { config: null, rows: new Map(), view: "list", jobId: null, online: false };

function $(id) { return document.getElementById(id); }

// A DOM element with properties (never innerHTML) and children (strings become text nodes).
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "on") for (const [name, fn] of Object.entries(value)) node.addEventListener(name, fn);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || response.status + " " + response.statusText);
  return body;
}

function age(iso) {
  if (!iso) return "-";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 120) return Math.round(seconds) + "s";
  if (seconds < 7200) return Math.round(seconds / 60) + "m";
  return Math.round(seconds / 3600) + "h";
}

function statusBadge(status) { return el("span", { className: "status " + status }, status); }

// -- actions ------------------------------------------------------------------------------------------------------

async function act(id, action) {
  const headers = { "X-Taskscheduler-Action": "1" };
  const token = sessionStorage.getItem("taskscheduler-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    await api("/api/jobs/" + encodeURIComponent(id) + "/" + action, { method: "POST", headers: headers });
    say("");
  } catch (err) {
    say(action + " " + id + ": " + err.message);
  }
}

function actionButtons(row) {
  if (!state.config || state.config.read_only) return [];
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

function rowElement(row) {
  const link = el("a", { href: "#/job/" + row.id }, row.id);
  return el("tr", { dataset: { id: row.id, status: row.status } },
    el("td", { className: "id" }, link),
    el("td", { className: "class" }, row.class),
    el("td", { className: "status-cell" }, statusBadge(row.status)),
    el("td", { className: "progress" }, el("progress", { max: 100, value: Number(row.progress) || 0, title: Math.round(Number(row.progress) || 0) + "%" })),
    el("td", { className: "run" }, row.run),
    el("td", { className: "age", dataset: { created: row.created || "" } }, age(row.created)),
    el("td", { className: "node" }, row.node || (row.worker ? "worker " + row.worker.slice(-6) : "-")),
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
  const body = $("jobs").tBodies[0];
  const current = body.querySelector('tr[data-id="' + CSS.escape(row.id) + '"]');
  if (current) current.replaceWith(rowElement(row));
  else renderRows();
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
    }).catch(() => {});
    return;
  }
  state.total = f.status ? (counts[f.status] || 0) : STATUSES.reduce((sum, status) => sum + (counts[status] || 0), 0);
  renderShown();
}

async function loadJobs() {
  const f = filters();
  const params = new URLSearchParams();
  if (f.status) params.set("status", f.status);
  if (f.cls) params.set("class", f.cls);
  if (f.id) params.set("id", f.id);
  params.set("limit", String(MAX_ROWS));
  const found = await api("/api/jobs?" + params.toString());
  state.rows = new Map(found.jobs.map((row) => [row.id, row]));
  state.total = found.total;
  renderRows();
}

function renderCounts(counts) {
  const box = $("counts");
  box.replaceChildren(...STATUSES.map((status) => el("div", {
    className: "count", dataset: { status: status }, title: "show only " + status,
    on: { click: () => { $("filter-status").value = status; loadJobs().catch((e) => say(e.message)); } },
  }, el("span", { className: "n" }, counts[status] || 0), statusBadge(status))));
}

function renderNodes(nodes) {
  const box = $("nodes");
  if (!nodes.length) { box.replaceChildren(el("p", { className: "muted" }, "no live queue node")); return; }
  box.replaceChildren(...nodes.map((node) => el("div", { className: "node-card", dataset: { id: node.id } },
    el("strong", {}, node.host + " (pid " + node.pid + ")"),
    el("div", { className: "muted" }, "id " + node.id + " · v" + node.version + " · up " + age(node.started)),
    el("div", {}, "modules: " + node.modules.join(", ")),
    el("div", {}, node.busy + " busy, " + (node.workers.length - node.busy) + " idle"),
    el("ul", {}, ...node.workers.map((w) => el("li", { className: "mono" }, "worker pid " + w.pid + ": ",
      w.job ? el("a", { href: "#/job/" + w.job }, w.job) : "idle"))))));
}

// -- the job page -------------------------------------------------------------------------------------------------

function field(name, value) {
  return el("tr", {}, el("th", {}, name), el("td", { className: "field-" + name }, value === null || value === undefined ? "-" : value));
}

function pretty(value) { return value === undefined ? "" : JSON.stringify(value, null, 2); }

function runElement(run) {
  const parts = [el("div", {}, el("strong", {}, "run " + run.run + " "), statusBadge(run.status),
    el("span", { className: "muted" }, " " + (run.started || "-") + " → " + (run.ended || "-") + (run.worker ? " · worker " + run.worker : "")))];
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
  try { job = await api("/api/jobs/" + encodeURIComponent(id)); } catch (err) { say(err.message); return; }
  if (state.view !== "job" || state.jobId !== id) return;
  $("job-id").textContent = job.id;
  $("job-actions").replaceChildren(...actionButtons(job));
  $("job-fields").tBodies[0].replaceChildren(
    field("class", job.class), field("status", statusBadge(job.status)),
    field("progress", el("progress", { max: 100, value: Number(job.progress) || 0 })), field("run", job.run),
    field("created", job.created), field("started", job.started), field("ended", job.ended),
    field("worker", job.worker), field("node", job.node),
    field("error", job.error ? (job.error.class || "") + ": " + (job.error.message || "") : null),
    field("result", job.result === null ? null : pretty(job.result)));
  $("job-data").textContent = pretty(job.data);
  $("job-options").textContent = pretty(job.options);
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

function connect() {
  const source = new EventSource("/api/stream");
  // "ready": subscribed; what is loaded from now on misses no change (also after a reconnect, and when the server
  // may have missed changes: its feed was interrupted).
  source.addEventListener("ready", () => { setOnline(true); refresh(); });
  source.addEventListener("job", (event) => {
    const row = JSON.parse(event.data);
    if (state.view === "list") upsertRow(row);
    else if (row.id === state.jobId) reloadJobSoon(row.id);
  });
  source.addEventListener("counts", (event) => {
    const counts = JSON.parse(event.data);
    renderCounts(counts);
    updateTotal(counts);
  });
  source.addEventListener("nodes", (event) => renderNodes(JSON.parse(event.data)));
  source.onerror = () => {
    setOnline(false);
    // Refused (e.g. 503: too many live pages open): the browser gives up on it, so try again later ourselves.
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, STREAM_RETRY_MS);
  };
}

async function refresh() {
  try {
    if (state.view === "job") { await loadJob(state.jobId); return; }
    const summary = await api("/api/summary");
    renderCounts(summary.counts);
    renderNodes(summary.nodes);
    await loadJobs();
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
  state.total = 0;
  $("database").textContent = "database " + state.config.database + " · v" + state.config.version;
  $("mode").textContent = state.config.read_only ? "read-only" : "";
  if (state.config.token_required && !state.config.read_only) {
    $("token-box").hidden = false;
    $("token").value = sessionStorage.getItem("taskscheduler-token") || "";
    $("token").addEventListener("change", () => sessionStorage.setItem("taskscheduler-token", $("token").value));
  }
  for (const status of STATUSES) $("filter-status").append(el("option", { value: status }, status));
  $("filters").addEventListener("submit", (event) => event.preventDefault());
  for (const id of ["filter-status", "filter-class", "filter-id"]) {
    $(id).addEventListener("change", () => loadJobs().catch((e) => say(e.message)));
  }
  window.addEventListener("hashchange", route);
  setInterval(() => {
    for (const cell of document.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.created);
  }, 1000);
  state.view = null;
  connect();
  route();
}

document.addEventListener("DOMContentLoaded", () => start().catch((err) => say(err.message)));
