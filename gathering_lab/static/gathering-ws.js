/**
 * gathering-ws.js — a dependency-free browser client for the GatheRing WebSocket protocol.
 *
 *     import { GatheringSocket } from "/static/gathering-ws.js";
 *
 *     const socket = new GatheringSocket({
 *       url: "ws://localhost:8000/ws/dashboard",   // default: this page's host
 *       clientId: "react-dashboard",
 *       onEvent: (event) => console.log(event.type, event.data),
 *       onStatus: (s) => console.log(s.status, s.delayMs),
 *     });
 *     await socket.subscribe({ event_types: ["task.*"], circle_id: 1 });
 *     await socket.publish({ type: "task.created", data: { title: "Write docs" } });
 *     socket.close();
 *
 * What it does for you: reconnects with the guide's backoff (min(1000 * 2^retries, 30000) ms,
 * reset once connected), sends a {"type":"ping"} heartbeat every 30 s and reconnects when no
 * pong comes back, resumes from the last seen `seq` after a reconnect (no event missed or shown
 * twice while the server still has it), re-sends your filters, and tells you when the server
 * restarted (its `epoch` changed) instead of silently carrying on. See docs/js-client.md.
 */

export const VERSION = "0.1.0";
export const WS_PATH = "/ws/dashboard";

/** Connection states reported by the `status` callback. */
export const Status = Object.freeze({
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  DISCONNECTED: "disconnected",
});

