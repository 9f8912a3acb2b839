// The live dashboard: one column per backend, built from the service's "hello" event and updated by each
// "sample" event of /dashboard/events (server-sent events from the service's sampler buffer; no polling).
"use strict";

const TITLES = { bullmq: "BullMQ", streams: "Redis Streams", kafka: "Kafka" };
const BROKERS = { redis: "Redis", kafka: "Kafka" };
const KEEP = 600; // points per chart: the sampler's 10 minutes
const board = { hello: null, columns: {}, last: {}, lastGood: {} };
window.labkitDashboard = board; // read by the browser tests

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "on") for (const [type, fn] of Object.entries(value)) node.addEventListener(type, fn);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function table(caption, headers, numeric = []) {
  const body = el("tbody");
  const head = el("tr", {}, ...headers.map((h, i) => el("th", { scope: "col", class: numeric.includes(i) ? "num" : "", text: h })));
  return { node: el("table", {}, el("caption", { class: "sr-only", text: caption }), el("thead", {}, head), body), body };
}

function fill(body, rows, columns, empty, numeric = []) {
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { colspan: String(columns), class: "empty", text: empty })));
    return;
  }
  for (const cells of rows) {
    body.append(el("tr", {}, ...cells.map((c, i) =>
      el("td", { class: numeric.includes(i) ? "num" : "" }, c instanceof Node ? c : String(c ?? "–")))));
  }
}

// A panel shows the last good sample, or (fromLatest: broker health) the newest one, good or not: a broker that
// does not answer is news, not stale data. Either way it greys out once its sample is three periods old.
function panel(column, key, title, fromLatest = false) {
  const updated = el("span", { class: "updated", "data-updated": key, text: "no sample yet" });
  const node = el("div", { class: "panel", "data-panel": key }, el("h3", {}, el("span", { text: title }), updated));
  column.panels.push({ node, updated, fromLatest });
  column.section.append(node);
  return node;
}

function short(id) {
  return id.length <= 14 ? id : `${id.slice(0, 12)}…`;
}

function seconds(s) {
  return s < 1 ? "now" : s < 90 ? `${Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`;
}

function chart(container, label, color) {
  const width = Math.max(container.clientWidth, 200);
  const opts = {
    width, height: 120, legend: { show: false }, cursor: { show: false },
    scales: { x: { time: true } },
    series: [{}, { label, stroke: color, width: 2, fill: color + "22" }],
    axes: [{ size: 28 }, { size: 40 }],
  };
  return new uPlot(opts, [[], []], container);
}

