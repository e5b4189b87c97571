// The LAP console: reads the Output API (/v1) with the key the person signed in with.
// Plain DOM and SVG, no library: every text from the API goes in as text, never as HTML.
"use strict";

const API = "/v1";
const KEY_SLOT = "lap-console-key"; // sessionStorage: gone when the tab closes, never in a URL
const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const HOUR_MS = 3600e3;
const DAY_MS = 24 * HOUR_MS;
const PIPELINE_EVERY_MS = 5000;

const state = { key: null, who: null, timers: [], generation: 0 };

// --- small helpers ----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttributes(el, attrs);
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttributes(el, attrs);
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function setAttributes(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
}

const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const decimal = (n, digits = 1) => (n === null || n === undefined ? "–" : Number(n).toFixed(digits));
const pad = (n) => String(n).padStart(2, "0");

function localTime(value, withDate = true) {
  const d = new Date(value);
  const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return withDate ? `${day} ${time}` : time;
}

function inputValue(date) { // for <input type="datetime-local">, in the browser's zone
  return `${localTime(date)}`.replace(" ", "T");
}

function since(date) {
  const s = Math.round((Date.now() - date.getTime()) / 1000);
  return s < 90 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function startOfHour(date) {
  const d = new Date(date);
  d.setMinutes(0, 0, 0);
  return d;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, params = {}, options = {}) {
  const url = new URL(API + path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Authorization: `Bearer ${options.key || state.key}` };
  if (options.body) headers["Content-Type"] = "application/json";
  let reply;
  try {
    reply = await fetch(url, { method: options.method || "GET", headers, cache: "no-store",
                               body: options.body ? JSON.stringify(options.body) : undefined });
  } catch (err) {
    throw new ApiError(0, "LAP is not reachable from this browser");
  }
  if (!reply.ok) {
    let detail = reply.statusText;
    try { detail = (await reply.json()).detail || detail; } catch (err) { /* not a problem document */ }
    if (reply.status === 401 && !options.key) signOut("Your key is no longer accepted (revoked or expired): sign in again.");
    throw new ApiError(reply.status, detail);
  }
  return options.raw ? reply : reply.json();
}

async function download(path, params, filename) {
  const reply = await api(path, { ...params, format: "csv" }, { raw: true });
  const link = h("a", { href: URL.createObjectURL(await reply.blob()), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
}

function failure(err) {
  const text = err.status ? `LAP answered ${err.status}: ${err.message}` : err.message;
  return h("p", { class: "error", role: "alert" }, text);
}

// --- sign-in and routing ----------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function signOut(message) {
  sessionStorage.removeItem(KEY_SLOT);
  state.key = null;
  state.who = null;
  $("sign-in-error").textContent = message || "";
  if (location.hash) history.replaceState(null, "", location.pathname);
  route();
}

async function signIn(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  const error = $("sign-in-error");
  error.textContent = "";
  try {
    state.who = await api("/whoami", {}, { key });
  } catch (err) {
    error.textContent = {
      401: "This key was not accepted: it is wrong, revoked or expired. Use a reader or admin key.",
      403: "This key cannot read: it is a sensor key. Use a reader or admin key.",
    }[err.status] || (err.status ? `LAP could not check the key now (${err.status}: ${err.message}).` : err.message);
    $("key").select();
    return;
  }
  state.key = key;
  sessionStorage.setItem(KEY_SLOT, key);
  $("key").value = "";
  route();
}

const VIEWS = { pipeline: showPipeline, proof: showProof, quarantine: showQuarantine, courses: showCourses,
                course: showCourse, learner: showLearner, erasures: showErasures };

function route() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  state.generation += 1;
  const signedIn = Boolean(state.key && state.who);
  $("sign-in").hidden = signedIn;
  $("view").hidden = !signedIn;
  $("nav").hidden = !signedIn;
  $("who").hidden = !signedIn;
  if (!signedIn) {
    $("view").replaceChildren();
    $("key").focus();
    return;
  }
  $("who-text").textContent = `${state.who.tenant} · ${state.who.role}`;
  const [name, ...args] = location.hash.slice(1).split("/");
  const view = VIEWS[name] ? name : "pipeline";
  const tab = { course: "courses", learner: "courses" }[view] || view;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === tab) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  VIEWS[view](args.map(decodeURIComponent));
}

function page(title, lead) {
  const view = $("view");
  view.replaceChildren(h("h2", {}, title), ...(lead ? [h("p", { class: "lead" }, lead)] : []));
  document.title = `${title} · LAP console`;
  const generation = state.generation;
  return { view, current: () => generation === state.generation };
}

