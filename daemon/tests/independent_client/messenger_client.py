#!/usr/bin/env python3
"""An independent Messenger client, written from docs/PROTOCOL.md alone.

Standard library only: TLS from `ssl`, framing from `struct`, and a hand-written protobuf
encoder/decoder (PROTOCOL.md §2.5). The module has three parts:

1. protobuf encoding and a small schema-driven decoder for the ServerFrame messages,
2. `Connection`: one TLS connection (ALPN messenger/1, CA verified) with request/response
   matching by request_id and a queue for pushes (Delivery, GoAway, connection-level Error),
3. `run_scenario`: an end-to-end check of the protocol against a running server.

    python3 messenger_client.py --addr 127.0.0.1:7443 --ca messenger-data/tls/dev-ca.pem

exits 0 when every check passes, and 1 with a message naming the first failed check.
"""

import argparse
import collections
import secrets
import socket
import ssl
import struct
import sys
import time
import traceback

# ---------------------------------------------------------------------------------------
# 1. Protobuf (PROTOCOL.md §2.5)
# ---------------------------------------------------------------------------------------


def varint(n):
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def key(field, wire_type):
    return varint((field << 3) | wire_type)


def f_uint(field, value, force=False):
    """uint32/uint64/int64/bool/enum; force=True for oneof members (always encoded)."""
    return key(field, 0) + varint(int(value)) if (value or force) else b""