function build(hello) {
  board.hello = hello;
  const main = document.getElementById("columns");
  main.replaceChildren();
  for (const name of hello.backends) {
    const section = el("section", { class: "backend", id: `backend-${name}`, "aria-labelledby": `title-${name}` });
    const column = { name, section, panels: [], series: { at: [], throughput: [], backlog: [] } };
    section.append(el("h2", { id: `title-${name}`, text: TITLES[name] || name }));
    column.broker = el("p", { class: "broker", role: "status", "data-broker": name, text: "waiting for the first sample…" });
    section.append(column.broker);

    const health = table(`${TITLES[name]} broker health`, ["Broker", "Answers", "Server", "Round trip"], [3]);
    column.health = health.body;
    const holds = Object.entries(hello.brokers[name]).map(([b, word]) => `${BROKERS[b] || b}: ${word}`).join("; ");
    panel(column, "health", "Broker health", true).append(health.node, el("p", { class: "word", text: holds }));

    const states = table(`${TITLES[name]} states`, ["State", "Count", `${TITLES[name]}'s word`], [1]);
    column.states = states.body;
    panel(column, "states", "States").append(states.node);

    const through = panel(column, "throughput", "Throughput (completed/s)");
    column.throughputBox = el("div", { class: "chart", role: "img", "aria-label": "throughput chart" });
    through.append(column.throughputBox);
    const backlog = panel(column, "backlog", name === "kafka" ? "Backlog (consumer lag)" : "Backlog");
    column.backlogBox = el("div", { class: "chart", role: "img", "aria-label": "backlog chart" });
    backlog.append(column.backlogBox);

    const workers = panel(column, "workers", `Workers (${hello.terms[name].worker})`);
    if (hello.scalable) {
      column.scaleNote = el("span", { class: "note", role: "status" });
      const button = (change, text) => el("button", { type: "button", "data-scale": String(change), text,
        on: { click: () => scale(column, change) } });
      column.scaleButtons = [button(1, "+1 worker"), button(-1, "−1 worker")];
      workers.append(el("div", { class: "controls" }, ...column.scaleButtons, column.scaleNote));
    }
    const workerTable = table(`${TITLES[name]} workers`, ["Worker", "Last seen", "Detail"]);
    column.workers = workerTable.body;
    workers.append(workerTable.node, el("p", { class: "word", text: `alive: ${hello.terms[name].alive}` }));

    if (name === "kafka") {
      const parts = table("Kafka partitions", ["Partition", "Owner", "Lag"], [2]);
      column.partitions = parts.body;
      panel(column, "partitions", "Partitions").append(el("div", { class: "scroll" }, parts.node));
    }
    if (name === "streams") {
      const pending = table("Streams pending entries", ["Entry", "Consumer", "Idle", "Deliveries"], [2, 3]);
      column.pending = pending.body;
      panel(column, "pending", "Pending entries (XPENDING)").append(el("div", { class: "scroll" }, pending.node));
    }
    const bookings = table(`${TITLES[name]} recent bookings`, ["Booking", "State", "Progress", "Changed"]);
    column.bookings = bookings.body;
    panel(column, "bookings", "Recent bookings").append(el("div", { class: "scroll" }, bookings.node));

    const letters = table(`${TITLES[name]} dead letters`, ["Booking", "Reason", "Attempts", "Replay"], [2]);
    column.letters = letters.body;
    column.lettersNote = el("span", { class: "note", role: "status" });
    const dead = panel(column, "dead-letters", "Dead letters");
    dead.append(el("div", { class: "scroll" }, letters.node), column.lettersNote);

    main.append(section);
    board.columns[name] = column;
    column.throughputChart = chart(column.throughputBox, "completed/s", "#1f7a4d");
    column.backlogChart = chart(column.backlogBox, "backlog", "#b45309");
    for (const point of hello.series[name] || []) push(column, point);
    draw(column);
  }
  tick();
}

function push(column, point) {
  const s = column.series;
  s.at.push(point.at); s.throughput.push(point.throughput); s.backlog.push(point.backlog);
  if (s.at.length > KEEP) for (const key of Object.keys(s)) s[key].shift();
}

function draw(column) {
  const s = column.series;
  column.throughputChart.setData([s.at, s.throughput]);
  column.backlogChart.setData([s.at, s.backlog]);
  const last = (values) => values.length ? values[values.length - 1] : null;
  column.throughputBox.setAttribute("aria-label", `throughput chart, ${s.at.length} points, latest ${last(s.throughput) ?? "–"} completed/s`);
  column.backlogBox.setAttribute("aria-label", `backlog chart, ${s.at.length} points, latest ${last(s.backlog) ?? "–"}`);
}

