// tidings.js — the browser client of tidings (docs/clients.md). A dependency-free ES module.
//
//   import { Tidings, TidingsInbox } from "/tidings.js";
//   const t = new Tidings({ url: "", token, transport: "sse" });   // or "ws"
//   t.on("notification", (n, unreadCount) => toast(n.title));
//
// Server-Sent Events: the token goes in `?token=` (EventSource cannot send headers) or,
// when no token is given, the `tidings_token` cookie is used. WebSocket: the token is sent
// in the first message `{"type":"auth","token"}`, never in the URL.
// Reconnects with exponential backoff and full jitter (capped) and resumes after the last
// id seen (`last_event_id`); when the server cannot resume it says `reset`: refetch.

const STREAM_PATH = "/api/v1/stream";
const WS_PATH = "/api/v1/ws";
const NO_RETRY_CODES = new Set([4401, 4403]); // the same credential will not do better

/** Seconds → ms delay before reconnect number `attempt` (0-based): uniform in [0, min(cap, initial·2^attempt)). */
export function backoffDelay(attempt, initial = 500, cap = 30000, rand = Math.random) {
  return rand() * Math.min(cap, initial * 2 ** Math.min(attempt, 64));
}

/** A tiny event emitter: `on(name, fn)` returns a function that removes `fn`. */
class Emitter {
  constructor() {
    this._handlers = new Map();
  }
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(fn);
    return () => this.off(name, fn);
  }
  off(name, fn) {
    this._handlers.get(name)?.delete(fn);
  }
  emit(name, ...args) {
    for (const fn of [...(this._handlers.get(name) || [])]) {
      try {
        fn(...args);
      } catch (err) {
        console.error(`tidings: a "${name}" handler threw`, err);
      }
    }
  }
}

function isNotificationRecord(data) {
  return (
    data !== null &&
    typeof data === "object" &&
    "recipient" in data &&
    "created_at" in data &&
    "unread_count" in data
  );
}

function baseUrl(url) {
  return (url ?? "").replace(/\/+$/, "");
}

/**
 * One live connection of a user (SSE or WebSocket).
 *
 * Options: `url` (server base, "" = same origin), `token` or `getToken` (async, called before
 * each connect; omit both to use the `tidings_token` cookie), `transport` ("sse" | "ws"),
 * `topics` (array), `lastEventId` (resume from a stored id), `backoff` ({initial, max} ms),
 * `autoConnect` (default true), and `on` ({eventName: handler}).
 *
 * Events (`t.on(name, fn)`):
 *   open(welcome)                       connected; `welcome.unread_count`
 *   close({code, reason, willReconnect})
 *   notification(record, unreadCount)   an inbox notification (API.md §7)
 *   notification.read({ids, unread_count}), notification.deleted({ids, unread_count})
 *   unreadcount(n)                      whenever the server names a new unread count
 *   reset({reason})                     resume was impossible: refetch what you show
 *   event({event, topic, data, id})     any other published event
 *   error(err)                          a refused topic, a bad credential, ...
 *   state("connecting" | "open" | "reconnecting" | "closed")
 */
export class Tidings extends Emitter {
  constructor(options = {}) {
    super();
    this.url = baseUrl(options.url ?? "");
    this.token = options.token ?? null;
    this.getToken = options.getToken ?? null;
    this.transport = options.transport === "ws" ? "ws" : "sse";
    this.topics = [...(options.topics || [])];
    this.lastEventId = options.lastEventId ?? null;
    this.backoff = { initial: 500, max: 30000, ...(options.backoff || {}) };
    this.unreadCount = null;
    this.state = "idle";
    this._attempt = 0;
    this._timer = null;
    this._source = null; // EventSource or WebSocket
    this._closed = false;
    this._generation = 0; // ignores callbacks of sockets we already dropped
    for (const [name, fn] of Object.entries(options.on || {})) this.on(name, fn);
    if (options.autoConnect !== false) queueMicrotask(() => this.connect());
  }

  /** Open the connection (a no-op when already open or connecting). */
  connect() {
    if (this._source || this._timer) return;
    this._closed = false;
    this._open().catch((err) => this._lost({ code: 0, reason: String(err) }));
  }

