// The wasminfer console. It reads the JSON API every second with the key the person gave (kept in
// this tab's sessionStorage, sent as `Authorization: Bearer`) and draws what it reads; its buttons
// are API calls like any client's, allowed or refused by the API. Rates and percentiles over a
// window are differences between two reads of /v1/stats (cumulative counters and histograms).
// Text that comes from the server (a guest's log lines, error messages) is only ever set as text.
"use strict";

const TICK_MS = 1000;
const HISTORY_S = 300; // what the charts show
const RATE_WINDOW_S = 5; // invocations/s and errors/s: over the last 5 s
const LATENCY_WINDOW_S = 10; // p50 and p99: over the last 10 s
const MAX_LOG_LINES = 500;
const KEY = "wasminfer.key";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const SVG = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem(KEY),
  who: null, // /v1/whoami
  reads: [], // recent /v1/stats reads, oldest first
  history: [], // one point per tick for the charts: {at, functions, models, instances, replicas}
  selected: null, // the function whose detail and log are shown
  logSince: null,
  versionsAt: 0,
  timer: null,
  running: false,
};

const $ = (id) => document.getElementById(id);

// --- DOM helpers: every string becomes a text node ----------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  setAttrs(el, attrs);
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
}

// --- formats ---------------------------------------------------------------------------------
const num = (v, digits = 0) =>
  v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });
const count = (v) => num(v, Number.isInteger(v) ? 0 : 1);
const rate = (v) => (v === null || v === undefined ? "–" : num(v, v < 10 ? 1 : 0));