function update(sample) {
  const column = board.columns[sample.backend];
  if (!column) return;
  board.last[sample.backend] = sample;
  fill(column.health, sample.brokers.map((b) => [BROKERS[b.broker] || b.broker,
    el("span", { "data-answers": b.broker, class: b.answers ? "" : "down", text: b.answers ? "yes" : `no: ${b.error}` }),
    b.server ?? "–", b.round_trip_ms === null ? "–" : `${b.round_trip_ms.toFixed(1)} ms`]), 4, "", [3]);
  if (!sample.ok) {
    column.broker.textContent = `broker not answering: ${sample.error}`;
    column.broker.classList.add("down");
    tick();
    return;
  }
  board.lastGood[sample.backend] = sample;
  column.broker.textContent = "broker answering";
  column.broker.classList.remove("down");
  const words = board.hello.words[sample.backend];
  fill(column.states, board.hello.states.filter((s) => words[s] !== null).map((s) => {
    const count = el("span", { "data-count": s, text: String(sample.states[s] ?? "–") });
    return [s, count, el("span", { class: "word", text: words[s] })];
  }), 3, "", [1]);
  const now = Date.now() / 1000;
  fill(column.workers, sample.workers.map((w) => [w.id, seconds(now - w.last_seen), w.detail]), 3, "no live worker");
  if (column.partitions) {
    fill(column.partitions, sample.partitions.map((p) => [p.partition, p.owner ?? "nobody", p.lag]), 3, "no partitions yet", [2]);
  }
  if (column.pending) {
    fill(column.pending, sample.pending.map((e) => [e.id, e.consumer, `${(e.idle_ms / 1000).toFixed(1)} s`, e.deliveries]),
      4, "nothing pending", [2, 3]);
  }
  const bookingWords = board.hello.booking_words[sample.backend];
  fill(column.bookings, sample.bookings.map((b) => [
    el("span", { "data-booking": b.booking_id, title: b.booking_id, text: short(b.booking_id) }),
    el("span", {}, el("span", { "data-state": b.state ?? "expired", text: b.state ?? "expired" }),
      el("br"), el("span", { class: "word", text: bookingWords[b.state] ?? "no status record" })),
    el("span", {}, el("progress", { max: "100", value: String(b.progress), "aria-label": `${b.booking_id}: ${b.progress} %` }),
      ` ${b.progress} %${b.step ? " " + b.step : ""}`),
    seconds(now - b.updated_at)]), 4, "none yet: post bookings to the service");
  fill(column.letters, sample.dead_letters.map((d) => [d.booking_id ?? "(not a booking)", d.reason, d.attempts,
    d.booking_id ? el("button", { type: "button", "data-replay": d.booking_id, text: "Replay",
      "aria-label": `replay ${d.booking_id}`, on: { click: () => replay(column, d.booking_id) } }) : "–"]),
    4, "none", [2]);
  if (sample.dead_letter_count > sample.dead_letters.length) {
    column.lettersNote.textContent = `the newest ${sample.dead_letters.length} of ${sample.dead_letter_count}`;
  }
  push(column, sample);
  draw(column);
  tick();
}

function tick() {
  if (!board.hello) return;
  const now = Date.now() / 1000;
  const staleAfter = 3 * board.hello.every_s;
  for (const [name, column] of Object.entries(board.columns)) {
    const ageOf = (sample) => sample ? now - sample.at : Infinity;
    const stale = ageOf(board.lastGood[name]) > staleAfter + 0.5;
    column.section.dataset.stale = String(stale);
    for (const p of column.panels) {
      const sample = p.fromLatest ? board.last[name] : board.lastGood[name];
      p.node.classList.toggle("stale", ageOf(sample) > staleAfter + 0.5);
      p.updated.textContent = sample ? `updated ${seconds(ageOf(sample))}` : "no sample yet";
    }
  }
}

async function post(url, body) {
  const answer = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(data.error || `HTTP ${answer.status}`);
  return data;
}

async function scale(column, change) {
  column.scaleButtons.forEach((b) => { b.disabled = true; });
  column.scaleNote.textContent = change > 0 ? "starting a worker…" : "stopping a worker…";
  try {
    const answer = await post(`/dashboard/workers/${column.name}`, { change });
    column.scaleNote.textContent = `workers: ${answer.workers.join(", ") || "none"}`;
  } catch (error) {
    column.scaleNote.textContent = error.message;
  } finally {
    column.scaleButtons.forEach((b) => { b.disabled = false; });
  }
}

async function replay(column, bookingId) {
  column.lettersNote.textContent = `replaying ${bookingId}…`;
  try {
    const answer = await post("/api/dead-letters/replay", { backend: column.name, booking_ids: [bookingId] });
    const skipped = answer.skipped.map((s) => `${s.booking_id}: ${s.reason}`).join("; ");
    column.lettersNote.textContent = `replayed ${answer.replayed}` + (skipped ? `; skipped ${skipped}` : "");
  } catch (error) {
    column.lettersNote.textContent = error.message;
  }
}

const connection = document.getElementById("connection");
const source = new EventSource("/dashboard/events");
source.addEventListener("hello", (event) => build(JSON.parse(event.data)));
source.addEventListener("sample", (event) => update(JSON.parse(event.data)));
source.addEventListener("open", () => { connection.textContent = "live: connected to the service"; connection.classList.remove("down"); });
source.addEventListener("error", () => { connection.textContent = "the service is not answering; reconnecting…"; connection.classList.add("down"); });
setInterval(tick, 500);
