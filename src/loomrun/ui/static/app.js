// The loomrun page: a live view of one job, drawn from what the server's WebSocket sends
// (frames of the replicas table, the metric history, the change ledger, the schema), and
// controls that POST each change and show its answer from every replica.
// Everything from the server goes into the page as text (textContent), never as HTML.
"use strict";

const MAX_POINTS = 4096;      // per replica on the page; thinned evenly past it
const MAX_RECORDS = 5000;     // ledger records (and markers) a page keeps of its job
const CHART_EVERY_MS = 500;   // curves are redrawn at most this often
const COLORS = ["#3358d4", "#d43d33", "#1f8a4c", "#b7791f", "#7b3fd4", "#0f8a9d",
                "#c2417e", "#5a6b1f", "#d46e33", "#33a0d4"];

const state = {
  job: null, rows: [], metrics: [], list: [], events: [],
  series: {},          // replica -> {step: [], time: [], <metric>: []}
  markers: [],         // applied changes: {replica, name, old, new, step, who, time}
  records: [],         // every ledger record of the job, oldest first
  schema: {},          // replica -> [param]
  charts: {},          // metric -> {plot, replicas}
  frames: 0, chartDraws: 0, lastChart: 0, dirty: false,
  selection: 0,        // counts the page's choices of a job: older answers are dropped
  request: 0,          // counts the controls used: only the latest one's answer is shown
};
window.loomrun = state;  // for a look from the browser's console (and the tests)

const $ = (selector) => document.querySelector(selector);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// -- numbers as `watch` writes them -----------------------------------------------------

function g(value, digits) {  // Python's "%.{digits}g"
  if (typeof value !== "number") return value == null ? "-" : format(value);
  if (!isFinite(value)) return String(value);
  if (value === 0) return "0";
  const exponent = Math.floor(Math.log10(Math.abs(value)));
  if (exponent < -4 || exponent >= digits) {
    return value.toExponential(digits - 1).replace(/\.?0+e/, "e").replace(/e([+-])(\d)$/, "e$10$2");
  }
  return String(parseFloat(value.toFixed(Math.max(0, digits - 1 - exponent))));
}

function rate(value) {
  for (const [limit, suffix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
    if (Math.abs(value) >= limit) return g(value / limit, 3) + suffix;
  }
  return value.toFixed(1);
}

function format(value) {
  if (value === null || value === undefined) return "-";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number") return g(value, 6);
  if (Array.isArray(value)) return "[" + value.map(format).join(", ") + "]";
  return String(value);
}

function age(seconds) {
  if (seconds < 60) return seconds.toFixed(1) + "s";
  if (seconds < 3600) return Math.round(seconds / 60) + "m";
  return (seconds / 3600).toFixed(1) + "h";
}

function color(replica) {
  const index = parseInt(String(replica).slice(1), 10) || 0;
  return COLORS[index % COLORS.length];
}

// -- the live connection ------------------------------------------------------------------

let socket = null;

function connect() {
  socket = new WebSocket(`ws://${location.host}/ws`);
  socket.onopen = () => {
    $("#link").textContent = "live";
    if (state.job) select(state.job);  // its ledger, history and schema are sent again
  };
  socket.onclose = () => {
    $("#link").textContent = "disconnected; retrying…";
    setTimeout(connect, 1000);
  };
  socket.onmessage = (event) => {
    const message = JSON.parse(event.data);
    if (message.type === "frame") { onFrame(message); return; }
    if (message.selection !== state.selection || message.job !== state.job) return;  // a former choice's
    if (message.type === "history") onHistory(message);
    else if (message.type === "changes") onChanges(message);
    else if (message.type === "schema") onSchema(message);
  };
}

function select(job) {
  state.selection += 1;
  state.request += 1;  // an answer still on its way is for the former choice
  delete $("#params").dataset.shape;  // the schema that comes next builds the forms anew
  if (job !== state.job) {
    state.job = job;
    state.series = {}; state.markers = []; state.records = []; state.schema = {};
    for (const chart of Object.values(state.charts)) chart.plot.destroy();
    state.charts = {};
    $("#charts").replaceChildren();
    $("#changes tbody").replaceChildren();
    $("#params").replaceChildren();
    $("#outcome").replaceChildren();
  }
  // The ledger comes again from its first record; the curves are kept (the history that
  // comes again is merged in: a finished job's supervisors no longer answer for it).
  state.markers = []; state.records = [];
  $("#changes tbody").replaceChildren();
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({type: "select", job, selection: state.selection}));
  }
}

