// The GatheRing dashboard: connect, watch live events, filter, publish, server stats.
// No framework, no build step, no external resource. Query parameters (all optional):
//   ?url=ws://host:port/ws/dashboard  &client_id=NAME  &autoconnect=0  &max=100  &stats_ms=2000
import {
  EVENT_TYPE_PATTERN,
  GatheringSocket,
  PATTERN_PATTERN,
  Status,
  defaultUrl,
  matchesFilters,
} from "/static/gathering-ws.js";

const EVENT_TYPES = [
  "agent.started", "agent.stopped", "agent.task.assigned", "agent.task.completed",
  "agent.task.failed", "agent.tool.executed", "memory.created", "memory.shared",
  "memory.recalled", "circle.created", "circle.started", "circle.stopped",
  "circle.member.added", "circle.member.removed", "task.created", "task.assigned",
  "task.started", "task.completed", "task.failed", "task.conflict.detected",
  "conversation.message", "conversation.turn.complete", "system.error", "system.warning",
];
const MAX_DATA_CHARS = 4000;
const MAX_TOASTS = 4;
const TOAST_MS = 8000;
const MAX_CLIENT_ROWS = 20;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const el = {
  status: $("status"), statusText: $("status-text"), notice: $("notice"), noticeText: $("notice-text"),
  connectForm: $("connect-form"), url: $("url"), clientId: $("client-id"), token: $("token"),
  disconnect: $("disconnect"),
  filterForm: $("filter-form"), filterTypes: $("filter-types"), filterCircle: $("filter-circle"),
  filterProject: $("filter-project"), filterError: $("filter-error"), filterClear: $("filter-clear"),
  activeFilters: $("active-filters"),
  publishForm: $("publish-form"), publishType: $("publish-type"), publishData: $("publish-data"),
  publishSource: $("publish-source"), publishCircle: $("publish-circle"), publishProject: $("publish-project"),
  publishError: $("publish-error"), publishResult: $("publish-result"), publishSubmit: $("publish-submit"),
  notifyTypes: $("notify-types"), toasts: $("toasts"),
  events: $("events"), eventsEmpty: $("events-empty"), eventCount: $("event-count"),
  maxRows: $("max-rows"), pause: $("pause"), clear: $("clear-events"),
  statActive: $("stat-active"), statTotal: $("stat-total"), statSent: $("stat-sent"),
  statBroadcasts: $("stat-broadcasts"), statClients: $("stat-clients"), statsNote: $("stats-note"),
};

let client = null;
let clientToken = null; // the token `client` was made with
let received = 0;
let paused = false;
let queue = []; // rows waiting for the next animation frame, oldest first, at most maxRows
let frameRequested = false;
let countdownTimer = null;

const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hour12: false,
});

// Helpers

function parseId(text) {
  const value = text.trim();
  if (value === "") return null;
  if (/^-?\d+$/.test(value) && Number.isSafeInteger(Number(value))) return Number(value);
  return value;
}

function parsePatterns(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function maxRows() {
  return Number(el.maxRows.value) || 50;
}

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child); // text stays text: no HTML injection
  return node;
}

function formatTime(timestamp) {
  const moment = new Date(timestamp);
  return Number.isNaN(moment.getTime()) ? String(timestamp ?? "") : timeFormat.format(moment);
}

function jsonText(value, limit = MAX_DATA_CHARS, { oneLine = false } = {}) {
  let text;
  try {
    // One line when short ({ "a": 1, "b": 2 }), indented when long.
    text = JSON.stringify(value ?? {}, null, 1).replace(/\n\s*/g, " ");
    if (text.length > 100 && !oneLine) text = JSON.stringify(value, null, 2);
  } catch {
    text = String(value);
  }
  return text.length > limit ? `${text.slice(0, limit)}… (${text.length - limit} more characters)` : text;
}

function showNotice(text) {
  el.noticeText.textContent = text;
  el.notice.hidden = false;
}

// Status

function renderStatus(s) {
  clearInterval(countdownTimer);
  countdownTimer = null;
  el.status.dataset.state = s.status;
  el.statusText.replaceChildren();
  switch (s.status) {
    case Status.CONNECTING:
      el.statusText.textContent = s.retries ? `Connecting (attempt ${s.retries})…` : "Connecting…";
      break;
    case Status.CONNECTED:
      el.statusText.textContent = `Connected as ${s.clientId}`;
      break;
    case Status.RECONNECTING: {
      const seconds = h("span", { "aria-live": "off" });
      const of = Number.isFinite(s.maxRetries) ? ` of ${s.maxRetries}` : "";
      el.statusText.append("Reconnecting in ", seconds, ` s (attempt ${s.retries}${of})`);
      const tick = () => {
        seconds.textContent = String(Math.max(0, Math.ceil((s.retryAt - Date.now()) / 1000)));
      };
      tick();
      countdownTimer = setInterval(tick, 250);
      break;
    }
    default: {
      let text = "Disconnected";
      if (s.code && s.code !== 1000) text += `: ${s.code}${s.reason ? ` ${s.reason}` : ""}`;
      if (s.gaveUp && s.code !== 1008) text += " — gave up; press Connect to retry";
      el.statusText.textContent = text;
    }
  }
  el.disconnect.disabled = s.status === Status.DISCONNECTED;
  el.publishSubmit.disabled = s.status !== Status.CONNECTED;
}