function ms(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const m = seconds * 1000;
  if (m >= 1000) return `${num(m / 1000, 2)} s`;
  return `${num(m, m < 1 ? 3 : m < 10 ? 2 : 1)} ms`;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${num(n, i && n < 10 ? 1 : 0)} ${units[i]}`;
}

const clock = (unix) => new Date(unix * 1000).toLocaleTimeString("en-GB");
const dateTime = (iso) => (iso ? new Date(iso).toLocaleString("en-GB") : "–");

// --- the API -----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return `${this.status} ${this.code}: ${this.message}`;
  }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (state.key) headers.set("authorization", `Bearer ${state.key}`);
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) {
    let code = "http_error";
    let message = response.statusText;
    try {
      ({ code, message } = (await response.json()).error);
    } catch (_) {
      // not one of the API's JSON errors: the status line says it
    }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

const getJSON = async (path) => (await api(path)).json();

function can(scope) {
  const scopes = state.who ? state.who.scopes : [];
  return scopes.includes("admin") || scopes.includes(scope);
}

// A control the key may not use is shown disabled, saying why; the API refuses it anyway.
function control(button, scope) {
  if (!can(scope)) {
    button.disabled = true;
    button.title = `needs a key with the ${scope} scope`;
  }
  return button;
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

// --- signing in --------------------------------------------------------------------------------
function showLogin(message) {
  clearTimeout(state.timer);
  state.who = null;
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("status").textContent = "";
  $("login").hidden = false;
  $("key-error").textContent = message || "";
  $("key").focus();
}

function forgetKey(message) {
  state.key = null;
  sessionStorage.removeItem(KEY);
  showLogin(message);
}

function refusal(err) {
  if (err.status === 401) return `The server refused this key: ${err.message}.`;
  if (err.status === 403) return `This key cannot read this server: ${err.message}.`;
  return `The server answered ${err}.`;
}

async function connect() {
  try {
    state.who = await getJSON("/v1/whoami");
  } catch (err) {
    if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
      // No key yet is not an error: the form asks for one.
      if (state.key) forgetKey(refusal(err));
      else showLogin("");
    } else {
      showLogin(`Could not reach the server: ${err.message}`);
    }
    return;
  }
  const { tenant, scopes, open_access: open } = state.who;
  $("who").textContent = open ? "open access (no keys): default tenant, admin" : `tenant ${tenant} · ${scopes.join(", ")}`;
  $("who").dataset.scopes = scopes.join(" ");
  $("sign-out").hidden = open;
  $("login").hidden = true;
  $("app").hidden = false;
  $("key-error").textContent = "";
  $("invoke").disabled = false;
  control($("invoke"), "invoke");
  tick();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key").value.trim();
  $("key").value = "";
  sessionStorage.setItem(KEY, state.key);
  connect();
});

$("sign-out").addEventListener("click", () => forgetKey(""));

// --- the loop ------------------------------------------------------------------------------------
async function tick() {
  clearTimeout(state.timer);
  if (state.running || !state.who) return;
  state.running = true;
  try {
    const names = ["stats", "functions", "models", "scaling", "jobs"];
    const results = await Promise.allSettled([
      getJSON("/v1/stats"),
      getJSON("/v1/functions"),
      getJSON("/v1/models"),
      getJSON("/v1/scaling"),
      can("invoke") ? getJSON("/v1/jobs?limit=20") : Promise.resolve(null),
    ]);
    const refused = results.find((r) => r.status === "rejected" && r.reason.status === 401);
    if (refused) {
      forgetKey(refusal(refused.reason));
      return;
    }
    const data = {};
    const failures = [];
    results.forEach((r, i) => {
      if (r.status === "fulfilled") data[names[i]] = r.value;
      else failures.push(`${names[i]}: ${r.reason}`);
    });
    render(data);
    if (state.selected) await renderSelected();
    $("status").textContent = failures.length
      ? `some reads failed (${failures.join("; ")})`
      : `updated ${new Date().toLocaleTimeString("en-GB")}`;
  } catch (err) {
    $("status").textContent = `connection lost: ${err.message}`;
  } finally {
    state.running = false;
    if (state.who) state.timer = setTimeout(tick, TICK_MS);
  }
}

function render(data) {
  const now = data.stats ? data.stats.at : Date.now() / 1000;
  if (data.stats) {
    state.reads.push(data.stats);
    while (state.reads.length > 2 && state.reads[1].at < now - LATENCY_WINDOW_S - 2) state.reads.shift();
  }
  const point = { at: now, functions: {}, models: {}, instances: {}, replicas: null };
  const names = (data.functions ? data.functions.functions : []).map((f) => f.name);
  for (const name of names) point.functions[name] = windowed(name);
  const instances = data.scaling ? instancesByFunction(data.scaling) : {};
  for (const name of names) point.instances[name] = instances[name] ? instances[name].live : 0;
  if (data.models) for (const m of data.models.models) point.models[m.name] = m.stats ? m.stats.runs_per_second : null;
  if (data.scaling) point.replicas = data.scaling.serving;
  state.history.push(point);
  while (state.history.length && state.history[0].at < now - HISTORY_S) state.history.shift();

  if (data.functions) renderFunctions(data.functions.functions, point, instances, now);
  if (data.models) renderModels(data.models.models, now);
  if (data.scaling) renderScaling(data.scaling, now);
  renderJobs(data.jobs);
}

// --- functions --------------------------------------------------------------------------------
const total = (counts) => Object.values(counts || {}).reduce((a, b) => a + b, 0);

function windowed(name) {
  // Rates over RATE_WINDOW_S and percentiles over LATENCY_WINDOW_S, from the two reads that span them.
  const reads = state.reads;
  if (!reads.length) return { rate: null, errors: null, p50: null, p99: null };
  const last = reads[reads.length - 1];
  const since = (seconds) => {
    let past = reads[0];
    for (const r of reads) if (r.at <= last.at - seconds) past = r;
    return past;
  };
  const fn = (read) => read.functions[name] || { invocations: {}, latency_seconds: { buckets: [] } };
  const now = fn(last);
  const out = { rate: null, errors: null, p50: null, p99: null, total: total(now.invocations) };
  const r = since(RATE_WINDOW_S);
  if (r !== last) {
    const dt = last.at - r.at;
    const then = fn(r);
    const failed = (c) => total(c) - (c.ok || 0);
    out.rate = Math.max(0, total(now.invocations) - total(then.invocations)) / dt;
    out.errors = Math.max(0, failed(now.invocations) - failed(then.invocations)) / dt;
  }
  const l = since(LATENCY_WINDOW_S);
  const before = l === last ? [] : fn(l).latency_seconds.buckets;
  const delta = now.latency_seconds.buckets.map(([le, n], i) => [le, n - (before[i] ? before[i][1] : 0)]);
  out.p50 = quantile(delta, 0.5);
  out.p99 = quantile(delta, 0.99);
  return out;
}

// The q-quantile of a cumulative histogram ([upper bound, count] pairs ending with "+Inf"),
// interpolated inside its bucket as Prometheus' histogram_quantile does; null without observations.
function quantile(buckets, q) {
  const count = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (count <= 0) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (const [le, n] of buckets) {
    if (n >= rank) {
      if (le === "+Inf") return lower; // past the largest bound: that bound is all it can say
      return n === below ? le : lower + ((le - lower) * (rank - below)) / (n - below);
    }
    if (le !== "+Inf") lower = le;
    below = n;
  }
  return lower;
}

function instancesByFunction(scaling) {
  // Summed over the replicas; keys are "tenant/function".
  const prefix = `${state.who.tenant}/`;
  const out = {};
  for (const replica of scaling.replicas) {
    for (const [key, s] of Object.entries(replica.functions || {})) {
      if (!key.startsWith(prefix)) continue;
      const o = (out[key.slice(prefix.length)] ||= { live: 0, busy: 0, desired: null });
      o.live += s.live || 0;
      o.busy += s.busy || 0;
      if (s.desired !== null && s.desired !== undefined) o.desired = (o.desired || 0) + s.desired;
    }
  }
  return out;
}

function renderFunctions(functions, point, instances, now) {
  const stats = state.reads.length ? state.reads[state.reads.length - 1].functions : {};
  const rows = functions.map((f) => {
    const w = point.functions[f.name];
    const s = stats[f.name] || { invocations: {}, cold_starts: 0 };
    const failed = total(s.invocations) - (s.invocations.ok || 0);
    const inst = instances[f.name] || { live: 0, busy: 0, desired: null };
    const spark = state.history.map((p) => [p.at, p.functions[f.name] ? p.functions[f.name].rate : null]);
    const errorCodes = Object.entries(s.invocations).filter(([k]) => k !== "ok").map(([k, n]) => `${k}: ${n}`);
    return h(
      "tr",
      {
        "data-function": f.name,
        class: f.name === state.selected ? "selected" : null,
        onclick: () => select(f.name),
        title: "show its charts, versions and log",
      },
      h("td", {}, h("a", { href: `#${f.name}` }, f.name)),
      h("td", { "data-col": "version" }, `v${f.version}`),
      h("td", { "data-col": "state", class: f.state === "ready" ? null : "warn" }, `${f.state} · ${f.abi}`),
      h("td", { "data-col": "rate" }, h("span", {}, rate(w.rate)), sparkline(spark, now)),
      h("td", { "data-col": "p50" }, ms(w.p50)),
      h("td", { "data-col": "p99" }, ms(w.p99)),
      h("td", { "data-col": "errors", class: failed ? "warn" : null, title: errorCodes.join(", ") || null }, num(failed)),
      h("td", { "data-col": "instances" }, `${inst.live} / ${inst.busy}${inst.desired === null ? "" : ` (${inst.desired})`}`),
      h("td", { "data-col": "cold-starts" }, num(s.cold_starts)),
      h("td", { "data-col": "invocations" }, num(total(s.invocations))),
    );
  });
  $("function-rows").replaceChildren(...rows);
  $("no-functions").hidden = functions.length > 0;
  const names = functions.map((f) => f.name);
  $("overview").replaceChildren(
    lineChart("Invocations/s", seriesOf(names, (p, n) => (p.functions[n] ? p.functions[n].rate : null)), rate, now),
    lineChart("p99 latency", seriesOf(names, (p, n) => (p.functions[n] ? p.functions[n].p99 : null)), ms, now),
  );
  if (state.selected && !names.includes(state.selected)) select(null);
}

