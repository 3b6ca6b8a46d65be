// The bergtalzug dashboard: draws what /api/events sends. No libraries;
// every value from the server is shown with textContent (never as HTML).
"use strict";

const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e8590c", "#1098ad", "#c2255c", "#5c940d"];
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const boards = new Map(); // pipeline id -> { el, view, history }
let config = { controls: false, sample_every: 1 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function num(n) {
  if (n === null || n === undefined) return "–";
  return Math.round(n).toLocaleString("en-US");
}

function rate(n) {
  if (n === null || n === undefined) return "–";
  return n >= 100 ? num(n) : n.toFixed(1);
}

function dur(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
  if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  return m + " min " + Math.round(s - m * 60) + " s";
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString("en-GB");
}

// A field the test and the eye read: data-value holds the raw number.
function set(root, field, text, value) {
  for (const node of root.querySelectorAll(`[data-field="${field}"]`)) {
    node.textContent = text;
    node.setAttribute("data-value", value === undefined ? text : String(value));
  }
}

function field(name) {
  return el("span", { "data-field": name, class: "v" }, "–");
}

function build(view) {
  const section = el("section", { class: "pipeline", "data-pipeline": view.name, "data-id": view.id });
  const controls = el("div", { class: "controls" });
  section.append(el("div", { class: "title" },
    el("h2", {}, view.name),
    el("span", { class: "phase", "data-field": "phase" }, view.phase),
    el("span", { class: "k", "data-field": "elapsed" }, ""),
    controls));
  const summary = el("div", { class: "summary" });
  for (const [key, label] of [["admitted_items", "admitted"], ["completed_items", "completed"],
    ["failed_items", "failed"], ["active_items", "in the pipeline"], ["recent_items_per_second", "items/s (10 s)"],
    ["p50_duration", "end-to-end p50"], ["p99_duration", "end-to-end p99"], ["stalled_items", "stalled"],
    ["source_errors", "source errors"], ["restarts", "restarts seen"]]) {
    summary.append(el("div", {}, el("span", { class: "k" }, label), field(key)));
  }
  section.append(summary);
  section.append(el("div", { class: "progress", "data-field-group": "progress" },
    el("div", { class: "bar" }, el("i", { "data-bar": "progress" })),
    el("span", { "data-field": "progress" }, ""), el("span", { "data-field": "eta" }, "")));
  const stages = el("div", { class: "stages" });
  view.stages.forEach((s, i) => {
    if (i > 0) stages.append(el("span", { class: "arrow" }, "→"));
    const rows = [["busy", "workers busy / total"], ["queue", "queue / queue_size"], ["items_per_second", "items/s"],
      ["utilisation", "utilisation"], ["p50", "service p50"], ["p99", "service p99"], ["processed", "processed"],
      ["failed", "failed"], ["retried", "retried"], ["stalled", "stalled"]];
    const table = el("table", {});
    for (const [key, label] of rows) {
      table.append(el("tr", {}, el("td", { class: "k" }, label), el("td", {}, field(key))));
      if (key === "queue") {
        table.append(el("tr", {}, el("td", { colspan: "2" }, el("div", { class: "bar qbar" }, el("i", { "data-bar": "queue" })))));
      }
    }
    stages.append(el("div", { class: "stage", "data-stage": s.name },
      el("h3", {}, s.name, el("span", { class: "model" }, s.model), el("span", { class: "badge" }, "bottleneck")),
      table));
  });
  section.append(stages);
  const charts = el("div", { class: "charts" });
  for (const [key, title] of [["throughput", "Throughput per stage (items/s)"], ["queues", "Queue depth per stage"],
    ["latency", "End-to-end latency since start (p50 / p90 / p99)"], ["failures", "Failures per second"]]) {
    charts.append(el("div", { class: "chart" }, el("h4", {}, title), el("canvas", { "data-chart": key, "data-points": "0" })));
  }
  section.append(charts);
  const lists = el("div", { class: "lists" });
  lists.append(list("failures", "Recent failures (dead letters)", ["time", "job id", "stage", "kind", "attempts", "error"]));
  lists.append(list("stalls", "Stalled items", ["reported", "job id", "stage", "worker", "age"]));
  lists.append(list("restarts", "Worker restarts", ["time", "stage", "worker", "replacement", "reason"]));
  lists.append(list("source_errors", "Source errors", ["time", "message"]));
  section.append(lists);
  return { el: section, controls, history: [], view };
}

function list(key, title, columns) {
  const head = el("tr", {});
  for (const c of columns) head.append(el("th", {}, c));
  return el("div", { "data-list": key },
    el("h4", {}, title, " ", el("span", { class: "k", "data-count": key }, "")),
    el("table", {}, el("thead", {}, head), el("tbody", {})));
}

function fillList(root, key, entries, row) {
  const box = root.querySelector(`[data-list="${key}"]`);
  const body = box.querySelector("tbody");
  body.replaceChildren();
  for (const e of entries.slice().reverse()) body.append(row(e));
  if (entries.length === 0) {
    body.append(el("tr", {}, el("td", { class: "none", colspan: "6" }, "none")));
  }
}

function cells(attrs, ...values) {
  const tr = el("tr", attrs);
  for (const v of values) {
    const td = el("td", {}, String(v));
    tr.append(td);
  }
  tr.lastChild.className = "err";
  return tr;
}

function update(board, view) {
  board.view = view;
  const root = board.el;
  const st = view.stats;
  set(root, "phase", view.phase);
  root.querySelector(".phase").setAttribute("data-value", view.phase);
  if (st) {
    set(root, "elapsed", (view.phase === "finished" ? "ran for " : "running for ") + dur(st.elapsed), st.elapsed);
    for (const key of ["admitted_items", "completed_items", "failed_items", "active_items", "stalled_items", "source_errors"]) {
      set(root, key, num(st[key]), st[key]);
    }
    set(root, "recent_items_per_second", rate(st.recent_items_per_second), st.recent_items_per_second);
    set(root, "p50_duration", dur(st.p50_duration), st.p50_duration);
    set(root, "p99_duration", dur(st.p99_duration), st.p99_duration);
    st.stages.forEach((s, i) => {
      const info = view.stages[i];
      const card = root.querySelector(`[data-stage="${CSS.escape(s.name)}"]`);
      if (!card) return;
      card.classList.toggle("bottleneck", st.bottleneck === s.name && view.phase !== "finished");
      const busy = Math.min(s.in_flight, s.workers);
      set(card, "busy", `${busy} / ${s.workers}`, busy);
      set(card, "queue", `${num(s.queued)} / ${num(info.queue_size)}`, s.queued);
      card.querySelector('[data-bar="queue"]').style.width = Math.min(100, 100 * s.queued / Math.max(1, info.queue_size)) + "%";
      set(card, "items_per_second", rate(s.items_per_second), s.items_per_second);
      set(card, "utilisation", Math.round(s.utilisation * 100) + " %", s.utilisation);
      set(card, "p50", dur(s.p50_duration), s.p50_duration);
      set(card, "p99", dur(s.p99_duration), s.p99_duration);
      for (const key of ["processed", "failed", "retried", "stalled"]) set(card, key, num(s[key]), s[key]);
      card.querySelector('[data-field="failed"]').classList.toggle("bad", s.failed > 0);
    });
  }
  set(root, "restarts", num(view.restarts.length), view.restarts.length);
  const bar = root.querySelector('[data-bar="progress"]');
  if (view.progress !== null) {
    bar.style.width = (view.progress * 100).toFixed(1) + "%";
    set(root, "progress", (view.progress * 100).toFixed(1) + " %", view.progress);
    set(root, "eta", view.phase === "finished" ? "done" : view.eta_seconds === null ? "ETA –" : "ETA " + dur(view.eta_seconds),
      view.eta_seconds === null ? "" : view.eta_seconds);
  } else {
    bar.style.width = view.phase === "finished" ? "100%" : "0";
    set(root, "progress", view.phase === "finished" ? "done" : "total unknown", "");
    set(root, "eta", "", "");
  }
  root.querySelector('[data-count="failures"]').textContent =
    view.failures_heard > view.failures.length ? `(last ${view.failures.length} of ${view.failures_heard})` : "";
  fillList(root, "failures", view.failures, f =>
    cells({ "data-job": f.job_id }, clock(f.at_ms), f.job_id, f.stage, f.kind, f.attempts, f.error));
  fillList(root, "stalls", view.stalls, s =>
    cells({ "data-job": s.job_id }, clock(s.at_ms), s.job_id, s.stage, s.worker, "≥ " + dur(s.age_now)));
  fillList(root, "restarts", view.restarts, r =>
    cells({}, clock(r.at_ms), r.stage, r.worker, r.replacement, r.reason));
  fillList(root, "source_errors", view.source_errors, e => cells({}, clock(e.at_ms), e.message));
  updateControls(board, view);
  // New samples (a sample may come twice around a reconnect: keep one).
  const last = board.history.length ? board.history[board.history.length - 1].t : -1;
  for (const s of view.history) if (s.t > last) board.history.push(s);
  const keep = Math.ceil(300 / Math.max(config.sample_every, 0.01));
  if (board.history.length > keep) board.history.splice(0, board.history.length - keep);
  draw(board);
}

function updateControls(board, view) {
  const box = board.controls;
  if (!view.controls) { box.replaceChildren(); return; }
  if (box.childElementCount) return;
  for (const action of ["stop", "abort"]) {
    const button = el("button", { class: action, "data-action": action }, action);
    button.addEventListener("click", () => control(view.id, action));
    box.append(button);
  }
}

async function control(id, action) {
  let key = token || sessionStorage.getItem("bergtalzug-token") || prompt("Token for the controls");
  if (!key) return;
  const answer = await fetch(`api/pipelines/${id}/${action}`, { method: "POST", headers: { Authorization: "Bearer " + key } });
  if (answer.ok) sessionStorage.setItem("bergtalzug-token", key);
  else { sessionStorage.removeItem("bergtalzug-token"); alert(await answer.text()); }
}

function draw(board) {
  const h = board.history;
  const names = board.view.stages.map(s => s.name);
  const perStage = (key) => names.map((name, i) => ({ name, values: h.map(s => s[key][i]) }));
  chart(board.el, "throughput", h, perStage("stage_per_s"));
  chart(board.el, "queues", h, perStage("queued"));
  chart(board.el, "latency", h, ["p50", "p90", "p99"].map(k => ({ name: k, values: h.map(s => s[k]) })), dur);
  chart(board.el, "failures", h, [{ name: "failed/s", values: h.map(s => s.failed_per_s) }]);
}

// A line chart on a canvas: time on x (the samples' t), zero-based y.
function chart(root, key, history, series, format) {
  const canvas = root.querySelector(`[data-chart="${key}"]`);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300, height = canvas.clientHeight || 150;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.setAttribute("data-points", String(history.length));
  const max = Math.max(0, ...series.flatMap(s => s.values.filter(v => v !== null)));
  canvas.setAttribute("data-max", String(max));
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.font = "11px system-ui, sans-serif";
  const left = 52, right = 8, top = 16, bottom = 18;
  const w = width - left - right, hh = height - top - bottom;
  g.strokeStyle = "#dde1e8";
  g.fillStyle = "#6b7385";
  const show = format || (v => rate(v));
  for (let i = 0; i <= 2; i++) {
    const y = top + hh - hh * i / 2;
    g.beginPath(); g.moveTo(left, y); g.lineTo(left + w, y); g.stroke();
    g.fillText(show(max * i / 2), 2, y + 4);
  }
  if (history.length === 0) { g.fillText("waiting for samples", left + 8, top + hh / 2); return; }
  const t0 = history[0].t, t1 = Math.max(history[history.length - 1].t, t0 + 1e-9);
  g.fillText(dur(t0), left, height - 4);
  const end = dur(t1);
  g.fillText(end, left + w - g.measureText(end).width, height - 4);
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    g.strokeStyle = color;
    g.lineWidth = 1.6;
    g.beginPath();
    let started = false;
    s.values.forEach((v, j) => {
      if (v === null || v === undefined) return;
      const x = left + w * (history[j].t - t0) / (t1 - t0);
      const y = top + hh - (max > 0 ? hh * v / max : 0);
      if (started) g.lineTo(x, y); else { g.moveTo(x, y); started = true; }
    });
    g.stroke();
    g.fillStyle = color;
    g.fillText(s.name, left + 4 + i * 70, 11);
  });
}

function receive(message, fresh) {
  config = message;
  const main = document.getElementById("pipelines");
  if (fresh) { boards.clear(); main.replaceChildren(); }
  for (const view of message.pipelines) {
    let board = boards.get(view.id);
    if (!board) {
      board = build(view);
      boards.set(view.id, board);
      if (main.querySelector(".empty")) main.replaceChildren();
      main.append(board.el);
    }
    update(board, view);
  }
  if (boards.size === 0 && !main.querySelector(".empty")) {
    main.append(el("p", { class: "empty" }, "No pipeline is watched yet."));
  }
}

function connect() {
  const link = document.getElementById("link");
  const events = new EventSource("api/events");
  events.addEventListener("hello", e => {
    link.textContent = "live"; link.setAttribute("data-state", "live");
    receive(JSON.parse(e.data), true);
  });
  events.addEventListener("tick", e => receive(JSON.parse(e.data), false));
  events.onerror = () => {
    // The browser reconnects by itself; a new hello starts over.
    link.textContent = "reconnecting…"; link.setAttribute("data-state", "lost");
  };
}

connect();