async function start() {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", route);
  const key = sessionStorage.getItem(KEY_SLOT);
  if (key) {
    try {
      state.who = await api("/whoami", {}, { key });
      state.key = key;
    } catch (err) {
      sessionStorage.removeItem(KEY_SLOT);
      $("sign-in-error").textContent = err.status === 401 ? "Your key is no longer accepted: sign in again." : err.message;
    }
  }
  route();
}

// --- charts -----------------------------------------------------------------------------------

// Bars over time: series stacked per bar, a label under the first, middle and last bars, the top value on the left.
function barChart({ labels, series, width = 1000, height = 170, label = "chart", classOf }) {
  const left = 48, bottom = 22, top = 8;
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const max = Math.max(1, ...totals);
  const step = (width - left) / Math.max(1, labels.length);
  const scale = (v) => ((height - bottom - top) * v) / max;
  const chart = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label });
  chart.append(svg("line", { class: "axis", x1: left, x2: width, y1: height - bottom, y2: height - bottom }),
               svg("text", { x: left - 6, y: top + 10, "text-anchor": "end" }, number(max)),
               svg("text", { x: left - 6, y: height - bottom, "text-anchor": "end" }, "0"));
  labels.forEach((text, i) => {
    let y = height - bottom;
    for (const s of series) {
      const value = s.values[i];
      if (!value) continue;
      const tall = Math.max(1, scale(value));
      y -= tall;
      chart.append(svg("rect", { class: (classOf && classOf(i, s)) || s.className, x: left + i * step + 1, y,
                                 width: Math.max(1, step - 2), height: tall },
                       svg("title", {}, `${text}: ${number(value)} ${s.name}`)));
    }
    if (i === 0 || i === labels.length - 1 || i === Math.floor(labels.length / 2)) {
      const anchor = i === 0 ? "start" : i === labels.length - 1 ? "end" : "middle";
      const x = left + i * step + (anchor === "start" ? 0 : anchor === "end" ? step : step / 2);
      chart.append(svg("text", { x, y: height - 6, "text-anchor": anchor }, text));
    }
  });
  return chart;
}

function legend(items) {
  return h("div", { class: "legend" }, items.map(([cls, text]) => h("span", {}, h("span", { class: `swatch ${cls}` }), text)));
}

const WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

function heatmap(week, zone) {
  const cell = 34, left = 44, top = 18;
  const max = Math.max(1, ...week.flatMap((d) => d.hours));
  const chart = svg("svg", { class: "chart heatmap", viewBox: `0 0 ${left + 24 * cell} ${top + 7 * cell}`,
                             role: "img", "aria-label": `events by weekday and hour (${zone})` });
  for (let hour = 0; hour < 24; hour += 3) {
    chart.append(svg("text", { x: left + hour * cell + cell / 2, y: 12, "text-anchor": "middle" }, `${pad(hour)}h`));
  }
  week.forEach((day, d) => {
    chart.append(svg("text", { x: left - 8, y: top + d * cell + cell / 2 + 4, "text-anchor": "end" }, day.weekday.slice(0, 3)));
    day.hours.forEach((count, hour) => {
      chart.append(svg("rect", { class: count ? "cell" : "cell empty", x: left + hour * cell, y: top + d * cell,
                                 width: cell, height: cell, "fill-opacity": count ? 0.15 + (0.85 * count) / max : 1,
                                 "data-count": count },
                       svg("title", {}, `${day.weekday} ${pad(hour)}:00–${pad(hour + 1)}:00: ${number(count)} events`)));
    });
  });
  return chart;
}

function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null, scope: "col" }, c.head)))),
    h("tbody", {}, rows));
}

function cells(columns, row) {
  return columns.map((c) => h("td", { class: c.num ? "num" : null, "data-field": c.field || null },
                                c.cell ? c.cell(row) : c.num ? number(row[c.field]) : row[c.field]));
}

// --- Pipeline ---------------------------------------------------------------------------------

async function showPipeline() {
  const { view, current } = page("Pipeline", `This tenant's events and refusals in the last 15 minutes, each shard's `
    + `consumer, and each dependency; refreshed every ${PIPELINE_EVERY_MS / 1000} s.`);
  const status = h("p", { id: "pipeline-status", class: "status", role: "status" }, "Loading…");
  const body = h("div", { id: "pipeline-body" });
  view.append(status, body);
  let last = null;
  const tick = async () => {
    try {
      const report = await api("/pipeline", { minutes: 15 });
      if (!current()) return;
      last = new Date();
      renderPipeline(body, report);
      body.classList.remove("stale");
      status.className = "status fresh";
      status.textContent = `Live: updated at ${localTime(last, false)}`;
    } catch (err) {
      if (!current()) return;
      body.classList.add("stale");
      status.className = "status stale";
      status.textContent = last ? `Stale: these figures are from ${localTime(last, false)} (${since(last)}). ${err.message}`
                                : `No figures yet: ${err.message}`;
    }
  };
  await tick();
  if (current()) state.timers.push(setInterval(tick, PIPELINE_EVERY_MS));
}