// Events: queued, rendered once per animation frame, DOM capped to maxRows

function enqueue(row) {
  queue.push(row);
  const cap = maxRows();
  if (queue.length > cap) queue = queue.slice(-cap);
  if (!frameRequested && !paused) {
    frameRequested = true;
    requestAnimationFrame(flush);
  }
}

function flush() {
  frameRequested = false;
  if (paused) return;
  if (queue.length) {
    const fragment = document.createDocumentFragment();
    for (let i = queue.length - 1; i >= 0; i -= 1) fragment.append(renderRow(queue[i]));
    queue = [];
    el.events.prepend(fragment);
    const cap = maxRows();
    while (el.events.childElementCount > cap) el.events.lastElementChild.remove();
  }
  renderCount();
}

function renderCount() {
  const shown = el.events.childElementCount;
  el.eventsEmpty.hidden = shown > 0;
  const waiting = paused && queue.length ? ` · paused, ${queue.length} waiting` : "";
  el.eventCount.textContent = `${received} received · showing ${shown}${waiting}`;
}

function renderRow(row) {
  const { message, system, text } = row;
  const type = message.type;
  const meta = [];
  if (message.seq != null) meta.push(`#${message.seq}`);
  if (message.source_agent_id != null) meta.push(`agent ${message.source_agent_id}`);
  if (message.circle_id != null) meta.push(`circle ${message.circle_id}`);
  if (message.project_id != null) meta.push(`project ${message.project_id}`);
  const family = system ? "system" : type.split(".")[0];
  const bad = /(^|\.)(failed|error)$/.test(type) || type === "error";
  return h(
    "li",
    {
      className: `event${system ? " system" : ""}${bad ? " bad" : ""}`,
      dataset: { type, family, testid: system ? "system-row" : "event-row", seq: message.seq ?? "" },
    },
    h(
      "div",
      { className: "event-head" },
      h("span", { className: "event-type" }, type),
      text ? h("span", { className: "event-text" }, text) : null,
      meta.length ? h("span", { className: "event-meta" }, meta.join(" · ")) : null,
      h("time", { className: "event-time", dateTime: message.timestamp ?? "", title: message.timestamp ?? "" },
        formatTime(message.timestamp)),
    ),
    h("pre", { className: "event-data" }, jsonText(message.data, MAX_DATA_CHARS, { oneLine: system })),
  );
}

function systemRow(type, text, data = {}) {
  enqueue({ system: true, text, message: { type, data, timestamp: new Date().toISOString() } });
}

// Notifications

function maybeToast(event) {
  const patterns = parsePatterns(el.notifyTypes.value).filter((p) => PATTERN_PATTERN.test(p));
  if (!patterns.length || !matchesFilters({ event_types: patterns }, event)) return;
  const close = h("button", { type: "button", className: "link", "aria-label": "Dismiss" }, "✕");
  const toast = h(
    "div",
    { className: "toast", dataset: { testid: "toast", type: event.type } },
    h("div", {}, h("strong", {}, event.type), h("p", {}, jsonText(event.data, 160, { oneLine: true }))),
    close,
  );
  close.addEventListener("click", () => toast.remove());
  el.toasts.append(toast);
  while (el.toasts.childElementCount > MAX_TOASTS) el.toasts.firstElementChild.remove();
  setTimeout(() => toast.remove(), TOAST_MS);
}

// Filters

function filtersText(f) {
  if (!f) return "Server filter: everything";
  const types = f.event_types && !(f.event_types.length === 1 && f.event_types[0] === "*")
    ? f.event_types.join(", ") : "all types";
  const circle = f.circle_id == null ? "any circle" : `circle ${f.circle_id}`;
  const project = f.project_id == null ? "any project" : `project ${f.project_id}`;
  return `Server filter: ${types} · ${circle} · ${project}`;
}

