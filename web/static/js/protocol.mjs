// One WebSocket connection to messengerd: each binary message is one protobuf frame
// (ClientFrame out, ServerFrame in). Owns Hello, request/response matching by request_id,
// per-request timeouts and keep-alive pings. Knows nothing about users, chats or the UI.
import { messenger } from "../proto/messenger.mjs";

export const pb = messenger.v1;
export const ErrorCode = pb.ErrorCode;

const CLIENT_NAME = "messenger-web/0.1.0";
const REQUEST_TIMEOUT_MS = 30_000;
const MAX_PING_INTERVAL_MS = 20_000;

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder();

export const encodeText = (text) => textEncoder.encode(text);
export const decodeText = (bytes) => textDecoder.decode(bytes);

/** The server answered a request with an Error frame. */
export class ServerError extends Error {
  constructor(error) {
    super(error.message || errorCodeName(error.code));
    this.name = "ServerError";
    this.code = error.code ?? ErrorCode.ERROR_CODE_UNSPECIFIED;
    this.retryAfterMs = error.retryAfterMs ?? 0;
  }
}

/** The connection ended (or never opened) before the request was answered. */
export class ConnectionLost extends Error {
  constructor(reason) {
    super(reason);
    this.name = "ConnectionLost";
  }
}

export function errorCodeName(code) {
  const name = ErrorCode[code];
  return name ? name.replace("ERROR_CODE_", "").toLowerCase().replaceAll("_", " ") : `error ${code}`;
}

/** The WebSocket URL of the daemon that served this page. */
export function defaultUrl(loc = globalThis.location) {
  return `${loc.protocol === "http:" ? "ws" : "wss"}://${loc.host}/start`;
}

export class Connection {
  /**
   * Opens the WebSocket and completes Hello. Resolves with the connection once HelloOk came.
   * handlers: { onPush(serverFrame), onClose(reason) } — onClose runs once, only after open
   * resolved.
   */
  static async open(url, handlers) {
    const conn = new Connection(url, handlers);
    await conn.#opened;
    const hello = await conn.request("hello", { protocolVersion: 1, client: CLIENT_NAME });
    if (hello.protocolVersion !== 1) {
      conn.close(`server speaks protocol ${hello.protocolVersion}`);
      throw new ConnectionLost("unsupported protocol version");
    }
    conn.limits = hello.limits;
    conn.#startPings();
    return conn;
  }

  #ws;
  #nextId = 1;
  #pending = new Map(); // request_id -> { resolve, reject, timer, kind }
  #handlers;
  #closed = false;
  #ready = false;
  #opened;
  #pingTimer = null;
  limits = null;

  constructor(url, handlers) {
    this.#handlers = handlers;
    this.#ws = new WebSocket(url);
    this.#ws.binaryType = "arraybuffer";
    this.#opened = new Promise((resolve, reject) => {
      this.#ws.addEventListener("open", () => resolve(), { once: true });
      this.#ws.addEventListener("close", () => reject(new ConnectionLost("could not connect")), {
        once: true,
      });
    });
    this.#ws.addEventListener("message", (e) => this.#onMessage(e));
    this.#ws.addEventListener("close", (e) => this.#onClosed(e.reason || `closed (${e.code})`));
  }

  get isOpen() {
    return !this.#closed;
  }

  /** Sends a request and resolves with the response's payload (e.g. the `Sent` message). */
  request(kind, body = {}, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (this.#closed) return Promise.reject(new ConnectionLost("not connected"));
    const requestId = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        // An unanswered request means a dead connection (PROTOCOL.md §3.2).
        this.close(`no answer to ${kind} within ${timeoutMs} ms`);
      }, timeoutMs);
      this.#pending.set(requestId, { resolve, reject, timer, kind });
      this.#write({ requestId, [kind]: body });
    });
  }

  /** Sends a frame that has no response (Ack). */
  notify(kind, body) {
    if (!this.#closed) this.#write({ requestId: 0, [kind]: body });
  }

  close(reason = "closed by the client") {
    if (this.#closed) return;
    try {
      this.#ws.close(1000, reason.slice(0, 120));
    } catch {
      // Already closing.
    }
    this.#onClosed(reason);
  }

  #write(frame) {
    this.#ws.send(pb.ClientFrame.encode(frame).finish());
  }

  #onMessage(event) {
    if (!(event.data instanceof ArrayBuffer)) {
      this.close("the server sent a text message");
      return;
    }
    let frame;
    try {
      frame = pb.ServerFrame.decode(new Uint8Array(event.data));
    } catch (err) {
      this.close(`undecodable frame: ${err.message}`);
      return;
    }
    const id = frame.requestId || 0;
    if (id !== 0) {
      const waiter = this.#pending.get(id);
      if (!waiter) return;
      this.#pending.delete(id);
      clearTimeout(waiter.timer);
      if (frame.kind === "error") waiter.reject(new ServerError(frame.error));
      else waiter.resolve(frame[frame.kind]);
      return;
    }
    this.#handlers.onPush?.(frame);
  }

  #onClosed(reason) {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#pingTimer);
    for (const waiter of this.#pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new ConnectionLost(reason));
    }
    this.#pending.clear();
    if (this.#ready) this.#handlers.onClose?.(reason);
  }

  #startPings() {
    this.#ready = true;
    const idle = this.limits?.idleTimeoutMs || 120_000;
    const every = Math.min(MAX_PING_INTERVAL_MS, Math.floor(idle / 4));
    this.#pingTimer = setInterval(() => {
      this.request("ping", {}).catch(() => {});
    }, every);
  }
}