function renderPipeline(body, report) {
  const down = Object.entries(report.components).filter(([, c]) => !c.ok);
  const chips = h("div", { class: "chips", id: "components" }, Object.entries(report.components).map(([name, c]) =>
    h("span", { class: `chip ${c.ok ? "ok" : "down"}`, title: c.detail, "data-component": name },
      `${name}: ${c.ok ? "ok" : "DOWN"}`)));
  const minutes = report.minutes;
  const labels = minutes.map((m) => localTime(m.minute, false));
  const refused = minutes.map((m) => Object.values(m.refused).reduce((a, b) => a + b, 0));
  const accepted = minutes.map((m) => m.accepted);
  const statuses = [...new Set(minutes.flatMap((m) => Object.keys(m.refused)))].sort();
  const perMinute = [{ head: "Minute", cell: (m) => localTime(m.minute, false) },
                     { head: "Accepted", field: "accepted", num: true },
                     ...statuses.map((s) => ({ head: `Refused ${s}`, num: true, cell: (m) => number(m.refused[s] || 0) }))];
  const shardColumns = [
    { head: "Shard", field: "shard_id" },
    { head: "Consumer", field: "consumer" },
    { head: "Node", cell: (s) => s.node || "–" },
    { head: "Lag (ms)", field: "lag_ms", num: true },
    { head: "Index backlog (batches)", field: "index_backlog_batches", num: true },
    { head: "Last report", cell: (s) => [s.reported_at ? localTime(s.reported_at, false) : "never",
                                         s.stale ? h("span", { class: "mark-stale" }, " stale") : null] },
  ];
  const nodes = {};
  for (const s of report.shards.filter((s) => s.consumer !== "finished")) (nodes[s.node || "not reported"] ||= []).push(s.shard_id);
  const total = (values) => values.reduce((a, b) => a + b, 0);
  body.replaceChildren(
    h("div", { class: "panel" }, h("h3", {}, "Dependencies"), chips,
      down.length ? h("p", { class: "error", role: "alert" },
                      `Down: ${down.map(([name, c]) => `${name} (${c.detail})`).join("; ")}`) : null),
    h("div", { class: "panel" },
      h("h3", {}, "Ingest, per minute"),
      h("p", {}, "In these 15 minutes: ", h("strong", { id: "accepted-total" }, number(total(accepted))),
        " events accepted, ", h("strong", { id: "refused-total" }, number(total(refused))),
        " requests refused and kept in the quarantine (refusals without a valid key are counted by Ray's metrics only)."),
      legend([["accepted", "accepted events"], ["refused", "refused requests"]]),
      barChart({ labels, label: "accepted events and refused requests per minute",
                 series: [{ name: "accepted", values: accepted, className: "bar-accepted" },
                          { name: "refused", values: refused, className: "bar-refused" }] }),
      h("details", {}, h("summary", {}, "Per-minute figures"),
        table(perMinute, minutes.map((m) => h("tr", {}, cells(perMinute, m))), { id: "minutes" }))),
    h("div", { class: "panel" },
      h("h3", {}, "Shards"),
      table(shardColumns, report.shards.map((s) => h("tr", { class: s.stale ? "stale-row" : null, "data-shard": s.shard_id },
                                                     cells(shardColumns, s))), { id: "shards" }),
      h("h3", {}, "Consumers by node"),
      Object.keys(nodes).length
        ? h("ul", { id: "placement" }, Object.entries(nodes).map(([node, shards]) =>
            h("li", {}, h("strong", {}, node), `: ${shards.length} shard${shards.length > 1 ? "s" : ""} (${shards.join(", ")})`)))
        : h("p", {}, "No open shard has a consumer yet.")),
  );
}

// --- Proof ------------------------------------------------------------------------------------

function missingTotal(hour) {
  return Object.values(hour.missing).reduce((a, b) => a + b, 0);
}

function hourState(hour) {
  if (hour.complete) return "complete";
  return missingTotal(hour) + hour.retention_lost + hour.dead_lettered > 0 ? "incomplete" : "in-progress";
}

