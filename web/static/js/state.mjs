// The client's model: who I am, the conversations, their messages and unread counts.
// Pure data and merge rules (no network, no DOM). A message is identified by
// (sender, client_msg_id), which the server keeps on every copy, so a pending send, its
// Delivery, a history page and a replay all land on the same entry and nothing shows twice.

export const conversationKey = (to) => (to.groupId ? `g:${to.groupId}` : `u:${to.userId}`);

/** Which conversation a server Message belongs to (PROTOCOL.md §6.5). */
export function conversationOf(message, me) {
  if (message.groupId) return { groupId: message.groupId };
  if (message.sender && message.sender.userId === me) return { userId: message.userId };
  return { userId: message.sender ? message.sender.userId : message.userId };
}

const messageKey = (senderId, clientMsgId) => `${senderId}/${clientMsgId}`;

export class ChatState extends EventTarget {
  me = null; // pb User
  groupAdds = 0; // pb GroupAddPolicy of the signed-in account (0: not known yet)
  connection = { state: "offline", detail: "" };
  conversations = new Map(); // key -> Conversation
  activeKey = null;
  error = "";
  resuming = false; // a stored session is being resumed: no login form meanwhile

  reset() {
    this.me = null;
    this.groupAdds = 0;
    this.conversations.clear();
    this.activeKey = null;
    this.error = "";
    this.changed();
  }

  changed(what = "all") {
    this.dispatchEvent(new CustomEvent("change", { detail: what }));
  }

  /** Finds or creates the conversation for `to` ({userId} or {groupId}). */
  conversation(to, title) {
    const key = conversationKey(to);
    let c = this.conversations.get(key);
    if (!c) {
      c = {
        key,
        to: to.groupId ? { groupId: to.groupId } : { userId: to.userId },
        isGroup: Boolean(to.groupId),
        title: title || (to.groupId ? `group ${to.groupId}` : `user ${to.userId}`),
        messages: new Map(),
        unread: 0,
        lastActivity: 0,
        historyLoaded: false,
        hasMore: true,
        loadingHistory: false,
        members: null, // pb GroupMember[] once fetched
      };
      this.conversations.set(key, c);
    } else if (title) {
      c.title = title;
    }
    return c;
  }

  /** Merges a server Message (from a Delivery, a history page or a summary). */
  addServerMessage(m, { live = false } = {}) {
    const me = this.me?.userId;
    const c = this.conversation(conversationOf(m, me));
    const senderId = m.sender?.userId ?? 0;
    const key = messageKey(senderId, m.clientMsgId);
    const existing = c.messages.get(key);
    const entry = existing || { key, clientMsgId: m.clientMsgId, senderId, localTime: 0 };
    Object.assign(entry, {
      messageId: m.messageId,
      senderName: m.sender?.displayName || m.sender?.username || `user ${senderId}`,
      text: m.text,
      time: m.serverTimeMs,
      status: "sent",
    });
    c.messages.set(key, entry);
    if (!c.isGroup && senderId !== me && m.sender) {
      c.title = m.sender.displayName || m.sender.username;
    }
    c.lastActivity = Math.max(c.lastActivity, m.messageId);
    if (live && !existing && senderId !== me && this.activeKey !== c.key) c.unread += 1;
    return c;
  }

  /** A message typed here that the server has not confirmed yet. */
  addPending(p) {
    const c = this.conversation(p.to);
    const key = messageKey(this.me.userId, p.clientMsgId);
    if (!c.messages.has(key)) {
      c.messages.set(key, {
        key,
        clientMsgId: p.clientMsgId,
        senderId: this.me.userId,
        senderName: this.me.displayName || this.me.username,
        text: p.text,
        time: p.createdAt,
        localTime: p.createdAt,
        messageId: 0,
        status: "pending",
      });
    }
    c.lastActivity = Number.MAX_SAFE_INTEGER; // a fresh send goes to the top of the list
    return c;
  }

  /** The server answered our send (Sent) or refused it (failed). */
  settlePending(to, clientMsgId, { messageId, time, failed, reason }) {
    const c = this.conversation(to);
    const m = c.messages.get(messageKey(this.me.userId, clientMsgId));
    if (!m) return;
    if (failed) {
      m.status = "failed";
      m.failure = reason;
    } else {
      m.messageId = messageId;
      m.time = time;
      m.status = "sent";
      c.lastActivity = Math.max(
        messageId,
        c.lastActivity === Number.MAX_SAFE_INTEGER ? 0 : c.lastActivity,
      );
    }
  }

  /** Messages of a conversation in display order: by message_id, pending ones last. */
  ordered(c) {
    return [...c.messages.values()].sort((a, b) => {
      if (a.messageId && b.messageId) return a.messageId - b.messageId;
      if (a.messageId) return -1;
      if (b.messageId) return 1;
      return a.localTime - b.localTime;
    });
  }

  /** Oldest confirmed message id of a conversation (0 when it has none). */
  oldestId(c) {
    let oldest = 0;
    for (const m of c.messages.values()) {
      if (m.messageId && (!oldest || m.messageId < oldest)) oldest = m.messageId;
    }
    return oldest;
  }

  sortedConversations() {
    return [...this.conversations.values()].sort((a, b) => b.lastActivity - a.lastActivity);
  }

  removeConversation(key) {
    this.conversations.delete(key);
    if (this.activeKey === key) this.activeKey = null;
  }
}