function onFrame(message) {
  state.frames += 1;
  state.list = message.list;
  drawJobList(message.list, message.job);
  if (message.job && state.job === null) select(message.job);  // the server's pick, once
  const job = (message.jobs || []).find((j) => j.job === state.job);
  state.rows = job ? job.replicas : [];
  state.metrics = message.metrics || [];
  state.events = message.events || [];
  drawHeader(job);
  drawReplicas();
  drawDevices();
  drawEvents();
  drawTargets();
  for (const row of state.rows) addRow(row);
  scheduleCharts();
}

// -- the job list and header ---------------------------------------------------------------

function drawJobList(list, chosen) {
  const picker = $("#job");
  const names = list.map((j) => j.job);
  const shown = Array.from(picker.options).map((o) => o.value);
  if (names.join() !== shown.join()) {
    picker.replaceChildren(...list.map((j) => el("option", {value: j.job, text: `${j.job} (${j.state})`})));
  }
  picker.value = state.job || chosen || "";
}

function drawHeader(job) {
  const pill = $("#job-state");
  if (!job) { pill.textContent = "no job"; pill.className = "pill"; $("#summary").textContent = ""; return; }
  pill.textContent = job.state;
  pill.className = "pill " + job.state.split(/[: ]/)[0];
  const t = job.totals;
  $("#summary").textContent = `${t.running}/${t.replicas} running · ${rate(t.steps_per_sec)} steps/s · ` +
    `up ${age(job.uptime)} · ${job.hosts.join(", ")} · ${job.script}`;
}

// -- the replicas table: the columns of `watch` -------------------------------------------

const FIXED_HEAD = ["replica", "host", "device", "state", "step", "steps/s"];
const FIXED_TAIL = ["lr", "last change", "gpu", "restarts", "age"];

function gpuText(row) {
  if (row.gpu_util == null) return "-";
  let text = `${Math.round(row.gpu_util)}%`;
  if (row.gpu_mem_total) text += ` ${(row.gpu_mem_used / 2 ** 30).toFixed(1)}/${Math.round(row.gpu_mem_total / 2 ** 30)}G`;
  return text;
}

function stateClass(text) {
  if (text === "running") return "state-running";
  if (text === "paused") return "state-paused";
  if (/^(failed|stale|lost|hung)/.test(text)) return "state-bad";
  return "";
}

// Rows are kept and only the cells whose text changed are written: with 64 replicas at 10
// frames a second, rebuilding the tables would keep the browser busy laying them out.
function updateRows(tbody, rows, key, cellsOf) {
  const kept = new Map(Array.from(tbody.children).map((tr) => [tr.dataset.key, tr]));
  const order = [];
  for (const row of rows) {
    const cells = cellsOf(row);
    let tr = kept.get(row[key]);
    if (!tr || tr.children.length !== cells.length) {
      tr = el("tr", {"data-key": row[key], "data-replica": row.replica});
      for (const [, cls, column] of cells) tr.append(el("td", {class: cls || "", "data-column": column || ""}));
    }
    cells.forEach(([text, cls], i) => {
      const td = tr.children[i];
      if (td.textContent !== text) td.textContent = text;
      if (td.className !== (cls || "")) td.className = cls || "";
    });
    order.push(tr);
  }
  const same = order.length === tbody.children.length && order.every((tr, i) => tbody.children[i] === tr);
  if (!same) tbody.replaceChildren(...order);
}

function drawReplicas() {
  const metrics = state.metrics.filter((m) => !FIXED_HEAD.includes(m) && !FIXED_TAIL.includes(m));
  const head = [...FIXED_HEAD, ...metrics, ...FIXED_TAIL];
  const thead = $("#replicas thead");
  if (thead.dataset.columns !== head.join("|")) {
    thead.dataset.columns = head.join("|");
    thead.replaceChildren(el("tr", {}, ...head.map((h) => el("th", {text: h}))));
    $("#replicas tbody").replaceChildren();
  }
  updateRows($("#replicas tbody"), state.rows, "replica", (row) => {
    const lr = row.lr != null ? row.lr : row.metrics.lr;
    return [
      [row.replica], [row.host], [row.device], [row.state, stateClass(row.state)],
      [String(row.step), "num"], [rate(row.steps_per_sec), "num"],
      ...metrics.map((m) => [g(row.metrics[m], 3), "num"]),
      [g(lr, 4) + ((row.held || []).includes("lr") ? " held" : ""), "num"], [row.last_change || "-"], [gpuText(row)], [String(row.restarts), "num"],
      [age(row.age), "num"],
    ].map(([text, cls], i) => [text, cls, head[i]]);
  });
}