/** Custom event types are dotted lowercase words, e.g. `deploy.finished` (as on the server). */
export const EVENT_TYPE_PATTERN = /^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$/;
/** Subscription patterns: `*`, `task.*`, `task.created`. */
export const PATTERN_PATTERN = /^(\*|[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?)$/;

/** Server messages that are not bus events. */
const CONTROL_TYPES = new Set([
  "connection.established",
  "pong",
  "error",
  "subscribed",
  "published",
  "resumed",
  "authenticated",
]);
/** Close code after which reconnecting cannot help: policy (bad origin, client id or token). */
const POLICY_CLOSE = 1008;

/** The dashboard URL of the server that served this page (ws: or wss: to match http: or https:). */
export function defaultUrl(loc = globalThis.location) {
  if (!loc || (loc.protocol !== "http:" && loc.protocol !== "https:")) {
    return `ws://localhost:8000${WS_PATH}`;
  }
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}${WS_PATH}`;
}

/** The guide's reconnect delay: min(baseMs * 2^retries, maxMs) milliseconds. */
export function backoffDelay(retries, baseMs = 1000, maxMs = 30000) {
  return Math.min(baseMs * 2 ** retries, maxMs);
}

/** True if `message` (an event) passes `filters` ({event_types, circle_id, project_id}). */
export function matchesFilters(filters, message) {
  if (!filters) return true;
  if (filters.circle_id != null && message.circle_id !== filters.circle_id) return false;
  if (filters.project_id != null && message.project_id !== filters.project_id) return false;
  const patterns = filters.event_types;
  if (!patterns || patterns.length === 0) return true;
  return patterns.some(
    (p) => p === "*" || p === message.type || (p.endsWith("*") && message.type.startsWith(p.slice(0, -1))),
  );
}

/** An error reply from the server, or a request that could not complete. */
export class GatheringError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "GatheringError";
    this.code = code;
  }
}

function normaliseFilters(filters) {
  if (filters == null) return null;
  let types = filters.event_types ?? null;
  if (typeof types === "string") types = [types];
  if (types !== null) {
    if (!Array.isArray(types) || types.length === 0) {
      throw new TypeError("event_types must be a non-empty list of patterns or null");
    }
    for (const t of types) {
      if (typeof t !== "string" || !PATTERN_PATTERN.test(t)) {
        throw new TypeError(`invalid event type pattern ${JSON.stringify(t)}: expected '*', 'task.*' or 'task.created'`);
      }
    }
  }
  return { event_types: types, circle_id: filters.circle_id ?? null, project_id: filters.project_id ?? null };
}

/**
 * A GatheRing WebSocket connection that stays connected.
 *
 * Options (all optional):
 *   url            ws:// or wss:// URL of /ws/dashboard (default: defaultUrl())
 *   clientId       sent as ?client_id=; default: the id the server assigns, kept across reconnects
 *   token          string, or a (possibly async) function returning one, called before each
 *                  connection; sent as the first frame {"type":"auth","data":{"token":...}},
 *                  never in the URL. A 1008 close is final, except with a token function
 *   maxRetries     reconnect attempts before giving up (default 5, as in the guide; Infinity ok)
 *   baseDelayMs    backoff base (1000) and maxDelayMs cap (30000): delay = min(base * 2^retries, cap)
 *   heartbeatMs    application ping interval (30000; 0 disables); pongTimeoutMs (10000): no pong
 *                  within that time means the connection is dead, so it is dropped and retried
 *   filters        initial {event_types, circle_id, project_id}, sent after every (re)connect
 *   resume         resume from the last seen seq after a reconnect (default true)
 *   lastSeq, epoch where to resume from on the first connect (e.g. saved in sessionStorage)
 *   autoConnect    connect in the constructor (default true); otherwise call connect()
 *   onEvent, onMessage, onStatus, onRestart, onResumed, onError, onClose: callbacks, same as on(name, fn)
 */
export class GatheringSocket {
  constructor(options = {}) {
    const {
      url = defaultUrl(),
      clientId = null,
      token = null,
      maxRetries = 5,
      baseDelayMs = 1000,
      maxDelayMs = 30000,
      heartbeatMs = 30000,
      pongTimeoutMs = 10000,
      filters = null,
      resume = true,
      lastSeq = null,
      epoch = null,
      autoConnect = true,
      WebSocket: WebSocketImpl = globalThis.WebSocket,
    } = options;
    const parsed = new URL(url, globalThis.location?.href);
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`url must start with ws:// or wss://, not ${JSON.stringify(url)}`);
    }
    this.url = parsed.href;
    this.clientId = clientId;
    this.maxRetries = maxRetries;
    this.baseDelayMs = baseDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.heartbeatMs = heartbeatMs;
    this.pongTimeoutMs = pongTimeoutMs;
    this.resumeEnabled = resume;
    /** Highest event seq seen (or the server's seq when we connected), in `epoch`. */
    this.lastSeq = lastSeq;
    /** The server history's epoch; a different one on reconnect means the server restarted. */
    this.epoch = epoch;
    /** Filters the server applies to this client (null: everything). */
    this.filters = normaliseFilters(filters);
    this.status = Status.DISCONNECTED;
    this.retries = 0;
    this._token = token;
    this._WebSocket = WebSocketImpl;
    this._listeners = new Map();
    this._ws = null;
    this._closedByUser = true;
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._requests = []; // FIFO of {type, resolve, reject}: the server answers in order
    this._pings = new Map(); // ping id -> {resolve, reject, sentAt, timer}
    this._nextPingId = 1;
    this._resumeBuffer = null; // events held while a resume is replaying
    this._filterGuard = null; // filters sent but not yet acknowledged
    this._connectGeneration = 0;
    for (const name of ["Event", "Message", "Status", "Restart", "Resumed", "Error", "Close"]) {
      const fn = options[`on${name}`];
      if (typeof fn === "function") this.on(name.toLowerCase(), fn);
    }
    if (autoConnect) this.connect();
  }

  /** True once the server has greeted this connection (connection.established). */
  get connected() {
    return this.status === Status.CONNECTED;
  }

  // Callbacks

  /** Call `fn` on `name`: event, message, status, restart, resumed, error, close. Returns an off() function. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  _emit(name, value) {
    for (const fn of [...(this._listeners.get(name) ?? [])]) {
      try {
        fn(value, this);
      } catch (error) {
        console.error(`gathering-ws: ${name} callback failed`, error);
      }
    }
  }

  _setStatus(status, details = {}) {
    this.status = status;
    this._emit("status", { status, retries: this.retries, maxRetries: this.maxRetries, ...details });
  }

  // Connecting

  /** Connect now (also after close() or after giving up); resets the retry count. */
  connect() {
    this._closedByUser = false;
    this.retries = 0;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._ws && this._ws.readyState <= 1) return; // CONNECTING or OPEN already
    this._open();
  }

  async _open() {
    const generation = ++this._connectGeneration;
    this._setStatus(Status.CONNECTING);
    let token = this._token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (error) {
        this._emit("error", new GatheringError("unauthorized", `could not get a token: ${error}`));
        token = null;
      }
      if (generation !== this._connectGeneration || this._closedByUser) return;
    }
    const url = new URL(this.url);
    if (this.clientId) url.searchParams.set("client_id", this.clientId);
    let ws;
    try {
      ws = new this._WebSocket(url.href);
    } catch (error) {
      this._emit("error", error);
      this._scheduleReconnect({ code: 1006, reason: String(error.message ?? error) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (token) this._request({ type: "auth", data: { token } }, "authenticated").catch((e) => this._emit("error", e));
    };
    ws.onmessage = (frame) => {
      if (this._ws === ws) this._onFrame(frame.data); // not from a socket we already dropped
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._onClose({ code: event.code, reason: event.reason, wasClean: event.wasClean });
    };
    ws.onerror = () => {
      // The close event follows with the details; browsers hide the cause of the error.
    };
  }

  _onClose({ code, reason, wasClean }) {
    this._ws = null;
    this._stopHeartbeat();
    this._resumeBuffer = null;
    this._filterGuard = null;
    const error = new GatheringError("closed", `connection closed (${code}${reason ? ` ${reason}` : ""})`);
    for (const request of this._requests.splice(0)) request.reject(error);
    for (const ping of this._pings.values()) {
      clearTimeout(ping.timer);
      ping.reject(error);
    }
    this._pings.clear();
    // A policy close is final, unless a token function may give a fresh token (expiry).
    const final = code === POLICY_CLOSE && typeof this._token !== "function";
    const willRetry = !this._closedByUser && !final && this.retries < this.maxRetries;
    this._emit("close", { code, reason, wasClean, willRetry });
    if (this._closedByUser) {
      this._setStatus(Status.DISCONNECTED, { code, reason });
    } else if (final) {
      this._closedByUser = true;
      this._setStatus(Status.DISCONNECTED, { code, reason, gaveUp: true });
    } else {
      this._scheduleReconnect({ code, reason });
    }
  }

  _scheduleReconnect({ code, reason }) {
    if (this.retries >= this.maxRetries) {
      this._closedByUser = true;
      this._setStatus(Status.DISCONNECTED, { code, reason, gaveUp: true });
      return;
    }
    this.retries += 1; // as in the guide: the first retry waits base * 2
    const delayMs = backoffDelay(this.retries, this.baseDelayMs, this.maxDelayMs);
    this._setStatus(Status.RECONNECTING, { code, reason, delayMs, retryAt: Date.now() + delayMs });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (!this._closedByUser) this._open();
    }, delayMs);
  }

  /** Close for good: no reconnect until connect() is called again. */
  close(code = 1000, reason = "client closed") {
    this._closedByUser = true;
    this._connectGeneration += 1;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._ws;
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close(); // browsers only send 1000 and 3000-4999
      }
      // Report at once rather than when the close handshake ends.
      this._onClose({ code, reason, wasClean: true });
    } else if (this.status !== Status.DISCONNECTED) {
      this._setStatus(Status.DISCONNECTED, { code, reason });
    }
  }

  // Incoming messages

  _onFrame(raw) {
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      this._emit("error", new GatheringError("invalid_json", "the server sent a frame that is not JSON"));
      return;
    }
    if (!message || typeof message.type !== "string") return;
    this._emit("message", message);
    if (!CONTROL_TYPES.has(message.type)) {
      this._onEvent(message);
      return;
    }
    switch (message.type) {
      case "connection.established":
        this._onEstablished(message.data ?? {});
        break;
      case "pong":
        this._onPong(message);
        break;
      default:
        this._onReply(message);
    }
  }

  _onEstablished(data) {
    if (data.client_id) this.clientId = data.client_id;
    this.retries = 0;
    const previousEpoch = this.epoch;
    const restarted = previousEpoch != null && data.epoch != null && data.epoch !== previousEpoch;
    const canResume = this.resumeEnabled && typeof data.seq === "number" && data.epoch != null;
    let since = null;
    if (restarted) {
      // Seqs of the old epoch mean nothing here: what we had not received is gone. Replay what
      // the new server published before we got back, from its first event.
      this._emit("restart", { previousEpoch, epoch: data.epoch, lastSeq: this.lastSeq });
      since = 0;
    } else if (this.lastSeq != null && (previousEpoch == null || previousEpoch === data.epoch)) {
      since = this.lastSeq;
    }
    if (data.epoch != null) this.epoch = data.epoch;
    if (since === null && typeof data.seq === "number") this.lastSeq = data.seq;
    this._setStatus(Status.CONNECTED, { clientId: this.clientId, epoch: this.epoch, restarted });
    this._startHeartbeat();
    if (this.filters) {
      this._sendFilters().catch((error) => {
        if (error.code !== "closed") this._emit("error", error);
      });
    }
    if (canResume && since !== null) {
      this._resumeBuffer = [];
      // Handled as the reply arrives (not in a promise callback), so no event slips in between.
      this._request({ type: "resume", data: { since_seq: since, epoch: this.epoch } }, "resumed", {
        onReply: (ack) => this._finishResume(since, ack),
        onError: (error) => {
          if (error.code === "closed") return; // the next connection resumes again
          this._flushResumeBuffer(since);
          this._emit("error", error);
        },
      }).catch(() => {});
    } else if (since === 0 && typeof data.seq === "number") {
      this.lastSeq = data.seq;
    }
  }

  _onEvent(event) {
    const guard = this._filterGuard;
    if (guard && !matchesFilters(guard, event)) return; // sent before the server applied our filters
    if (this._resumeBuffer) {
      this._resumeBuffer.push(event);
      return;
    }
    if (typeof event.seq === "number" && (event.epoch == null || event.epoch === this.epoch)) {
      if (this.lastSeq != null && event.seq <= this.lastSeq) return; // already delivered
      this.lastSeq = event.seq;
    }
    this._emit("event", event);
  }

  _finishResume(since, ack) {
    this._flushResumeBuffer(since);
    if (typeof ack.seq === "number" && (this.lastSeq == null || ack.seq > this.lastSeq)) {
      this.lastSeq = ack.seq;
    }
    this._emit("resumed", ack);
  }

  _flushResumeBuffer(since) {
    const buffered = this._resumeBuffer ?? [];
    this._resumeBuffer = null;
    buffered.sort((a, b) => (a.seq ?? 0) - (b.seq ?? 0));
    this.lastSeq = since;
    for (const event of buffered) this._onEvent(event);
  }

  _onReply(message) {
    const index = message.type === "error" ? 0 : this._requests.findIndex((r) => r.type === message.type);
    const request = index >= 0 ? this._requests.splice(index, 1)[0] : undefined;
    if (message.type === "error") {
      const { code = "error", message: text = "error" } = message.data ?? {};
      const error = new GatheringError(code, text);
      if (request) request.reject(error);
      else this._emit("error", error);
      return;
    }
    if (message.type === "subscribed") this._filterGuard = null;
    request?.resolve(message.data ?? {});
  }

  _track(type, resolve, reject, { onReply, onError } = {}) {
    this._requests.push({
      type,
      resolve: (data) => {
        onReply?.(data);
        resolve(data);
      },
      reject: (error) => {
        onError?.(error);
        reject(error);
      },
    });
  }

  // Outgoing messages

  _send(message) {
    if (!this._ws || this._ws.readyState !== 1) {
      throw new GatheringError("not_connected", "not connected");
    }
    this._ws.send(JSON.stringify(message));
  }

  _request(message, replyType, handlers) {
    return new Promise((resolve, reject) => {
      try {
        this._send(message);
      } catch (error) {
        reject(error);
        return;
      }
      this._track(replyType, resolve, reject, handlers);
    });
  }

  _sendFilters() {
    const filters = this.filters;
    this._filterGuard = filters ?? null;
    const message = filters ? { type: "subscribe", data: filters } : { type: "unsubscribe" };
    return this._request(message, "subscribed").catch((error) => {
      this._filterGuard = null;
      throw error;
    });
  }

  /**
   * Receive only matching events: {event_types: ["task.*", ...], circle_id, project_id}
   * (omitted or null: any). The server applies them; they are re-sent after every reconnect.
   * Resolves with the server's ack, or with null when not connected (sent on connect).
   */
  subscribe(filters) {
    this.filters = normaliseFilters(filters ?? {});
    if (!this.connected) return Promise.resolve(null);
    return this._sendFilters();
  }

  /** Receive everything again. */
  unsubscribe() {
    this.filters = null;
    if (!this.connected) return Promise.resolve(null);
    return this._sendFilters();
  }

  /**
   * Publish an event on the server's bus: {type, data, source_agent_id, circle_id, project_id}.
   * Resolves with {event_id, seq}; rejects with a GatheringError (invalid type, not connected,
   * or the server's error reply).
   */
  publish({ type, data = {}, source_agent_id = null, circle_id = null, project_id = null } = {}) {
    if (typeof type !== "string" || !EVENT_TYPE_PATTERN.test(type)) {
      return Promise.reject(
        new GatheringError("invalid_event_type", `invalid event type ${JSON.stringify(type)}: expected dotted lowercase words like 'task.created'`),
      );
    }
    if (data === null || typeof data !== "object" || Array.isArray(data)) {
      return Promise.reject(new GatheringError("invalid_message", "event data must be a JSON object"));
    }
    return this._request(
      { type: "publish", data: { type, data, source_agent_id, circle_id, project_id } },
      "published",
    );
  }

  /**
   * Send a fresh token on the open connection (e.g. before the old one expires); it is also
   * used for the next connections. Resolves with the server's `authenticated` ack.
   */
  authenticate(token) {
    this._token = token;
    if (typeof token !== "string" || !token) {
      return Promise.reject(new GatheringError("invalid_message", "token must be a non-empty string"));
    }
    return this._request({ type: "auth", data: { token } }, "authenticated");
  }

  /** Send {"type":"ping"}; resolves with the round-trip time in milliseconds. */
  ping(timeoutMs = this.pongTimeoutMs) {
    return new Promise((resolve, reject) => {
      const id = this._nextPingId++;
      try {
        this._send({ type: "ping", id });
      } catch (error) {
        reject(error);
        return;
      }
      const timer = setTimeout(() => {
        this._pings.delete(id);
        reject(new GatheringError("timeout", `no pong within ${timeoutMs} ms`));
      }, timeoutMs);
      this._pings.set(id, { resolve, reject, sentAt: performance.now(), timer });
    });
  }

  _onPong(message) {
    const ping = this._pings.get(message.id);
    if (!ping) return;
    this._pings.delete(message.id);
    clearTimeout(ping.timer);
    ping.resolve(performance.now() - ping.sentAt);
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    if (!this.heartbeatMs) return;
    this._heartbeatTimer = setInterval(() => {
      const ws = this._ws;
      this.ping().catch((error) => {
        if (error.code !== "timeout" || this._ws !== ws || !ws) return;
        // No pong: the connection is dead even if the browser has not noticed. Drop it.
        this._emit("error", error);
        ws.onclose = null;
        ws.close(4000, "heartbeat timeout");
        this._onClose({ code: 4000, reason: "heartbeat timeout", wasClean: false });
      });
    }, this.heartbeatMs);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }
}
