// The primespark console. Plain script, no dependencies, no network beyond its own origin.
// Every value from the pipeline is written with textContent (never as markup): payloads and
// error messages are producers' bytes.
"use strict";

(function () {
  const POLL_MS = 2000;
  const RECENT_MS = 3000;
  let previous = null; // the last overview, for rates
  let recentTimer = null;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null) continue;
        if (k === "class") e.className = v;
        else e.setAttribute(k, String(v));
      }
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits || 0 });
  }

  function seconds(v) {
    if (v === null || v === undefined) return "–";
    if (v < 0.001) return (v * 1e6).toFixed(0) + " µs";
    if (v < 1) return (v * 1000).toFixed(1) + " ms";
    if (v < 120) return v.toFixed(1) + " s";
    if (v < 7200) return (v / 60).toFixed(1) + " min";
    return (v / 3600).toFixed(1) + " h";
  }

  function time(us) {
    if (us === null || us === undefined) return "–";
    return new Date(us / 1000).toISOString().replace("T", " ").replace("Z", "");
  }

  // A numeric cell: the shown text, and the raw value in data-v for whoever checks it.
  function cell(key, value, shown, cls) {
    return el("td", { class: cls || "n", "data-m": key, "data-v": value === null ? "" : value }, shown);
  }

  function rate(key, value, dt) {
    if (!previous || dt <= 0 || value === null) return null;
    const before = previous.values[key];
    if (before === undefined || before === null || value < before) return null;
    return (value - before) / dt;
  }

  // The mean of a histogram over the last poll (its count and sum then and now), or since
  // the start when nothing was observed in between.
  function recentMean(key, count, sum, keep) {
    keep(key + ".count", count);
    keep(key + ".sum", sum);
    if (previous) {
      const dn = count - (previous.values[key + ".count"] || 0);
      const ds = sum - (previous.values[key + ".sum"] || 0);
      if (dn > 0) return ds / dn;
    }
    return count > 0 ? sum / count : null;
  }

  function fill(tbody, rows, columns) {
    tbody.replaceChildren();
    if (rows.length === 0) {
      tbody.appendChild(el("tr")).appendChild(el("td", { class: "empty", colspan: columns }, "nothing yet"));
    }
    for (const r of rows) tbody.appendChild(r);
  }

  function banner(text) {
    const b = document.getElementById("banner");
    if (text) {
      b.textContent = text;
      b.hidden = false;
    } else {
      b.hidden = true;
    }
  }

  async function getJson(path) {
    const r = await fetch(path, { headers: { accept: "application/json" }, cache: "no-store" });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  function renderOverview(o) {
    const dt = previous ? (o.now_us - previous.now_us) / 1e6 : 0;
    const values = {};
    const keep = (k, v) => { values[k] = v; return v; };

    const ready = document.getElementById("ready");
    ready.textContent = o.ready ? "ready" : "not ready";
    ready.className = "badge " + (o.ready ? "ok" : "bad");
    ready.setAttribute("data-m", "ready");
    ready.setAttribute("data-v", o.ready ? "1" : "0");
    document.getElementById("uptime").textContent = seconds(o.uptime_seconds);
    document.getElementById("updated").textContent = time(o.now_us).slice(11, 19);

    const streams = [], partitions = [];
    for (const s of o.streams) {
      const k = "stream." + s.name + ".";
      const r = rate(k + "records_total", keep(k + "records_total", s.records_total), dt);
      const tr = el("tr", { "data-stream": s.name });
      tr.append(
        el("td", null, s.name), el("td", null, s.topic),
        cell(k + "events_per_second", r, r === null ? "–" : num(r, 1)),
        cell(k + "records_total", s.records_total, num(s.records_total)),
        cell(k + "windows_closed_total", s.windows_closed_total, num(s.windows_closed_total)),
        cell(k + "late_events_total", s.late_events_total, num(s.late_events_total)),
        cell(k + "dead_letters_total", s.dead_letters_total, num(s.dead_letters_total)),
        cell(k + "watermark_lag_seconds", s.watermark_lag_seconds, seconds(s.watermark_lag_seconds)));
      streams.push(tr);
      for (const p of s.partitions) {
        const pk = "partition." + s.topic + "." + p.partition + ".";
        const pr = rate(pk + "records_total", keep(pk + "records_total", p.records_total), dt);
        const ptr = el("tr");
        ptr.append(
          el("td", null, s.topic),
          cell(pk + "partition", p.partition, p.partition),
          cell(pk + "events_per_second", pr, pr === null ? "–" : num(pr, 1)),
          cell(pk + "records_total", p.records_total, num(p.records_total)),
          cell(pk + "consumer_lag_records", p.consumer_lag_records, num(p.consumer_lag_records)),
          cell(pk + "watermark_lag_seconds", p.watermark_lag_seconds, seconds(p.watermark_lag_seconds)),
          cell(pk + "dead_letters_total", p.dead_letters_total, num(p.dead_letters_total)));
        partitions.push(ptr);
      }
    }
    fill(document.querySelector("#streams tbody"), streams, 8);
    fill(document.querySelector("#partitions tbody"), partitions, 7);

    const sinks = [];
    for (const s of o.sinks) {
      const k = "sink." + s.sink + "." + s.table + ".";
      const r = rate(k + "rows_total", keep(k + "rows_total", s.rows_total), dt);
      const mean = recentMean(k + "flush", s.flushes_total, s.flush_seconds_sum, keep);
      const tr = el("tr");
      const state = el("td", { class: s.degraded ? "state-bad" : "state-ok", "data-m": k + "degraded", "data-v": s.degraded ? 1 : 0 },
        s.degraded ? "degraded" : "ok");
      const lastError = el("td", { class: s.last_error ? "err" : "empty" },
        s.last_error ? s.last_error + " (" + time(s.last_error_at_us) + ")" : "none");
      tr.append(
        el("td", null, s.sink), el("td", null, s.table),
        cell(k + "rows_per_second", r, r === null ? "–" : num(r, 1)),
        cell(k + "rows_total", s.rows_total, num(s.rows_total)),
        cell(k + "flush_mean_seconds", mean, seconds(mean)),
        cell(k + "flush_p99_seconds", s.flush_p99_seconds, seconds(s.flush_p99_seconds)),
        state, lastError);
      sinks.push(tr);
    }
    fill(document.querySelector("#sinks tbody"), sinks, 8);

    const inf = o.inference;
    const backend = document.getElementById("backend");
    backend.textContent = inf.backends_in_use.length ? inf.backends_in_use.join(", ") : "none";
    backend.setAttribute("data-v", inf.backends_in_use.join(","));
    const queue = document.getElementById("queue");
    queue.textContent = num(inf.queue_depth);
    queue.setAttribute("data-v", inf.queue_depth);
    const fallbacks = document.getElementById("fallbacks");
    fallbacks.textContent = num(inf.fallbacks_total);
    fallbacks.setAttribute("data-v", inf.fallbacks_total);
    const models = [];
    for (const m of inf.models) {
      const k = "model." + m.backend + "." + m.model + ".";
      const r = rate(k + "samples_total", keep(k + "samples_total", m.samples_total), dt);
      const mean = recentMean(k + "batch", m.batches_total, m.seconds_sum, keep);
      const tr = el("tr");
      tr.append(
        el("td", null, m.backend), el("td", null, m.model),
        cell(k + "samples_per_second", r, r === null ? "–" : num(r, 1)),
        cell(k + "samples_total", m.samples_total, num(m.samples_total)),
        cell(k + "latency_mean_seconds", mean, seconds(mean)),
        cell(k + "p99_seconds", m.p99_seconds, seconds(m.p99_seconds)),
        cell(k + "anomalies_total", m.anomalies_total, num(m.anomalies_total)),
        cell(k + "errors_total", m.errors_total, num(m.errors_total)));
      models.push(tr);
    }
    fill(document.querySelector("#models tbody"), models, 8);

    previous = { now_us: o.now_us, values: values };
    document.body.setAttribute("data-overview-at", String(o.now_us));
    document.body.setAttribute("data-ready", "1");
  }

  async function pollOverview() {
    try {
      renderOverview(await getJson("/console/api/overview"));
      banner(null);
    } catch (e) {
      banner("Cannot reach the pipeline: " + e.message);
    }
    setTimeout(pollOverview, POLL_MS);
  }

  function renderRecent(r) {
    for (const c of document.querySelectorAll(".capacity")) c.textContent = String(r.capacity);
    const dead = r.dead_letters.map((d) => {
      const tr = el("tr", { "data-offset": d.offset, "data-partition": d.partition });
      const shown = d.payload + (d.payload_bytes > d.payload.length ? " … (" + d.payload_bytes + " bytes)" : "");
      tr.append(el("td", null, time(d.at_us)), el("td", null, d.topic),
        el("td", { class: "n" }, d.partition), el("td", { class: "n" }, d.offset),
        el("td", { class: "err" }, d.reason), el("td", null, d.error),
        el("td", { class: "payload" }, shown));
      return tr;
    });
    fill(document.querySelector("#dead-letters tbody"), dead, 7);
    const anomalies = r.anomalies.map((a) => {
      const tr = el("tr", { "data-offset": a.offset });
      tr.append(el("td", null, time(a.at_us)), el("td", null, time(a.event_time_us)),
        el("td", null, a.device_id), el("td", null, a.model),
        el("td", { class: "n" }, a.score.toFixed(3)), el("td", { class: "n" }, a.threshold.toFixed(3)),
        el("td", null, a.backend), el("td", { class: "n" }, a.partition), el("td", { class: "n" }, a.offset));
      return tr;
    });
    fill(document.querySelector("#anomalies tbody"), anomalies, 9);
    document.body.setAttribute("data-recent-ready", "1");
  }

  async function pollRecent() {
    try {
      renderRecent(await getJson("/console/api/recent"));
    } catch (e) {
      banner("Cannot read the latest dead letters: " + e.message);
    }
  }

  // --- SQL ---------------------------------------------------------------------------------

  const TIME_NAME = /(^|_)(time|bucket|ts|timestamp|at|date|day|hour|minute)($|_)/i;
  const TIME_VALUE = /^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}/;

  function timeColumn(columns, rows) {
    for (let i = 0; i < columns.length; i++) {
      const vals = rows.map((r) => r[i]).filter((v) => v !== null);
      if (vals.length === 0) continue;
      if (vals.every((v) => typeof v === "string" && TIME_VALUE.test(v) && !Number.isNaN(Date.parse(v)))) return i;
      if (TIME_NAME.test(columns[i]) && vals.every((v) => typeof v === "string" && !Number.isNaN(Date.parse(v)))) return i;
    }
    return -1;
  }

  function chart(columns, rows) {
    const box = document.getElementById("sql-chart");
    box.replaceChildren();
    const t = timeColumn(columns, rows);
    if (t < 0 || rows.length < 2) return;
    const numeric = columns.map((_, i) => i).filter((i) => i !== t &&
      rows.some((r) => typeof r[i] === "number") && rows.every((r) => r[i] === null || typeof r[i] === "number"));
    if (numeric.length === 0) return;
    const group = columns.map((_, i) => i).find((i) => i !== t && !numeric.includes(i) &&
      rows.every((r) => r[i] === null || typeof r[i] === "string"));
    const series = new Map();
    for (const r of rows) {
      const x = Date.parse(r[t]);
      for (const i of numeric) {
        if (r[i] === null) continue;
        const name = (group === undefined ? "" : String(r[group]) + " · ") + columns[i];
        if (!series.has(name)) series.set(name, []);
        series.get(name).push([x, r[i]]);
      }
    }
    const names = [...series.keys()].sort((a, b) => series.get(b).length - series.get(a).length).slice(0, 8);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const n of names) for (const [x, y] of series.get(n)) {
      x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    }
    if (x1 === x0) x1 = x0 + 1;
    if (y0 > 0) y0 = 0; // a positive series reads against zero
    if (y1 === y0) { y1 = y0 + 1; y0 = y0 - 1; }
    const W = 900, H = 260, L = 60, R = 10, T = 10, B = 30;
    const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("id", "sql-svg");
    const line = (x1_, y1_, x2_, y2_) => {
      const l = document.createElementNS(NS, "line");
      l.setAttribute("x1", x1_); l.setAttribute("y1", y1_); l.setAttribute("x2", x2_); l.setAttribute("y2", y2_);
      l.setAttribute("stroke", "#9aa4b2");
      svg.appendChild(l);
    };
    const label = (x, y, text, anchor) => {
      const s = document.createElementNS(NS, "text");
      s.setAttribute("x", x); s.setAttribute("y", y); s.setAttribute("font-size", "11");
      s.setAttribute("fill", "#5c6675"); s.setAttribute("text-anchor", anchor || "start");
      s.textContent = text;
      svg.appendChild(s);
    };
    line(L, H - B, W - R, H - B); line(L, T, L, H - B);
    label(L - 4, T + 8, num(y1, 2), "end"); label(L - 4, H - B, num(y0, 2), "end");
    label(L, H - 8, new Date(x0).toISOString().slice(0, 19).replace("T", " "));
    label(W - R, H - 8, new Date(x1).toISOString().slice(0, 19).replace("T", " "), "end");
    const colors = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
    const legend = el("div", { class: "legend" });
    names.forEach((n, k) => {
      const pts = series.get(n).sort((a, b) => a[0] - b[0]);
      const path = document.createElementNS(NS, "polyline");
      path.setAttribute("fill", "none");
      path.setAttribute("stroke", colors[k]);
      path.setAttribute("stroke-width", "1.5");
      path.setAttribute("data-series", n);
      path.setAttribute("points", pts.map(([x, y]) => sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join(" "));
      svg.appendChild(path);
      const item = el("span", null, "■ " + n + "   ");
      item.style.color = colors[k];
      legend.appendChild(item);
    });
    box.append(svg, legend);
  }

  function renderResult(out) {
    const table = document.getElementById("sql-result");
    const head = table.querySelector("thead");
    const body = table.querySelector("tbody");
    head.replaceChildren();
    body.replaceChildren();
    const hr = el("tr");
    for (const c of out.columns) hr.appendChild(el("th", null, c));
    head.appendChild(hr);
    for (const r of out.rows) {
      const tr = el("tr");
      for (const v of r) tr.appendChild(el("td", { class: typeof v === "number" ? "n" : null }, v === null ? "NULL" : v));
      body.appendChild(tr);
    }
    chart(out.columns, out.rows);
  }

  async function runSql() {
    const button = document.getElementById("sql-run");
    const status = document.getElementById("sql-status");
    const result = document.getElementById("sql-result");
    const sql = document.getElementById("sql-text").value;
    button.disabled = true;
    result.setAttribute("data-state", "running");
    status.className = "";
    status.textContent = "running…";
    const started = performance.now();
    try {
      const r = await fetch("/v1/sql", {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify({ sql: sql }),
      });
      const body = await r.json().catch(() => ({ error: "HTTP " + r.status }));
      if (!r.ok) {
        document.getElementById("sql-chart").replaceChildren();
        result.querySelector("thead").replaceChildren();
        result.querySelector("tbody").replaceChildren();
        status.className = "err";
        status.textContent = "HTTP " + r.status + ": " + (body.error || "failed");
        result.setAttribute("data-state", "error");
        return;
      }
      renderResult(body);
      const ms = Math.round(performance.now() - started);
      status.textContent = body.rows.length + " rows in " + ms + " ms" + (body.truncated ? " (truncated by the endpoint's limits)" : "");
      result.setAttribute("data-state", "done");
    } catch (e) {
      status.className = "err";
      status.textContent = "failed: " + e.message;
      result.setAttribute("data-state", "error");
    } finally {
      button.disabled = false;
    }
  }

  // --- Pages -------------------------------------------------------------------------------

  function show() {
    const tab = (location.hash || "#overview").slice(1);
    const known = ["overview", "recent", "sql"].includes(tab) ? tab : "overview";
    for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + known;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.getAttribute("data-tab") === known);
    if (recentTimer) { clearInterval(recentTimer); recentTimer = null; }
    if (known === "recent") {
      pollRecent();
      recentTimer = setInterval(pollRecent, RECENT_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    window.addEventListener("hashchange", show);
    document.getElementById("sql-run").addEventListener("click", runSql);
    document.getElementById("sql-text").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) runSql();
    });
    show();
    pollOverview();
  });
})();