function seriesOf(names, value) {
  return names.map((name) => ({ label: name, points: state.history.map((p) => [p.at, value(p, name)]) }));
}

function select(name) {
  state.selected = name;
  state.logSince = null;
  state.versionsAt = 0;
  $("logs").replaceChildren();
  $("invoke-result").textContent = "";
  $("function").hidden = !name;
  $("function-name").textContent = name || "";
  for (const tr of $("function-rows").children) tr.classList.toggle("selected", tr.dataset.function === name);
  if (name) tick();
}

$("close-function").addEventListener("click", () => select(null));

async function renderSelected() {
  const name = state.selected;
  const now = state.history.length ? state.history[state.history.length - 1].at : Date.now() / 1000;
  const at = (p) => p.functions[name] || {};
  $("function-charts").replaceChildren(
    lineChart("Invocations/s and errors/s", [
      { label: "invocations", points: state.history.map((p) => [p.at, at(p).rate ?? null]) },
      { label: "errors", points: state.history.map((p) => [p.at, at(p).errors ?? null]) },
    ], rate, now),
    lineChart("Latency", [
      { label: "p50", points: state.history.map((p) => [p.at, at(p).p50 ?? null]) },
      { label: "p99", points: state.history.map((p) => [p.at, at(p).p99 ?? null]) },
    ], ms, now),
  );
  const path = `/v1/functions/${encodeURIComponent(name)}`;
  const query = new URLSearchParams({ n: "200" });
  if (state.logSince !== null) query.set("since", String(state.logSince));
  const [logs, fn] = await Promise.allSettled([
    getJSON(`${path}/logs?${query}`),
    Date.now() - state.versionsAt > 5000 ? getJSON(path) : Promise.resolve(null),
  ]);
  if (name !== state.selected) return;
  if (logs.status === "fulfilled") appendLogs(logs.value.lines);
  if (fn.status === "fulfilled" && fn.value) {
    state.versionsAt = Date.now();
    renderVersions(fn.value);
  }
}

