//! The client's state machine: conversations, messages, unread counts, the input editor and
//! its history, delivery states of own messages, forms and slash commands.
//!
//! It owns everything the screen shows and decides what to ask the network for, as
//! [`Command`]s returned from its handlers. It must never do I/O or wait for anything: keys
//! and [`NetEvent`]s go in, state changes and commands come out, so every behaviour here is
//! testable without a terminal or a server.

use std::collections::HashSet;
use std::time::Instant;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use messenger_protocol::client::{Recipient, new_client_msg_id};
use messenger_protocol::pb;

/// Most history entries kept for the input line.
const INPUT_HISTORY_MAX: usize = 500;
/// Messages asked for per history page.
pub const HISTORY_PAGE: u32 = 50;

/// One conversation: a direct chat with a user (possibly oneself) or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConvKey {
    Direct(u64),
    Group(u64),
}

impl ConvKey {
    pub fn recipient(self) -> Recipient {
        match self {
            ConvKey::Direct(id) => Recipient::User(id),
            ConvKey::Group(id) => Recipient::Group(id),
        }
    }
}

/// Where an own message stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Typed, not yet accepted by the server (possibly queued while offline).
    Pending,
    /// Accepted: durable on the server.
    Sent,
    /// Refused for good (e.g. not a member any more); the reason says why.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `None` until the server accepted it.
    pub message_id: Option<u64>,
    pub client_msg_id: String,
    pub sender_id: u64,
    pub sender_name: String,
    pub time_ms: i64,
    pub body: String,
    pub own: bool,
    pub state: DeliveryState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: u64,
    pub username: String,
    pub display_name: String,
    pub admin: bool,
}

#[derive(Debug, Clone)]
pub struct Conversation {
    pub key: ConvKey,
    pub title: String,
    /// Accepted messages in `message_id` order, then pending ones in typing order.
    pub messages: Vec<ChatMessage>,
    ids: HashSet<u64>,
    pub unread: u32,
    /// Time of the newest activity, for ordering the list.
    pub last_activity_ms: i64,
    /// The newest message id, to break ties in ordering.
    pub last_message_id: u64,
    /// Whether older history may exist on the server.
    pub has_more: bool,
    /// A history page is on its way.
    pub loading: bool,
    /// The first history page was asked for.
    pub history_started: bool,
    pub members: Option<Vec<Member>>,
}

impl Conversation {
    pub fn new(key: ConvKey, title: String) -> Self {
        Self {
            key,
            title,
            messages: Vec::new(),
            ids: HashSet::new(),
            unread: 0,
            last_activity_ms: 0,
            last_message_id: 0,
            has_more: true,
            loading: false,
            history_started: false,
            members: None,
        }
    }

    /// The oldest accepted message id, where the next history page starts.
    pub fn oldest_id(&self) -> Option<u64> {
        self.messages.iter().find_map(|m| m.message_id)
    }

    pub fn contains_id(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// Inserts an accepted message at its place by id; false if it was there already.
    fn insert_accepted(&mut self, msg: ChatMessage) -> bool {
        let Some(id) = msg.message_id else {
            self.messages.push(msg);
            return true;
        };
        if !self.ids.insert(id) {
            return false;
        }
        // Almost always the newest (live) or the oldest (history): both ends are cheap.
        let mut pos = self.messages.len();
        while pos > 0 {
            match self.messages[pos - 1].message_id {
                Some(prev) if prev < id => break,
                _ => pos -= 1,
            }
        }
        self.touch(msg.time_ms, id);
        self.messages.insert(pos, msg);
        true
    }

    fn touch(&mut self, time_ms: i64, id: u64) {
        self.last_activity_ms = self.last_activity_ms.max(time_ms);
        self.last_message_id = self.last_message_id.max(id);
    }

    /// Marks the pending message `client_msg_id` as accepted and moves it to its place.
    fn accept(&mut self, client_msg_id: &str, message_id: u64, time_ms: i64) -> bool {
        let Some(pos) = self
            .messages
            .iter()
            .rposition(|m| m.own && m.message_id.is_none() && m.client_msg_id == client_msg_id)
        else {
            return false;
        };
        let mut msg = self.messages.remove(pos);
        msg.message_id = Some(message_id);
        msg.time_ms = time_ms;
        msg.state = DeliveryState::Sent;
        if !self.insert_accepted(msg) {
            // The own delivery arrived first; that copy stands.
        }
        true
    }
}

/// Connection state shown in the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Connected,
    /// Waiting before the next attempt.
    Reconnecting {
        at: Instant,
        error: String,
    },
    /// Not trying (e.g. the certificate is not trusted); the reason says what to do.
    Offline(String),
}

/// What the network task can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SignIn {
        username: String,
        password: String,
        /// `Some(display name)` to create the account first.
        register: Option<String>,
    },
    Send {
        to: ConvKey,
        client_msg_id: String,
        body: String,
    },
    History {
        conv: ConvKey,
        before_message_id: u64,
    },
    OpenDirect {
        username: String,
    },
    LookupUser(u64),
    GetGroup(u64),
    CreateGroup {
        name: String,
        usernames: Vec<String>,
    },
    AddMembers {
        group_id: u64,
        usernames: Vec<String>,
    },
    RemoveMember {
        group_id: u64,
        username: String,
    },
    LeaveGroup(u64),
    SetDisplayName(String),
    SetGroupAdds(pb::GroupAddPolicy),
    ChangePassword {
        current: String,
        new: String,
    },
    DeleteAccount {
        password: String,
    },
    Logout,
}

