//! The JetStream store's reader of the NATS protocol (`store::nats::wire`, reached through the
//! module's hidden re-exports): the bytes a NATS server sends on the feed connection, cut into
//! operations. Those bytes come from a peer like any other: a server bug, a proxy in between or
//! a port that is not NATS at all can put anything on that connection.
//!
//! An input is either the stream itself or a program that builds one out of operations framed
//! as a server frames them (or nearly), raw bytes, lines at the length limit and cuts, so that
//! the fuzzer reaches messages whose lengths add up, and the line limit, without counting.
//!
//! The reader is checked against what the protocol says the bytes were, not against a second
//! parser: every operation it returns is the bytes it consumed, it holds back only what can
//! still become an operation within its limits, a refusal consumes nothing and stands whatever
//! follows, and the stream read in one piece, in the input's pieces and (short streams) a byte
//! at a time yields the same operations and the same end.

use std::ops::Range;

use bytes::BytesMut;

use super::input::Input;
use super::{cap, Outcome};
use botd_relay::store::nats::{header_numbers, parse, status, ServerOp, WireError, MAX_LINE};

/// Largest input. A built stream can be larger: each long line adds about [`MAX_LINE`] bytes,
/// at most [`MAX_LONG_LINES`] times.
const MAX_INPUT: usize = 1 << 16;
/// Long lines per built stream, and cuts a program may add: a cut costs a scan of what is
/// held back, up to a long line.
const MAX_LONG_LINES: usize = 2;
const MAX_CUTS: usize = 32;
/// Streams up to this length are also fed one byte at a time.
const BYTE_BY_BYTE: usize = 1024;
/// Operations an outcome names; the rest it counts.
const LISTED: usize = 12;
/// The message limit the feed reads its handshake with (`feed.rs`).
const HANDSHAKE_MAX_MESSAGE: usize = 1 << 20;

/// Flag bit 0: the content is a program (see [`step`]), not the stream.
pub(super) const BUILT: u8 = 1;
/// Flag bit 1: the message limit is the handshake's, not the input's.
pub(super) const HANDSHAKE_LIMIT: u8 = 2;

/// The steps of a program: a byte whose low three bits pick the step and whose high five bits
/// are the step's variant, then the step's operands.
pub(super) mod step {
    /// A chunk, as it is.
    pub const RAW: u8 = 0;
    /// sid (u8), payload (chunk); variant: see `message`.
    pub const MSG: u8 = 1;
    /// sid (u8), header shape (u8: bits 0-2 see `header_block`, bits 3-4 the announced
    /// header length), sequence (u32), payload (chunk); variant: see `message`.
    pub const HMSG: u8 = 2;
    /// JSON (chunk); variant bit 0: `info` and a tab.
    pub const INFO: u8 = 3;
    /// No operand; variant `& 7` picks one of `CONTROL_LINES`.
    pub const CONTROL: u8 = 4;
    /// Text (chunk); variant bit 0: without quotes.
    pub const ERR: u8 = 5;
    /// Length change (u8 as i8, added to `MAX_LINE`); variant bits 0-1: the line's start
    /// (`INFO `, `-ERR `, nothing, `PING `), bits 2-3 its end (CRLF, CR, nothing, LF).
    pub const LONG_LINE: u8 = 6;
    /// No operand: the stream is also cut here (the first `MAX_CUTS` times).
    pub const CUT: u8 = 7;
}

/// Subjects of built messages: a live feed's, a bare one, an inbox with a number, a stream's.
const SUBJECTS: [&str; 4] = ["botd.live.m0.ab", "s", "_INBOX.x.42", "botd.m1.ab"];
/// Version lines of built header blocks: plain, and the statuses a JetStream request can get.
const VERSION_LINES: [&str; 4] = [
    "NATS/1.0",
    "NATS/1.0 404 No Messages",
    "NATS/1.0 408 Request Timeout",
    "NATS/1.0 503",
];
/// The lines of [`step::CONTROL`], in spellings the reader accepts.
const CONTROL_LINES: [&str; 8] = [
    "PING", "PONG", "+OK", "ping", "Pong", "+ok", "PING x", "PONG\t",
];
const LONG_LINE_STARTS: [&str; 4] = ["INFO ", "-ERR ", "", "PING "];
const LONG_LINE_ENDS: [&str; 4] = ["\r\n", "\r", "", "\n"];