const HOUR_COLUMNS = [
  { head: "Accepted", field: "accepted", num: true },
  { head: "Archived", field: "archived", num: true },
  { head: "Aggregated", field: "aggregated", num: true },
  { head: "Indexed", field: "indexed", num: true },
  { head: "Duplicates", field: "duplicates", num: true },
  { head: "Quarantined", field: "quarantined", num: true },
  { head: "Erased", field: "erased", num: true },
  { head: "Missing", field: "missing", num: true, cell: (r) => number(missingTotal(r)) },
  { head: "Pending", field: "pending", num: true, cell: (r) => number(r.pending + r.index_pending) },
  { head: "State", field: "state", cell: (r) => h("span", { class: `state-${hourState(r)}` }, hourState(r).replace("-", " ")) },
];

async function showProof(args) {
  const end = args[1] ? new Date(args[1]) : new Date(startOfHour(Date.now()).getTime() + HOUR_MS);
  const start = args[0] ? new Date(args[0]) : new Date(end.getTime() - DAY_MS);
  const { view, current } = page("Proof", `What each stage holds of the events received in each hour (${TZ}): `
    + "an hour is complete when every accepted event is archived, aggregated and indexed. Select an hour for its missing ids.");
  if (isNaN(start) || isNaN(end)) {
    view.append(h("p", { class: "error", role: "alert" }, "This address holds no valid window."));
    return;
  }
  const from = h("input", { type: "datetime-local", id: "proof-start", value: inputValue(start) });
  const to = h("input", { type: "datetime-local", id: "proof-end", value: inputValue(end) });
  const show = () => { location.hash = `proof/${new Date(from.value).toISOString()}/${new Date(to.value).toISOString()}`; };
  const params = { start: start.toISOString(), end: end.toISOString(), tz: TZ };
  view.append(h("div", { class: "toolbar" },
    h("label", {}, "From", from), h("label", {}, "To", to),
    h("button", { type: "button", onclick: show }, "Show"),
    h("button", { type: "button", onclick: () => { location.hash = "proof"; } }, "Last 24 hours"),
    h("button", { type: "button", onclick: () => download("/audit/hours", params, "reconcile-hours.csv") }, "Download CSV")));
  const holder = h("div", {}, h("p", {}, "Reconciling…"));
  const detail = h("div", { id: "hour-detail" });
  view.append(holder, detail);
  let report;
  try {
    report = await api("/audit/hours", params);
  } catch (err) {
    if (current()) holder.replaceChildren(failure(err));
    return;
  }
  if (!current()) return;
  const rows = new Map();
  const chart = h("div", {});
  const drawChart = () => chart.replaceChildren(
    legend([["accepted", "accepted, hour complete or in progress"], ["incomplete", "accepted, hour incomplete"]]),
    barChart({ labels: report.hours.map((r) => localTime(r.hour)), label: "accepted events per hour",
               series: [{ name: "accepted", values: report.hours.map((r) => r.accepted), className: "bar-accepted" }],
               classOf: (i) => (hourState(report.hours[i]) === "incomplete" ? "bar-incomplete" : "bar-accepted") }));
  const hourRow = (hour) => h("tr", { class: hourState(hour), "data-hour": hour.hour },
    h("td", {}, h("button", { class: "link", type: "button", onclick: () => openHour(hour) }, localTime(hour.hour))),
    cells(HOUR_COLUMNS, hour));
  const replaceHour = (fresh) => {
    const i = report.hours.findIndex((r) => r.hour === fresh.hour);
    if (i >= 0) report.hours[i] = fresh;
    const row = hourRow(fresh);
    row.classList.add("selected");
    rows.get(fresh.hour).replaceWith(row);
    rows.set(fresh.hour, row);
    drawChart();
    drawSummary();
  };
  const openHour = (hour) => {
    for (const [key, row] of rows) row.classList.toggle("selected", key === hour.hour);
    showHour(detail, hour, start, end, replaceHour, current);
  };
  const summary = h("p", { id: "proof-summary" });
  const drawSummary = () => {
    const incomplete = report.hours.filter((r) => hourState(r) === "incomplete").length;
    summary.className = incomplete ? "error" : "";
    summary.textContent = incomplete ? `${incomplete} of ${report.hours.length} hours are incomplete.`
                                     : `No hour of these ${report.hours.length} misses an event.`;
  };
  drawChart();
  drawSummary();
  holder.replaceChildren(summary, h("div", { class: "panel" }, chart),
    table([{ head: "Hour" }, ...HOUR_COLUMNS],
          report.hours.map((hour) => { const row = hourRow(hour); rows.set(hour.hour, row); return row; }),
          { id: "hours" }));
}

