//! Rendering: draws the [`App`] state, nothing else. It never changes state and never
//! talks to the network; what it learns while drawing (the top of the conversation was
//! reached) it returns in [`RenderInfo`].
//!
//! Every piece of text that came from someone else (message bodies, names, group titles,
//! error messages) goes through [`sanitize`] first: a control character or an escape
//! sequence reaching the terminal could move the cursor, change colours or worse, so they
//! become visible placeholders (`^[` for ESC, U+FFFD for C1 controls and bidi overrides).
//! Widths come from unicode-width, the same tables ratatui uses, so wide (CJK, emoji) text
//! wraps where the terminal does.

use std::time::Instant;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, List, ListItem, ListState, Paragraph};
use unicode_width::UnicodeWidthChar;

use crate::app::{App, ChatMessage, ConnState, ConvKey, DeliveryState, Form, Overlay};

/// Width of the conversation list.
const LIST_WIDTH: u16 = 26;
/// Width of prompt and sign-in boxes.
const FORM_WIDTH: u16 = 72;
/// Most lines the input box grows to.
const INPUT_MAX_LINES: usize = 6;

/// What the renderer learnt about the view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderInfo {
    /// Height of the message area.
    pub view_height: usize,
    /// The oldest loaded message is on screen; `Some(max scroll)` then.
    pub top_reached: Option<usize>,
}

/// Makes one line of untrusted text safe to print: C0 controls as `^X`, DEL as `^?`, C1
/// controls and bidirectional overrides as U+FFFD, tabs as spaces.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\t' => out.push_str("    "),
            '\u{0}'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            '\u{7f}' => out.push_str("^?"),
            '\u{80}'..='\u{9f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{061c}'
            | '\u{200e}'
            | '\u{200f}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn char_width(c: char) -> usize {
    c.width().unwrap_or(0)
}

pub fn str_width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// Breaks sanitized text into rows: the first row holds `first` columns, later ones
/// `rest`. Breaks at the last space that fits, else mid-word (a 10,000-character word
/// still wraps); a character wider than the row gets a row of its own.
pub fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let mut rows = Vec::new();
    let mut row = String::new();
    let mut width = 0;
    let mut limit = first.max(1);
    for c in text.chars() {
        let w = char_width(c);
        if width + w > limit && !row.is_empty() {
            // Prefer to break after the last space, if it leaves something on the row.
            let carry = match row.rfind(' ') {
                Some(i) if i > 0 && c != ' ' => {
                    let tail = row[i + 1..].to_owned();
                    row.truncate(i + 1);
                    tail
                }
                _ => String::new(),
            };
            rows.push(std::mem::take(&mut row));
            limit = rest.max(1);
            width = str_width(&carry);
            row = carry;
            if c == ' ' && row.is_empty() {
                continue;
            }
        }
        row.push(c);
        width += w;
    }
    rows.push(row);
    rows
}

fn time_of(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let day = secs.rem_euclid(86_400);
    format!("{:02}:{:02}", day / 3600, (day % 3600) / 60)
}

fn name_color(id: u64) -> Color {
    const COLORS: [Color; 6] = [
        Color::Yellow,
        Color::Magenta,
        Color::Green,
        Color::Blue,
        Color::LightRed,
        Color::LightCyan,
    ];
    COLORS[(id % COLORS.len() as u64) as usize]
}