// ---------------------------------------------------------------------------------------------
// Building a stream
// ---------------------------------------------------------------------------------------------

/// A header block: `shape` bits 0-1 pick the version line, bit 2 adds the headers a
/// republished message carries, with sequence `seq`.
fn header_block(shape: u8, seq: u32) -> Vec<u8> {
    let mut block = format!("{}\r\n", VERSION_LINES[usize::from(shape & 3)]);
    if shape & 4 != 0 {
        block.push_str(&format!(
            "Nats-Stream: botd-m0\r\nNats-Subject: botd.m0.ab\r\nNats-Sequence: {seq}\r\n\
             Nats-Last-Sequence: {}\r\n",
            seq.saturating_sub(1)
        ));
    }
    block.push_str("\r\n");
    block.into_bytes()
}

/// A message as the server frames it, or nearly: `MSG` without a header block, `HMSG` with
/// one, announced as `header_len`. Variant bits 0-1 pick the subject, bit 2 adds a reply
/// subject, bits 3-4 announce the total exactly, one byte too many, one too few, or exactly in
/// lower case with tabs.
fn message(out: &mut Vec<u8>, variant: u8, sid: u8, headers: Option<(&[u8], usize)>, body: &[u8]) {
    let (lower, sep) = if variant >> 3 == 3 {
        (true, "\t")
    } else {
        (false, " ")
    };
    let name = match (headers.is_some(), lower) {
        (false, false) => "MSG",
        (false, true) => "msg",
        (true, false) => "HMSG",
        (true, true) => "hmsg",
    };
    let mut line = format!(
        "{name}{sep}{}{sep}{sid}",
        SUBJECTS[usize::from(variant & 3)]
    );
    if variant & 4 != 0 {
        line.push_str(&format!("{sep}_INBOX.r.{sid}"));
    }
    let header_bytes = headers.map_or(&[][..], |(block, _)| block);
    let total = header_bytes.len() + body.len();
    if let Some((_, announced)) = headers {
        line.push_str(&format!("{sep}{announced}"));
    }
    let announced_total = match variant >> 3 {
        1 => total + 1,
        2 => total.saturating_sub(1),
        _ => total,
    };
    line.push_str(&format!("{sep}{announced_total}\r\n"));
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(header_bytes);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

/// The stream a program builds (see [`step`]), and the cuts it asks for.
fn build(input: &mut Input) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut cuts = Vec::new();
    let mut long_lines = 0;
    while !input.is_empty() {
        let byte = input.u8();
        let variant = byte >> 3;
        match byte & 7 {
            step::RAW => stream.extend_from_slice(input.chunk()),
            step::MSG => {
                let sid = input.u8();
                message(&mut stream, variant, sid, None, input.chunk());
            }
            step::HMSG => {
                let sid = input.u8();
                let shape = input.u8();
                let block = header_block(shape, input.u32());
                let body = input.chunk();
                // Shape bits 3-4: the block's length, one more (the block takes a payload
                // byte), more than the whole message, or none (the block read as payload).
                let announced = match shape >> 3 & 3 {
                    0 => block.len(),
                    1 => block.len() + 1,
                    2 => block.len() + body.len() + 1,
                    _ => 0,
                };
                message(&mut stream, variant, sid, Some((&block, announced)), body);
            }
            step::INFO => {
                let start: &[u8] = if variant & 1 != 0 {
                    b"info\t"
                } else {
                    b"INFO "
                };
                stream.extend_from_slice(start);
                stream.extend_from_slice(input.chunk());
                stream.extend_from_slice(b"\r\n");
            }
            step::CONTROL => {
                stream.extend_from_slice(CONTROL_LINES[usize::from(variant & 7)].as_bytes());
                stream.extend_from_slice(b"\r\n");
            }
            step::ERR => {
                let text = input.chunk();
                let quote: &[u8] = if variant & 1 != 0 { b"" } else { b"'" };
                stream.extend_from_slice(b"-ERR ");
                stream.extend_from_slice(quote);
                stream.extend_from_slice(text);
                stream.extend_from_slice(quote);
                stream.extend_from_slice(b"\r\n");
            }
            step::LONG_LINE => {
                let change = input.u8() as i8;
                if long_lines == MAX_LONG_LINES {
                    continue;
                }
                long_lines += 1;
                let start = LONG_LINE_STARTS[usize::from(variant & 3)].as_bytes();
                let len = MAX_LINE.saturating_add_signed(isize::from(change));
                stream.extend_from_slice(start);
                stream.resize(stream.len() + len.saturating_sub(start.len()), b'x');
                stream.extend_from_slice(LONG_LINE_ENDS[usize::from(variant >> 2 & 3)].as_bytes());
            }
            _ if cuts.len() < MAX_CUTS => cuts.push(stream.len()),
            _ => {}
        }
    }
    (stream, cuts)
}

