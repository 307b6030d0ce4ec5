// The signed-in session: login/register/resume, reconnect with backoff, the inbox cursor
// (drop replayed seqs, cumulative acks), the offline send queue (retried with the same
// client_msg_id, so the server dedupes) and every request the UI makes. Updates ChatState;
// never touches the DOM.
import {
  Connection,
  ConnectionLost,
  ErrorCode,
  ServerError,
  decodeText,
  defaultUrl,
  encodeText,
} from "./protocol.mjs";

const ACK_DELAY_MS = 1000;
const ACK_BATCH = 100;
const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 10_000;
const HISTORY_PAGE = 30;

// sessionStorage keys: the token lives only as long as the tab (issue: "token kept in
// sessionStorage, resume on reload").
const TOKEN = "messenger.token";
const userKey = (userId, what) => `messenger.${userId}.${what}`;
// localStorage: this browser's login cookie per (case-folded) username. It outlives the tab and
// logouts on purpose: it marks the browser as one that signed in before, so other people's
// failed logins of the account never lock it out (docs/PROTOCOL.md §5.3.1). It lets nobody in
// without the password.
const cookieKey = (username) => `messenger.loginCookie.${username.toLowerCase()}`;

const toBase64 = (bytes) => btoa(String.fromCharCode(...bytes));
const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
const sameBytes = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);

function newClientMsgId() {
  return crypto.randomUUID();
}

export class Session {
  #state;
  #url;
  #storage;
  #cookies;
  #conn = null;
  #authenticated = false;
  #lastSeq = 0;
  #ackedSeq = 0;
  #ackTimer = null;
  #pending = []; // [{clientMsgId, to, text, createdAt}] — persisted until answered
  #inFlight = new Set(); // clientMsgIds sent on the current connection
  #attempt = 0;
  #reconnectTimer = null;
  #countdownTimer = null;
  #wantConnection = false;