/// What the network task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum NetEvent {
    State(ConnState),
    /// No valid session: show the sign-in form (with why, if there is a reason).
    SignedOut(Option<String>),
    SignInFailed(String),
    SignedIn(pb::User),
    /// A delivered message (live or replayed).
    Message(pb::Message),
    Sent {
        to: ConvKey,
        client_msg_id: String,
        message_id: u64,
        time_ms: i64,
    },
    SendFailed {
        to: ConvKey,
        client_msg_id: String,
        error: String,
    },
    History {
        conv: ConvKey,
        messages: Vec<pb::Message>,
        has_more: bool,
    },
    HistoryFailed {
        conv: ConvKey,
        error: String,
    },
    Conversations(Vec<pb::ConversationSummary>),
    /// A group's details (after create, add, kick, or an explicit look-up).
    Group {
        group: pb::Group,
        /// Open it (it was just created by us).
        open: bool,
    },
    LeftGroup(u64),
    User(pb::User),
    DirectOpened(pb::User),
    ProfileUpdated(String),
    Notice(String),
    Error(String),
}

/// A small form: the sign-in screen and the prompts behind keys and commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pub kind: FormKind,
    pub fields: Vec<Field>,
    pub focus: usize,
    pub error: Option<String>,
    /// Submitted, waiting for the server.
    pub busy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub label: &'static str,
    pub value: String,
    pub masked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormKind {
    SignIn { register: bool },
    Dm,
    NewGroup,
    AddMember,
    Kick,
    DisplayName,
    ChangePassword,
    DeleteAccount,
}

impl Form {
    fn new(kind: FormKind, fields: &[(&'static str, bool)]) -> Self {
        Self {
            kind,
            fields: fields
                .iter()
                .map(|&(label, masked)| Field {
                    label,
                    value: String::new(),
                    masked,
                })
                .collect(),
            focus: 0,
            error: None,
            busy: false,
        }
    }

    pub fn sign_in(register: bool) -> Self {
        let mut f = Form::new(
            FormKind::SignIn { register },
            &[("Username", false), ("Password", true)],
        );
        if register {
            f.fields.push(Field {
                label: "Display name",
                value: String::new(),
                masked: false,
            });
        }
        f
    }

    pub fn title(&self) -> &'static str {
        match self.kind {
            FormKind::SignIn { register: false } => "Log in",
            FormKind::SignIn { register: true } => "Register",
            FormKind::Dm => "Direct conversation",
            FormKind::NewGroup => "New group",
            FormKind::AddMember => "Add members",
            FormKind::Kick => "Remove a member",
            FormKind::DisplayName => "Display name",
            FormKind::ChangePassword => "Change password",
            FormKind::DeleteAccount => "Delete account",
        }
    }

    fn value(&self, i: usize) -> &str {
        self.fields.get(i).map_or("", |f| f.value.trim())
    }
}

/// The input line: a multi-line text buffer with a cursor (a byte offset on a char boundary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Editor {
    pub text: String,
    pub cursor: usize,
}

impl Editor {
    pub fn is_multiline(&self) -> bool {
        self.text.contains('\n')
    }

    pub fn set(&mut self, text: String) {
        self.cursor = text.len();
        self.text = text;
    }

    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    pub fn insert(&mut self, c: char) {
        self.text.insert(self.cursor, c);
        self.cursor += c.len_utf8();
    }

    pub fn insert_str(&mut self, s: &str) {
        self.text.insert_str(self.cursor, s);
        self.cursor += s.len();
    }

    fn prev_boundary(&self) -> Option<usize> {
        self.text[..self.cursor]
            .char_indices()
            .last()
            .map(|(i, _)| i)
    }

    fn next_boundary(&self) -> Option<usize> {
        self.text[self.cursor..]
            .chars()
            .next()
            .map(|c| self.cursor + c.len_utf8())
    }

    pub fn backspace(&mut self) {
        if let Some(p) = self.prev_boundary() {
            self.text.replace_range(p..self.cursor, "");
            self.cursor = p;
        }
    }

    pub fn delete(&mut self) {
        if let Some(n) = self.next_boundary() {
            self.text.replace_range(self.cursor..n, "");
        }
    }

    pub fn left(&mut self) {
        if let Some(p) = self.prev_boundary() {
            self.cursor = p;
        }
    }

    pub fn right(&mut self) {
        if let Some(n) = self.next_boundary() {
            self.cursor = n;
        }
    }

    pub fn home(&mut self) {
        self.cursor = self.text[..self.cursor].rfind('\n').map_or(0, |i| i + 1);
    }

    pub fn end(&mut self) {
        self.cursor = self.text[self.cursor..]
            .find('\n')
            .map_or(self.text.len(), |i| self.cursor + i);
    }

    pub fn delete_word(&mut self) {
        let before = &self.text[..self.cursor];
        let trimmed = before.trim_end_matches(' ');
        let start = trimmed.rfind([' ', '\n']).map_or(0, |i| i + 1);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }
}

/// A parsed slash command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slash {
    Help,
    Quit,
    Dm(String),
    GroupNew {
        name: String,
        members: Vec<String>,
    },
    GroupAdd(Vec<String>),
    GroupKick(String),
    GroupLeave,
    GroupMembers,
    Nick(String),
    /// Who may add me to groups.
    GroupAdds(pb::GroupAddPolicy),
    Password,
    DeleteAccount,
    Logout,
}

