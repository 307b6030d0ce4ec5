// End-to-end test of the browser client in real headless Chromium (Playwright, no browser
// download). Run by daemon/tests/browser.rs against an in-process messengerd; by hand:
//
//   MESSENGER_URL=https://127.0.0.1:7443/ MESSENGER_CERT=messenger-data/tls/cert.pem \
//   MESSENGER_SDK_USER=<a user answering "echo: <text>"> node web/tests/e2e.mjs
//
// Env: MESSENGER_URL (the page), MESSENGER_CERT (the server's leaf certificate, PEM: trusted
// by its public-key pin, no blanket ignoring of certificate errors), MESSENGER_SDK_USER (an
// SDK user that echoes direct messages), MESSENGER_SCREENSHOTS (folder; default a temp dir),
// CHROMIUM (default /usr/bin/chromium), MESSENGER_IDLE_MS (the server's idle timeout; the
// keep-alive step idles longer than that). Exits non-zero on the first failed check.
import { createHash, X509Certificate } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { messenger } from "../static/proto/messenger.mjs";

const pb = messenger.v1;

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set (see the head of web/tests/e2e.mjs)`);
  return v;
};
const URL_ = env("MESSENGER_URL");
const CERT = env("MESSENGER_CERT");
const SDK_USER = env("MESSENGER_SDK_USER");
const SHOTS = env("MESSENGER_SCREENSHOTS", mkdtempSync(join(tmpdir(), "messenger-screenshots-")));
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");
const WAIT = 15_000;
const IDLE_MS = Number(env("MESSENGER_IDLE_MS", "0"));

mkdirSync(SHOTS, { recursive: true });
console.log(`screenshots: ${SHOTS}`);

/** base64(sha256(SubjectPublicKeyInfo)) of the leaf: what --ignore-certificate-errors-spki-list takes. */
function spkiPin(pemPath) {
  const cert = new X509Certificate(readFileSync(pemPath));
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  return createHash("sha256").update(spki).digest("base64");
}

const suffix = Math.random().toString(36).slice(2, 8);
const steps = [];
let shot = 0;

async function step(name, fn) {
  const started = Date.now();
  await fn();
  steps.push(name);
  console.log(`ok ${steps.length} - ${name} (${Date.now() - started} ms)`);
}

async function screenshot(page, name) {
  shot += 1;
  const file = join(SHOTS, `${String(shot).padStart(2, "0")}-${name}.png`);
  await page.screenshot({ path: file });
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** Polls `fn` until it returns a truthy value or WAIT passes. */
async function eventually(what, fn, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// ---- page helpers (the app's DOM contract: ids and classes of static/index.html, view.mjs) ----

const status = (page) => page.locator("#conn-status");
const messageBodies = (page, text) =>
  page.locator("#messages .message .body").filter({ hasText: text });
async function exactCount(page, text) {
  const bodies = await page.locator("#messages .message .body").allTextContents();
  return bodies.filter((b) => b === text).length;
}

async function waitOnline(page) {
  await eventually("the connection to be online", async () =>
    (await status(page).getAttribute("data-state")) === "online",
  );
}

async function register(page, username, displayName, password) {
  const form = page.locator("#register-form");
  await form.locator("input[name=username]").fill(username);
  await form.locator("input[name=displayName]").fill(displayName);
  await form.locator("input[name=password]").fill(password);
  await form.locator("button[type=submit]").click();
  await page.locator("#app").waitFor({ state: "visible", timeout: WAIT });
  await waitOnline(page);
  check((await page.locator("#me").textContent()) === displayName, "my display name is shown");
}

/** Shows the conversation list (on a phone the open chat hides it). */
async function showList(page) {
  if (await page.locator("#back").isVisible()) await page.locator("#back").click();
}

const conversationItem = (page, title) =>
  page.locator("#conversations .conversation").filter({
    has: page.locator(".title", { hasText: title }),
  });

async function openConversation(page, title) {
  await showList(page);
  const item = conversationItem(page, title);
  await item.waitFor({ timeout: WAIT });
  await item.locator("button").click();
  await eventually(`"${title}" to open`, async () =>
    (await page.locator("#chat-title").textContent()) === title,
  );
}

async function send(page, text) {
  await page.locator("#composer textarea").fill(text);
  await page.locator("#composer button[type=submit]").click();
}

async function waitSent(page, text) {
  await eventually(`"${text}" to be confirmed as sent`, async () => {
    const li = page.locator("#messages .message.mine").filter({ hasText: text }).last();
    return (await li.getAttribute("data-status")) === "sent";
  });
}

async function waitMessage(page, text, sender) {
  const li = page.locator("#messages .message").filter({
    has: page.locator(".body", { hasText: text }),
  });
  await li.first().waitFor({ timeout: WAIT });
  if (sender) {
    const shown = await li.first().locator(".sender").textContent();
    check(shown === sender, `"${text}" shows sender ${sender} (got ${shown})`);
  }
  const time = await li.first().locator("time").textContent();
  check(time.length > 0, `"${text}" shows a time`);
}

async function unreadOf(page, title) {
  const badge = conversationItem(page, title).locator(".unread");
  return (await badge.count()) ? Number(await badge.textContent()) : 0;
}

// ---- the scenario ----------------------------------------------------------------

const pin = spkiPin(CERT);
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  // Playwright gives every launch a fresh --user-data-dir of its own (it refuses the flag).
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    `--ignore-certificate-errors-spki-list=${pin}`,
  ],
});

const problems = [];
async function newUserPage(viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    // CSP violations are reported on the console: the page must cause none.
    if (msg.type() === "error" && /Content Security Policy|Refused to/.test(msg.text())) {
      problems.push(`console: ${msg.text()}`);
    }
  });
  page.on("dialog", async (dialog) => {
    problems.push(`a dialog opened: ${dialog.message()}`);
    await dialog.dismiss();
  });
  return { context, page, sockets: recordSockets(page) };
}

/** Every WebSocket of a page, with the ClientFrames it sent (decoded with the same module). */
function recordSockets(page) {
  const sockets = [];
  page.on("websocket", (ws) => {
    const entry = { url: ws.url(), closed: false, frames: [] };
    sockets.push(entry);
    ws.on("close", () => (entry.closed = true));
    ws.on("framesent", ({ payload }) => {
      if (typeof payload === "string") {
        problems.push(`a text WebSocket message was sent: ${payload.slice(0, 40)}`);
        return;
      }
      entry.frames.push(pb.ClientFrame.decode(payload));
    });
  });
  return sockets;
}

/** Protocol rules every socket of a page followed: Hello first, binary only, cumulative acks. */
function checkFrames(who, sockets) {
  check(sockets.length > 0, `${who} opened a WebSocket`);
  let acks = 0;
  for (const s of sockets) {
    check(s.url.endsWith("/start"), `${who}'s socket is on /start (${s.url})`);
    if (!s.frames.length) continue;
    check(s.frames[0].kind === "hello", `${who}'s first frame is Hello (got ${s.frames[0].kind})`);
    let last = 0;
    const ids = new Set();
    for (const f of s.frames) {
      if (f.kind === "ack") {
        acks += 1;
        check(!f.requestId, `${who}'s acks carry request_id 0`);
        check(f.ack.upToSeq > last, `${who}'s acks are cumulative (${f.ack.upToSeq} after ${last})`);
        last = f.ack.upToSeq;
      } else {
        check(f.requestId > 0 && !ids.has(f.requestId), `${who} uses a fresh request_id per request`);
        ids.add(f.requestId);
      }
    }
  }
  check(acks > 0, `${who} acknowledged deliveries`);
}