function drawDevices() {
  updateRows($("#devices tbody"), state.rows, "replica", (row) => [
    [row.replica], [row.device], [row.device_uuid || "-"],
    [row.gpu_util == null ? "-" : `${Math.round(row.gpu_util)}%`],
    [row.gpu_mem_total ? `${(row.gpu_mem_used / 2 ** 30).toFixed(1)} / ${(row.gpu_mem_total / 2 ** 30).toFixed(0)} GiB` : "-"],
  ]);
}

function drawEvents() {
  const lines = state.events.map((e) =>
    `${new Date(e.time * 1000).toLocaleTimeString()}  ${e.replica}  ${e.kind}: ${e.text}`);
  const list = $("#events");
  if (list.dataset.shown === lines.join("\n")) return;
  list.dataset.shown = lines.join("\n");
  list.replaceChildren(...lines.map((text) => el("li", {text})));
}

// -- controls --------------------------------------------------------------------------------

function replicasOf() { return state.rows.map((r) => r.replica); }

function drawTargets() {
  const box = $("#targets");
  const names = replicasOf();
  if (box.dataset.replicas === names.join()) return;
  box.dataset.replicas = names.join();
  const all = el("input", {type: "checkbox", id: "target-all"});
  all.checked = true;
  const boxes = names.map((name) => {
    const input = el("input", {type: "checkbox", "data-replica": name, class: "target"});
    input.addEventListener("change", () => { if (input.checked) all.checked = false; });
    return el("label", {}, input, " " + name);
  });
  all.addEventListener("change", () => {
    if (all.checked) box.querySelectorAll("input.target").forEach((i) => { i.checked = false; });
  });
  box.replaceChildren(el("span", {text: "targets:"}), el("label", {}, all, " all"), ...boxes);
}

function chosenReplicas() {
  if ($("#target-all") && $("#target-all").checked) return null;
  const chosen = Array.from(document.querySelectorAll("input.target:checked")).map((i) => i.dataset.replica);
  return chosen.length ? chosen : null;
}

function onSchema(message) {
  state.schema = message.params;
  const shape = JSON.stringify(Object.entries(message.params).map(([r, ps]) =>
    [r, ps.map((p) => [p.name, p.type, p.min, p.max, p.choices, p.doc])]));
  const form = $("#params");
  if (form.dataset.shape === shape) {
    for (const params of Object.values(message.params)) {
      for (const param of params) {
        const field = form.querySelector(`[name="${CSS.escape(param.name)}"]`);
        if (field && document.activeElement !== field && !field.dataset.edited) showValue(field, param.value);
      }
    }
    return;
  }
  form.dataset.shape = shape;
  const merged = new Map();  // name -> {param, replicas}
  for (const [replica, params] of Object.entries(message.params)) {
    for (const param of params) {
      if (!merged.has(param.name)) merged.set(param.name, {param, replicas: []});
      merged.get(param.name).replicas.push(replica);
    }
  }
  const names = Array.from(merged.keys()).sort((a, b) =>
    (merged.get(b).param.builtin - merged.get(a).param.builtin) || a.localeCompare(b));
  $("#params").replaceChildren(...names.map((name) => paramForm(merged.get(name).param)));
}

function inputFor(param) {
  const value = param.value;
  if (param.kind === "enum" || (param.choices && param.choices.length)) {
    const select = el("select", {name: param.name});
    for (const choice of param.choices) {
      const option = el("option", {value: JSON.stringify(choice), text: format(choice)});
      if (JSON.stringify(choice) === JSON.stringify(value)) option.selected = true;
      select.append(option);
    }
    return select;
  }
  if (param.kind === "bool" && !param.is_list) {
    const input = el("input", {type: "checkbox", name: param.name, role: "switch"});
    input.checked = Boolean(value);
    return el("label", {class: "switch"}, input);
  }
  if ((param.kind === "float" || param.kind === "int") && !param.is_list) {
    const input = el("input", {type: "number", name: param.name, step: param.kind === "int" ? "1" : "any"});
    if (param.min != null) input.min = param.min;
    if (param.max != null) input.max = param.max;
    if (value != null) input.value = value;
    return input;
  }
  const input = el("input", {type: "text", name: param.name,
                             placeholder: param.is_list ? "0.9,0.999" : ""});
  if (param.kind === "json") input.dataset.json = "1";
  showValue(input, value);
  return input;
}