function appendLogs(lines) {
  const pre = $("logs");
  const follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  for (const line of lines) {
    const inv = line.invocation ? ` #${line.invocation}` : "";
    pre.append(
      h("div", { class: `log ${line.level}` }, `${clock(line.ts)} ${line.stream}/${line.level}${inv}  `, line.message),
    );
    state.logSince = line.ts;
  }
  while (pre.childElementCount > MAX_LOG_LINES) pre.firstElementChild.remove();
  if (follow) pre.scrollTop = pre.scrollHeight;
}

function renderVersions(fn) {
  const rows = fn.versions.slice().reverse().map((v) =>
    h(
      "tr",
      { "data-version": v.version },
      h("td", {}, `v${v.version}`, v.is_current ? " (current)" : ""),
      h("td", {}, dateTime(v.created_at)),
      h("td", {}, bytes(v.size)),
      h("td", {}, v.abi),
      h(
        "td",
        {},
        v.is_current
          ? ""
          : control(h("button", { type: "button", class: "rollback", onclick: () => rollback(fn.name, v.version) }, "make current"), "admin"),
      ),
    ),
  );
  $("version-rows").replaceChildren(...rows);
}

async function rollback(name, version) {
  try {
    const view = await (await api(`/v1/functions/${encodeURIComponent(name)}/rollback?version=${version}`, { method: "POST" })).json();
    notice("");
    $("status").textContent = `${name}: version ${view.version} is current`;
    state.versionsAt = 0;
    tick();
  } catch (err) {
    notice(`Rolling ${name} back to v${version} failed: ${err}`);
  }
}

$("invoke-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = state.selected;
  const out = $("invoke-result");
  out.className = "";
  out.textContent = "…";
  try {
    const started = performance.now();
    const response = await api(`/v1/functions/${encodeURIComponent(name)}/invoke`, {
      method: "POST",
      headers: { "content-type": $("invoke-type").value || "application/octet-stream" },
      body: $("invoke-body").value,
    });
    const text = await response.text();
    const took = performance.now() - started;
    out.textContent = `${response.status} ${response.headers.get("content-type") || ""} in ${num(took, 1)} ms\n${text.slice(0, 4096)}`;
  } catch (err) {
    out.className = "error";
    out.textContent = String(err);
  }
  tick();
});

// --- models -------------------------------------------------------------------------------------
function renderModels(models, now) {
  const rows = models.map((m) => {
    const s = m.stats || {};
    const b = s.batching;
    return h(
      "tr",
      { "data-model": m.name },
      h("td", {}, m.name),
      h("td", {}, `v${m.version}`),
      h("td", {}, bytes(m.size)),
      h("td", { "data-col": "session", class: m.loaded ? null : "warn" }, m.loaded ? "loaded" : "not loaded"),
      h("td", { "data-col": "memory" }, bytes(m.resident_bytes)),
      h("td", { "data-col": "runs-rate" }, rate(s.runs_per_second)),
      h("td", {}, rate(s.inferences_per_second)),
      h("td", { "data-col": "runs" }, num(s.runs)),
      h("td", { class: s.errors ? "warn" : null }, num((s.errors || 0) + (s.rejected || 0))),
      h("td", {}, `${num(s.runs_in_flight)} (+${num(s.runs_queued)} queued)`),
      h("td", {}, b ? num(b.mean_batch_size, 2) : "no batching"),
    );
  });
  $("model-rows").replaceChildren(...rows);
  $("no-models").hidden = models.length > 0;
  const names = models.map((m) => m.name);
  const charts = [];
  if (names.length) charts.push(lineChart("Model runs/s", seriesOf(names, (p, n) => p.models[n] ?? null), rate, now));
  for (const m of models) {
    const b = m.stats && m.stats.batching;
    if (b && b.batches) charts.push(barChart(`Batch sizes of ${m.name} (runs)`, b.batch_size_buckets));
  }
  $("model-charts").replaceChildren(...charts);
}