/// Parses `/command args`; `Err` is a message for the user.
pub fn parse_slash(line: &str) -> Result<Slash, String> {
    let mut words = line.split_whitespace();
    let cmd = words.next().unwrap_or("");
    let rest: Vec<String> = words.map(str::to_owned).collect();
    let usage = |u: &str| Err(format!("usage: {u}"));
    match cmd {
        "/help" | "/?" => Ok(Slash::Help),
        "/quit" | "/exit" => Ok(Slash::Quit),
        "/dm" | "/msg" | "/query" => match rest.as_slice() {
            [user] => Ok(Slash::Dm(user.clone())),
            _ => usage("/dm USERNAME"),
        },
        "/group" => {
            let Some((sub, args)) = rest.split_first() else {
                return usage("/group new|add|kick|leave|members ...");
            };
            match (sub.as_str(), args) {
                ("new" | "create", [name, members @ ..]) => Ok(Slash::GroupNew {
                    name: name.clone(),
                    members: members.to_vec(),
                }),
                ("new" | "create", []) => usage("/group new NAME [USERNAME...]"),
                ("add", users) if !users.is_empty() => Ok(Slash::GroupAdd(users.to_vec())),
                ("add", _) => usage("/group add USERNAME..."),
                ("kick" | "remove", [user]) => Ok(Slash::GroupKick(user.clone())),
                ("kick" | "remove", _) => usage("/group kick USERNAME"),
                ("leave", []) => Ok(Slash::GroupLeave),
                ("members", []) => Ok(Slash::GroupMembers),
                _ => usage("/group new|add|kick|leave|members ..."),
            }
        }
        "/nick" | "/name" => {
            if rest.is_empty() {
                usage("/nick DISPLAY NAME")
            } else {
                Ok(Slash::Nick(rest.join(" ")))
            }
        }
        "/groupadds" => match rest.as_slice() {
            [who] => match who.as_str() {
                "anyone" => Ok(Slash::GroupAdds(pb::GroupAddPolicy::Anyone)),
                "contacts" => Ok(Slash::GroupAdds(pb::GroupAddPolicy::Contacts)),
                "nobody" => Ok(Slash::GroupAdds(pb::GroupAddPolicy::Nobody)),
                _ => usage("/groupadds anyone|contacts|nobody"),
            },
            _ => usage("/groupadds anyone|contacts|nobody"),
        },
        "/password" | "/passwd" => Ok(Slash::Password),
        "/delete-account" => Ok(Slash::DeleteAccount),
        "/logout" => Ok(Slash::Logout),
        other => Err(format!("unknown command {other}; /help lists them")),
    }
}

/// Which overlay covers the main screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help,
    Members(ConvKey),
    Form(Form),
}

/// The whole client state.
#[derive(Debug)]
pub struct App {
    pub server: String,
    pub me: Option<pb::User>,
    pub conn: ConnState,
    /// Ordered by last activity, newest first.
    pub conversations: Vec<Conversation>,
    pub selected: Option<ConvKey>,
    pub input: Editor,
    history: Vec<String>,
    history_pos: Option<usize>,
    draft: String,
    pub overlay: Overlay,
    /// Shown when signed out; kept apart from `overlay` so prompts cannot hide it.
    pub sign_in: Option<Form>,
    /// Lines scrolled up from the bottom of the open conversation.
    pub scroll: usize,
    /// Height of the message area at the last draw (page size for scrolling).
    pub view_height: usize,
    pub notice: Option<(String, bool)>,
    pub quit: bool,
    /// The connection was lost since it was last up.
    away: bool,
    /// Messages from others since the last reconnect, until the next key press.
    pub since_reconnect: Option<usize>,
    /// Quitting was asked for once while messages were unsent.
    quit_warned: bool,
    /// Local time zone offset for showing message times (UTC in tests).
    pub utc_offset_secs: i64,
}