async function showHour(detail, hour, windowStart, windowEnd, replaceHour, current, outcome = null) {
  const start = new Date(Math.max(new Date(hour.hour).getTime(), windowStart.getTime()));
  const end = new Date(Math.min(new Date(hour.hour).getTime() + HOUR_MS, windowEnd.getTime()));
  const span = { start: start.toISOString(), end: end.toISOString() };
  const said = () => (outcome ? h("p", { id: "replay-progress", role: "status" }, outcome) : null);
  detail.replaceChildren(h("div", { class: "panel" }, h("h3", {}, `Hour from ${localTime(start)}`), said(),
                           h("p", {}, "Listing missing ids…")));
  detail.scrollIntoView({ block: "nearest" });
  let report;
  try {
    report = await api("/audit/reconcile", { ...span, detail: "ids", limit: 1000 });
  } catch (err) {
    if (current()) detail.replaceChildren(h("div", { class: "panel" }, failure(err)));
    return;
  }
  if (!current()) return;
  const stages = Object.entries(report.missing_ids || {});
  const lists = stages.filter(([, ids]) => ids.length).map(([stage, ids]) => h("div", {},
    h("h4", {}, `Missing from ${stage}: ${number(report.missing[stage])}`),
    h("ul", { class: "ids", "data-stage": stage }, ids.map((id) => h("li", {}, id))),
    report.missing[stage] > ids.length ? h("p", { class: "note" }, `The first ${ids.length} ids; `
      + "`lap reconcile --ids` lists them all.") : null));
  const panel = h("div", { class: "panel" },
    h("h3", {}, `Hour from ${localTime(start)} to ${localTime(end, false)}`),
    said(),
    report.erased ? h("p", { id: "hour-erased" }, `${number(report.erased)} events of this hour were erased `
      + "(a learner's erasure): taken out of every stage on purpose, not missing. ",
      h("a", { href: "#erasures" }, "Erasures")) : null,
    h("p", {}, report.complete ? "Complete: every accepted event is in every stage."
                               : lists.length ? "Incomplete: these events are missing."
                               : report.dead_lettered ? "Not complete: events are kept aside (dead letters)."
                               : `Not complete yet, nothing missing so far: ${number(report.pending)} events are `
                                 + `still in the stream and ${number(report.index_pending)} waiting for the index.`));
  const needed = stages.filter(([stage]) => report.missing[stage] > 0).map(([stage]) => stage);
  const repairable = !report.nothing_missing || report.dead_lettered > 0;
  if (state.who.role === "admin" && repairable) {
    const progress = h("p", { id: "replay-progress", role: "status" });
    const button = h("button", { class: "primary", type: "button", id: "replay-hour" }, "Replay this hour");
    button.addEventListener("click", async () => {
      button.disabled = true;
      // an archive object that vanished is rebuilt from the stream; otherwise the archive is the source
      const body = { ...span, stages: needed.length ? needed : ["archive", "aggregate", "index"],
                     source: needed.includes("archive") ? "stream" : "archive" };
      try {
        const { id } = await api("/audit/replay", {}, { method: "POST", body });
        const job = await followReplay(id, progress);
        const fresh = await api("/audit/hours", { start: hour.hour, end: new Date(new Date(hour.hour).getTime() + HOUR_MS).toISOString(), tz: TZ });
        if (!current()) return;
        replaceHour(fresh.hours[0]);
        const restored = Object.entries(job.result?.replayed || {}).map(([what, n]) => `${what} ${number(n)}`).join(", ");
        showHour(detail, fresh.hours[0], windowStart, windowEnd, replaceHour, current,
                 `Replay ${id}: done${restored ? ` (${restored})` : ""}.`);
      } catch (err) {
        progress.replaceChildren(failure(err));
        button.disabled = false;
      }
    });
    panel.append(h("p", {}, button, ` replays ${needed.length ? needed.join(", ") : "every stage"} from the `
      + `${needed.includes("archive") ? "stream" : "archive"}; events already stored are not counted twice.`), progress);
  } else if (repairable) {
    panel.append(h("p", { class: "note" }, "An admin key can replay this hour from here."));
  }
  panel.append(...lists);
  detail.replaceChildren(panel);
}