  /** Close for good (no reconnect). */
  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    this._drop();
    this._setState("closed");
  }

  /** WebSocket: subscribe to more topics. SSE: reconnects with the new topic list (resuming). */
  subscribe(topics) {
    const fresh = topics.filter((t) => !this.topics.includes(t));
    this.topics.push(...fresh);
    if (this.transport === "ws") this._send({ type: "subscribe", topics: fresh });
    else if (fresh.length) this._reopen();
  }

  unsubscribe(topics) {
    this.topics = this.topics.filter((t) => !topics.includes(t));
    if (this.transport === "ws") this._send({ type: "unsubscribe", topics });
    else this._reopen();
  }

  /** WebSocket only: mark notifications read over the socket (REST works for both). */
  markRead(ids) {
    return this._send({ type: "mark_read", notification_ids: ids });
  }

  // -- plumbing -------------------------------------------------------------------------

  async _currentToken() {
    if (this.getToken) this.token = await this.getToken();
    return this.token;
  }

  async _open() {
    const generation = ++this._generation;
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting");
    const token = await this._currentToken();
    if (generation !== this._generation || this._closed) return;
    const params = new URLSearchParams();
    if (this.topics.length) params.set("topics", this.topics.join(","));
    if (this.lastEventId) params.set("last_event_id", this.lastEventId);
    if (this.transport === "sse") this._openSSE(generation, token, params);
    else this._openWS(generation, token, params);
  }

  _openSSE(generation, token, params) {
    if (token) params.set("token", token);
    const qs = params.toString();
    const es = new EventSource(`${this.url}${STREAM_PATH}${qs ? "?" + qs : ""}`, {
      withCredentials: !token,
    });
    this._source = es;
    const live = () => generation === this._generation;
    const handle = (name) => (e) => {
      if (!live()) return;
      if (e.lastEventId) this.lastEventId = e.lastEventId;
      let data = e.data;
      try {
        data = JSON.parse(e.data);
      } catch {
        // a string payload is sent as-is
      }
      this._dispatch(name, data, e.lastEventId || null);
    };
    for (const name of ["welcome", "reset", "notification.read", "notification.deleted", "shutdown"]) {
      es.addEventListener(name, handle(name));
    }
    es.onmessage = handle("message");
    // Any other named event (published with `event: <name>`) cannot be caught generically by
    // EventSource; apps that publish custom names listen with `tidings.listen(name)`.
    for (const name of this._extraNames || []) es.addEventListener(name, handle(name));
    es.onerror = () => {
      if (!live()) return;
      // We drive reconnection ourselves (jittered backoff, fresh token, `last_event_id`):
      // the browser's own retry would use a fixed delay and the old token.
      this._lost({ code: 0, reason: "stream interrupted" });
    };
  }

  /** SSE: also receive events published under a custom `event` name (WS gets them all). */
  listen(name) {
    this._extraNames = [...(this._extraNames || []), name];
    if (this._source && this.transport === "sse") this._reopen();
  }

  _openWS(generation, token, params) {
    const base = this.url || location.origin;
    const wsUrl = base.replace(/^http/, "ws") + WS_PATH;
    const qs = params.toString();
    const ws = new WebSocket(`${wsUrl}${qs ? "?" + qs : ""}`);
    this._source = ws;
    const live = () => generation === this._generation;
    ws.onopen = () => {
      if (live() && token) ws.send(JSON.stringify({ type: "auth", token }));
    };
    ws.onmessage = (e) => {
      if (!live()) return;
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch {
        return;
      }
      if (msg.id) this.lastEventId = msg.id;
      this._dispatchWS(msg);
    };
    ws.onclose = (e) => {
      if (!live()) return;
      this._lost({ code: e.code, reason: e.reason });
    };
  }

  _dispatchWS(msg) {
    switch (msg.type) {
      case "welcome":
      case "reset":
      case "notification.read":
      case "notification.deleted":
        return this._dispatch(msg.type, msg, msg.id || null);
      case "notification":
        return this._notification(msg.notification, msg.unread_count);
      case "event":
        if (msg.event === "shutdown") return undefined;
        return this.emit("event", { event: msg.event, topic: msg.topic, data: msg.data, id: msg.id });
      case "error":
        return this.emit("error", msg);
      default:
        return undefined; // subscribed, unsubscribed, pong
    }
  }

  _dispatch(name, data, id) {
    switch (name) {
      case "welcome":
        this._attempt = 0;
        this._setState("open");
        this.emit("open", data);
        this._count(data.unread_count);
        break;
      case "reset":
        this.emit("reset", { reason: data && data.reason });
        break;
      case "notification.read":
      case "notification.deleted":
        this.emit(name, data);
        this._count(data.unread_count);
        break;
      case "shutdown":
        break; // the stream ends next; we reconnect
      case "message":
        if (isNotificationRecord(data)) {
          const { unread_count: count, ...record } = data;
          this._notification(record, count);
          break;
        }
      // fall through: an ordinary published event
      default:
        this.emit("event", { event: name, topic: undefined, data, id });
    }
  }

  _notification(record, count) {
    this.emit("notification", record, count);
    this._count(count);
  }

  _count(n) {
    if (typeof n !== "number" || n === this.unreadCount) return;
    this.unreadCount = n;
    this.emit("unreadcount", n);
  }

  _lost({ code, reason }) {
    this._drop();
    const fatal = NO_RETRY_CODES.has(code) && !this.getToken;
    const willReconnect = !this._closed && !fatal;
    this.emit("close", { code, reason, willReconnect });
    if (fatal) this.emit("error", { code: "unauthorized", message: reason });
    if (!willReconnect) {
      this._setState("closed");
      return;
    }
    this._setState("reconnecting");
    const delay = backoffDelay(this._attempt++, this.backoff.initial, this.backoff.max);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (!this._closed) this.connect();
    }, delay);
  }

  _reopen() {
    if (this._closed || !this._source) return;
    this._drop();
    this.connect();
  }

  _drop() {
    this._generation++;
    const src = this._source;
    this._source = null;
    if (!src) return;
    if (typeof EventSource !== "undefined" && src instanceof EventSource) src.close();
    else if (src.readyState <= 1) src.close(1000);
  }

  _send(msg) {
    const ws = this._source;
    if (this.transport !== "ws" || !ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.emit("state", state);
  }
}