// --- replicas and scaling -------------------------------------------------------------------------
function renderScaling(scaling, now) {
  const load = scaling.load || {};
  const rejected = Object.entries(scaling.rejected || {}).map(([k, n]) => `${k}: ${n}`).join(", ");
  $("fleet").textContent =
    `${scaling.serving} serving (${scaling.min_replicas}–${scaling.max_replicas})` +
    (scaling.starting ? `, ${scaling.starting} starting` : "") +
    `, backend ${scaling.backend || "in-process only"} · queue p90 ${num(load.queue_ms_p90, 2)} ms, ` +
    `in flight ${num(load.in_flight, 1)}, CPU ${num(load.cpu, 2)} cores` +
    (rejected ? ` · refused: ${rejected}` : "");
  const memory = scaling.memory;
  if (memory) {
    const t = memory.tenant || {};
    $("memory").replaceChildren(
      meter("this tenant's quota", t.used_bytes, t.quota_bytes, `instances ${bytes(t.instances_bytes)}, models ${bytes(t.models_bytes)}`),
      meter("the server's budget", memory.used_bytes, memory.budget_bytes, "every tenant"),
    );
  }
  const prefix = `${state.who.tenant}/`;
  $("replica-rows").replaceChildren(
    ...scaling.replicas.map((r) =>
      h(
        "tr",
        { "data-replica": r.id },
        h("td", {}, r.id),
        h("td", {}, r.kind),
        h("td", { class: r.state === "serving" ? null : "warn" }, r.state),
        h("td", {}, num(r.outstanding)),
        h("td", {}, num(r.cpu, 2)),
        h(
          "td",
          {},
          Object.entries(r.functions || {})
            .map(([k, s]) => `${k.startsWith(prefix) ? k.slice(prefix.length) : k}: ${s.live} live, ${s.busy} busy`)
            .join("; ") || "–",
        ),
      ),
    ),
  );
  const names = Object.keys(state.history.length ? state.history[state.history.length - 1].instances : {});
  $("replica-charts").replaceChildren(
    lineChart("Live instances", seriesOf(names, (p, n) => p.instances[n] ?? null), count, now),
    lineChart("Replicas serving", [{ label: "replicas", points: state.history.map((p) => [p.at, p.replicas]) }], count, now),
  );
  $("decision-rows").replaceChildren(
    ...scaling.decisions.slice().reverse().slice(0, 30).map((d) =>
      h(
        "tr",
        {},
        h("td", {}, clock(d.at)),
        h("td", {}, d.scope),
        h("td", {}, d.subject.startsWith(prefix) ? d.subject.slice(prefix.length) : d.subject),
        h("td", { class: d.direction }, `${d.before} → ${d.after}`),
        h("td", {}, d.reason),
      ),
    ),
  );
}

function meter(label, used, limit, detail) {
  const bar = h("span");
  bar.style.width = `${limit ? Math.min(100, (100 * used) / limit) : 0}%`;
  return h("div", { class: "meter-row" }, h("span", { class: "meter-label" }, label), h("span", { class: "meter" }, bar),
    h("span", {}, `${bytes(used)} of ${bytes(limit)} (${detail})`));
}

// --- jobs ----------------------------------------------------------------------------------------
function renderJobs(jobs) {
  const note = $("jobs-note");
  if (!can("invoke")) {
    note.hidden = false;
    note.textContent = "Jobs hold invocation outputs: only a key with the invoke scope sees them.";
    $("jobs-table").hidden = true;
    return;
  }
  $("jobs-table").hidden = false;
  if (!jobs) return;
  note.hidden = jobs.jobs.length > 0;
  note.textContent = "No jobs: `wasminfer invoke NAME --async` or `wasminfer batch`.";
  $("job-rows").replaceChildren(
    ...jobs.jobs.map((j) => {
      const done = j.status === "succeeded" || j.status === "failed" || j.status === "cancelled";
      return h(
        "tr",
        { "data-job": j.id },
        h("td", { title: j.id }, j.id.slice(0, 12)),
        h("td", {}, j.function),
        h("td", {}, j.kind),
        h("td", { class: j.status === "failed" ? "warn" : null, title: j.error ? `${j.error.code}: ${j.error.message}` : null }, j.status),
        h("td", {}, h("progress", { max: j.items.total || 1, value: j.items.done }), ` ${j.items.done}/${j.items.total}`,
          j.items.failed ? ` (${j.items.failed} failed)` : ""),
        h("td", {}, dateTime(j.created_at)),
        h("td", {}, j.timings.run_s === null ? "–" : `${num(j.timings.run_s, 2)} s`),
        h("td", {}, done ? "" : control(h("button", { type: "button", onclick: () => cancelJob(j.id) }, "cancel"), "invoke")),
      );
    }),
  );
}