/// The rows of one message at `width` columns:
/// `✓ 12:34 Alice: text` with continuation rows indented under the text.
pub fn message_lines(m: &ChatMessage, width: usize, utc_offset_secs: i64) -> Vec<Line<'static>> {
    let (mark, mark_style) = if m.own {
        match &m.state {
            DeliveryState::Pending => ("… ", Style::default().fg(Color::DarkGray)),
            DeliveryState::Sent => ("✓ ", Style::default().fg(Color::Green)),
            DeliveryState::Failed(_) => ("✗ ", Style::default().fg(Color::Red)),
        }
    } else {
        ("  ", Style::default())
    };
    let name = sanitize(&m.sender_name);
    let name_style = if m.own {
        Style::default()
            .fg(Color::Cyan)
            .add_modifier(Modifier::BOLD)
    } else {
        Style::default()
            .fg(name_color(m.sender_id))
            .add_modifier(Modifier::BOLD)
    };
    let prefix_width = 2 + 5 + 1 + str_width(&name) + 2;
    let indent = 8usize;
    let body = m.body.replace("\r\n", "\n");
    let mut out = Vec::new();
    let mut first = true;
    for raw in body.split('\n') {
        let clean = sanitize(raw);
        let (first_w, rest_w) = if first {
            (
                width.saturating_sub(prefix_width).max(1),
                width.saturating_sub(indent).max(1),
            )
        } else {
            (
                width.saturating_sub(indent).max(1),
                width.saturating_sub(indent).max(1),
            )
        };
        for row in wrap(&clean, first_w, rest_w) {
            let mut spans = Vec::new();
            if first {
                spans.push(Span::styled(mark, mark_style));
                spans.push(Span::styled(
                    time_of(
                        m.time_ms
                            .saturating_add(utc_offset_secs.saturating_mul(1000)),
                    ),
                    Style::default().fg(Color::DarkGray),
                ));
                spans.push(Span::raw(" "));
                spans.push(Span::styled(name.clone(), name_style));
                spans.push(Span::raw(": "));
                first = false;
            } else {
                spans.push(Span::raw(" ".repeat(indent)));
            }
            let body_style = if matches!(m.state, DeliveryState::Failed(_)) {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            spans.push(Span::styled(row, body_style));
            out.push(Line::from(spans));
        }
    }
    out
}

pub fn render(f: &mut Frame, app: &App, now: Instant) -> RenderInfo {
    let area = f.area();
    if let Some(form) = &app.sign_in {
        render_sign_in(f, app, form, area, now);
        return RenderInfo::default();
    }
    let input_rows = input_rows(app, area.width.saturating_sub(2) as usize);
    let input_height = input_rows.len().clamp(1, INPUT_MAX_LINES) as u16 + 2;
    let [main, input_area, status] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(input_height),
        Constraint::Length(1),
    ])
    .areas(area);
    let list_width = LIST_WIDTH.min(main.width / 3);
    let [list_area, chat_area] =
        Layout::horizontal([Constraint::Length(list_width), Constraint::Min(1)]).areas(main);

    render_list(f, app, list_area);
    let info = render_chat(f, app, chat_area);
    render_input(f, app, input_area, &input_rows);
    render_status(f, app, status, now);

    match &app.overlay {
        Overlay::None => {}
        Overlay::Help => render_help(f, area),
        Overlay::Members(key) => render_members(f, app, *key, area),
        Overlay::Form(form) => render_form(f, form, area, None),
    }
    info
}

fn render_list(f: &mut Frame, app: &App, area: Rect) {
    let inner_width = area.width.saturating_sub(2) as usize;
    let items: Vec<ListItem> = app
        .conversations
        .iter()
        .map(|c| {
            let sigil = match c.key {
                ConvKey::Direct(_) => "@",
                ConvKey::Group(_) => "#",
            };
            let unread = if c.unread > 0 {
                format!(" ({})", c.unread)
            } else {
                String::new()
            };
            let title_room = inner_width.saturating_sub(2 + unread.len());
            let title = truncate(&sanitize(&c.title), title_room);
            let style = if c.unread > 0 {
                Style::default().add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            };
            ListItem::new(Line::from(vec![
                Span::styled(format!("{sigil} "), Style::default().fg(Color::DarkGray)),
                Span::styled(title, style),
                Span::styled(unread, Style::default().fg(Color::Yellow)),
            ]))
        })
        .collect();
    let mut state = ListState::default();
    state.select(
        app.selected
            .and_then(|k| app.conversations.iter().position(|c| c.key == k)),
    );
    let list = List::new(items)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title("Conversations"),
        )
        .highlight_style(Style::default().bg(Color::DarkGray).fg(Color::White))
        .highlight_symbol("");
    f.render_stateful_widget(list, area, &mut state);
}

/// Cuts `s` to `width` columns, marking the cut with `…`.
pub fn truncate(s: &str, width: usize) -> String {
    if str_width(s) <= width {
        return s.to_owned();
    }
    let mut out = String::new();
    let mut w = 0;
    for c in s.chars() {
        let cw = char_width(c);
        if w + cw + 1 > width {
            break;
        }
        out.push(c);
        w += cw;
    }
    out.push('…');
    out
}