def f_bytes(field, value, force=False):
    """string, bytes, or an already encoded sub-message."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    return key(field, 2) + varint(len(value)) + value if (value or force) else b""


def f_msg(field, encoded):
    """A set sub-message (or oneof member): written even when empty."""
    return f_bytes(field, encoded, force=True)


def f_packed(field, values):
    """A packed `repeated uint64`."""
    return f_bytes(field, b"".join(varint(v) for v in values))


def read_varint(buf, i):
    n = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return n, i
        if shift >= 70:
            raise ValueError("varint too long")


def raw_fields(buf):
    """Yields (field_number, wire_type, int | bytes) for every field of an encoded message."""
    i = 0
    while i < len(buf):
        k, i = read_varint(buf, i)
        field, wire_type = k >> 3, k & 7
        if wire_type == 0:
            value, i = read_varint(buf, i)
        elif wire_type == 2:
            n, i = read_varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated length-delimited field")
            value = bytes(buf[i : i + n])
            i += n
        elif wire_type == 1:
            value, i = bytes(buf[i : i + 8]), i + 8
        elif wire_type == 5:
            value, i = bytes(buf[i : i + 4]), i + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield field, wire_type, value


# The server-to-client half of the schema (Appendix A; ConversationList from §1.1 and §9.2,
# which Appendix A does not have yet). Each message maps field number -> (name, type); a type is a
# scalar kind or another message's name, a trailing "*" means repeated. Fields named in
# ONEOFS are members of the message's `oneof kind` and also set `kind` to their name.
SCHEMA = {
    "ServerFrame": {
        1: ("request_id", "uint"),
        2: ("hello_ok", "HelloOk"),
        3: ("error", "Error"),
        4: ("registered", "Registered"),
        5: ("authenticated", "Authenticated"),
        6: ("ok", "Ok"),
        7: ("user", "User"),
        8: ("sent", "Sent"),
        9: ("delivery", "Delivery"),
        10: ("group", "Group"),
        11: ("group_list", "GroupList"),
        12: ("history_page", "HistoryPage"),
        13: ("pong", "Pong"),
        14: ("go_away", "GoAway"),
        15: ("conversation_list", "ConversationList"),
    },
    "HelloOk": {1: ("protocol_version", "uint"), 2: ("server", "string"), 3: ("limits", "Limits")},
    "Limits": {
        1: ("max_frame_bytes", "uint"),
        2: ("max_body_bytes", "uint"),
        3: ("max_group_members", "uint"),
        4: ("max_history_page", "uint"),
        5: ("idle_timeout_ms", "uint"),
    },
    "Error": {1: ("code", "uint"), 2: ("message", "string"), 3: ("retry_after_ms", "uint")},
    "Registered": {1: ("user", "User")},
    "Authenticated": {
        1: ("user", "User"),
        2: ("session_token", "bytes"),
        3: ("device_id", "uint"),
        4: ("expires_at_ms", "int64"),
        5: ("acked_seq", "uint"),
    },
    "Ok": {},
    "User": {1: ("user_id", "uint"), 2: ("username", "string"), 3: ("display_name", "string")},
    "Sent": {1: ("message_id", "uint"), 2: ("server_time_ms", "int64"), 3: ("duplicate", "bool")},
    "Message": {
        1: ("message_id", "uint"),
        2: ("sender", "User"),
        3: ("to_user_id", "uint"),
        4: ("to_group_id", "uint"),
        5: ("client_msg_id", "string"),
        6: ("body", "bytes"),
        7: ("content_type", "string"),
        8: ("server_time_ms", "int64"),
    },
    "Delivery": {1: ("seq", "uint"), 2: ("message", "Message")},
    "GroupMember": {1: ("user", "User"), 2: ("admin", "bool")},
    "Group": {
        1: ("group_id", "uint"),
        2: ("name", "string"),
        3: ("members", "GroupMember*"),
        4: ("created_at_ms", "int64"),
    },
    "GroupList": {1: ("groups", "Group*")},
    "HistoryPage": {1: ("messages", "Message*"), 2: ("has_more", "bool")},
    "Pong": {},
    "GoAway": {1: ("reason", "string"), 2: ("reconnect_after_ms", "uint"), 3: ("code", "uint")},
    "ConversationList": {
        1: ("conversations", "ConversationSummary*"),
        2: ("next_cursor", "bytes"),
    },
    "ConversationSummary": {
        1: ("user", "User"),  # oneof `with`
        2: ("group", "Group"),  # oneof `with`
        3: ("last_message", "Message"),
    },
}
ONEOFS = {"ServerFrame": {name for name, _ in SCHEMA["ServerFrame"].values()} - {"request_id"}}
DEFAULTS = {"uint": 0, "int64": 0, "bool": False, "string": "", "bytes": b""}


class Msg(dict):
    """A decoded message: a dict that also allows attribute access (`frame.error.code`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def decode(type_name, buf):
    """Decodes `buf` as `type_name`. Absent fields get proto3 defaults (messages: None);
    unknown fields are skipped; for a non-repeated field the last occurrence wins."""
    schema = SCHEMA[type_name]
    out = Msg(kind=None) if type_name in ONEOFS else Msg()
    for name, typ in schema.values():
        out[name] = [] if typ.endswith("*") else DEFAULTS.get(typ)
    for field, wire_type, value in raw_fields(buf):
        if field not in schema:
            continue
        name, typ = schema[field]
        repeated = typ.endswith("*")
        typ = typ.rstrip("*")
        if typ in ("uint", "int64", "bool"):
            if wire_type != 0:
                raise ValueError(f"{type_name}.{name}: wire type {wire_type}, expected varint")
            if typ == "int64" and value >= 1 << 63:
                value -= 1 << 64
            elif typ == "bool":
                value = bool(value)
        else:
            if wire_type != 2:
                raise ValueError(f"{type_name}.{name}: wire type {wire_type}, expected bytes")
            if typ == "string":
                value = value.decode("utf-8")
            elif typ != "bytes":
                value = decode(typ, value)
        if repeated:
            out[name].append(value)
        else:
            out[name] = value
        if name in ONEOFS.get(type_name, ()):
            out["kind"] = name
    return out


# ClientFrame.kind field numbers (PROTOCOL.md §1.1), plus ListConversations (field 21).
HELLO, REGISTER, LOGIN, RESUME = 2, 3, 4, 5
UPDATE_PROFILE, CHANGE_PASSWORD, LOGOUT, DELETE_ACCOUNT, LOOKUP_USER = 6, 7, 8, 9, 10
SEND, ACK, CREATE_GROUP, ADD_MEMBERS, REMOVE_MEMBER, LEAVE_GROUP = 11, 12, 13, 14, 15, 16
LIST_GROUPS, GET_GROUP, GET_HISTORY, PING, LIST_CONVERSATIONS = 17, 18, 19, 20, 21

# ErrorCode (PROTOCOL.md §11).
ERROR_NAMES = {
    0: "UNSPECIFIED", 1: "INVALID_ARGUMENT", 2: "UNAUTHENTICATED", 3: "PERMISSION_DENIED",
    4: "NOT_FOUND", 5: "ALREADY_EXISTS", 6: "RATE_LIMITED", 7: "TOO_LARGE",
    8: "UNSUPPORTED_VERSION", 9: "UNAVAILABLE", 10: "INTERNAL",
}
ERROR_CODES = {name: code for code, name in ERROR_NAMES.items()}

# ---------------------------------------------------------------------------------------
# 2. Connection (PROTOCOL.md §2, §3)
# ---------------------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


class Connection:
    TIMEOUT = 10.0  # seconds per request / awaited push

    def __init__(self, addr, ca_file):
        host, port = addr.rsplit(":", 1)
        # The CA file is the only trust root; chain and host name are verified. (The
        # development certificate carries an Authority Key Identifier, so Python's
        # VERIFY_X509_STRICT, the default from 3.13 on, is satisfied.)
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.set_alpn_protocols(["messenger/1"])
        host = host.strip("[]")
        tcp = socket.create_connection((host, int(port)), timeout=self.TIMEOUT)
        # The host name (or IP address) is checked against the certificate; the development
        # certificate is issued for localhost, 127.0.0.1 and ::1.
        self.sock = ctx.wrap_socket(tcp, server_hostname=host)
        if self.sock.selected_alpn_protocol() != "messenger/1":
            raise RuntimeError(f"ALPN: server selected {self.sock.selected_alpn_protocol()!r}")
        self.buf = bytearray()
        self.next_id = 1
        self.pushes = collections.deque()  # request_id 0 frames not yet consumed
        self.max_frame_bytes = 262144  # replaced by HelloOk.limits
        self.limits = None

    # --- raw frames ------------------------------------------------------------------

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, kind_field, body, request_id):
        payload = f_uint(1, request_id) + f_msg(kind_field, body)
        self.send_raw(struct.pack(">I", len(payload)) + payload)

    def read_frame(self, timeout=TIMEOUT):
        """The next ServerFrame, decoded. Raises Closed on EOF, TimeoutError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if n > self.max_frame_bytes:
                    raise RuntimeError(f"server frame of {n} bytes exceeds max_frame_bytes")
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return decode("ServerFrame", body)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError("no frame from the server") from None
            except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
                raise Closed(str(e)) from None
            if not chunk:
                if self.buf:
                    raise Closed(f"closed with {len(self.buf)} bytes of an incomplete frame")
                raise Closed("connection closed")
            self.buf += chunk

    # --- requests and pushes ---------------------------------------------------------

    def request(self, kind_field, body=b""):
        """Sends a request and returns its response frame; pushes meanwhile are queued."""
        request_id = self.next_id
        self.next_id += 1
        self.send(kind_field, body, request_id)
        deadline = time.monotonic() + self.TIMEOUT
        while True:
            frame = self.read_frame(max(0.0, deadline - time.monotonic()))
            if frame.request_id == request_id:
                return frame
            if frame.request_id != 0:
                raise RuntimeError(f"response to unknown request_id {frame.request_id}: {frame}")
            self.pushes.append(frame)

    def next_push(self, timeout=TIMEOUT):
        if self.pushes:
            return self.pushes.popleft()
        frame = self.read_frame(timeout)
        if frame.request_id != 0:
            raise RuntimeError(f"unexpected response {frame}")
        return frame

    def next_delivery(self, timeout=TIMEOUT):
        frame = self.next_push(timeout)
        if frame.kind != "delivery":
            raise RuntimeError(f"expected a Delivery push, got {describe(frame)}")
        return frame.delivery

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # --- the protocol's requests -----------------------------------------------------

    def hello(self, client="independent-python/1"):
        frame = self.request(HELLO, f_uint(1, 1) + f_bytes(2, client))
        if frame.kind == "hello_ok" and frame.hello_ok.limits:
            self.limits = frame.hello_ok.limits
            self.max_frame_bytes = self.limits.max_frame_bytes
        return frame

    def register(self, username, password, display_name=""):
        return self.request(
            REGISTER, f_bytes(1, username) + f_bytes(2, password) + f_bytes(3, display_name)
        )

    def login(self, username, password, device_name=""):
        return self.request(
            LOGIN, f_bytes(1, username) + f_bytes(2, password) + f_bytes(3, device_name)
        )

    def resume(self, token):
        return self.request(RESUME, f_bytes(1, token))

    def send_to_user(self, user_id, client_msg_id, body, content_type=""):
        return self.request(
            SEND,
            f_uint(1, user_id, force=True)
            + f_bytes(3, client_msg_id)
            + f_bytes(4, body)
            + f_bytes(5, content_type),
        )

    def send_to_group(self, group_id, client_msg_id, body):
        return self.request(
            SEND, f_uint(2, group_id, force=True) + f_bytes(3, client_msg_id) + f_bytes(4, body)
        )

    def ack(self, up_to_seq):
        self.send(ACK, f_uint(1, up_to_seq), request_id=0)  # no response on success

    def create_group(self, name, member_ids):
        return self.request(CREATE_GROUP, f_bytes(1, name) + f_packed(2, member_ids))

    def history_with_user(self, user_id, before_message_id=0, limit=0):
        return self.request(
            GET_HISTORY,
            f_uint(1, user_id, force=True) + f_uint(3, before_message_id) + f_uint(4, limit),
        )

    def list_conversations(self, limit=0, cursor=b""):
        return self.request(LIST_CONVERSATIONS, f_uint(1, limit) + f_bytes(2, cursor))

    def update_profile(self, display_name="", group_adds=0):
        """group_adds: GroupAddPolicy (1 anyone, 2 contacts, 3 nobody; 0 unchanged)."""
        return self.request(UPDATE_PROFILE, f_bytes(1, display_name) + f_uint(2, group_adds))

    def change_password(self, current, new):
        return self.request(CHANGE_PASSWORD, f_bytes(1, current) + f_bytes(2, new))

    def ping(self):
        return self.request(PING)


def describe(frame):
    """A short description of a ServerFrame for failure messages."""
    if frame.kind == "error":
        e = frame.error
        code = ERROR_NAMES.get(e.code, e.code)
        return f"Error{{{code}, {e.message!r}}} (request_id {frame.request_id})"
    return f"{frame.kind} (request_id {frame.request_id}): {frame[frame.kind]}"


# ---------------------------------------------------------------------------------------
# 3. Scenario
# ---------------------------------------------------------------------------------------


class CheckFailed(Exception):
    pass


def check(condition, what):
    if not condition:
        raise CheckFailed(what)


def expect(frame, kind, what):
    """Asserts `frame` is the success response `kind` and returns its content."""
    check(frame.kind == kind, f"{what}: expected {kind}, got {describe(frame)}")
    return frame[kind]


def expect_error(frame, code_name, what):
    check(
        frame.kind == "error" and frame.error.code == ERROR_CODES[code_name],
        f"{what}: expected Error {code_name}, got {describe(frame)}",
    )
    return frame.error


def expect_quiet(conn, what, seconds=0.4):
    """Asserts that nothing arrives for a while."""
    if conn.pushes:
        raise CheckFailed(f"{what}: unexpected {describe(conn.pushes[0])}")
    try:
        frame = conn.read_frame(seconds)
    except TimeoutError:
        return
    raise CheckFailed(f"{what}: unexpected {describe(frame)}")


def expect_closed(conn, what):
    """Asserts that the server closes the connection without sending anything further."""
    try:
        frame = conn.read_frame(Connection.TIMEOUT)
    except Closed:
        return
    except TimeoutError:
        raise CheckFailed(f"{what}: the server did not close the connection") from None
    raise CheckFailed(f"{what}: expected the connection to close, got {describe(frame)}")


def same_user(user, expected):
    return user is not None and (user.user_id, user.username, user.display_name) == (
        expected.user_id,
        expected.username,
        expected.display_name,
    )


def new_cmid():
    return secrets.token_hex(16)


def step(text):
    print(f"- {text}", flush=True)


LIMIT_NAMES = (
    "max_frame_bytes", "max_body_bytes", "max_group_members", "max_history_page", "idle_timeout_ms",
)


def run_scenario(addr, ca):
    connections = []

    def connect():
        """A new connection after Hello/HelloOk; returns it and the HelloOk."""
        conn = Connection(addr, ca)
        connections.append(conn)
        hello_ok = expect(conn.hello(), "hello_ok", "Hello")
        check(hello_ok.protocol_version == 1, f"HelloOk: version {hello_ok.protocol_version}")
        check(hello_ok.limits is not None, "HelloOk has no limits")
        for name in LIMIT_NAMES:
            check(hello_ok.limits[name] > 0, f"HelloOk.limits.{name} is {hello_ok.limits[name]}")
        return conn, hello_ok

    try:
        scenario(connect)
    finally:
        for conn in connections:
            conn.close()


def scenario(connect):
    suffix = secrets.token_hex(4)  # fresh accounts on every run
    password = "correct horse battery staple"

    step("Hello / HelloOk")
    a, hello_ok = connect()
    check(hello_ok.server.startswith("messengerd/"), f"HelloOk.server {hello_ok.server!r}")
    print(f"  server {hello_ok.server}, limits {dict(hello_ok.limits)}")

    step("Ping before authentication")
    expect(a.ping(), "pong", "Ping before authentication")

    step("register alice, bob, carol")
    users = {}
    for name, display in (("alice", "Alice Liddell"), ("bob", "Bob Builder"), ("carol", "Carol")):
        username = f"{name}_{suffix}"
        what = f"Register {username}"
        user = expect(a.register(username, password, display), "registered", what).user
        check(user is not None and user.user_id > 0, f"{what}: no user id")
        check(user.username == username, f"{what}: username {user.username!r}")
        check(user.display_name == display, f"{what}: display name {user.display_name!r}")
        users[name] = user
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    check(len({u.user_id for u in users.values()}) == 3, "user ids are not distinct")

    step("bad registrations -> INVALID_ARGUMENT")
    expect_error(a.register("x!", password), "INVALID_ARGUMENT", "Register 'x!'")
    expect_error(
        a.register(f"dave_{suffix}", "short"), "INVALID_ARGUMENT", "Register with a short password"
    )

    step("duplicate username in another case -> ALREADY_EXISTS")
    expect_error(
        a.register(alice.username.upper(), password), "ALREADY_EXISTS", "Register ALICE_…"
    )

    step("request before authentication -> UNAUTHENTICATED")
    expect_error(a.list_conversations(10), "UNAUTHENTICATED", "ListConversations before Login")

    step("wrong password -> UNAUTHENTICATED")
    expect_error(
        a.login(alice.username, password + "!", "py"), "UNAUTHENTICATED", "Login, wrong password"
    )

    step("login alice (username in another case) and bob")
    auth_a = expect(a.login(alice.username.upper(), password, "py"), "authenticated", "Login alice")
    check(same_user(auth_a.user, alice), f"Login alice: user {auth_a.user}")
    check(len(auth_a.session_token) == 32, f"Login alice: {len(auth_a.session_token)}-byte token")
    check(auth_a.device_id > 0, "Login alice: no device_id")
    check(auth_a.expires_at_ms > time.time() * 1000, f"Login alice: expires {auth_a.expires_at_ms}")
    check(auth_a.acked_seq == 0, f"Login alice: acked_seq {auth_a.acked_seq} on a first login")
    b, _ = connect()
    auth_b = expect(b.login(bob.username, password, "py"), "authenticated", "Login bob")
    check(same_user(auth_b.user, bob), f"Login bob: user {auth_b.user}")
    bob_token, bob_device = auth_b.session_token, auth_b.device_id

    step("Login on an authenticated connection -> INVALID_ARGUMENT")
    expect_error(
        a.login(alice.username, password, "again"), "INVALID_ARGUMENT", "a second Login"
    )

    step("alice sends bob 3 direct messages")
    sent = []  # (client_msg_id, body, Sent) in sending order
    for i in range(1, 4):
        cmid, body = new_cmid(), f"hello bob #{i} \N{SNOWMAN}".encode()
        content_type = "text/plain" if i > 1 else ""  # empty means text/plain
        s = expect(a.send_to_user(bob.user_id, cmid, body, content_type), "sent", f"Send #{i}")
        check(not s.duplicate, f"Send #{i}: duplicate=true on a first send")
        check(s.message_id > 0 and s.server_time_ms > 0, f"Send #{i}: {s}")
        if sent:
            previous = sent[-1][2].message_id
            check(s.message_id > previous, f"Send #{i}: message_id {s.message_id} <= {previous}")
        sent.append((cmid, body, s))

    step("retry with the same client_msg_id -> duplicate, same message_id")
    cmid, _, first = sent[1]
    retry = expect(a.send_to_user(bob.user_id, cmid, b"ignored"), "sent", "Send retry")
    check(retry.duplicate, "Send retry: duplicate is not true")
    check(
        (retry.message_id, retry.server_time_ms) == (first.message_id, first.server_time_ms),
        f"Send retry: {retry}, the first Sent was {first}",
    )

    def check_deliveries(conn, who, expected, first_seq):
        """Reads one Delivery per expected (cmid, body, Sent) direct message from alice to bob:
        consecutive seqs from first_seq, in order, stamped by the server. Returns the last seq."""
        seq = first_seq - 1
        for cmid, body, s in expected:
            d = conn.next_delivery()
            m = d.message
            what = f"{who}: Delivery of message {s.message_id}"
            check(d.seq == seq + 1, f"{what}: seq {d.seq}, expected {seq + 1}")
            seq = d.seq
            check(m is not None and m.message_id == s.message_id, f"{what}: got {m}")
            check(same_user(m.sender, alice), f"{what}: sender {m.sender}")
            check((m.to_user_id, m.to_group_id) == (bob.user_id, 0), f"{what}: recipient {m}")
            check((m.client_msg_id, m.body) == (cmid, body), f"{what}: content {m}")
            check(m.content_type == "text/plain", f"{what}: content_type {m.content_type!r}")
            check(m.server_time_ms == s.server_time_ms, f"{what}: server_time_ms differs")
        return seq

    step("bob receives 3 deliveries, in order, consecutive seqs, stamped with alice")
    bob_seq = check_deliveries(b, "bob", sent, auth_b.acked_seq + 1)
    expect_quiet(b, "bob after 3 deliveries (the retry must not be delivered)")

    step("alice's own connection receives her copies")
    alice_seq = check_deliveries(a, "alice", sent, 1)
    expect_quiet(a, "alice after her 3 copies")

    step("bob acks; Ack has no response")
    b.ack(bob_seq)
    b.send(PING, b"", request_id=77)  # the Ack must not be answered: the next frame is the Pong
    pong = b.read_frame()
    check(pong.kind == "pong" and pong.request_id == 77, f"after Ack: {describe(pong)}, not Pong")

    step("bob reconnects and resumes: nothing replayed")
    b.close()
    b, _ = connect()
    resumed = expect(b.resume(bob_token), "authenticated", "Resume bob")
    check(resumed.device_id == bob_device, f"Resume bob: device_id {resumed.device_id}")
    check(resumed.session_token == bob_token, "Resume bob: another session_token")
    check(resumed.acked_seq == bob_seq, f"Resume bob: acked_seq {resumed.acked_seq} != {bob_seq}")
    check(same_user(resumed.user, bob), f"Resume bob: user {resumed.user}")
    expect_quiet(b, "bob after Resume (everything was acked)")
    b.close()

    step("alice sends 2 more while bob is offline; bob resumes and gets exactly those")
    more = []
    for i in range(1, 3):
        cmid, body = new_cmid(), f"while you were away #{i}".encode()
        s = expect(a.send_to_user(bob.user_id, cmid, body), "sent", f"offline Send #{i}")
        previous = (more or sent)[-1][2].message_id
        check(s.message_id > previous, f"offline Send #{i}: id {s.message_id} <= {previous}")
        more.append((cmid, body, s))
    alice_seq = check_deliveries(a, "alice", more, alice_seq + 1)
    b, _ = connect()
    resumed = expect(b.resume(bob_token), "authenticated", "second Resume bob")
    check(resumed.acked_seq == bob_seq, f"second Resume: acked_seq {resumed.acked_seq}")
    bob_seq = check_deliveries(b, "bob after Resume", more, bob_seq + 1)
    expect_quiet(b, "bob after the 2 replayed deliveries")
    b.ack(bob_seq)

    step("group: bob has not written to alice, so he must accept anyone to be added by her")
    refused = a.create_group(f"Refused {suffix}", [bob.user_id])
    expect_error(refused, "PERMISSION_DENIED", "CreateGroup with bob before he accepts")
    expect(b.update_profile(group_adds=1), "ok", "bob's UpdateProfile group_adds ANYONE")

    step("group: create with bob, message delivered to bob")
    group_name = f"Tea party {suffix}"
    group = expect(a.create_group(group_name, [bob.user_id, bob.user_id]), "group", "CreateGroup")
    check(group.group_id > 0 and group.name == group_name, f"CreateGroup: {group}")
    members = [(m.user.user_id, m.admin) for m in group.members]
    expected = [(alice.user_id, True), (bob.user_id, False)]
    check(members == expected, f"CreateGroup: members {members}, expected {expected}")
    gcmid, gbody = new_cmid(), b"welcome to the group"
    gs = expect(a.send_to_group(group.group_id, gcmid, gbody), "sent", "Send to the group")
    check(gs.message_id > more[-1][2].message_id, "group Send: message_id did not increase")
    for conn, who, seq in ((b, "bob", bob_seq), (a, "alice", alice_seq)):
        d = conn.next_delivery()
        m = d.message
        what = f"{who}: group Delivery"
        check(d.seq == seq + 1, f"{what}: seq {d.seq}, expected {seq + 1}")
        check(m.message_id == gs.message_id, f"{what}: {m}")
        check((m.to_user_id, m.to_group_id) == (0, group.group_id), f"{what}: recipient {m}")
        check((m.client_msg_id, m.body) == (gcmid, gbody), f"{what}: content {m}")
        check(same_user(m.sender, alice), f"{what}: sender {m.sender}")
    bob_seq += 1
    b.ack(bob_seq)

    step("carol, not a member, sends to the group -> NOT_FOUND, as for a missing group")
    c, _ = connect()
    expect(c.login(carol.username, password, "py"), "authenticated", "Login carol")
    denied = c.send_to_group(group.group_id, new_cmid(), b"let me in")
    expect_error(denied, "NOT_FOUND", "carol's Send to the group")
    expect_quiet(b, "bob after carol's refused send")

    step("ChangePassword with a wrong current password -> PERMISSION_DENIED")
    refused = c.change_password("not my password", "another good password")
    expect_error(refused, "PERMISSION_DENIED", "ChangePassword with a wrong current password")
    expect(c.ping(), "pong", "carol's connection after the refused ChangePassword")

    step("history of the direct conversation, paged by 2")
    all_direct = sorted((s.message_id for _, _, s in sent + more), reverse=True)
    seen, before = [], 0
    for _ in range(10):
        what = f"GetHistory before {before}"
        page = expect(a.history_with_user(bob.user_id, before, limit=2), "history_page", what)
        ids = [m.message_id for m in page.messages]
        check(0 < len(ids) <= 2, f"{what}: {len(ids)} messages with limit 2")
        check(ids == sorted(ids, reverse=True), f"{what}: not newest first: {ids}")
        check(before == 0 or ids[0] < before, f"{what}: returned {ids}")
        for m in page.messages:
            check(m.to_user_id == bob.user_id and same_user(m.sender, alice), f"{what}: {m}")
        seen += ids
        if not page.has_more:
            break
        before = ids[-1]
    else:
        raise CheckFailed("GetHistory: has_more never became false")
    check(seen == all_direct, f"GetHistory pages: {seen}, expected {all_direct} exactly once")
    whole = expect(b.history_with_user(alice.user_id), "history_page", "bob's GetHistory, limit 0")
    ids = [m.message_id for m in whole.messages]
    check(ids == all_direct, f"bob's GetHistory: {ids}, expected {all_direct}")
    check(not whole.has_more, "bob's GetHistory: has_more with everything returned")

    step("ListConversations for bob: the group, then alice (newest activity first)")
    convs_page = expect(b.list_conversations(50), "conversation_list", "ListConversations")
    convs = convs_page.conversations
    check(len(convs) == 2, f"ListConversations: {len(convs)} conversations: {convs}")
    for conv in convs:
        check((conv.user is None) != (conv.group is None), f"ListConversations: {conv}")
        check(conv.last_message is not None, f"ListConversations: no last_message in {conv}")
    newest, older = convs
    check(newest.group is not None, f"ListConversations: first is not the group: {newest}")
    check(newest.group.group_id == group.group_id, f"ListConversations: group {newest.group}")
    check(newest.group.name == group_name, f"ListConversations: group name {newest.group.name!r}")
    check(newest.last_message.message_id == gs.message_id, f"ListConversations: {newest}")
    check(same_user(older.user, alice), f"ListConversations: second is not alice: {older}")
    last_direct = more[-1][2].message_id
    check(older.last_message.message_id == last_direct, f"ListConversations: {older}")
    check(not convs_page.next_cursor, "ListConversations: a next_cursor after the last page")
    one = expect(b.list_conversations(1), "conversation_list", "ListConversations limit 1")
    check(
        [cv.group and cv.group.group_id for cv in one.conversations] == [group.group_id],
        f"ListConversations limit 1: {one.conversations}",
    )
    check(one.next_cursor, "ListConversations limit 1: no next_cursor")
    two = expect(
        b.list_conversations(1, one.next_cursor), "conversation_list", "ListConversations page 2"
    )
    check(
        [same_user(cv.user, alice) for cv in two.conversations] == [True],
        f"ListConversations page 2: {two.conversations}",
    )
    check(not two.next_cursor, "ListConversations page 2: a next_cursor after the last page")

    step("oversized frame -> Error TOO_LARGE, request_id 0, close")
    t, hello_ok = connect()
    t.send_raw(struct.pack(">I", hello_ok.limits.max_frame_bytes + 1))  # the prefix alone
    frame = t.read_frame()
    expect_error(frame, "TOO_LARGE", "oversized frame")
    check(frame.request_id == 0, f"oversized frame: Error with request_id {frame.request_id}")
    expect_closed(t, "after TOO_LARGE")

    step("garbage frame -> Error INVALID_ARGUMENT, request_id 0, close")
    t, _ = connect()
    garbage = b"\xff" * 11  # an 11-byte varint as the first key: not protobuf
    t.send_raw(struct.pack(">I", len(garbage)) + garbage)
    frame = t.read_frame()
    expect_error(frame, "INVALID_ARGUMENT", "garbage frame")
    check(frame.request_id == 0, f"garbage frame: Error with request_id {frame.request_id}")
    expect_closed(t, "after the garbage frame")

    step("Ping / Pong")
    for conn, who in ((a, "alice"), (b, "bob"), (c, "carol")):
        pong = conn.ping()
        check(pong.request_id == conn.next_id - 1, f"{who}'s Ping: {describe(pong)}")
        expect_quiet(conn, f"{who} at the end", seconds=0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="server address, HOST:PORT")
    parser.add_argument("--ca", required=True, help="CA certificate (PEM) to verify the server with")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        run_scenario(args.addr, args.ca)
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except (Closed, TimeoutError, RuntimeError, ValueError, OSError) as e:
        traceback.print_exc()
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"OK: every check passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