// ---------------------------------------------------------------------------------------------
// Reading a stream
// ---------------------------------------------------------------------------------------------

/// How reading a stream ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Every operation taken; `left` bytes wait for more.
    Waiting { left: usize },
    /// The reader refused the bytes from `at` on.
    Refused { at: usize, error: WireError },
}

/// What a reader made of a stream: each operation with the bytes it came from, and the end.
struct Read {
    ops: Vec<(Range<usize>, ServerOp)>,
    end: End,
}

/// Feeds `stream` to the reader as the feed connection does (append what arrived, take every
/// complete operation), in pieces ending at `cuts` (ascending) and at the end of the stream,
/// checking every answer of the reader against the bytes.
fn read(stream: &[u8], cuts: &[usize], max_message: usize) -> Read {
    let mut buf = BytesMut::new();
    let mut ops = Vec::new();
    let mut consumed = 0;
    for cut in cuts.iter().copied().chain([stream.len()]) {
        let fed = consumed + buf.len();
        buf.extend_from_slice(&stream[fed..cut]);
        loop {
            let before = buf.len();
            match parse(&mut buf, max_message) {
                Ok(Some(op)) => {
                    let taken = before - buf.len();
                    let range = consumed..consumed + taken;
                    check_op(&op, &stream[range.clone()], max_message);
                    consumed += taken;
                    ops.push((range, op));
                }
                Ok(None) => {
                    // Also proves that every operation taken was a prefix of the buffer.
                    assert!(
                        buf[..] == stream[consumed..cut],
                        "waiting changed the buffer"
                    );
                    check_waiting(&buf, max_message);
                    break;
                }
                Err(error) => {
                    assert!(buf[..] == stream[consumed..cut], "a refusal consumed bytes");
                    check_refusal(&error, &buf, max_message);
                    // The feed closes the connection on a refusal; a reader asked again, or
                    // given more bytes, must not find an operation there after all.
                    assert_eq!(
                        parse(&mut buf, max_message),
                        Err(error.clone()),
                        "asked again"
                    );
                    buf.extend_from_slice(&stream[cut..]);
                    assert_eq!(
                        parse(&mut buf, max_message),
                        Err(error.clone()),
                        "with the rest of the stream behind it"
                    );
                    let end = End::Refused {
                        at: consumed,
                        error,
                    };
                    return Read { ops, end };
                }
            }
        }
    }
    let end = End::Waiting { left: buf.len() };
    Read { ops, end }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

fn is_separator(byte: &u8) -> bool {
    *byte == b' ' || *byte == b'\t'
}

/// A protocol line's operation name and its arguments (after the first space or tab).
fn split_line(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(is_separator) {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => (line, &[]),
    }
}

fn fields(args: &[u8]) -> Vec<&[u8]> {
    args.split(is_separator).filter(|f| !f.is_empty()).collect()
}

/// A field of decimal digits as a number.
fn digits(field: &[u8]) -> Option<u64> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(field).ok()?.parse().ok()
}

fn is_message_line(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"MSG") || name.eq_ignore_ascii_case(b"HMSG")
}