fn render_chat(f: &mut Frame, app: &App, area: Rect) -> RenderInfo {
    let Some(conv) = app.current() else {
        let hint = Paragraph::new(vec![
            Line::from("No conversation open."),
            Line::from(""),
            Line::from("  /dm USERNAME               start a direct conversation"),
            Line::from("  /group new NAME USER...    create a group"),
            Line::from("  F1 or /help                all keys and commands"),
        ])
        .block(Block::default().borders(Borders::ALL));
        f.render_widget(hint, area);
        return RenderInfo::default();
    };
    let mut title = format!(" {} ", sanitize(&conv.title));
    if let Some(members) = &conv.members {
        title.push_str(&format!("· {} members ", members.len()));
    }
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let height = inner.height as usize;
    let width = inner.width as usize;

    // Only the messages that can be on screen are wrapped, newest first, so a conversation
    // of any length costs what fits on the screen plus the scroll offset.
    let need = height + app.scroll;
    let mut rows: Vec<Line<'static>> = Vec::new();
    let mut exhausted = true;
    for m in conv.messages.iter().rev() {
        if rows.len() >= need {
            exhausted = false;
            break;
        }
        let mut lines = message_lines(m, width, app.utc_offset_secs);
        lines.reverse();
        rows.extend(lines);
    }
    let header = if conv.loading {
        Some("— loading older messages —")
    } else if exhausted && !conv.has_more {
        Some("— beginning of the conversation —")
    } else {
        None
    };
    if exhausted && let Some(h) = header {
        rows.push(Line::styled(h, Style::default().fg(Color::DarkGray)));
    }
    let total = rows.len();
    let top_reached = if exhausted {
        Some(total.saturating_sub(height))
    } else {
        None
    };
    let scroll = match top_reached {
        Some(max) => app.scroll.min(max),
        None => app.scroll,
    };
    // rows is newest-first; take the window [scroll, scroll + height) and flip it.
    let mut visible: Vec<Line> = rows
        .into_iter()
        .skip(scroll)
        .take(height)
        .collect::<Vec<_>>();
    visible.reverse();
    // Short conversations sit at the bottom, next to the input, as in every chat client.
    let pad = height.saturating_sub(visible.len());
    let mut lines = vec![Line::from(""); pad];
    lines.extend(visible);
    f.render_widget(Paragraph::new(lines), inner);
    if scroll > 0 {
        let mark = format!(" ↑ {scroll} lines up · PgDn ");
        let w = str_width(&mark) as u16;
        if area.width > w + 2 && area.height > 0 {
            let r = Rect::new(area.x + area.width - w - 1, area.y + area.height - 1, w, 1);
            f.render_widget(
                Paragraph::new(mark).style(Style::default().fg(Color::Yellow)),
                r,
            );
        }
    }
    RenderInfo {
        view_height: height,
        top_reached,
    }
}

/// The input's rows at `width` columns, and where the cursor is (row, column).
fn input_rows(app: &App, width: usize) -> Vec<String> {
    input_layout(app, width).0
}

fn input_layout(app: &App, width: usize) -> (Vec<String>, (usize, usize)) {
    let width = width.max(1);
    let mut rows = Vec::new();
    let mut cursor = (0, 0);
    let mut offset = 0;
    for line in app.input.text.split('\n') {
        let line_start = offset;
        let line_end = offset + line.len();
        let cursor_here = app.input.cursor >= line_start && app.input.cursor <= line_end;
        // Sanitizing per char keeps the cursor arithmetic simple: widths of placeholders.
        let mut row = String::new();
        let mut w = 0;
        let mut here_rows = Vec::new();
        for (i, c) in line.char_indices() {
            let shown = sanitize(c.encode_utf8(&mut [0; 4]));
            let sw = str_width(&shown);
            if w + sw > width && !row.is_empty() {
                here_rows.push(std::mem::take(&mut row));
                w = 0;
            }
            if cursor_here && line_start + i == app.input.cursor {
                cursor = (rows.len() + here_rows.len(), w);
            }
            row.push_str(&shown);
            w += sw;
        }
        if cursor_here && app.input.cursor == line_end {
            if w >= width {
                here_rows.push(std::mem::take(&mut row));
                w = 0;
            }
            cursor = (rows.len() + here_rows.len(), w);
        }
        here_rows.push(row);
        rows.extend(here_rows);
        offset = line_end + 1;
    }
    (rows, cursor)
}

