// Rendering: turns ChatState into DOM. Every piece of user-supplied text (message bodies,
// names) goes through textContent, never innerHTML; no inline styles (the page's CSP forbids
// them), only classes, attributes and the `hidden` property.

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

function formatTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString() ? timeFormat.format(d) : dateFormat.format(d);
}

const STATUS_TEXT = {
  offline: "offline",
  connecting: "connecting…",
  connected: "connected",
  reconnecting: "reconnecting",
  online: "online",
};

export class View {
  #state;

  constructor(state) {
    this.#state = state;
  }

  render(what = "all") {
    const s = this.#state;
    this.#renderStatus();
    if (what === "connection") return;
    const signedIn = Boolean(s.me);
    $("auth").hidden = signedIn || s.resuming;
    $("app").hidden = !signedIn;
    $("logout").hidden = !signedIn;
    $("me").textContent = signedIn ? s.me.displayName || s.me.username : "";
    $("error").hidden = !s.error;
    $("error").textContent = s.error;
    if (!signedIn) return;
    document.body.classList.toggle("in-chat", Boolean(s.activeKey));
    $("back").hidden = !s.activeKey;
    const groupAdds = $("group-adds").elements.groupAdds;
    // Not while the user is choosing: a re-render must not undo an unsaved choice.
    if (s.groupAdds && document.activeElement !== groupAdds) groupAdds.value = String(s.groupAdds);
    this.#renderConversations();
    this.#renderChat();
  }

  #renderStatus() {
    const { state, detail, pending } = this.#state.connection;
    const status = $("conn-status");
    status.dataset.state = state;
    let text = STATUS_TEXT[state] || state;
    if (detail) text += ` (${detail})`;
    if (pending) text += ` · ${pending} queued`;
    status.textContent = text;
  }

  #renderConversations() {
    const list = $("conversations");
    const items = [];
    for (const c of this.#state.sortedConversations()) {
      const li = el("li", "conversation");
      li.dataset.key = c.key;
      li.classList.toggle("active", c.key === this.#state.activeKey);
      const button = el("button", "open-conversation");
      button.type = "button";
      button.dataset.key = c.key;
      const title = el("span", "title", c.title);
      const kind = el("span", "kind", c.isGroup ? "group" : "");
      button.append(title, kind);
      const last = this.#state.ordered(c).at(-1);
      if (last) button.append(el("span", "preview", `${last.senderName}: ${last.text}`));
      if (c.unread) {
        const badge = el("span", "unread", String(c.unread));
        badge.setAttribute("aria-label", `${c.unread} unread`);
        button.append(badge);
      }
      li.append(button);
      items.push(li);
    }
    list.replaceChildren(...items);
  }

  #renderChat() {
    const s = this.#state;
    const c = s.activeKey && s.conversations.get(s.activeKey);
    $("chat-empty").hidden = Boolean(c);
    $("chat-body").hidden = !c;
    if (!c) return;
    $("chat-title").textContent = c.title;
    $("toggle-members").hidden = !c.isGroup;
    if (!c.isGroup) $("members").hidden = true;
    this.#renderMembers(c);
    this.#renderMessages(c);
  }

  #renderMembers(c) {
    if (!c.isGroup) return;
    const me = this.#state.me.userId;
    const iAmAdmin = Boolean(c.members?.some((m) => m.user.userId === me && m.admin));
    const items = (c.members || []).map((m) => {
      const li = el("li", "member");
      li.dataset.userId = String(m.user.userId);
      li.append(el("span", "name", m.user.displayName || m.user.username));
      li.append(el("span", "username", `@${m.user.username}`));
      if (m.admin) li.append(el("span", "admin", "admin"));
      if (iAmAdmin && m.user.userId !== me) {
        const remove = el("button", "remove-member", "Remove");
        remove.type = "button";
        remove.dataset.userId = String(m.user.userId);
        li.append(remove);
      }
      return li;
    });
    $("member-list").replaceChildren(...items);
    $("add-member").hidden = !iAmAdmin;
  }

  #renderMessages(c) {
    const list = $("messages");
    const wasAtBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const fromBottom = list.scrollHeight - list.scrollTop;
    const sameConversation = list.dataset.key === c.key;
    const me = this.#state.me.userId;
    const items = [];
    const top = el("li", "history-marker");
    if (c.loadingHistory) top.textContent = "Loading older messages…";
    else if (c.historyLoaded && !c.hasMore) top.textContent = "Beginning of the conversation";
    else {
      const more = el("button", "load-older", "Load older messages");
      more.type = "button";
      top.append(more);
    }
    items.push(top);
    for (const m of this.#state.ordered(c)) {
      const mine = m.senderId === me;
      const li = el("li", mine ? "message mine" : "message");
      li.dataset.clientMsgId = m.clientMsgId;
      li.dataset.status = m.status;
      if (m.messageId) li.dataset.messageId = String(m.messageId);
      const meta = el("div", "meta");
      meta.append(el("span", "sender", m.senderName));
      const time = el("time", "time", formatTime(m.time));
      if (m.time) time.dateTime = new Date(m.time).toISOString();
      meta.append(time);
      if (mine) {
        const label = { pending: "sending…", sent: "sent", failed: "not sent" }[m.status];
        const status = el("span", "delivery", label);
        if (m.failure) status.title = m.failure;
        meta.append(status);
      }
      li.append(meta, el("p", "body", m.text));
      items.push(li);
    }
    list.replaceChildren(...items);
    list.dataset.key = c.key;
    // Follow the conversation when at its end, on opening it, and when I just sent something.
    const newest = this.#state.ordered(c).at(-1);
    const iJustSent = newest && newest.senderId === me && newest.key !== list.dataset.newest;
    list.dataset.newest = newest ? newest.key : "";
    if (!sameConversation || wasAtBottom || iJustSent) list.scrollTop = list.scrollHeight;
    else list.scrollTop = list.scrollHeight - fromBottom; // keep the view still when older ones arrive
  }
}