/// `op` is what `bytes`, all the reader consumed for it, say.
fn check_op(op: &ServerOp, bytes: &[u8], max_message: usize) {
    let end = find_crlf(bytes).expect("an operation consumes its line end");
    assert!(end <= MAX_LINE, "an operation's line of {end} bytes");
    let (name, args) = split_line(&bytes[..end]);
    let named = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
    let ServerOp::Message(m) = op else {
        assert_eq!(bytes.len(), end + 2, "{op:?} consumed more than its line");
        let matches = match op {
            ServerOp::Info(json) => named("INFO") && json[..] == *args,
            ServerOp::Ping => named("PING"),
            ServerOp::Pong => named("PONG"),
            ServerOp::Ok => named("+OK"),
            ServerOp::Err(text) => {
                named("-ERR")
                    && !text.starts_with('\'')
                    && !text.ends_with('\'')
                    && String::from_utf8_lossy(args).contains(text.as_str())
            }
            ServerOp::Message(_) => unreachable!(),
        };
        assert!(
            matches,
            "{op:?} read from {:?}",
            String::from_utf8_lossy(bytes)
        );
        return;
    };
    let with_headers = named("HMSG");
    assert!(with_headers || named("MSG"), "a message from {name:?}");
    let fields = fields(args);
    let expected = if with_headers { 4..=5 } else { 3..=4 };
    assert!(expected.contains(&fields.len()), "{} fields", fields.len());
    let total = m.headers.len() + m.payload.len();
    assert!(total <= max_message, "a message of {total} bytes");
    assert_eq!(m.subject[..], *fields[0], "subject");
    assert_eq!(digits(fields[1]), Some(m.sid), "sid");
    assert_eq!(
        digits(fields[fields.len() - 1]),
        Some(total as u64),
        "total"
    );
    if with_headers {
        let header_len = digits(fields[fields.len() - 2]);
        assert_eq!(header_len, Some(m.headers.len() as u64), "header length");
        check_headers(&m.headers);
    } else {
        assert!(m.headers.is_empty(), "a MSG with headers");
    }
    let body = &bytes[end + 2..];
    assert_eq!(body.len(), total + 2, "a message consumed another length");
    assert_eq!(body[..m.headers.len()], m.headers[..]);
    assert_eq!(body[m.headers.len()..total], m.payload[..]);
    assert_eq!(&body[total..], b"\r\n");
}

/// What the feed reads from a header block is in it: a sequence from a `Name: digits` line
/// after the version line, a status from the version line.
fn check_headers(headers: &[u8]) {
    let names = ["Nats-Sequence", "Nats-Last-Sequence"];
    for (name, value) in names.into_iter().zip(header_numbers(headers, names)) {
        let Some(value) = value else { continue };
        let found = headers.split(|&b| b == b'\n').skip(1).any(|line| {
            line.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b":"))
                .is_some_and(|v| digits(v.trim_ascii()) == Some(value))
        });
        assert!(found, "{name} {value} from {headers:?}");
    }
    if let Some(code) = status(headers) {
        let rest = headers
            .strip_prefix(b"NATS/1.0 ")
            .expect("a status after the version");
        let field = rest.split(|&b| b == b' ' || b == b'\r').next();
        assert_eq!(field.and_then(digits), Some(u64::from(code)), "status");
    }
}

/// Whether bytes without a line end can still be the start of a line within the limit: a line
/// of exactly `MAX_LINE` bytes may have only the CR of its line end in so far.
fn line_may_end(buf: &[u8]) -> bool {
    buf.len() <= MAX_LINE || (buf.len() == MAX_LINE + 1 && buf[MAX_LINE] == b'\r')
}

/// The reader waits only on what can still become an operation within its limits: the start
/// of a line within the limit, or the control line of a message within the message limit and
/// part of that message.
fn check_waiting(buf: &[u8], max_message: usize) {
    let Some(end) = find_crlf(buf) else {
        assert!(
            line_may_end(buf),
            "{} bytes without a line end held",
            buf.len()
        );
        return;
    };
    assert!(end <= MAX_LINE, "a line of {end} bytes held");
    let (name, args) = split_line(&buf[..end]);
    assert!(is_message_line(name), "a complete {name:?} line held");
    let total = fields(args).last().copied().and_then(digits);
    let total = total.expect("a held message's total") as usize;
    assert!(
        total <= max_message,
        "a message of {total} bytes waited for"
    );
    assert!(buf.len() < end + 2 + total + 2, "a complete message held");
}

/// A refusal names what is wrong at the front of `buf`.
fn check_refusal(error: &WireError, buf: &[u8], max_message: usize) {
    let line_end = find_crlf(&buf[..buf.len().min(MAX_LINE + 2)]);
    if let WireError::LineTooLong = error {
        assert_eq!(
            line_end, None,
            "a line within the limit refused as too long"
        );
        assert!(!line_may_end(buf), "refused at {} bytes", buf.len());
        return;
    }
    let end = line_end.unwrap_or_else(|| panic!("{error:?} before the line end"));
    let (name, args) = split_line(&buf[..end]);
    match error {
        WireError::TooLarge { size, limit } => {
            assert!(is_message_line(name), "{error:?} for {name:?}");
            assert!(*limit == max_message && size > limit, "{error:?}");
            let total = fields(args).last().copied().and_then(digits);
            assert_eq!(total, Some(*size as u64), "{error:?}");
        }
        WireError::Malformed { op } => assert!(name.eq_ignore_ascii_case(op.as_bytes())),
        WireError::Unknown(shown) => {
            assert!(!is_message_line(name), "{name:?} unknown");
            assert!(shown.chars().count() <= 16, "{shown:?}");
        }
        WireError::LineTooLong => unreachable!(),
    }
}