function readFilters() {
  const patterns = parsePatterns(el.filterTypes.value);
  const bad = patterns.filter((p) => !PATTERN_PATTERN.test(p));
  if (bad.length) throw new Error(`invalid event type pattern ${JSON.stringify(bad[0])}: use *, task.* or task.created`);
  const filters = {
    event_types: patterns.length ? patterns : null,
    circle_id: parseId(el.filterCircle.value),
    project_id: parseId(el.filterProject.value),
  };
  return filters.event_types || filters.circle_id != null || filters.project_id != null ? filters : null;
}

async function applyFilters(filters) {
  el.filterError.textContent = "";
  el.filterTypes.removeAttribute("aria-invalid");
  if (!client) return;
  try {
    const ack = filters ? await client.subscribe(filters) : await client.unsubscribe();
    if (ack === null) el.activeFilters.textContent = `${filtersText(filters)} (sent when connected)`;
  } catch (error) {
    el.filterError.textContent = error.message;
  }
}

el.filterForm.addEventListener("submit", (e) => {
  e.preventDefault();
  let filters;
  try {
    filters = readFilters();
  } catch (error) {
    el.filterError.textContent = error.message;
    el.filterTypes.setAttribute("aria-invalid", "true");
    return;
  }
  applyFilters(filters);
});

el.filterClear.addEventListener("click", () => {
  el.filterTypes.value = "";
  el.filterCircle.value = "";
  el.filterProject.value = "";
  applyFilters(null);
});

// Publish

function checkPublishData() {
  const text = el.publishData.value.trim() || "{}";
  let data;
  try {
    data = JSON.parse(text);
  } catch (error) {
    throw new Error(`data is not valid JSON: ${error.message}`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) {
    throw new Error(`data must be a JSON object like {"key": "value"}, not ${Array.isArray(data) ? "an array" : JSON.stringify(data)}`);
  }
  return data;
}

function validatePublish() {
  const type = el.publishType.value.trim();
  const problems = [];
  let data = null;
  el.publishType.toggleAttribute("aria-invalid", !EVENT_TYPE_PATTERN.test(type));
  if (!EVENT_TYPE_PATTERN.test(type)) {
    problems.push(`event type ${JSON.stringify(type)} must be dotted lowercase words like task.created`);
  }
  try {
    data = checkPublishData();
    el.publishData.removeAttribute("aria-invalid");
  } catch (error) {
    el.publishData.setAttribute("aria-invalid", "true");
    problems.push(error.message);
  }
  el.publishError.textContent = problems.join("; ");
  return problems.length ? null : { type, data };
}

el.publishData.addEventListener("input", validatePublish);
el.publishType.addEventListener("input", validatePublish);

el.publishForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  el.publishResult.textContent = "";
  const checked = validatePublish();
  if (!checked) return;
  if (!client?.connected) {
    el.publishError.textContent = "not connected: connect first";
    return;
  }
  try {
    const ack = await client.publish({
      ...checked,
      source_agent_id: parseId(el.publishSource.value),
      circle_id: parseId(el.publishCircle.value),
      project_id: parseId(el.publishProject.value),
    });
    el.publishResult.textContent = `Published ${ack.event_id} (seq ${ack.seq})`;
  } catch (error) {
    el.publishError.textContent = `${error.code ? `${error.code}: ` : ""}${error.message}`;
  }
});

// Connection

function createClient() {
  const socket = new GatheringSocket({
    url: el.url.value.trim(),
    clientId: el.clientId.value.trim() || null,
    token: el.token.value.trim() || null, // sent in the first frame, never in the URL
    maxRetries: Infinity, // a dashboard left open should come back by itself
    autoConnect: false,
    filters: readFiltersQuietly(),
  });
  socket.on("status", renderStatus);
  socket.on("event", (event) => {
    received += 1;
    enqueue({ message: event });
    maybeToast(event);
  });
  socket.on("message", (message) => {
    if (message.type === "connection.established") {
      el.clientId.value = message.data?.client_id ?? el.clientId.value;
      systemRow(message.type, `✓ ${message.data?.message ?? "connected"}`, message.data);
      refreshStats();
    } else if (message.type === "subscribed") {
      el.activeFilters.textContent = filtersText(message.data);
    }
  });
  socket.on("restart", ({ previousEpoch, epoch }) => {
    const text =
      "The server restarted: events it published before the restart that this page had not " +
      "received are lost. Showing events from the restart on.";
    showNotice(text);
    systemRow("server.restarted", "⚠ server restarted", { previous_epoch: previousEpoch, epoch });
  });
  socket.on("resumed", (ack) => {
    if (ack.gap) {
      showNotice("Some events were missed while disconnected: the server no longer has them.");
    }
    if (ack.count || ack.gap) {
      systemRow("resumed", `↻ ${ack.count} missed event${ack.count === 1 ? "" : "s"} replayed`, ack);
    }
  });
  socket.on("error", (error) => systemRow("error", `⚠ ${error.message}`, { code: error.code ?? null }));
  return socket;
}