impl App {
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            me: None,
            conn: ConnState::Connecting,
            conversations: Vec::new(),
            selected: None,
            input: Editor::default(),
            history: Vec::new(),
            history_pos: None,
            draft: String::new(),
            overlay: Overlay::None,
            sign_in: None,
            scroll: 0,
            view_height: 20,
            notice: None,
            quit: false,
            quit_warned: false,
            since_reconnect: None,
            away: false,
            utc_offset_secs: 0,
        }
    }

    pub fn my_id(&self) -> u64 {
        self.me.as_ref().map_or(0, |u| u.user_id)
    }

    pub fn conversation(&self, key: ConvKey) -> Option<&Conversation> {
        self.conversations.iter().find(|c| c.key == key)
    }

    fn conversation_mut(&mut self, key: ConvKey) -> Option<&mut Conversation> {
        self.conversations.iter_mut().find(|c| c.key == key)
    }

    pub fn current(&self) -> Option<&Conversation> {
        self.selected.and_then(|k| self.conversation(k))
    }

    fn info(&mut self, text: impl Into<String>) {
        self.notice = Some((text.into(), false));
    }

    fn error(&mut self, text: impl Into<String>) {
        self.notice = Some((text.into(), true));
    }

    /// Finds or creates a conversation; a new one may need its title from the server.
    fn ensure(&mut self, key: ConvKey, title: Option<&str>, out: &mut Vec<Command>) -> usize {
        if let Some(i) = self.conversations.iter().position(|c| c.key == key) {
            if let Some(t) = title
                && !t.is_empty()
            {
                self.conversations[i].title = t.to_owned();
            }
            return i;
        }
        let title = match (title, key) {
            (Some(t), _) if !t.is_empty() => t.to_owned(),
            (_, ConvKey::Group(id)) => {
                out.push(Command::GetGroup(id));
                format!("group {id}")
            }
            (_, ConvKey::Direct(id)) => {
                out.push(Command::LookupUser(id));
                format!("user {id}")
            }
        };
        self.conversations.push(Conversation::new(key, title));
        if self.selected.is_none() {
            self.selected = Some(key);
        }
        self.conversations.len() - 1
    }

    fn sort(&mut self) {
        self.conversations.sort_by(|a, b| {
            b.last_activity_ms
                .cmp(&a.last_activity_ms)
                .then(b.last_message_id.cmp(&a.last_message_id))
                .then(a.key.cmp(&b.key))
        });
    }

    /// Selects `key`: clears its unread count and asks for its first history page.
    pub fn select(&mut self, key: ConvKey) -> Vec<Command> {
        let mut out = Vec::new();
        self.selected = Some(key);
        self.scroll = 0;
        self.mark_read_and_load(&mut out);
        out
    }

    fn mark_read_and_load(&mut self, out: &mut Vec<Command>) {
        let Some(key) = self.selected else { return };
        let Some(c) = self.conversation_mut(key) else {
            return;
        };
        c.unread = 0;
        if !c.history_started {
            c.history_started = true;
            c.loading = true;
            out.push(Command::History {
                conv: key,
                before_message_id: 0,
            });
        }
    }

    fn cycle(&mut self, forward: bool) -> Vec<Command> {
        if self.conversations.is_empty() {
            return Vec::new();
        }
        let n = self.conversations.len();
        let cur = self
            .selected
            .and_then(|k| self.conversations.iter().position(|c| c.key == k));
        let next = match (cur, forward) {
            (None, _) => 0,
            (Some(i), true) => (i + 1) % n,
            (Some(i), false) => (i + n - 1) % n,
        };
        let key = self.conversations[next].key;
        self.select(key)
    }

    /// The view reached the top of what is loaded: ask for the next older page.
    pub fn reached_top(&mut self) -> Vec<Command> {
        let Some(key) = self.selected else {
            return Vec::new();
        };
        let Some(c) = self.conversation_mut(key) else {
            return Vec::new();
        };
        if !c.has_more || c.loading || !c.history_started {
            return Vec::new();
        }
        let Some(before) = c.oldest_id() else {
            return Vec::new();
        };
        c.loading = true;
        vec![Command::History {
            conv: key,
            before_message_id: before,
        }]
    }

    /// The renderer found the top of the conversation at this scroll offset.
    pub fn clamp_scroll(&mut self, max: usize) {
        self.scroll = self.scroll.min(max);
    }

    fn message_from_pb(&self, m: &pb::Message) -> (ConvKey, ChatMessage) {
        let me = self.my_id();
        let sender = m.sender.clone().unwrap_or_default();
        let key = match m.to {
            Some(pb::message::To::GroupId(g)) => ConvKey::Group(g),
            Some(pb::message::To::UserId(u)) if sender.user_id == me => ConvKey::Direct(u),
            _ => ConvKey::Direct(sender.user_id),
        };
        let name = if sender.display_name.is_empty() {
            sender.username.clone()
        } else {
            sender.display_name.clone()
        };
        let msg = ChatMessage {
            message_id: Some(m.message_id),
            client_msg_id: m.client_msg_id.clone(),
            sender_id: sender.user_id,
            sender_name: name,
            time_ms: m.server_time_ms,
            body: String::from_utf8_lossy(&m.body).into_owned(),
            own: sender.user_id == me && me != 0,
            state: DeliveryState::Sent,
        };
        (key, msg)
    }

    /// A delivered message: merged with its pending copy, deduplicated by id, counted as
    /// unread unless it is on screen or our own.
    fn on_message(&mut self, m: &pb::Message, out: &mut Vec<Command>) {
        let (key, msg) = self.message_from_pb(m);
        let peer_title = match key {
            ConvKey::Direct(id) if id == msg.sender_id => Some(msg.sender_name.clone()),
            _ => None,
        };
        let i = self.ensure(key, peer_title.as_deref(), out);
        let selected = self.selected == Some(key);
        let c = &mut self.conversations[i];
        let id = msg.message_id.unwrap_or(0);
        if c.contains_id(id) {
            return;
        }
        if msg.own && c.accept(&msg.client_msg_id, id, msg.time_ms) {
            self.sort();
            return;
        }
        let own = msg.own;
        let inserted = c.insert_accepted(msg);
        if inserted && !own && !selected {
            c.unread += 1;
        }
        if inserted
            && !own
            && let Some(n) = self.since_reconnect.as_mut()
        {
            *n += 1;
            let text = format!("{n} new message(s) arrived while you were away");
            self.info(text);
        }
        if selected {
            self.mark_read_and_load(out);
        }
        self.sort();
    }

    /// Applies what the network reports; returns follow-up requests.
    pub fn on_net(&mut self, ev: NetEvent) -> Vec<Command> {
        let mut out = Vec::new();
        if matches!(
            ev,
            NetEvent::DirectOpened(_)
                | NetEvent::Group { open: true, .. }
                | NetEvent::ProfileUpdated(_)
                | NetEvent::Notice(_)
                | NetEvent::LeftGroup(_)
        ) {
            self.close_prompt();
        }
        match ev {
            NetEvent::State(s) => {
                match &s {
                    ConnState::Reconnecting { .. } | ConnState::Offline(_) => self.away = true,
                    ConnState::Connected if self.away => {
                        self.away = false;
                        if self.me.is_some() {
                            self.since_reconnect = Some(0);
                        }
                    }
                    _ => {}
                }
                self.conn = s;
            }
            NetEvent::SignedOut(reason) => {
                self.me = None;
                self.conversations.clear();
                self.selected = None;
                self.overlay = Overlay::None;
                match (self.sign_in.as_mut(), reason) {
                    // Shown already (e.g. with why the saved session failed): keep what was
                    // typed and the reason.
                    (Some(form), None) => form.busy = false,
                    (_, reason) => {
                        let mut form = Form::sign_in(false);
                        form.error = reason;
                        self.sign_in = Some(form);
                    }
                }
            }
            NetEvent::SignInFailed(e) => {
                if let Some(f) = self.sign_in.as_mut() {
                    f.busy = false;
                    f.error = Some(e);
                }
            }
            NetEvent::SignedIn(user) => {
                if self.me.as_ref().map(|u| u.user_id) != Some(user.user_id) {
                    self.conversations.clear();
                    self.selected = None;
                }
                self.me = Some(user);
                self.sign_in = None;
            }
            NetEvent::Message(m) => self.on_message(&m, &mut out),
            NetEvent::Sent {
                to,
                client_msg_id,
                message_id,
                time_ms,
            } => {
                if let Some(c) = self.conversation_mut(to) {
                    c.accept(&client_msg_id, message_id, time_ms);
                }
                self.sort();
            }
            NetEvent::SendFailed {
                to,
                client_msg_id,
                error,
            } => {
                if let Some(c) = self.conversation_mut(to)
                    && let Some(m) = c
                        .messages
                        .iter_mut()
                        .rev()
                        .find(|m| m.own && m.client_msg_id == client_msg_id)
                {
                    m.state = DeliveryState::Failed(error.clone());
                }
                self.error(format!("message not sent: {error}"));
            }
            NetEvent::History {
                conv,
                messages,
                has_more,
            } => {
                let converted: Vec<ChatMessage> =
                    messages.iter().map(|m| self.message_from_pb(m).1).collect();
                if let Some(c) = self.conversation_mut(conv) {
                    c.loading = false;
                    c.has_more = has_more;
                    for m in converted {
                        c.insert_accepted(m);
                    }
                }
                self.sort();
            }
            NetEvent::HistoryFailed { conv, error } => {
                if let Some(c) = self.conversation_mut(conv) {
                    c.loading = false;
                    // Try again on the next scroll or selection.
                    if c.messages.is_empty() {
                        c.history_started = false;
                    }
                }
                self.error(format!("history: {error}"));
            }
            NetEvent::Conversations(list) => {
                for s in list {
                    let (key, title) = match s.with {
                        Some(pb::conversation_summary::With::User(u)) => {
                            let t = if u.display_name.is_empty() {
                                u.username
                            } else {
                                u.display_name
                            };
                            (ConvKey::Direct(u.user_id), t)
                        }
                        Some(pb::conversation_summary::With::Group(g)) => {
                            (ConvKey::Group(g.group_id), g.name)
                        }
                        None => continue,
                    };
                    let i = self.ensure(key, Some(&title), &mut out);
                    if let Some(m) = s.last_message {
                        let (_, msg) = self.message_from_pb(&m);
                        self.conversations[i].insert_accepted(msg);
                    }
                }
                self.sort();
                if let Some(first) = self.conversations.first().map(|c| c.key)
                    && self.selected.is_none_or(|k| self.conversation(k).is_none())
                {
                    self.selected = Some(first);
                }
                self.mark_read_and_load(&mut out);
            }
            NetEvent::Group { group, open } => {
                let key = ConvKey::Group(group.group_id);
                let members = group
                    .members
                    .iter()
                    .filter_map(|m| {
                        let u = m.user.as_ref()?;
                        Some(Member {
                            user_id: u.user_id,
                            username: u.username.clone(),
                            display_name: u.display_name.clone(),
                            admin: m.admin,
                        })
                    })
                    .collect::<Vec<_>>();
                let i = self.ensure(key, Some(&group.name), &mut out);
                let c = &mut self.conversations[i];
                if !members.is_empty() {
                    c.members = Some(members);
                }
                if c.last_activity_ms == 0 {
                    c.last_activity_ms = group.created_at_ms;
                }
                self.sort();
                if open {
                    out.extend(self.select(key));
                }
            }
            NetEvent::LeftGroup(id) => {
                let key = ConvKey::Group(id);
                self.conversations.retain(|c| c.key != key);
                if self.selected == Some(key) {
                    self.selected = self.conversations.first().map(|c| c.key);
                    self.mark_read_and_load(&mut out);
                }
                self.info("you left the group");
            }
            NetEvent::User(u) => {
                let title = if u.display_name.is_empty() {
                    u.username.clone()
                } else {
                    u.display_name.clone()
                };
                if let Some(c) = self.conversation_mut(ConvKey::Direct(u.user_id)) {
                    c.title = title;
                }
            }
            NetEvent::DirectOpened(u) => {
                let key = ConvKey::Direct(u.user_id);
                let title = if u.display_name.is_empty() {
                    u.username.clone()
                } else {
                    u.display_name.clone()
                };
                self.ensure(key, Some(&title), &mut out);
                out.extend(self.select(key));
            }
            NetEvent::ProfileUpdated(name) => {
                if let Some(me) = self.me.as_mut() {
                    me.display_name = name;
                }
                self.info("display name changed");
            }
            NetEvent::Notice(n) => self.info(n),
            NetEvent::Error(e) => {
                if let Overlay::Form(f) = &mut self.overlay {
                    f.busy = false;
                    f.error = Some(e);
                } else {
                    self.error(e);
                }
            }
        }
        out
    }

    /// Text pasted into the terminal (bracketed paste): inserted as typed, newlines kept.
    pub fn paste(&mut self, text: &str) {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        if let Some(f) = self.sign_in.as_mut() {
            if let Some(field) = f.fields.get_mut(f.focus) {
                field.value.push_str(text.lines().next().unwrap_or(""));
            }
            return;
        }
        if let Overlay::Form(f) = &mut self.overlay {
            if let Some(field) = f.fields.get_mut(f.focus) {
                field.value.push_str(text.lines().next().unwrap_or(""));
            }
            return;
        }
        self.input.insert_str(&text);
    }

    /// One key press.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Command> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('q')) {
            self.request_quit();
            return Vec::new();
        }
        if let Some(mut form) = self.sign_in.take() {
            let out = self.form_key(&mut form, key);
            self.sign_in = Some(form);
            return out;
        }
        self.since_reconnect = None;
        match std::mem::replace(&mut self.overlay, Overlay::None) {
            Overlay::None => {}
            // Any key closes an information overlay.
            Overlay::Help | Overlay::Members(_) => return Vec::new(),
            Overlay::Form(mut form) => {
                if key.code == KeyCode::Esc {
                    return Vec::new();
                }
                let out = self.form_key(&mut form, key);
                self.overlay = Overlay::Form(form);
                return out;
            }
        }
        self.notice = None;
        match (key.code, ctrl, alt) {
            (KeyCode::F(1), _, _) => {
                self.overlay = Overlay::Help;
                Vec::new()
            }
            (KeyCode::Tab, _, _) | (KeyCode::Char('n'), true, _) => self.cycle(true),
            (KeyCode::BackTab, _, _) | (KeyCode::Char('p'), true, _) => self.cycle(false),
            (KeyCode::PageUp, _, _) => {
                self.scroll += self.view_height.saturating_sub(2).max(1);
                Vec::new()
            }
            (KeyCode::PageDown, _, _) => {
                self.scroll = self
                    .scroll
                    .saturating_sub(self.view_height.saturating_sub(2).max(1));
                Vec::new()
            }
            (KeyCode::Enter, _, true) | (KeyCode::Char('j'), true, _) => {
                self.input.insert('\n');
                Vec::new()
            }
            (KeyCode::Enter, _, _) => self.submit(),
            (KeyCode::Char('d'), _, true) => self.open_form(FormKind::Dm),
            (KeyCode::Char('g'), _, true) => self.open_form(FormKind::NewGroup),
            (KeyCode::Char('a'), _, true) => self.open_form(FormKind::AddMember),
            (KeyCode::Char('k'), _, true) => self.open_form(FormKind::Kick),
            (KeyCode::Char('m'), _, true) => self.run_slash(Slash::GroupMembers),
            (KeyCode::Char('l'), _, true) => self.run_slash(Slash::GroupLeave),
            (KeyCode::Up, _, _) if !self.input.is_multiline() => {
                self.history_prev();
                Vec::new()
            }
            (KeyCode::Down, _, _) if !self.input.is_multiline() => {
                self.history_next();
                Vec::new()
            }
            (KeyCode::Up, _, _) | (KeyCode::Down, _, _) => {
                self.move_line(key.code == KeyCode::Up);
                Vec::new()
            }
            (KeyCode::Left, _, _) | (KeyCode::Char('b'), true, _) => {
                self.input.left();
                Vec::new()
            }
            (KeyCode::Right, _, _) | (KeyCode::Char('f'), true, _) => {
                self.input.right();
                Vec::new()
            }
            (KeyCode::Home, _, _) | (KeyCode::Char('a'), true, _) => {
                self.input.home();
                Vec::new()
            }
            (KeyCode::End, _, _) | (KeyCode::Char('e'), true, _) => {
                self.input.end();
                Vec::new()
            }
            (KeyCode::Backspace, _, _) | (KeyCode::Char('h'), true, _) => {
                self.input.backspace();
                Vec::new()
            }
            (KeyCode::Delete, _, _) | (KeyCode::Char('d'), true, _) => {
                self.input.delete();
                Vec::new()
            }
            (KeyCode::Char('u'), true, _) => {
                self.input.take();
                Vec::new()
            }
            (KeyCode::Char('w'), true, _) => {
                self.input.delete_word();
                Vec::new()
            }
            (KeyCode::Char(c), false, false) => {
                self.input.insert(c);
                self.history_pos = None;
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Own messages not yet accepted by the server.
    pub fn unsent(&self) -> usize {
        self.conversations
            .iter()
            .flat_map(|c| c.messages.iter().rev())
            .filter(|m| m.own && m.state == DeliveryState::Pending)
            .count()
    }

    /// Quits, unless that would drop unsent messages and the user was not warned yet.
    fn request_quit(&mut self) {
        let unsent = self.unsent();
        if unsent > 0 && !self.quit_warned {
            self.quit_warned = true;
            self.error(format!(
                "{unsent} message(s) not sent yet and lost on quit; quit again to quit anyway"
            ));
            return;
        }
        self.quit = true;
    }

    fn move_line(&mut self, up: bool) {
        // Moving by line within a multi-line input keeps the column in chars.
        let text = &self.input.text;
        let start = text[..self.input.cursor].rfind('\n').map_or(0, |i| i + 1);
        let col = text[start..self.input.cursor].chars().count();
        let target_start = if up {
            if start == 0 {
                return;
            }
            text[..start - 1].rfind('\n').map_or(0, |i| i + 1)
        } else {
            match text[self.input.cursor..].find('\n') {
                Some(i) => self.input.cursor + i + 1,
                None => return,
            }
        };
        let line_end = text[target_start..]
            .find('\n')
            .map_or(text.len(), |i| target_start + i);
        let line = &text[target_start..line_end];
        let off = line.char_indices().nth(col).map_or(line.len(), |(i, _)| i);
        self.input.cursor = target_start + off;
    }

    fn history_prev(&mut self) {
        if self.history.is_empty() {
            return;
        }
        let pos = match self.history_pos {
            None => {
                self.draft = self.input.text.clone();
                self.history.len() - 1
            }
            Some(0) => 0,
            Some(p) => p - 1,
        };
        self.history_pos = Some(pos);
        self.input.set(self.history[pos].clone());
    }

    fn history_next(&mut self) {
        let Some(p) = self.history_pos else { return };
        if p + 1 < self.history.len() {
            self.history_pos = Some(p + 1);
            self.input.set(self.history[p + 1].clone());
        } else {
            self.history_pos = None;
            let draft = std::mem::take(&mut self.draft);
            self.input.set(draft);
        }
    }

    fn remember(&mut self, line: &str) {
        if self.history.last().map(String::as_str) != Some(line) {
            self.history.push(line.to_owned());
            if self.history.len() > INPUT_HISTORY_MAX {
                self.history.remove(0);
            }
        }
        self.history_pos = None;
        self.draft.clear();
    }

    /// Enter in the input line: a slash command or a message to the open conversation.
    fn submit(&mut self) -> Vec<Command> {
        let text = self.input.text.clone();
        if text.trim().is_empty() {
            return Vec::new();
        }
        if text.starts_with('/') && !text.starts_with("//") {
            self.input.take();
            self.remember(&text);
            return match parse_slash(text.trim()) {
                Ok(cmd) => self.run_slash(cmd),
                Err(e) => {
                    self.error(e);
                    Vec::new()
                }
            };
        }
        let Some(key) = self.selected else {
            self.error("no conversation open: /dm USERNAME or /group new NAME USERNAME...");
            return Vec::new();
        };
        if self.me.is_none() {
            self.error("not signed in");
            return Vec::new();
        }
        self.input.take();
        self.remember(&text);
        // "//text" sends "/text".
        let body = text
            .strip_prefix('/')
            .filter(|t| t.starts_with('/'))
            .map_or(text.clone(), str::to_owned);
        self.queue_message(key, body)
    }

    /// Adds an own message as pending and asks the network to send it.
    pub fn queue_message(&mut self, key: ConvKey, body: String) -> Vec<Command> {
        let me = self.me.clone().unwrap_or_default();
        let client_msg_id = new_client_msg_id();
        let now = now_ms();
        let mut out = Vec::new();
        let i = self.ensure(key, None, &mut out);
        let c = &mut self.conversations[i];
        c.messages.push(ChatMessage {
            message_id: None,
            client_msg_id: client_msg_id.clone(),
            sender_id: me.user_id,
            sender_name: if me.display_name.is_empty() {
                me.username
            } else {
                me.display_name
            },
            time_ms: now,
            body: body.clone(),
            own: true,
            state: DeliveryState::Pending,
        });
        c.last_activity_ms = c.last_activity_ms.max(now);
        self.scroll = 0;
        self.sort();
        out.push(Command::Send {
            to: key,
            client_msg_id,
            body,
        });
        out
    }

    fn current_group(&mut self) -> Option<u64> {
        match self.selected {
            Some(ConvKey::Group(g)) => Some(g),
            _ => {
                self.error("open a group first");
                None
            }
        }
    }

    pub fn run_slash(&mut self, cmd: Slash) -> Vec<Command> {
        match cmd {
            Slash::Help => {
                self.overlay = Overlay::Help;
                Vec::new()
            }
            Slash::Quit => {
                self.request_quit();
                Vec::new()
            }
            Slash::Dm(username) => vec![Command::OpenDirect { username }],
            Slash::GroupNew { name, members } => vec![Command::CreateGroup {
                name,
                usernames: members,
            }],
            Slash::GroupAdd(usernames) => match self.current_group() {
                Some(group_id) => vec![Command::AddMembers {
                    group_id,
                    usernames,
                }],
                None => Vec::new(),
            },
            Slash::GroupKick(username) => match self.current_group() {
                Some(group_id) => vec![Command::RemoveMember { group_id, username }],
                None => Vec::new(),
            },
            Slash::GroupLeave => match self.current_group() {
                Some(g) => vec![Command::LeaveGroup(g)],
                None => Vec::new(),
            },
            Slash::GroupMembers => match self.current_group() {
                Some(g) => {
                    self.overlay = Overlay::Members(ConvKey::Group(g));
                    vec![Command::GetGroup(g)]
                }
                None => Vec::new(),
            },
            Slash::Nick(name) => vec![Command::SetDisplayName(name)],
            Slash::GroupAdds(who) => vec![Command::SetGroupAdds(who)],
            Slash::Password => self.open_form(FormKind::ChangePassword),
            Slash::DeleteAccount => self.open_form(FormKind::DeleteAccount),
            Slash::Logout => vec![Command::Logout],
        }
    }

    pub fn open_form(&mut self, kind: FormKind) -> Vec<Command> {
        let fields: &[(&'static str, bool)] = match kind {
            FormKind::SignIn { register } => {
                self.sign_in = Some(Form::sign_in(register));
                return Vec::new();
            }
            FormKind::Dm => &[("Username", false)],
            FormKind::NewGroup => &[("Group name", false), ("Members (usernames)", false)],
            FormKind::AddMember | FormKind::Kick => {
                if self.current_group().is_none() {
                    return Vec::new();
                }
                if kind == FormKind::Kick {
                    &[("Username", false)]
                } else {
                    &[("Usernames", false)]
                }
            }
            FormKind::DisplayName => &[("Display name", false)],
            FormKind::ChangePassword => &[
                ("Current password", true),
                ("New password", true),
                ("New password again", true),
            ],
            FormKind::DeleteAccount => &[("Password", true), ("Type your username", false)],
        };
        self.overlay = Overlay::Form(Form::new(kind, fields));
        Vec::new()
    }

    /// A key in a form; submitting clears `self.overlay`/`self.sign_in` handling to the caller.
    fn form_key(&mut self, form: &mut Form, key: KeyEvent) -> Vec<Command> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if form.busy {
            return Vec::new();
        }
        match key.code {
            KeyCode::Char('r') if ctrl => {
                if let FormKind::SignIn { register } = form.kind {
                    let mut new = Form::sign_in(!register);
                    for (n, o) in new.fields.iter_mut().zip(&form.fields) {
                        n.value = o.value.clone();
                    }
                    new.focus = form.focus.min(new.fields.len() - 1);
                    *form = new;
                }
                Vec::new()
            }
            KeyCode::Tab | KeyCode::Down => {
                form.focus = (form.focus + 1) % form.fields.len().max(1);
                Vec::new()
            }
            KeyCode::BackTab | KeyCode::Up => {
                let n = form.fields.len().max(1);
                form.focus = (form.focus + n - 1) % n;
                Vec::new()
            }
            KeyCode::Backspace => {
                if let Some(f) = form.fields.get_mut(form.focus) {
                    f.value.pop();
                }
                Vec::new()
            }
            KeyCode::Char('u') if ctrl => {
                if let Some(f) = form.fields.get_mut(form.focus) {
                    f.value.clear();
                }
                Vec::new()
            }
            KeyCode::Enter => {
                if form.focus + 1 < form.fields.len() && form.value(form.focus).is_empty() {
                    form.focus += 1;
                    return Vec::new();
                }
                match self.submit_form(form) {
                    Ok(cmds) => {
                        form.error = None;
                        if !cmds.is_empty() {
                            form.busy = true;
                        }
                        cmds
                    }
                    Err(e) => {
                        form.error = Some(e);
                        Vec::new()
                    }
                }
            }
            KeyCode::Char(c) if !ctrl => {
                if let Some(f) = form.fields.get_mut(form.focus) {
                    f.value.push(c);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn submit_form(&mut self, form: &Form) -> Result<Vec<Command>, String> {
        let v = |i: usize| form.value(i).to_owned();
        let need = |i: usize, what: &str| {
            if form.value(i).is_empty() {
                Err(format!("{what} is empty"))
            } else {
                Ok(form.value(i).to_owned())
            }
        };
        let users = |s: String| -> Vec<String> {
            s.split([' ', ','])
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Ok(match form.kind {
            FormKind::SignIn { register } => {
                let username = need(0, "username")?;
                // Passwords are not trimmed: spaces may belong to them.
                let password = form
                    .fields
                    .get(1)
                    .map(|f| f.value.clone())
                    .unwrap_or_default();
                if password.is_empty() {
                    return Err("password is empty".into());
                }
                let register = register.then(|| {
                    let d = v(2);
                    if d.is_empty() { username.clone() } else { d }
                });
                vec![Command::SignIn {
                    username,
                    password,
                    register,
                }]
            }
            FormKind::Dm => vec![Command::OpenDirect {
                username: need(0, "username")?,
            }],
            FormKind::NewGroup => vec![Command::CreateGroup {
                name: need(0, "group name")?,
                usernames: users(v(1)),
            }],
            FormKind::AddMember => {
                let group_id = self.current_group().ok_or("open a group first")?;
                vec![Command::AddMembers {
                    group_id,
                    usernames: users(need(0, "usernames")?),
                }]
            }
            FormKind::Kick => {
                let group_id = self.current_group().ok_or("open a group first")?;
                vec![Command::RemoveMember {
                    group_id,
                    username: need(0, "username")?,
                }]
            }
            FormKind::DisplayName => vec![Command::SetDisplayName(need(0, "display name")?)],
            FormKind::ChangePassword => {
                let current = form.fields[0].value.clone();
                let new = form.fields[1].value.clone();
                if new.is_empty() {
                    return Err("the new password is empty".into());
                }
                if new != form.fields[2].value {
                    return Err("the new passwords differ".into());
                }
                vec![Command::ChangePassword { current, new }]
            }
            FormKind::DeleteAccount => {
                let me = self
                    .me
                    .as_ref()
                    .map(|u| u.username.clone())
                    .unwrap_or_default();
                if me.is_empty() || v(1) != me {
                    return Err(format!(
                        "type your username ({me}) to confirm; nothing was deleted"
                    ));
                }
                vec![Command::DeleteAccount {
                    password: form.fields[0].value.clone(),
                }]
            }
        })
    }

    /// The network finished what the open prompt asked for.
    fn close_prompt(&mut self) {
        if matches!(&self.overlay, Overlay::Form(f) if f.busy) {
            self.overlay = Overlay::None;
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
