// Entry point: wires the DOM's forms and buttons to the Session, and re-renders the View on
// every state change. No logic of its own beyond reading form fields.
import { ChatState } from "./state.mjs";
import { Session } from "./session.mjs";
import { View } from "./view.mjs";

const state = new ChatState();
const session = new Session(state);
const view = new View(state);
const $ = (id) => document.getElementById(id);

state.addEventListener("change", (e) => view.render(e.detail));

function showError(err) {
  const message = err?.message || String(err);
  // Every refusal a retry can fix says when (rate limits, a busy server).
  const wait = Math.ceil((err?.retryAfterMs ?? 0) / 1000);
  state.error = wait > 0 ? `${message} (try again in ${wait} s)` : message;
  state.changed();
}

/** Runs a form action with its submit button disabled; errors are shown, not thrown. */
function onSubmit(id, action) {
  const form = $(id);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      state.error = "";
      await action(new FormData(form), form);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  });
}

const usernames = (text) =>
  String(text || "")
    .split(/[\s,]+/)
    .map((u) => u.trim().replace(/^@/, ""))
    .filter(Boolean);

onSubmit("login-form", async (f, form) => {
  await session.login(f.get("username").trim(), f.get("password"));
  form.reset();
});

onSubmit("register-form", async (f, form) => {
  await session.register(f.get("username").trim(), f.get("password"), f.get("displayName").trim());
  form.reset();
});

onSubmit("new-direct", async (f, form) => {
  await session.startDirect(f.get("username").trim().replace(/^@/, ""));
  form.reset();
});

onSubmit("group-adds", async (f) => {
  await session.setGroupAdds(Number(f.get("groupAdds")));
});

onSubmit("new-group", async (f, form) => {
  await session.createGroup(f.get("name").trim(), usernames(f.get("members")));
  form.reset();
});

const activeConversation = () => state.conversations.get(state.activeKey);

onSubmit("add-member", async (f, form) => {
  await session.addMembers(activeConversation(), usernames(f.get("username")));
  form.reset();
});

onSubmit("composer", async (f, form) => {
  const text = f.get("text");
  const c = activeConversation();
  if (!c || !text.trim()) return;
  session.send(c.to, text);
  form.reset();
  form.elements.text.focus();
});

// Enter sends, Shift+Enter makes a new line.
$("composer").elements.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("conversations").addEventListener("click", (e) => {
  const button = e.target.closest("button.open-conversation");
  if (button) session.open(button.dataset.key).catch(showError);
});

$("messages").addEventListener("click", (e) => {
  const c = activeConversation();
  if (c && e.target.closest("button.load-older")) session.loadOlder(c);
});

$("member-list").addEventListener("click", (e) => {
  const button = e.target.closest("button.remove-member");
  if (button) session.removeMember(activeConversation(), Number(button.dataset.userId)).catch(showError);
});

$("toggle-members").addEventListener("click", () => {
  $("members").hidden = !$("members").hidden;
  const c = activeConversation();
  if (c && !$("members").hidden) session.refreshGroup(c).catch(showError);
});

$("leave-group").addEventListener("click", () => {
  const c = activeConversation();
  if (c) session.leaveGroup(c).then(() => ($("members").hidden = true), showError);
});

$("back").addEventListener("click", () => {
  state.activeKey = null;
  state.changed();
});

$("logout").addEventListener("click", () => session.logout().catch(showError));

// History paging: near the top of the list, ask for the next older page.
$("messages").addEventListener("scroll", (e) => {
  const c = activeConversation();
  if (c && e.target.scrollTop < 60) session.loadOlder(c);
});

view.render();
if (session.hasStoredSession) session.resumeStored();