function readFiltersQuietly() {
  try {
    return readFilters();
  } catch {
    return null;
  }
}

function connect() {
  const url = el.url.value.trim();
  const clientId = el.clientId.value.trim() || null;
  const token = el.token.value.trim() || null;
  try {
    const same = client && client.url === new URL(url).href && clientToken === token;
    if (same && (!clientId || client.clientId === clientId)) {
      client.connect(); // same server and id: keeps seq/epoch, so missed events are replayed
      return;
    }
    client?.close();
    client = createClient();
    clientToken = token;
    client.connect();
  } catch (error) {
    renderStatus({ status: Status.DISCONNECTED, reason: error.message });
    el.statusText.textContent = `Disconnected: ${error.message}`;
  }
}

el.connectForm.addEventListener("submit", (e) => {
  e.preventDefault();
  connect();
});
el.disconnect.addEventListener("click", () => client?.close());
$("notice-close").addEventListener("click", () => {
  el.notice.hidden = true;
});

// Event list controls

el.maxRows.addEventListener("change", () => {
  const cap = maxRows();
  while (el.events.childElementCount > cap) el.events.lastElementChild.remove();
  renderCount();
});
el.pause.addEventListener("click", () => {
  paused = !paused;
  el.pause.setAttribute("aria-pressed", String(paused));
  el.pause.textContent = paused ? "Resume" : "Pause";
  if (!paused) flush();
  else renderCount();
});
el.clear.addEventListener("click", () => {
  queue = [];
  received = 0;
  el.events.replaceChildren();
  renderCount();
});

// Stats

function statsUrl() {
  try {
    const url = new URL(el.url.value.trim());
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.pathname = "/admin/websocket/stats";
    url.search = "";
    return url.href;
  } catch {
    return null;
  }
}

let statsBusy = false;
let statsAgain = false; // asked again while a fetch was out: its answer may predate the change
async function refreshStats() {
  const url = statsUrl();
  if (!url) return;
  if (statsBusy) {
    statsAgain = true;
    return;
  }
  statsBusy = true;
  statsAgain = false;
  try {
    const token = el.token.value.trim();
    const headers = token ? { Authorization: `Bearer ${token}` } : {}; // needs the admin role
    const response = await fetch(url, { cache: "no-store", headers, signal: AbortSignal.timeout(5000) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderStats(await response.json());
    el.statsNote.textContent = `Updated ${timeFormat.format(new Date())}`;
  } catch (error) {
    el.statsNote.textContent = `Stats unavailable (${error.message})`;
  } finally {
    statsBusy = false;
    if (statsAgain) refreshStats();
  }
}

function renderStats(stats) {
  el.statActive.textContent = stats.active_connections ?? "–";
  el.statTotal.textContent = stats.total_connections ?? "–";
  el.statSent.textContent = stats.total_messages_sent ?? "–";
  el.statBroadcasts.textContent = stats.total_broadcasts ?? "–";
  const clients = stats.clients ?? [];
  const rows = clients.slice(0, MAX_CLIENT_ROWS).map((c) =>
    h("tr", { dataset: { clientId: c.client_id } },
      h("td", { title: `connected at ${c.connected_at}` }, c.client_id),
      h("td", {}, String(c.messages_sent ?? "")),
      h("td", {}, String(c.messages_received ?? ""))));
  if (clients.length > MAX_CLIENT_ROWS) {
    rows.push(h("tr", {}, h("td", { colSpan: 3 }, `… and ${clients.length - MAX_CLIENT_ROWS} more`)));
  }
  el.statClients.replaceChildren(...rows);
}

// Start

function init() {
  const datalist = $("event-types");
  datalist.replaceChildren(...EVENT_TYPES.map((t) => h("option", { value: t })));
  el.url.value = params.get("url") ?? defaultUrl();
  el.clientId.value = params.get("client_id") ?? `dashboard-${Math.random().toString(16).slice(2, 8)}`;
  const max = params.get("max");
  if (max && /^\d+$/.test(max)) {
    if (![...el.maxRows.options].some((o) => o.value === max)) el.maxRows.append(h("option", { value: max }, max));
    el.maxRows.value = max;
  }
  renderStatus({ status: Status.DISCONNECTED });
  renderCount();
  validatePublish();
  el.publishError.textContent = "";
  const statsMs = Number(params.get("stats_ms") ?? 2000);
  if (statsMs > 0) {
    setInterval(() => {
      if (!document.hidden) refreshStats();
    }, statsMs);
  }
  refreshStats();
  if (params.get("autoconnect") !== "0") connect();
}

// For tests and the browser console.
window.dashboard = {
  get client() {
    return client;
  },
  get received() {
    return received;
  },
  refreshStats,
};

init();