/// The first difference between two reads of one stream, if any.
fn difference(a: &Read, b: &Read) -> Option<String> {
    if let Some(n) = (0..a.ops.len().min(b.ops.len())).find(|&n| a.ops[n] != b.ops[n]) {
        return Some(format!("operation {n}: {:?} / {:?}", a.ops[n], b.ops[n]));
    }
    if a.ops.len() != b.ops.len() || a.end != b.end {
        return Some(format!(
            "{} operations, {:?} / {} operations, {:?}",
            a.ops.len(),
            a.end,
            b.ops.len(),
            b.end
        ));
    }
    None
}

/// An operation in a few words.
fn describe(op: &ServerOp) -> String {
    match op {
        ServerOp::Info(_) => "INFO".into(),
        ServerOp::Ping => "PING".into(),
        ServerOp::Pong => "PONG".into(),
        ServerOp::Ok => "+OK".into(),
        ServerOp::Err(text) => format!("-ERR {text:?}"),
        ServerOp::Message(m) if m.headers.is_empty() => format!("MSG {} B", m.payload.len()),
        ServerOp::Message(m) => {
            let mut words = format!("HMSG {} B", m.payload.len());
            if let Some(code) = status(&m.headers) {
                words.push_str(&format!(" status {code}"));
            }
            if let [Some(seq)] = header_numbers(&m.headers, ["Nats-Sequence"]) {
                words.push_str(&format!(" seq {seq}"));
            }
            words
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target
// ---------------------------------------------------------------------------------------------

/// A byte stream from a NATS server through the feed's protocol reader, whole, in pieces and a
/// byte at a time (short streams). Input: flags (bit 0: [`BUILT`], bit 1:
/// [`HANDSHAKE_LIMIT`]), the message limit (u16), a piece count (u8 % 16) and the piece lengths
/// (u16 each), then the stream or, built, its program ([`step`]), whose cuts add to the pieces'.
pub fn nats_wire(data: &[u8]) -> Outcome {
    let mut input = Input::new(cap(data, MAX_INPUT));
    let flags = input.u8();
    let max_message = match input.u16() {
        _ if flags & HANDSHAKE_LIMIT != 0 => HANDSHAKE_MAX_MESSAGE,
        limit => usize::from(limit),
    };
    let pieces: Vec<usize> = (0..input.u8() % 16)
        .map(|_| usize::from(input.u16()))
        .collect();
    let (stream, mut cuts) = if flags & BUILT != 0 {
        build(&mut input)
    } else {
        (input.rest().to_vec(), Vec::new())
    };
    let mut at = 0;
    for len in pieces {
        at += len;
        cuts.push(at.min(stream.len()));
    }
    cuts.sort_unstable();
    cuts.dedup();

    let whole = read(&stream, &[], max_message);
    if let Some(diff) = difference(&whole, &read(&stream, &cuts, max_message)) {
        panic!("whole and cut at {cuts:?}: {diff}");
    }
    if stream.len() <= BYTE_BY_BYTE {
        let every: Vec<usize> = (1..stream.len()).collect();
        if let Some(diff) = difference(&whole, &read(&stream, &every, max_message)) {
            panic!("whole and byte by byte: {diff}");
        }
    }

    let mut words: Vec<String> = whole
        .ops
        .iter()
        .take(LISTED)
        .map(|(_, op)| describe(op))
        .collect();
    if whole.ops.len() > LISTED {
        words.push(format!("{} more", whole.ops.len() - LISTED));
    }
    let end = match &whole.end {
        End::Waiting { left } => format!("waiting with {left} bytes"),
        End::Refused { at, error } => format!("refused at {at}: {error}"),
    };
    if words.is_empty() {
        end
    } else {
        format!("{}; {end}", words.join(", "))
    }
}