  constructor(
    state,
    { url = defaultUrl(), storage = sessionStorage, cookies = localStorage } = {},
  ) {
    this.#state = state;
    this.#url = url;
    this.#storage = storage;
    this.#cookies = cookies;
    addEventListener("online", () => this.#onBrowserOnline());
    addEventListener("offline", () => this.#onBrowserOffline());
  }

  get hasStoredSession() {
    return Boolean(this.#storage.getItem(TOKEN));
  }

  // ---- signing in -------------------------------------------------------------------

  /** Resumes the stored session (page reload). Falls back to the login screen if refused. */
  resumeStored() {
    this.#wantConnection = true;
    this.#state.resuming = true;
    this.#connect();
  }

  async register(username, password, displayName) {
    const conn = await this.#freshConnection();
    try {
      await conn.request("register", { username, password, displayName });
      await this.#login(conn, username, password);
    } catch (err) {
      if (!this.#authenticated) conn.close("sign-up failed");
      throw err;
    }
  }

  async login(username, password) {
    const conn = await this.#freshConnection();
    try {
      await this.#login(conn, username, password);
    } catch (err) {
      conn.close("login failed");
      throw err;
    }
  }

  async logout() {
    this.#wantConnection = false;
    clearTimeout(this.#reconnectTimer);
    clearInterval(this.#countdownTimer);
    const conn = this.#conn;
    if (conn && this.#authenticated) {
      this.#sendAck();
      await conn.request("logout", {}).catch(() => {});
    }
    conn?.close("logged out");
    this.#forget();
  }

  async #login(conn, username, password) {
    const saved = this.#cookies.getItem(cookieKey(username));
    let loginCookie = new Uint8Array();
    try {
      if (saved) loginCookie = fromBase64(saved);
    } catch {
      // A damaged entry is no cookie: this login just shares the account's budget.
    }
    const auth = await conn.request("login", {
      username,
      password,
      deviceName: "browser",
      loginCookie,
    });
    if (auth.loginCookie?.length) this.#cookies.setItem(cookieKey(username), toBase64(auth.loginCookie));
    this.#storage.setItem(TOKEN, toBase64(auth.sessionToken));
    this.#wantConnection = true;
    await this.#authenticatedOn(conn, auth);
  }

  async #freshConnection() {
    this.#conn?.close("replaced");
    this.#setConnection("connecting", "");
    try {
      const conn = await Connection.open(this.#url, {
        onPush: (frame) => this.#onPush(frame),
        onClose: (reason) => this.#onClose(reason, conn),
      });
      this.#conn = conn;
      this.#setConnection("connected", "not signed in");
      return conn;
    } catch (err) {
      this.#setConnection("offline", "could not reach the server");
      throw err;
    }
  }

  #forget() {
    this.#state.resuming = false;
    this.#storage.removeItem(TOKEN);
    this.#authenticated = false;
    this.#conn = null;
    this.#pending = [];
    this.#lastSeq = 0;
    this.#state.reset();
    this.#setConnection("offline", "signed out");
  }

  // ---- connection life --------------------------------------------------------------

  async #connect() {
    clearTimeout(this.#reconnectTimer);
    clearInterval(this.#countdownTimer);
    const token = this.#storage.getItem(TOKEN);
    if (!token || !this.#wantConnection) return;
    this.#setConnection(this.#attempt ? "reconnecting" : "connecting", "");
    let conn;
    try {
      conn = await Connection.open(this.#url, {
        onPush: (frame) => this.#onPush(frame),
        onClose: (reason) => this.#onClose(reason, conn),
      });
    } catch {
      this.#scheduleReconnect();
      return;
    }
    if (!this.#wantConnection) {
      conn.close("no longer wanted");
      return;
    }
    this.#conn = conn;
    try {
      const auth = await conn.request("resume", { sessionToken: fromBase64(token) });
      await this.#authenticatedOn(conn, auth);
    } catch (err) {
      if (err instanceof ServerError && err.code === ErrorCode.ERROR_CODE_UNAUTHENTICATED) {
        // The token is dead (logged out, expired, password changed): log in again.
        conn.close("session refused");
        this.#wantConnection = false;
        this.#forget();
        this.#state.error = "Your session ended; please log in again.";
        this.#state.changed();
        return;
      }
      conn.close(err.message);
    }
  }

  #onClose(reason, conn) {
    if (conn && this.#conn !== conn) return; // an old connection
    this.#conn = null;
    this.#authenticated = false;
    this.#inFlight.clear();
    clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    if (!this.#wantConnection || !this.#storage.getItem(TOKEN)) {
      this.#setConnection("offline", reason);
      return;
    }
    this.#scheduleReconnect(this.#goAwayDelay);
    this.#goAwayDelay = null;
  }

  #goAwayDelay = null;

  /** Exponential backoff with full jitter (PROTOCOL.md §7.7), or the server's GoAway delay. */
  #scheduleReconnect(serverDelay = null) {
    if (!this.#wantConnection) return;
    if (!navigator.onLine) {
      this.#setConnection("offline", "no network; waiting for it to come back");
      return;
    }
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.#attempt);
    const delay = serverDelay ?? Math.floor(Math.random() * cap);
    this.#attempt += 1;
    const at = Date.now() + delay;
    const show = () => {
      const left = Math.max(0, Math.ceil((at - Date.now()) / 1000));
      this.#setConnection("reconnecting", `attempt ${this.#attempt} in ${left} s`);
    };
    show();
    clearInterval(this.#countdownTimer);
    this.#countdownTimer = setInterval(show, 500);
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  #onBrowserOffline() {
    // Do not wait for the socket to time out: the network is gone, the queue holds sends.
    this.#conn?.close("the browser went offline");
  }

  #onBrowserOnline() {
    if (this.#wantConnection && !this.#conn) {
      this.#attempt = 0;
      this.#connect();
    }
  }

  #setConnection(state, detail) {
    this.#state.connection = { state, detail, pending: this.#pending.length };
    this.#state.changed("connection");
  }

  async #authenticatedOn(conn, auth) {
    const state = this.#state;
    const sameUser = state.me && state.me.userId === auth.user.userId;
    if (!sameUser) {
      state.reset();
      this.#pending = [];
    }
    state.me = auth.user;
    state.groupAdds = auth.settings?.groupAdds || 0;
    state.error = "";
    state.resuming = false;
    this.#conn = conn;
    this.#authenticated = true;
    this.#attempt = 0;
    clearInterval(this.#countdownTimer);
    const me = auth.user.userId;
    // Per-user cursor (PROTOCOL.md §7.5): survives reloads of this tab.
    const stored = Number(this.#storage.getItem(userKey(me, "lastSeq")) || 0);
    this.#lastSeq = Math.max(sameUser ? this.#lastSeq : 0, stored, auth.ackedSeq || 0);
    this.#ackedSeq = auth.ackedSeq || 0;
    this.#loadPending(me);
    this.#loadUnread(me);
    this.#setConnection("online", "");
    this.#flushQueue();
    await this.#loadConversations(conn);
    state.changed();
  }

  // ---- deliveries and acks ----------------------------------------------------------

  #onPush(frame) {
    switch (frame.kind) {
      case "delivery":
        this.#onDelivery(frame.delivery);
        break;
      case "goAway": {
        const g = frame.goAway;
        if (g.code === ErrorCode.ERROR_CODE_UNAUTHENTICATED) {
          // Revoked, logged out, or this device resumed elsewhere: never resume on our own.
          this.#wantConnection = false;
          this.#state.error = `Disconnected: ${g.reason}`;
          this.#forget();
        } else if (g.reconnectAfterMs) {
          this.#goAwayDelay = g.reconnectAfterMs;
        }
        break;
      }
      case "error":
        this.#state.error = frame.error.message;
        this.#state.changed();
        break;
      default:
        break;
    }
  }

  #onDelivery(d) {
    if (!this.#authenticated) return;
    if (d.seq <= this.#lastSeq) return; // replayed: already processed
    if (d.seq !== this.#lastSeq + 1) {
      this.#conn?.close(`delivery gap: got seq ${d.seq} after ${this.#lastSeq}`);
      return;
    }
    const m = d.message;
    m.text = decodeText(m.body);
    const c = this.#state.addServerMessage(m, { live: true });
    if (m.sender?.userId === this.#state.me.userId) this.#dropPending(m.clientMsgId);
    if (c.isGroup && c.title.startsWith("group ")) this.#fetchGroupName(c);
    this.#lastSeq = d.seq;
    const me = this.#state.me.userId;
    this.#storage.setItem(userKey(me, "lastSeq"), String(d.seq));
    this.#saveUnread();
    this.#state.changed();
    if (d.seq - this.#ackedSeq >= ACK_BATCH) this.#sendAck();
    else if (!this.#ackTimer) this.#ackTimer = setTimeout(() => this.#sendAck(), ACK_DELAY_MS);
  }

  #sendAck() {
    clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    if (!this.#authenticated || this.#lastSeq <= this.#ackedSeq) return;
    this.#conn.notify("ack", { upToSeq: this.#lastSeq });
    this.#ackedSeq = this.#lastSeq;
  }

  async #fetchGroupName(c) {
    try {
      const g = await this.#conn.request("getGroup", { groupId: c.to.groupId });
      c.title = g.name;
      c.members = g.members;
      this.#state.changed();
    } catch {
      // Left or removed meanwhile: the title stays generic.
    }
  }

  // ---- sending and the offline queue ------------------------------------------------

  /** Queues a text message; it is sent now if connected, else on the next connection. */
  send(to, text) {
    const p = { clientMsgId: newClientMsgId(), to, text, createdAt: Date.now() };
    this.#pending.push(p);
    this.#savePending();
    this.#state.addPending(p);
    this.#state.changed();
    this.#flushQueue();
  }

  #flushQueue() {
    if (!this.#authenticated) return;
    for (const p of this.#pending) {
      if (!this.#inFlight.has(p.clientMsgId)) this.#sendOne(this.#conn, p);
    }
  }

  async #sendOne(conn, p) {
    this.#inFlight.add(p.clientMsgId);
    const body = {
      clientMsgId: p.clientMsgId,
      body: encodeText(p.text),
      contentType: "text/plain",
      ...(p.to.groupId ? { groupId: p.to.groupId } : { userId: p.to.userId }),
    };
    try {
      const sent = await conn.request("send", body);
      this.#state.settlePending(p.to, p.clientMsgId, {
        messageId: sent.messageId,
        time: sent.serverTimeMs,
      });
      this.#dropPending(p.clientMsgId);
    } catch (err) {
      if (err instanceof ConnectionLost) return; // stays queued: resent on reconnect, same id
      if (conn !== this.#conn) return;
      this.#inFlight.delete(p.clientMsgId);
      const retryable = [
        ErrorCode.ERROR_CODE_RATE_LIMITED,
        ErrorCode.ERROR_CODE_INTERNAL,
        ErrorCode.ERROR_CODE_UNAVAILABLE,
      ];
      if (retryable.includes(err.code)) {
        setTimeout(() => this.#flushQueue(), Math.max(err.retryAfterMs, 500));
        return;
      }
      this.#state.settlePending(p.to, p.clientMsgId, { failed: true, reason: err.message });
      this.#dropPending(p.clientMsgId);
    }
    this.#state.changed();
  }

  #dropPending(clientMsgId) {
    const before = this.#pending.length;
    this.#pending = this.#pending.filter((p) => p.clientMsgId !== clientMsgId);
    if (this.#pending.length !== before) {
      this.#savePending();
      this.#state.connection.pending = this.#pending.length;
    }
  }

  #savePending() {
    const me = this.#state.me?.userId;
    if (me) this.#storage.setItem(userKey(me, "pending"), JSON.stringify(this.#pending));
  }

  #loadPending(me) {
    const stored = JSON.parse(this.#storage.getItem(userKey(me, "pending")) || "[]");
    const known = new Set(this.#pending.map((p) => p.clientMsgId));
    for (const p of stored) if (!known.has(p.clientMsgId)) this.#pending.push(p);
    for (const p of this.#pending) this.#state.addPending(p);
  }

  #saveUnread() {
    const unread = {};
    for (const c of this.#state.conversations.values()) if (c.unread) unread[c.key] = c.unread;
    this.#storage.setItem(userKey(this.#state.me.userId, "unread"), JSON.stringify(unread));
  }

  #loadUnread(me) {
    const unread = JSON.parse(this.#storage.getItem(userKey(me, "unread")) || "{}");
    for (const [key, n] of Object.entries(unread)) {
      const id = Number(key.slice(2));
      const c = this.#state.conversation(key.startsWith("g:") ? { groupId: id } : { userId: id });
      c.unread = Math.max(c.unread, n);
    }
  }

  // ---- conversations, history, groups -----------------------------------------------

  /**
   * Every conversation summary, page by page (PROTOCOL.md §9.2): the pages are one snapshot, so
   * each conversation comes once; what changes meanwhile arrives as deliveries.
   */
  async #allConversations(conn) {
    const all = [];
    let cursor = new Uint8Array(0);
    for (;;) {
      const page = await conn.request("listConversations", { limit: 0, cursor });
      all.push(...page.conversations);
      const next = page.nextCursor || new Uint8Array(0);
      // An empty cursor ends the listing; one that does not move would loop forever.
      if (next.length === 0 || sameBytes(next, cursor)) return all;
      cursor = next;
    }
  }

  async #loadConversations(conn) {
    const [summaries, groups] = await Promise.all([
      this.#allConversations(conn),
      conn.request("listGroups", {}),
    ]);
    const state = this.#state;
    const groupIds = new Set();
    for (const g of groups.groups) {
      groupIds.add(g.groupId);
      state.conversation({ groupId: g.groupId }, g.name); // also groups without messages yet
    }
    for (const s of summaries) {
      if (s.user) state.conversation({ userId: s.user.userId }, s.user.displayName || s.user.username);
      if (s.group) state.conversation({ groupId: s.group.groupId }, s.group.name);
      if (s.lastMessage) {
        s.lastMessage.text = decodeText(s.lastMessage.body);
        state.addServerMessage(s.lastMessage);
      }
    }
    // Groups we were removed from or left (on another device) are gone.
    for (const c of [...state.conversations.values()]) {
      if (c.isGroup && !groupIds.has(c.to.groupId)) state.removeConversation(c.key);
    }
    const active = state.activeKey && state.conversations.get(state.activeKey);
    if (active) {
      active.historyLoaded = false;
      await this.loadOlder(active, { fresh: true });
    }
  }

  /** Opens a conversation: resets its unread count and loads its newest history page. */
  async open(key) {
    const state = this.#state;
    const c = state.conversations.get(key);
    if (!c) return;
    state.activeKey = key;
    c.unread = 0;
    if (state.me) this.#saveUnread();
    state.changed();
    if (!c.historyLoaded) await this.loadOlder(c, { fresh: true });
    if (c.isGroup) await this.refreshGroup(c).catch(() => {});
  }

  /** Loads the next older history page (or the newest one when `fresh`). */
  async loadOlder(c, { fresh = false } = {}) {
    if (!this.#authenticated || c.loadingHistory) return;
    if (!fresh && (!c.hasMore || !c.historyLoaded)) return;
    c.loadingHistory = true;
    this.#state.changed("history");
    try {
      const before = fresh ? 0 : this.#state.oldestId(c);
      const page = await this.#conn.request("getHistory", {
        ...c.to,
        beforeMessageId: before,
        limit: HISTORY_PAGE,
      });
      for (const m of page.messages) {
        m.text = decodeText(m.body);
        this.#state.addServerMessage(m);
      }
      if (!fresh || !c.historyLoaded) c.hasMore = Boolean(page.hasMore);
      c.historyLoaded = true;
    } catch (err) {
      this.#reportError(err);
    } finally {
      c.loadingHistory = false;
      this.#state.changed("history");
    }
  }

  /** Starts (or opens) a direct conversation with a username. */
  async startDirect(username) {
    const user = await this.#request("lookupUser", { username });
    const c = this.#state.conversation({ userId: user.userId }, user.displayName || user.username);
    this.#state.changed();
    await this.open(c.key);
    return c;
  }

  async createGroup(name, usernames) {
    const ids = await this.#lookupIds(usernames);
    const g = await this.#request("createGroup", { name, memberIds: ids });
    const c = this.#state.conversation({ groupId: g.groupId }, g.name);
    c.members = g.members;
    this.#state.changed();
    await this.open(c.key);
    return c;
  }

  async refreshGroup(c) {
    const g = await this.#request("getGroup", { groupId: c.to.groupId });
    c.title = g.name;
    c.members = g.members;
    this.#state.changed();
  }

  /** Who may add me to groups: a GroupAddPolicy number (PROTOCOL.md §8.5). */
  async setGroupAdds(policy) {
    await this.#request("updateProfile", { groupAdds: policy });
    this.#state.groupAdds = policy;
    this.#state.changed();
  }

  async addMembers(c, usernames) {
    const ids = await this.#lookupIds(usernames);
    const g = await this.#request("addMembers", { groupId: c.to.groupId, userIds: ids });
    c.members = g.members;
    this.#state.changed();
  }

  async removeMember(c, userId) {
    const g = await this.#request("removeMember", { groupId: c.to.groupId, userId });
    c.members = g.members;
    this.#state.changed();
  }

  async leaveGroup(c) {
    await this.#request("leaveGroup", { groupId: c.to.groupId });
    this.#state.removeConversation(c.key);
    this.#state.changed();
  }

  async #lookupIds(usernames) {
    const ids = [];
    for (const username of usernames) {
      const u = await this.#request("lookupUser", { username });
      ids.push(u.userId);
    }
    return ids;
  }

  #request(kind, body) {
    if (!this.#authenticated) return Promise.reject(new ConnectionLost("not connected right now"));
    return this.#conn.request(kind, body);
  }

  #reportError(err) {
    this.#state.error = err.message;
    this.#state.changed();
  }
}