async function followReplay(id, progress) {
  for (;;) {
    const job = await api(`/audit/replay/${encodeURIComponent(id)}`);
    const steps = Object.entries(job.progress || {}).map(([step, p]) => `${step} ${number(p.done)}/${number(p.total)}`);
    progress.textContent = `Replay ${id}: ${job.status}${steps.length ? ` (${steps.join(", ")})` : ""}`;
    if (job.status === "failed") throw new ApiError(0, `Replay ${id} failed: ${job.error}`);
    if (job.status === "done") return job;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// --- Erasures -------------------------------------------------------------------------------

async function showErasures() {
  const { view, current } = page("Erasures", "Learners erased from every store, newest first. LAP keeps this "
    + "tombstone of each: the learner's IRI hashed (never the IRI), when, by which key, and what each store gave up.");
  const holder = h("div", {}, h("p", {}, "Loading…"));
  view.append(holder);
  let found;
  try {
    found = await api("/erasures");
  } catch (err) {
    if (current()) holder.replaceChildren(failure(err));
    return;
  }
  if (!current()) return;
  if (!found.erasures.length) {
    holder.replaceChildren(h("p", { id: "no-erasures" }, "No learner of this tenant has been erased."));
    return;
  }
  const counts = (e) => Object.entries(e.counts).filter(([, n]) => n).map(([k, n]) => `${k.replaceAll("_", " ")} ${number(n)}`).join(", ");
  const columns = [
    { head: "Erasure", field: "id" },
    { head: "Learner (sha256)", field: "learner_hash", cell: (e) => h("code", { title: e.learner_hash || "" }, (e.learner_hash || "the whole tenant").slice(0, 16)) },
    { head: "Status", field: "status" },
    { head: "Asked", field: "requested_at", cell: (e) => localTime(e.requested_at) },
    { head: "By key", field: "requested_by" },
    { head: "Done", field: "finished_at", cell: (e) => (e.finished_at ? localTime(e.finished_at) : "") },
    { head: "Events", field: "events", num: true, cell: (e) => number(e.counts.events || 0) },
    { head: "What each store gave up", field: "counts", cell: counts },
  ];
  holder.replaceChildren(table(columns, found.erasures.map((e) => h("tr", { "data-erasure": e.id }, cells(columns, e))),
                               { id: "erasures" }));
}

// --- Quarantine -------------------------------------------------------------------------------

async function showQuarantine(args) {
  const end = new Date();
  const start = new Date(end.getTime() - (Number(args[0]) || 24) * HOUR_MS);
  const { view, current } = page("Quarantine", "Requests refused in the last 24 hours (400, 413, 422), by sensor and "
    + "reason. Each group shows its newest request: its problems and its payload as kept.");
  const holder = h("div", {}, h("p", {}, "Loading…"));
  view.append(holder);
  let report;
  try {
    report = await api("/audit/refusals", { start: start.toISOString(), end: end.toISOString() });
  } catch (err) {
    if (current()) holder.replaceChildren(failure(err));
    return;
  }
  if (!current()) return;
  if (!report.groups.length) {
    holder.replaceChildren(h("p", { id: "no-refusals" }, "Nothing was refused in this window."));
    return;
  }
  const columns = [
    { head: "Sensor", cell: (g) => h("span", { class: "iri" }, g.sensor) },
    { head: "Status", field: "status" },
    { head: "Reason", field: "title" },
    { head: "Requests", field: "count", num: true },
    { head: "Newest", cell: (g) => localTime(g.last_received_at) },
    { head: "Sample", cell: (g) => h("button", { class: "link", type: "button", onclick: (e) => showSample(e.target, g) }, "Show") },
  ];
  holder.replaceChildren(table(columns, report.groups.map((g) => h("tr", { "data-request": g.sample_request_id }, cells(columns, g))),
                               { id: "refusals" }));
}

async function showSample(button, group) {
  const row = button.closest("tr");
  const open = row.nextElementSibling;
  if (open && open.classList.contains("sample")) {
    open.remove();
    button.textContent = "Show";
    return;
  }
  const cell = h("td", { colspan: 6 }, "Loading…");
  row.after(h("tr", { class: "sample" }, cell));
  button.textContent = "Hide";
  try {
    const kept = await api(`/audit/quarantine/${encodeURIComponent(group.sample_request_id)}`);
    let payload = kept.payload;
    if (kept.payload_encoding === "utf-8" && payload.length < 200000) {
      try { payload = JSON.stringify(JSON.parse(payload), null, 2); } catch (err) { /* shown as sent */ }
    }
    cell.replaceChildren(
      h("p", {}, `Request ${kept.request_id}, received ${localTime(kept.received_at)}: ${kept.status} ${kept.title}`),
      h("ul", { class: "problems" }, kept.problems.map((p) => h("li", {}, h("code", {}, p.path), ` ${p.message}`))),
      kept.payload_erased
        ? h("p", { class: "note" }, `Payload: ${number(kept.payload_bytes)} bytes, no longer kept: it named a learner who was erased.`)
        : h("p", { class: "note" }, `Payload: ${number(kept.payload_bytes)} bytes${kept.payload_truncated ? ", only the first part kept" : ""}`
          + `${kept.payload_encoding === "base64" ? " (not UTF-8: shown in base64)" : ""}.`),
      kept.payload_erased ? "" : h("pre", { class: "payload" }, payload));
  } catch (err) {
    cell.replaceChildren(failure(err));
  }
}

// --- Courses and learners ---------------------------------------------------------------------

function pagedList({ path, field, columns, q, id }) {
  const body = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "More");
  const holder = h("div", {}, h("table", { id }, h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.head)))), body), more);
  let cursor = null;
  const load = async () => {
    more.disabled = true;
    try {
      const reply = await api(path, { q, limit: 50, cursor });
      for (const row of reply[field]) body.append(h("tr", {}, cells(columns, row)));
      if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: columns.length }, "None found.")));
      cursor = reply.next_cursor;
      more.hidden = !cursor;
    } catch (err) {
      holder.append(failure(err));
    }
    more.disabled = false;
  };
  more.addEventListener("click", load);
  load();
  return holder;
}