async function cancelJob(id) {
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
    notice("");
    tick();
  } catch (err) {
    notice(`Cancelling job ${id} failed: ${err}`);
  }
}

// --- charts (SVG, drawn here) ---------------------------------------------------------------------
function niceCeil(v) {
  if (!(v > 0)) return 0;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// A line per series over the last HISTORY_S seconds; a gap where a value is null.
function lineChart(title, series, format, now) {
  const W = 460, H = 150, L = 56, R = 10, T = 10, B = 22;
  const t0 = now - HISTORY_S;
  let max = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
  const top = niceCeil(max) || 1;
  const x = (t) => L + ((t - t0) / HISTORY_S) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    parts.push(svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "grid" }));
    parts.push(svg("text", { x: L - 6, y: y(top * f) + 4, "text-anchor": "end" }, format(top * f)));
  }
  [["−5 min", 0], ["−2.5 min", HISTORY_S / 2], ["now", HISTORY_S]].forEach(([label, dt]) =>
    parts.push(svg("text", { x: x(t0 + dt), y: H - 6, "text-anchor": dt ? (dt === HISTORY_S ? "end" : "middle") : "start" }, label)));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    let run = [];
    const flush = () => {
      if (run.length > 1) parts.push(svg("polyline", { points: run.join(" "), stroke: color, class: "line" }));
      else if (run.length === 1) parts.push(svg("circle", { cx: run[0].split(",")[0], cy: run[0].split(",")[1], r: 2, fill: color }));
      run = [];
    };
    for (const [t, v] of s.points) {
      if (v === null || v === undefined || t < t0) flush();
      else run.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    }
    flush();
  });
  const legend = h("div", { class: "legend" }, series.map((s, i) => {
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = COLORS[i % COLORS.length];
    return h("span", {}, swatch, s.label);
  }));
  return h("figure", { class: "chart" }, h("figcaption", {}, title),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, parts), legend);
}

// Bars of a cumulative histogram's buckets ([upper bound, count] pairs ending with "+Inf").
function barChart(title, buckets) {
  const counts = buckets.map(([le, n], i) => [le, n - (i ? buckets[i - 1][1] : 0)]);
  while (counts.length > 1 && counts[counts.length - 1][1] === 0) counts.pop();
  const W = 460, H = 150, L = 40, R = 10, T = 10, B = 22;
  const top = niceCeil(Math.max(...counts.map(([, n]) => n))) || 1;
  const width = (W - L - R) / counts.length;
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    const yy = T + (1 - f) * (H - T - B);
    parts.push(svg("line", { x1: L, x2: W - R, y1: yy, y2: yy, class: "grid" }));
    parts.push(svg("text", { x: L - 6, y: yy + 4, "text-anchor": "end" }, count(top * f)));
  }
  counts.forEach(([le, n], i) => {
    const height = (n / top) * (H - T - B);
    parts.push(svg("rect", { x: L + i * width + 2, y: T + (H - T - B) - height, width: width - 4, height, class: "bar" },
      svg("title", {}, `≤ ${le}: ${n}`)));
    parts.push(svg("text", { x: L + (i + 0.5) * width, y: H - 6, "text-anchor": "middle" }, le === "+Inf" ? "more" : `≤${le}`));
  });
  return h("figure", { class: "chart" }, h("figcaption", {}, title), svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, parts));
}

function sparkline(points, now) {
  const W = 90, H = 20;
  const t0 = now - HISTORY_S;
  const values = points.filter(([t, v]) => v !== null && t >= t0);
  const top = niceCeil(Math.max(0, ...values.map(([, v]) => v))) || 1;
  const coords = values.map(([t, v]) => `${(((t - t0) / HISTORY_S) * W).toFixed(1)},${(H - 1 - (v / top) * (H - 2)).toFixed(1)}`);
  return svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark", "aria-hidden": "true" },
    coords.length > 1 ? svg("polyline", { points: coords.join(" "), class: "line" }) : null);
}

connect();