function showValue(field, value) {
  if (value == null) return;
  if (field.type === "checkbox") field.checked = Boolean(value);
  else if (field.tagName === "SELECT") field.value = JSON.stringify(value);
  else if (field.dataset.json) field.value = JSON.stringify(value);  // a whole structure
  else field.value = Array.isArray(value) ? value.join(",") : String(value);
}

function valueOf(form, param) {
  const field = form.querySelector(`[name="${CSS.escape(param.name)}"]`);
  if (field.type === "checkbox") return field.checked;
  if (field.tagName === "SELECT") return JSON.parse(field.value);
  return field.value.trim();
}

function paramForm(param) {
  const form = el("div", {class: "param", "data-param": param.name});
  const bounds = [param.min != null ? `min ${param.min}` : "", param.max != null ? `max ${param.max}` : ""]
    .filter(Boolean).join(", ");
  const button = el("button", {type: "button", text: "set"});
  button.addEventListener("click", () => {
    const value = valueOf(form, param);
    delete form.querySelector(`[name="${CSS.escape(param.name)}"]`).dataset.edited;
    if (value === "") { showError(`${param.name}: give a value (${param.type})`); return; }
    post("/api/set", {job: state.job, params: {[param.name]: value}, replicas: chosenReplicas(),
                      force: $("#force").checked});
  });
  const input = inputFor(param);
  input.addEventListener("input", (event) => { event.target.dataset.edited = "1"; });
  form.append(el("span", {class: "name", text: param.name, title: param.type}), input, button,
              el("span", {class: "doc", text: [param.type, bounds, param.doc].filter(Boolean).join(" · ")}));
  return form;
}

function showError(text) {
  $("#outcome").replaceChildren(el("div", {class: "error", text}));
}

async function post(path, body) {
  const mine = ++state.request;
  $("#outcome").replaceChildren(el("div", {text: "waiting for every replica's answer…"}));
  let answer;
  try {
    const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify(body)});
    answer = await response.json();
  } catch (error) {
    if (mine === state.request) showError(`no answer from loomrun ui: ${error}`);
    return;
  }
  if (mine !== state.request) return;  // a later control (or another job) took the panel
  if (answer.error) { showError(answer.error); return; }
  $("#outcome").replaceChildren(...answer.changes.map((c) => {
    const text = `${c.replica}: ${c.text}`;  // the answer as `loomrun set` words it
    return el("div", {class: c.state.split(" ")[0], "data-replica": c.replica, text});
  }));
}

// -- curves ------------------------------------------------------------------------------------

function onHistory(message) {
  for (const [replica, columns] of Object.entries(message.series)) {
    const live = state.series[replica];  // points the page has (frames, an earlier history)
    const series = state.series[replica] = {step: [], time: []};
    columns.step.forEach((step, i) => addPoint(series, step, columns.time[i], valuesAt(columns, i)));
    const last = series.step.length ? series.step[series.step.length - 1] : 0;
    if (live) live.step.forEach((step, i) => {
      if (step > last) addPoint(series, step, live.time[i], valuesAt(live, i));  // newer than it
    });
  }
  scheduleCharts();
}

function valuesAt(columns, i) {  // the metrics of point i of a series' columns
  const values = {};
  for (const [name, column] of Object.entries(columns)) {
    if (name !== "step" && name !== "time" && column[i] !== null) values[name] = column[i];
  }
  return values;
}

function addRow(row) {
  const series = state.series[row.replica] || (state.series[row.replica] = {step: [], time: []});
  const values = {...row.metrics, steps_per_sec: row.steps_per_sec};
  if (typeof row.lr === "number") values.lr = row.lr;
  addPoint(series, row.step, Date.now() / 1000, values);
}