const courseLink = (iri) => h("a", { class: "iri", href: `#course/${encodeURIComponent(iri)}` }, iri);
const learnerLink = (iri) => h("a", { class: "iri", href: `#learner/${encodeURIComponent(iri)}` }, iri);

function showCourses(args) {
  const { view } = page("Courses and learners", "Find a course or a learner by part of its IRI.");
  const search = (label, id, list) => {
    const input = h("input", { type: "search", id, placeholder: "part of an IRI", value: args[0] || "" });
    const results = h("div", {});
    const run = () => results.replaceChildren(list(input.value.trim() || null));
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") run(); });
    run();
    return h("div", { class: "panel" }, h("div", { class: "toolbar" }, h("label", {}, label, input),
                                           h("button", { type: "button", onclick: run }, "Search")), results);
  };
  view.append(h("div", { class: "grid2" },
    search("Courses", "course-search", (q) => pagedList({ path: "/courses", field: "courses", q, id: "courses", columns: [
      { head: "Course", cell: (c) => courseLink(c.course) }, { head: "Events", field: "events", num: true },
      { head: "First day", field: "first_day" }, { head: "Last day", field: "last_day" }] })),
    search("Learners", "learner-search", (q) => pagedList({ path: "/learners", field: "learners", q, id: "learners", columns: [
      { head: "Learner", cell: (l) => learnerLink(l.learner) }, { head: "Courses", field: "courses", num: true },
      { head: "Events", field: "events", num: true }, { head: "Last active", cell: (l) => localTime(l.last_active) }] }))));
}

function lastDays(days) {
  const end = new Date(Date.now() + 60e3);
  return { start: new Date(end.getTime() - days * DAY_MS).toISOString(), end: end.toISOString() };
}

const LEARNER_COLUMNS = [
  { head: "Learner", sort: "learner", cell: (r) => learnerLink(r.learner) },
  { head: "Events", sort: "events", field: "events", num: true },
  { head: "Submissions", sort: "submissions", field: "submissions", num: true },
  { head: "Mean score", sort: "score_mean", num: true, cell: (r) => decimal(r.score_mean, 2) },
  { head: "Time on task (min)", sort: "time_on_task_s", num: true, cell: (r) => decimal(r.time_on_task_s / 60) },
  { head: "Last active", sort: "last_active", cell: (r) => localTime(r.last_active) },
];