fn render_input(f: &mut Frame, app: &App, area: Rect, _rows: &[String]) {
    let width = area.width.saturating_sub(2) as usize;
    let (rows, (crow, ccol)) = input_layout(app, width);
    let height = area.height.saturating_sub(2) as usize;
    let first = (crow + 1).saturating_sub(height.max(1));
    let title = match app.current() {
        Some(c) => format!(" to {} ", sanitize(&c.title)),
        None => " message ".into(),
    };
    let hint = if app.input.is_multiline() {
        " Enter send · Ctrl-J newline "
    } else {
        " Enter send · Alt-Enter newline · F1 help "
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(title)
        .title_bottom(Line::from(hint).right_aligned());
    let lines: Vec<Line> = rows
        .into_iter()
        .skip(first)
        .take(height)
        .map(Line::from)
        .collect();
    f.render_widget(Paragraph::new(lines).block(block), area);
    let (x, y) = (1 + ccol, 1 + crow.saturating_sub(first));
    // On a terminal too small for the box there is nowhere sensible to put the cursor.
    if app.overlay == Overlay::None && x < area.width as usize && y < area.height as usize {
        f.set_cursor_position(Position::new(area.x + x as u16, area.y + y as u16));
    }
}

fn conn_text(conn: &ConnState, now: Instant) -> (String, Color) {
    match conn {
        ConnState::Connecting => ("connecting…".into(), Color::Yellow),
        ConnState::Connected => ("connected".into(), Color::Green),
        ConnState::Reconnecting { at, .. } => {
            let secs = at.saturating_duration_since(now).as_secs_f64().ceil() as u64;
            (format!("reconnecting in {secs}s"), Color::Yellow)
        }
        ConnState::Offline(_) => ("offline".into(), Color::Red),
    }
}

fn render_status(f: &mut Frame, app: &App, area: Rect, now: Instant) {
    let (state, color) = conn_text(&app.conn, now);
    let mut spans = vec![Span::styled(
        format!(" {state} "),
        Style::default().fg(Color::Black).bg(color),
    )];
    if let Some(me) = &app.me {
        spans.push(Span::raw(format!(
            " {} ({}) @ {} ",
            sanitize(&me.username),
            sanitize(&me.display_name),
            sanitize(&app.server)
        )));
    } else {
        spans.push(Span::raw(format!(" {} ", sanitize(&app.server))));
    }
    let detail = match (&app.notice, &app.conn) {
        (Some((text, err)), _) => Some((text.clone(), *err)),
        (None, ConnState::Offline(why)) => Some((why.clone(), true)),
        (None, ConnState::Reconnecting { error, .. }) => Some((error.clone(), false)),
        _ => None,
    };
    if let Some((text, err)) = detail {
        let style = if err {
            Style::default().fg(Color::Red)
        } else {
            Style::default().fg(Color::Gray)
        };
        spans.push(Span::styled(format!("│ {}", sanitize(&text)), style));
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

pub const HELP: &[(&str, &str)] = &[
    (
        "Tab / Shift-Tab, Ctrl-N / Ctrl-P",
        "next / previous conversation",
    ),
    (
        "PageUp / PageDown",
        "scroll (older history loads at the top)",
    ),
    ("Enter", "send"),
    ("Alt-Enter or Ctrl-J", "new line in the message"),
    ("Up / Down", "input history (single-line input)"),
    ("Alt-D  /dm USER", "direct conversation"),
    ("Alt-G  /group new NAME USER...", "create a group"),
    ("Alt-A  /group add USER...", "add members (admins)"),
    ("Alt-K  /group kick USER", "remove a member (admins)"),
    ("Alt-L  /group leave", "leave the open group"),
    ("Alt-M  /group members", "show the members"),
    ("/nick NAME", "change your display name"),
    (
        "/groupadds anyone|contacts|nobody",
        "who may add you to groups",
    ),
    ("/password", "change your password"),
    ("/logout  /delete-account", "sign out / delete the account"),
    ("Ctrl-C  /quit", "quit"),
    ("//text", "send text starting with /"),
];

fn render_help(f: &mut Frame, area: Rect) {
    let r = centered(area, 76, HELP.len() as u16 + 4);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, v)| {
            Line::from(vec![
                Span::styled(format!("{k:<34}"), Style::default().fg(Color::Cyan)),
                Span::raw(*v),
            ])
        })
        .collect();
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(" Help — any key closes "),
        ),
        r,
    );
}