// A point per step, in order of steps: a step at or behind the last one (a restart, from
// scratch or from a checkpoint) drops the points from that step on, as the run went again.
function addPoint(series, step, time, values) {
  if (step <= 0) return;
  const steps = series.step;
  if (steps.length && step <= steps[steps.length - 1]) {
    if (step === steps[steps.length - 1]) return;
    let keep = steps.length;
    while (keep > 0 && steps[keep - 1] >= step) keep -= 1;
    for (const name of Object.keys(series)) series[name].length = Math.min(series[name].length, keep);
  }
  const count = steps.length;
  steps.push(step);
  series.time.push(time);
  for (const [name, value] of Object.entries(values)) {
    if (!series[name]) series[name] = new Array(count).fill(null);
    while (series[name].length < count) series[name].push(null);
    series[name].push(value);
  }
  for (const [name, column] of Object.entries(series)) {
    while (column.length <= count) column.push(null);
  }
  if (steps.length > MAX_POINTS) {
    for (const name of Object.keys(series)) series[name] = series[name].filter((_, i) => i % 2 === 0);
  }
}

function metricNames() {
  const seen = new Set();
  for (const series of Object.values(state.series)) {
    for (const name of Object.keys(series)) if (name !== "step" && name !== "time") seen.add(name);
  }
  const rank = (n) => (n === "loss" ? 0 : n === "lr" ? 1 : n === "steps_per_sec" ? 3 : 2);
  return Array.from(seen).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function scheduleCharts() {
  state.dirty = true;
  const wait = state.lastChart + CHART_EVERY_MS - performance.now();
  if (wait <= 0) requestAnimationFrame(drawCharts);
  else if (!state.chartTimer) state.chartTimer = setTimeout(() => { state.chartTimer = null; requestAnimationFrame(drawCharts); }, wait);
}

function drawCharts() {
  if (!state.dirty) return;
  state.dirty = false;
  state.lastChart = performance.now();
  state.chartDraws += 1;
  const replicas = Object.keys(state.series).sort((a, b) => parseInt(a.slice(1)) - parseInt(b.slice(1)));
  for (const name of metricNames()) {
    const tables = replicas.map((r) => {
      const ys = state.series[r][name] || [];
      // "nan", "inf" and "-inf" are values the script reported, but not ones to draw
      const drawable = (v) => typeof v === "number" && (!logScale[name] || v > 0);
      return [state.series[r].step, state.series[r].step.map((_, i) => (drawable(ys[i]) ? ys[i] : null))];
    });
    const data = tables.length ? uPlot.join(tables) : [[]];
    let chart = state.charts[name];
    if (chart && chart.replicas !== replicas.join()) { chart.plot.destroy(); chart.box.remove(); chart = null; }
    if (!chart) chart = state.charts[name] = makeChart(name, replicas);
    chart.plot.setData(data);
  }
}

const logScale = {loss: true};  // metric -> drawn on a log scale (a loss spans decades)

function makeChart(name, replicas, before = null) {
  const toggle = el("input", {type: "checkbox", "data-log": name});
  toggle.checked = Boolean(logScale[name]);
  toggle.addEventListener("change", () => {
    logScale[name] = toggle.checked;
    const old = state.charts[name];
    state.charts[name] = makeChart(name, replicas, old.box);
    old.plot.destroy();
    old.box.remove();
    state.dirty = true;
    drawCharts();
  });
  const box = el("div", {class: "chart", "data-metric": name},
                 el("h3", {}, name + " ", el("label", {class: "log"}, toggle, " log scale")));
  if (before) before.before(box); else $("#charts").append(box);
  const width = Math.max(300, box.clientWidth || 460);
  const plot = new uPlot({
    width, height: 200,
    scales: {x: {time: false}, y: logScale[name] ? {distr: 3} : {}},
    // the values' own digits on the y axis: an lr of 0.0003 is not "0"
    axes: [{label: "step"}, {size: 70, values: (u, ticks) => ticks.map((v) => g(v, 3))}],
    legend: {live: false},
    cursor: {drag: {x: true, y: false}},
    series: [{label: "step"}, ...replicas.map((r) => ({
      label: r, stroke: color(r), width: 1.5, spanGaps: true, points: {show: false},
      // lr holds its value until a change: drawn as steps, not slopes between samples
      paths: name === "lr" || name.startsWith("lr.") ? uPlot.paths.stepped({align: 1}) : undefined,
    }))],
    plugins: [markerPlugin()],
  }, [[]], box);
  return {plot, box, replicas: replicas.join()};
}

function markerPlugin() {
  return {hooks: {
    draw: [(u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.setLineDash([5, 4]);
      ctx.lineWidth = 1.5 * devicePixelRatio;
      for (const marker of state.markers) {
        const x = Math.round(u.valToPos(marker.step, "x", true));
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        // a rollback: solid; a rule's firing: dotted, where the point met its condition;
        // a copy of another replica's state (an exploit): dash-dot
        ctx.setLineDash(marker.outcome === "fired" ? [1, 3] : marker.name === "rollback" ? []
          : marker.name === "copy" ? [8, 3, 2, 3] : [5, 4]);
        ctx.strokeStyle = color(marker.replica);
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
      }
      ctx.restore();
    }],
    setCursor: [(u) => showTip(u)],
  }};
}

function showTip(u) {
  const tip = $("#tip");
  const left = u.cursor.left;
  if (left == null || left < 0) { tip.hidden = true; return; }
  const near = state.markers.filter((m) => Math.abs(u.valToPos(m.step, "x") - left) <= 5);
  if (!near.length) { tip.hidden = true; return; }
  tip.textContent = near.map((m) => `${m.replica}  ${describe(m)}  at step ${m.step}  (${m.who || "?"})`).join("\n");
  const box = u.over.getBoundingClientRect();
  tip.style.left = `${box.left + left + 12}px`;
  tip.style.top = `${box.top + (u.cursor.top || 0) + 12}px`;
  tip.hidden = false;
}

// Actions on the training state: what each did, from its answer (record.new).
const ACTIONS = {
  rollback: (done) => `rolled back to snapshot ${done.name} (taken at step ${done.step})`,
  snapshot: (done) => `snapshot ${done.name}`,
  save: (done) => `saved ${done.file}`,
  snapshot_every: (done) => (done.every ? `a snapshot every ${done.every} steps` : "periodic snapshots off"),
  share: (done) => `state shared for ${done.target}`,
  copy: (done) => `copied ${done.from}'s state (of step ${done.step})`,
};

function describe(record) {
  if (record.outcome === "fired") return `rule ${record.name} fired: ${record.reason}`;
  if (record.name === "pause") return record.new ? "paused" : "resumed";
  const done = record.new;
  if (ACTIONS[record.name] && done && typeof done === "object") return ACTIONS[record.name](done);
  return partsOf(record).map((p) => `${p.name} ${format(p.old)} → ${format(p.new)}`).join(", ");
}

// A record's parameters: every one of a `set` of several (one change), else its one.
function partsOf(record) {
  if (!Array.isArray(record.parts) || !record.parts.length) return [record];
  const overridden = record.parts.filter((p) => p.overridden);  // the others are in effect
  return record.outcome === "overridden" && overridden.length ? overridden : record.parts;
}

// -- the change ledger ---------------------------------------------------------------------------

function onChanges(message) {
  const body = $("#changes tbody");
  for (const record of message.records) {
    state.records.push(record);
    // a share is drawn by its copy, on the replica that took it
    if (["applied", "overridden", "fired"].includes(record.outcome) && record.name !== "share") state.markers.push(record);
    body.prepend(el("tr", {"data-replica": record.replica, "data-change": record.change_id},
      el("td", {text: new Date(record.time * 1000).toLocaleTimeString()}),
      el("td", {text: record.replica}), el("td", {text: partsOf(record).map((p) => p.name).join(", ")}),
      el("td", {text: record.outcome === "fired" || record.name === "pause" || ACTIONS[record.name] ? describe(record) : partsOf(record).map((p) => `${format(p.old)} → ${format(p.new)}`).join(", ")}),
      el("td", {text: String(record.step), class: "num"}),
      el("td", {text: record.outcome + (record.kind && record.kind !== "set" ? ` (${record.kind})` : "") + (record.reason ? `: ${record.reason}` : "")}),
      el("td", {text: record.who || "?"})));
  }
  while (body.children.length > 500) body.lastChild.remove();
  if (state.records.length > MAX_RECORDS) state.records.splice(0, state.records.length - MAX_RECORDS);
  if (state.markers.length > MAX_RECORDS) state.markers.splice(0, state.markers.length - MAX_RECORDS);
  for (const chart of Object.values(state.charts)) chart.plot.redraw(false);
}

// -- start ------------------------------------------------------------------------------------------

$("#job").addEventListener("change", (event) => select(event.target.value));
$("#pause").addEventListener("click", () => post("/api/pause", {job: state.job, paused: true, replicas: chosenReplicas(), force: $("#force").checked}));
$("#resume").addEventListener("click", () => post("/api/pause", {job: state.job, paused: false, replicas: chosenReplicas(), force: $("#force").checked}));
connect();