/**
 * The user's inbox, kept in step with the server: fetches `/api/v1/notifications` and the
 * unread count, then follows the live pushes (its own `Tidings`, or one passed as `client`).
 * Every tab of the user gets `notification.read`/`deleted` pushes, so badges agree.
 *
 * Options: as `Tidings` (url, token | getToken, transport, topics), plus `client`
 * (an existing Tidings), `pageSize` (default 20).
 * Events: `change({items, unreadCount})`, `unreadcount(n)`, `notification(record)`, `error(err)`.
 */
export class TidingsInbox extends Emitter {
  constructor(options = {}) {
    super();
    this.url = baseUrl(options.url ?? "");
    this.token = options.token ?? null;
    this.getToken = options.getToken ?? null;
    this.pageSize = options.pageSize ?? 20;
    this.items = [];
    this.total = 0;
    this.unreadCount = 0;
    this._pushes = 0; // pushes seen: a REST answer older than a push must not win
    this._pushed = []; // notifications pushed while a refresh is in flight
    this.client =
      options.client ||
      new Tidings({ ...options, getToken: this.getToken ? () => this._token() : null });
    const c = this.client;
    this._off = [
      c.on("notification", (record, count) => {
        this._pushes++;
        if (this._refreshing) this._pushed.push(record);
        this.items = [record, ...this.items.filter((n) => n.id !== record.id)];
        this.total += 1;
        this._set(count);
        this.emit("notification", record);
      }),
      c.on("notification.read", ({ ids, unread_count }) => {
        this._pushes++;
        const now = new Date().toISOString();
        this.items = this.items.map((n) =>
          ids.includes(n.id) && !n.read_at ? { ...n, read_at: now } : n,
        );
        this._set(unread_count);
      }),
      c.on("notification.deleted", ({ ids, unread_count }) => {
        this._pushes++;
        this.items = this.items.filter((n) => !ids.includes(n.id));
        this._set(unread_count);
      }),
      c.on("open", (welcome) => {
        this._pushes++;
        this._set(welcome.unread_count);
      }),
      c.on("reset", () => this.refresh()),
    ];
    this.ready = this.refresh();
  }

  /** Refetch the first page and the unread count. */
  async refresh() {
    const seen = this._pushes;
    this._pushed = [];
    this._refreshing = true;
    try {
      const page = await this._fetch("GET", `/api/v1/notifications?page=1&page_size=${this.pageSize}`);
      const listed = new Set(page.items.map((n) => n.id));
      const newer = this._pushed.filter((n) => !listed.has(n.id)).reverse();
      this.items = [...newer, ...page.items];
      this.total = page.total;
      this._set(page.unread_count, seen);
    } catch (err) {
      this.emit("error", err);
    } finally {
      this._refreshing = false;
    }
  }

  async markRead(id) {
    const seen = this._pushes;
    const answer = await this._fetch("PUT", `/api/v1/notifications/${encodeURIComponent(id)}/read`);
    this.items = this.items.map((n) => (n.id === id ? answer.notification : n));
    this._set(answer.unread_count, seen);
    return answer;
  }

  async markAllRead() {
    const seen = this._pushes;
    const answer = await this._fetch("PUT", "/api/v1/notifications/read", { all: true });
    const now = new Date().toISOString();
    this.items = this.items.map((n) => (n.read_at ? n : { ...n, read_at: now }));
    this._set(answer.unread_count, seen);
    return answer;
  }

  async remove(id) {
    await this._fetch("DELETE", `/api/v1/notifications/${encodeURIComponent(id)}`);
    this.items = this.items.filter((n) => n.id !== id);
    this.emit("change", { items: this.items, unreadCount: this.unreadCount });
  }

  close() {
    this._off.forEach((off) => off());
    this.client.close();
  }

  async _token() {
    if (this.getToken) this.token = await this.getToken();
    return this.token;
  }

  async _fetch(method, path, body) {
    const headers = {};
    const token = this.getToken ? await this._token() : this.token;
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(this.url + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: token ? "same-origin" : "include",
    });
    if (res.status === 204) return null;
    const answer = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(answer.error?.message || `HTTP ${res.status}`);
      err.status = res.status;
      err.code = answer.error?.code;
      throw err;
    }
    return answer;
  }

  /** A REST answer's count applies only when no push arrived meanwhile (pushes are newer). */
  _set(count, seenPushes) {
    if (seenPushes === undefined || seenPushes === this._pushes) {
      if (typeof count === "number" && count !== this.unreadCount) {
        this.unreadCount = count;
        this.emit("unreadcount", count);
      }
    }
    this.emit("change", { items: this.items, unreadCount: this.unreadCount });
  }
}

export default Tidings;