const PASSWORD = "correct horse battery";
const alice = { name: `alice_${suffix}`, display: `Alice ${suffix}` };
const bob = { name: `bob_${suffix}`, display: `Bob ${suffix}` };
const sdkDisplay = `${SDK_USER} display`; // tests' SDK users are registered as "<name> display"

let failed = null;
try {
  const a = await newUserPage({ width: 1200, height: 800 });
  const b = await newUserPage({ width: 390, height: 760 }); // a phone
  const A = a.page;
  const B = b.page;

  await step("the daemon serves the app with its CSP", async () => {
    const response = await A.goto(URL_);
    check(response.ok(), `GET / answered ${response.status()}`);
    const csp = response.headers()["content-security-policy"] || "";
    check(csp.includes("script-src 'self'"), `the page carries the CSP (got "${csp}")`);
    await B.goto(URL_);
    await A.locator("#register-form").waitFor();
    await screenshot(A, "sign-up");
  });

  await step("two users register and are signed in", async () => {
    await register(A, alice.name, alice.display, PASSWORD);
    await register(B, bob.name, bob.display, PASSWORD);
    await screenshot(B, "phone-empty-list");
  });

  await step("a direct message arrives with an unread count, sender and time", async () => {
    await A.locator("#new-direct input[name=username]").fill(bob.name);
    await A.locator("#new-direct button").click();
    await eventually("the chat with Bob", async () =>
      (await A.locator("#chat-title").textContent()) === bob.display,
    );
    await send(A, "hello bob");
    await waitSent(A, "hello bob");
    await eventually("Bob's unread count of 1", async () => (await unreadOf(B, alice.display)) === 1);
    await screenshot(B, "phone-unread");
    await openConversation(B, alice.display);
    await waitMessage(B, "hello bob", alice.display);
    await eventually("opening the chat to clear its unread count", async () =>
      (await unreadOf(B, alice.display)) === 0,
    );
    await send(B, "hi alice");
    await waitSent(B, "hi alice");
    await waitMessage(A, "hi alice", bob.display);
    check((await exactCount(A, "hello bob")) === 1, "Alice's own message shows once");
    await screenshot(B, "phone-direct-chat");
    await screenshot(A, "direct-chat");
  });

  await step("HTML in a message is shown as text", async () => {
    const html = "<img src=x onerror=alert(1)>";
    await send(A, html);
    await waitSent(A, html);
    await eventually("the HTML text at Bob", async () => (await exactCount(B, html)) === 1);
    for (const page of [A, B]) {
      check((await page.locator("#messages img").count()) === 0, "no img element was created");
      check((await exactCount(page, html)) === 1, "the markup appears literally, once");
    }
    await screenshot(B, "phone-html-as-text");
  });

  await step("a browser user and an SDK user chat", async () => {
    await A.locator("#new-direct input[name=username]").fill(SDK_USER);
    await A.locator("#new-direct button").click();
    await eventually("the chat with the SDK user", async () =>
      (await A.locator("#chat-title").textContent()) === sdkDisplay,
    );
    const text = `hello bot ${suffix}`;
    await send(A, text);
    await waitSent(A, text);
    await waitMessage(A, `echo: ${text}`, sdkDisplay);
    await screenshot(A, "sdk-echo");
  });

  const team = `Team ${suffix}`;
  await step("a group: create, chat with sender names, add, remove", async () => {
    await A.locator("#new-group input[name=name]").fill(team);
    await A.locator("#new-group input[name=members]").fill(bob.name);
    await A.locator("#new-group button").click();
    await eventually("the group to open", async () =>
      (await A.locator("#chat-title").textContent()) === team,
    );
    await send(A, "hello team");
    await waitSent(A, "hello team");
    await eventually("the group at Bob with 1 unread", async () => (await unreadOf(B, team)) === 1);
    await openConversation(B, team);
    await waitMessage(B, "hello team", alice.display);
    await send(B, "hi team");
    await waitMessage(A, "hi team", bob.display);

    await A.locator("#toggle-members").click();
    const members = A.locator("#member-list .member");
    await eventually("two members", async () => (await members.count()) === 2);
    await A.locator("#add-member input[name=username]").fill(SDK_USER);
    await A.locator("#add-member button").click();
    await eventually("the SDK user added", async () => (await members.count()) === 3);
    await screenshot(A, "group-members");
    const sdkMember = members.filter({ hasText: `@${SDK_USER}` });
    await sdkMember.locator(".remove-member").click();
    await eventually("the SDK user removed", async () => (await members.count()) === 2);
    check((await members.filter({ hasText: `@${bob.name}` }).count()) === 1, "Bob is still a member");
    await screenshot(B, "phone-group-chat");
  });

  await step("history pages in on scroll", async () => {
    await openConversation(A, bob.display);
    for (let i = 1; i <= 35; i += 1) await send(A, `bulk ${i}`);
    await waitSent(A, "bulk 35");
    await openConversation(B, alice.display);
    await waitMessage(B, "bulk 35");
  });

  await step("a reload resumes the session without losing or doubling a message", async () => {
    const reloading = B.reload();
    await send(A, "sent while Bob reloads");
    await reloading;
    await B.locator("#app").waitFor({ state: "visible" });
    await waitOnline(B);
    check(!(await B.locator("#auth").isVisible()), "no login form after the reload");
    await openConversation(B, alice.display);
    await waitMessage(B, "sent while Bob reloads", alice.display);
    // The newest page holds 30 messages; "hello bob" is older and comes by scrolling up.
    check((await exactCount(B, "hello bob")) === 0, "older messages are not loaded yet");
    await eventually("an older history page", async () => {
      await B.locator("#messages").evaluate((ol) => {
        ol.scrollTop = 0;
        ol.dispatchEvent(new Event("scroll"));
      });
      return (await exactCount(B, "hello bob")) === 1;
    });
    for (const text of ["sent while Bob reloads", "hello bob", "bulk 1", "bulk 35"]) {
      check((await exactCount(B, text)) === 1, `"${text}" shows exactly once after the reload`);
    }
    await screenshot(B, "phone-after-reload-history");
  });

  await step("offline sends are queued and delivered once after reconnecting", async () => {
    await b.context.setOffline(true);
    await eventually("Bob to notice he is offline", async () =>
      (await status(B).getAttribute("data-state")) !== "online",
    );
    await send(B, "queued 1");
    await send(B, "queued 2");
    const pending = B.locator('#messages .message.mine[data-status="pending"]');
    check((await pending.count()) === 2, "both sends wait as pending");
    await screenshot(B, "phone-offline-queue");
    await b.context.setOffline(false);
    await waitOnline(B);
    await waitSent(B, "queued 2");
    await waitSent(B, "queued 1");
    for (const text of ["queued 1", "queued 2"]) {
      await eventually(`"${text}" at Alice`, async () => (await exactCount(A, text)) === 1);
    }
    await new Promise((r) => setTimeout(r, 500));
    for (const text of ["queued 1", "queued 2"]) {
      check((await exactCount(A, text)) === 1, `"${text}" arrived exactly once`);
      check((await exactCount(B, text)) === 1, `"${text}" shows once for Bob`);
    }
    await screenshot(A, "after-offline-queue");
  });

  await step("a send whose answer was lost is retried with the same id and shown once", async () => {
    // Carol's socket goes through a Playwright WebSocket route that forwards everything but,
    // once, swallows what the server says after her send and cuts the connection when its
    // `Sent` comes: the message is stored, but the page never heard so.
    const c = await newUserPage({ width: 1000, height: 700 });
    const C = c.page;
    const text = `the answer to this gets lost ${suffix}`;
    const lost = { armed: true, requestId: 0, clientMsgId: "", retries: 0, retryId: 0, duplicate: null };
    await C.routeWebSocket(/\/start$/, (ws) => {
      const server = ws.connectToServer();
      let swallowing = false;
      ws.onMessage((m) => {
        const f = pb.ClientFrame.decode(Buffer.from(m));
        if (f.kind === "send" && Buffer.from(f.send.body).toString() === text) {
          if (lost.armed) {
            Object.assign(lost, { armed: false, requestId: f.requestId, clientMsgId: f.send.clientMsgId });
            swallowing = true;
          } else {
            if (f.send.clientMsgId !== lost.clientMsgId) lost.otherIds = (lost.otherIds || 0) + 1;
            lost.retries += 1;
            lost.retryId = f.requestId;
          }
        }
        server.send(m);
      });
      server.onMessage((m) => {
        const f = pb.ServerFrame.decode(Buffer.from(m));
        if (swallowing) {
          if (f.kind === "sent" && f.requestId === lost.requestId) {
            ws.close({ code: 4000, reason: "test: connection cut" });
            server.close();
          }
          return;
        }
        if (f.kind === "sent" && lost.retries && f.requestId === lost.retryId) lost.duplicate = f.sent.duplicate;
        ws.send(m);
      });
    });
    await C.goto(URL_);
    const carol = { name: `carol_${suffix}`, display: `Carol ${suffix}` };
    await register(C, carol.name, carol.display, PASSWORD);
    await C.locator("#new-direct input[name=username]").fill(alice.name);
    await C.locator("#new-direct button").click();
    await eventually("the chat with Alice", async () =>
      (await C.locator("#chat-title").textContent()) === alice.display,
    );
    await send(C, text);
    await waitSent(C, text);
    check(lost.retries === 1, `the send was retried once after reconnecting (${lost.retries})`);
    check(!lost.otherIds, "the retry reused the original client_msg_id");
    // The page may show the message as sent from its own copy replayed after the resume,
    // before the retry's answer arrives (a busy machine makes that likely): wait for the answer.
    await eventually("the server's answer to the retry", async () => lost.duplicate !== null);
    check(lost.duplicate === true, "the server answered the retry as a duplicate");
    await waitOnline(C);
    await openConversation(A, carol.display);
    await waitMessage(A, text, carol.display);
    await new Promise((r) => setTimeout(r, 500));
    check((await exactCount(A, text)) === 1, "Alice got it exactly once");
    check((await exactCount(C, text)) === 1, "Carol shows it exactly once");
    await screenshot(C, "retried-send");
    await c.context.close();
  });

  await step("a member leaves the group", async () => {
    await openConversation(B, team);
    await B.locator("#toggle-members").click();
    await B.locator("#leave-group").click();
    // Leaving closes the chat: on the phone the list is back.
    await B.locator("#conversations").waitFor({ state: "visible" });
    await eventually("the group gone from Bob's list", async () =>
      (await conversationItem(B, team).count()) === 0,
    );
    await openConversation(A, team);
    const members = A.locator("#member-list .member");
    await eventually("Alice sees Bob gone", async () => {
      if (await A.locator("#members").isVisible()) await A.locator("#toggle-members").click();
      await A.locator("#toggle-members").click(); // showing the panel refreshes the members
      await A.waitForTimeout(200);
      return (await members.count()) === 1 && (await members.filter({ hasText: `@${bob.name}` }).count()) === 0;
    });
    await screenshot(A, "group-after-leave");
  });

  await step("idle pages keep their connection alive with Ping", async () => {
    check(IDLE_MS > 0, "MESSENGER_IDLE_MS is set");
    const open = a.sockets.filter((s) => !s.closed);
    check(open.length === 1, `Alice has one open socket (has ${open.length})`);
    const pingsBefore = open[0].frames.filter((f) => f.kind === "ping").length;
    await A.waitForTimeout(IDLE_MS + 1500); // longer than the server lets a silent connection live
    check(!open[0].closed, "the idle connection is still open");
    check(a.sockets.length === a.sockets.filter((s) => s.closed).length + 1, "no reconnect happened");
    const pings = open[0].frames.filter((f) => f.kind === "ping").length - pingsBefore;
    check(pings >= 2, `Alice pinged while idle (${pings} pings)`);
    check((await status(A).getAttribute("data-state")) === "online", "still online");
    checkFrames("Alice", a.sockets);
    checkFrames("Bob", b.sockets);
  });

  check(problems.length === 0, `the pages reported problems:\n  ${problems.join("\n  ")}`);
} catch (err) {
  failed = err;
} finally {
  await browser.close().catch(() => {});
}

if (failed) {
  console.error(`not ok ${steps.length + 1} - ${failed.stack || failed}`);
  console.log(`${steps.length} passed, 1 failed`);
  process.exit(1);
}
console.log(`${steps.length} passed, 0 failed`);