fn render_members(f: &mut Frame, app: &App, key: ConvKey, area: Rect) {
    let conv = app.conversation(key);
    let lines: Vec<Line> = match conv.and_then(|c| c.members.as_ref()) {
        None => vec![Line::from("loading…")],
        Some(ms) => ms
            .iter()
            .map(|m| {
                let mut s = format!("{} ({})", sanitize(&m.display_name), sanitize(&m.username));
                if m.admin {
                    s.push_str("  admin");
                }
                Line::from(s)
            })
            .collect(),
    };
    let r = centered(area, 50, lines.len() as u16 + 2);
    let title = format!(
        " Members of {} ",
        conv.map_or(String::new(), |c| sanitize(&c.title))
    );
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)),
        r,
    );
}

fn render_form(f: &mut Frame, form: &Form, area: Rect, header: Option<Vec<Line<'static>>>) {
    let mut lines: Vec<Line> = header.unwrap_or_default();
    let mut cursor = None;
    for (i, field) in form.fields.iter().enumerate() {
        let value = if field.masked {
            "•".repeat(field.value.chars().count())
        } else {
            sanitize(&field.value)
        };
        let label = format!("{:>20}: ", field.label);
        let style = if i == form.focus {
            Style::default().add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        if i == form.focus {
            cursor = Some((lines.len(), str_width(&label) + str_width(&value)));
        }
        lines.push(Line::from(vec![
            Span::styled(label, style),
            Span::raw(value),
        ]));
    }
    lines.push(Line::from(""));
    if form.busy {
        lines.push(Line::styled("working…", Style::default().fg(Color::Yellow)));
    } else if let Some(e) = &form.error {
        // Wrapped here so the box grows to fit it.
        let inner = FORM_WIDTH.min(area.width).saturating_sub(2) as usize;
        for row in wrap(&sanitize(e), inner, inner) {
            lines.push(Line::styled(row, Style::default().fg(Color::Red)));
        }
    } else {
        let hint = if matches!(form.kind, crate::app::FormKind::SignIn { .. }) {
            "Enter: submit · Tab: next field · Ctrl-C: quit"
        } else {
            "Enter: submit · Tab: next field · Esc: cancel"
        };
        lines.push(Line::styled(hint, Style::default().fg(Color::DarkGray)));
    }
    let r = centered(area, FORM_WIDTH, lines.len() as u16 + 2);
    let inner_width = r.width.saturating_sub(2) as usize;
    let paragraph = Paragraph::new(lines)
        .wrap(ratatui::widgets::Wrap { trim: false })
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" {} ", form.title())),
        );
    f.render_widget(Clear, r);
    f.render_widget(paragraph, r);
    if let Some((row, col)) = cursor
        && col < inner_width
    {
        f.set_cursor_position(Position::new(r.x + 1 + col as u16, r.y + 1 + row as u16));
    }
}

fn render_sign_in(f: &mut Frame, app: &App, form: &Form, area: Rect, now: Instant) {
    let [body, status] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(area);
    let register = matches!(form.kind, crate::app::FormKind::SignIn { register: true });
    let header = vec![
        Line::from(vec![
            Span::raw("Server: "),
            Span::styled(sanitize(&app.server), Style::default().fg(Color::Cyan)),
        ]),
        Line::styled(
            if register {
                "Creating a new account · Ctrl-R: log in instead"
            } else {
                "Signing in · Ctrl-R: register a new account instead"
            },
            Style::default().fg(Color::DarkGray),
        ),
        Line::from(""),
    ];
    render_form(f, form, body, Some(header));
    render_status(f, app, status, now);
}