async function showCourse(args) {
  const course = args[0] || "";
  const { view, current } = page("Course", null);
  view.append(h("p", { class: "iri", id: "course-iri" }, course));
  const span = lastDays(30);
  const activity = h("div", { class: "panel" }, h("h3", {}, `Events per day, last 30 days (${TZ})`), h("p", {}, "Loading…"));
  const heat = h("div", { class: "panel" }, h("h3", {}, `Events by weekday and hour, last 30 days (${TZ})`), h("p", {}, "Loading…"));
  const learners = h("div", { class: "panel" }, h("h3", {}, "Learners"));
  view.append(h("div", { class: "grid2" }, activity, heat), learners);

  const sortState = { sort: "-events", q: null };
  const body = h("tbody", {});
  const more = h("button", { type: "button", hidden: true }, "More");
  const search = h("input", { type: "search", id: "learner-filter", placeholder: "part of a learner IRI" });
  const head = h("tr", {});
  let cursor = null;
  const drawHead = () => head.replaceChildren(...LEARNER_COLUMNS.map((c) => {
    const active = sortState.sort.replace("-", "") === c.sort;
    const descending = sortState.sort.startsWith("-");
    return h("th", { class: c.num ? "num" : null, "aria-sort": active ? (descending ? "descending" : "ascending") : null },
      h("button", { type: "button", "data-sort": c.sort, onclick: () => {
        sortState.sort = active && descending ? c.sort : `-${c.sort}`;
        if (!active && c.sort === "learner") sortState.sort = "learner";
        load(true);
      } }, c.head, active ? (descending ? " ▼" : " ▲") : ""));
  }));
  const load = async (fresh) => {
    if (fresh) { cursor = null; body.replaceChildren(); drawHead(); }
    try {
      const reply = await api("/course-learners", { course, sort: sortState.sort, q: sortState.q, limit: 50, cursor });
      if (!current()) return;
      for (const row of reply.learners) body.append(h("tr", { "data-learner": row.learner }, cells(LEARNER_COLUMNS, row)));
      if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: LEARNER_COLUMNS.length }, "No learner found.")));
      cursor = reply.next_cursor;
      more.hidden = !cursor;
    } catch (err) {
      if (current()) body.replaceChildren(h("tr", {}, h("td", { colspan: LEARNER_COLUMNS.length }, failure(err))));
    }
  };
  more.addEventListener("click", () => load(false));
  search.addEventListener("keydown", (e) => { if (e.key === "Enter") { sortState.q = search.value.trim() || null; load(true); } });
  learners.append(h("div", { class: "toolbar" }, h("label", {}, "Search", search),
      h("button", { type: "button", onclick: () => { sortState.q = search.value.trim() || null; load(true); } }, "Search"),
      h("button", { type: "button", onclick: () => download("/course-learners", { course, sort: sortState.sort, q: sortState.q },
                                                          "course-learners.csv") }, "Download CSV")),
    h("table", { id: "course-learners" }, h("thead", {}, head), body), more);
  load(true);

  try {
    const [days, map] = await Promise.all([
      api("/course-activity", { course, ...span, granularity: "day", tz: TZ }),
      api("/course-heatmap", { course, ...span, tz: TZ }),
    ]);
    if (!current()) return;
    activity.replaceChildren(activity.firstChild, days.buckets.length
      ? barChart({ labels: days.buckets.map((b) => localTime(b.start).slice(0, 10)), label: "events per day", width: 560,
                   series: [{ name: "events", values: days.buckets.map((b) => b.events), className: "bar-events" }] })
      : h("p", {}, "No events in these days."),
      h("p", { class: "note", id: "activity-total" }, `${number(days.buckets.reduce((a, b) => a + b.events, 0))} events; `
        + `up to ${number(Math.max(0, ...days.buckets.map((b) => b.active_learners)))} active learners a day.`));
    heat.replaceChildren(heat.firstChild, heatmap(map.week, map.time_zone),
      h("p", { class: "note", id: "heatmap-total" }, `${number(map.hour_of_week.reduce((a, b) => a + b, 0))} events.`));
  } catch (err) {
    if (current()) activity.append(failure(err));
  }
}

async function showLearner(args) {
  const learner = args[0] || "";
  const { view, current } = page("Learner", null);
  view.append(h("p", { class: "iri", id: "learner-iri" }, learner));
  const holder = h("div", {}, h("p", {}, "Loading…"));
  view.append(holder);
  try {
    const [summary, activity] = await Promise.all([api("/learner-summary", { learner }),
                                                   api("/learner-activity", { learner, ...lastDays(30) })]);
    if (!current()) return;
    const columns = [
      { head: "Course", cell: (c) => (c.course ? courseLink(c.course) : "(no course)") },
      { head: "Events", field: "events", num: true },
      { head: "Submissions", field: "submissions", num: true },
      { head: "Mean score", num: true, cell: (c) => decimal(c.scores.mean, 2) },
      { head: "Time on task (min)", num: true, cell: (c) => decimal(c.time_on_task_s / 60) },
      { head: "First active", cell: (c) => localTime(c.first_active) },
      { head: "Last active", cell: (c) => localTime(c.last_active) },
    ];
    const courses = Object.entries(activity.courses);
    holder.replaceChildren(
      h("div", { class: "panel" }, h("h3", {}, "Courses"),
        table(columns, summary.courses.map((c) => h("tr", {}, cells(columns, c))), { id: "learner-courses" })),
      h("div", { class: "panel" }, h("h3", {}, "Events per day and course, last 30 days (UTC days)"),
        legend(courses.map(([course], i) => [`series-${i % 5}`, course || "(no course)"])),
        barChart({ labels: activity.days, label: "events per day and course",
                   series: courses.map(([course, values], i) => ({ name: `events in ${course || "no course"}`, values,
                                                                    className: `series-${i % 5}` })) })));
  } catch (err) {
    if (current()) holder.replaceChildren(err.status === 404 ? h("p", { class: "error", role: "alert" },
      "No events of this learner for this tenant.") : failure(err));
  }
}

document.addEventListener("DOMContentLoaded", start);
