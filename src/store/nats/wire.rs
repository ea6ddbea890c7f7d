//! The NATS client protocol, as much of it as the live feed ([`super::feed`]) speaks: the
//! server's operations read from bytes (`INFO`, `MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`)
//! and the client's written to bytes (`CONNECT`, `SUB`, `UNSUB`, `PING`, `PONG`). No sockets
//! and no clocks: the feed's connection task feeds it what it read.
//!
//! A delivered message keeps its header block as the bytes that came in: the feed reads the
//! two numbers it needs from it ([`header_numbers`]) instead of building a map of every header,
//! which cost the relay more than a microsecond per republished message.

use bytes::{Buf, Bytes, BytesMut};

/// The longest protocol line accepted (an `INFO` names the cluster's other servers).
pub const MAX_LINE: usize = 64 * 1024;

/// A malformed or oversized operation: the connection is closed and opened again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("protocol line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("message of {size} bytes is larger than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed {op} line")]
    Malformed { op: &'static str },
    #[error("unknown operation {0:?}")]
    Unknown(String),
}

/// A message delivered to one of the client's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub sid: u64,
    pub subject: Bytes,
    /// The header block (`NATS/1.0 …\r\n…\r\n\r\n`), empty for a `MSG`.
    pub headers: Bytes,
    pub payload: Bytes,
}

/// One operation from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The JSON after `INFO `.
    Info(Bytes),
    Message(Delivered),
    Ping,
    Pong,
    Ok,
    /// The text after `-ERR ` (quotes removed).
    Err(String),
}

/// Takes the next complete operation off the front of `buf`; `Ok(None)` until one is
/// complete. `max_message` bounds a message's header and payload together.
pub fn parse(buf: &mut BytesMut, max_message: usize) -> Result<Option<ServerOp>, WireError> {
    let Some(end) = line_end(buf)? else {
        return Ok(None);
    };
    let line = &buf[..end];
    let (op, args) = match line.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => (line, &line[line.len()..]),
    };
    let op = op.to_ascii_uppercase();
    match op.as_slice() {
        b"MSG" | b"HMSG" => {
            let with_headers = op == b"HMSG";
            let name = if with_headers { "HMSG" } else { "MSG" };
            let malformed = WireError::Malformed { op: name };
            // subject sid [reply] [header_len] total_len
            let mut fields: [&[u8]; 5] = [&[]; 5];
            let mut count = 0;
            for field in args
                .split(|&b| b == b' ' || b == b'\t')
                .filter(|f| !f.is_empty())
            {
                if count == fields.len() {
                    return Err(malformed);
                }
                fields[count] = field;
                count += 1;
            }
            let expected = if with_headers { 4..=5 } else { 3..=4 };
            if !expected.contains(&count) {
                return Err(malformed);
            }
            let fields = &fields[..count];
            let subject_at = fields[0].as_ptr() as usize - buf.as_ptr() as usize;
            let subject_len = fields[0].len();
            let sid = number(fields[1]).ok_or_else(|| malformed.clone())?;
            let total = number(fields[fields.len() - 1]).ok_or_else(|| malformed.clone())?;
            let header_len = if with_headers {
                number(fields[fields.len() - 2]).ok_or_else(|| malformed.clone())?
            } else {
                0
            };
            let (total, header_len) = (to_usize(total)?, to_usize(header_len)?);
            if header_len > total {
                return Err(malformed);
            }
            if total > max_message {
                return Err(WireError::TooLarge {
                    size: total,
                    limit: max_message,
                });
            }
            let needed = end + 2 + total + 2;
            if buf.len() < needed {
                buf.reserve(needed - buf.len());
                return Ok(None);
            }
            if &buf[end + 2 + total..needed] != b"\r\n" {
                return Err(malformed);
            }
            let line = buf.split_to(end + 2).freeze();
            let mut payload = buf.split_to(total).freeze();
            buf.advance(2);
            let headers = payload.split_to(header_len);
            Ok(Some(ServerOp::Message(Delivered {
                sid,
                subject: line.slice(subject_at..subject_at + subject_len),
                headers,
                payload,
            })))
        }
        b"PING" => Ok(Some(consume(buf, end, ServerOp::Ping))),
        b"PONG" => Ok(Some(consume(buf, end, ServerOp::Pong))),
        b"+OK" => Ok(Some(consume(buf, end, ServerOp::Ok))),
        b"-ERR" => {
            let text = String::from_utf8_lossy(args)
                .trim()
                .trim_matches('\'')
                .to_owned();
            Ok(Some(consume(buf, end, ServerOp::Err(text))))
        }
        b"INFO" => {
            let json = Bytes::copy_from_slice(args);
            Ok(Some(consume(buf, end, ServerOp::Info(json))))
        }
        _ => Err(WireError::Unknown(
            String::from_utf8_lossy(&op[..op.len().min(16)]).into_owned(),
        )),
    }
}

fn consume(buf: &mut BytesMut, end: usize, op: ServerOp) -> ServerOp {
    buf.advance(end + 2);
    op
}

/// Where the first line ends (the offset of its CRLF), or `Ok(None)` while what came so far
/// can still become a line of at most `MAX_LINE` bytes and its CRLF, wherever a read ended
/// (between the CR and the LF too).
fn line_end(buf: &[u8]) -> Result<Option<usize>, WireError> {
    // A CRLF within the first `MAX_LINE + 2` bytes starts at `MAX_LINE` at the latest.
    let window = &buf[..buf.len().min(MAX_LINE + 2)];
    if let Some(end) = memchr::memmem::find(window, b"\r\n") {
        return Ok(Some(end));
    }
    let may_end = match buf.len() {
        len if len <= MAX_LINE => true,
        len if len == MAX_LINE + 1 => buf[MAX_LINE] == b'\r',
        _ => false,
    };
    if may_end {
        Ok(None)
    } else {
        Err(WireError::LineTooLong)
    }
}

fn number(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 19 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    field.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn to_usize(n: u64) -> Result<usize, WireError> {
    usize::try_from(n).map_err(|_| WireError::TooLarge {
        size: usize::MAX,
        limit: 0,
    })
}

/// The values of headers `names` as numbers, from a header block as it came in, in one pass.
/// Names match exactly (the server writes its own headers, such as `Nats-Sequence`, in this
/// form); the first line is the version line and is not a header.
pub fn header_numbers<const N: usize>(headers: &[u8], names: [&str; N]) -> [Option<u64>; N] {
    let mut found = [None; N];
    let mut rest = match memchr::memchr(b'\n', headers) {
        Some(at) => &headers[at + 1..],
        None => return found,
    };
    while !rest.is_empty() {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        for (slot, name) in found.iter_mut().zip(names) {
            if slot.is_none() && line.len() > name.len() && line.starts_with(name.as_bytes()) {
                if let Some(value) = line[name.len()..].strip_prefix(b":") {
                    *slot = number(value.trim_ascii());
                }
            }
        }
    }
    found
}

/// The status of a header block whose version line carries one (`NATS/1.0 503`: no
/// responders).
pub fn status(headers: &[u8]) -> Option<u16> {
    let line = headers.split(|&b| b == b'\r').next()?;
    let code = line.strip_prefix(b"NATS/1.0 ")?;
    let code = code.split(|&b| b == b' ').next()?;
    u16::try_from(number(code)?).ok()
}

/// `CONNECT` with the options as JSON, then a `PING` whose `PONG` says the server accepted it
/// (a refusal comes as `-ERR` first).
pub fn connect(out: &mut Vec<u8>, options_json: &str) {
    out.extend_from_slice(b"CONNECT ");
    out.extend_from_slice(options_json.as_bytes());
    out.extend_from_slice(b"\r\nPING\r\n");
}

/// A publish with a reply subject (`reply_prefix` and `number`) and one header, `Nats-Msg-Id`.
/// Returns the size the server counts against its `max_payload` (header block and body).
pub fn publish_with_id(
    out: &mut Vec<u8>,
    subject: &str,
    reply_prefix: &str,
    number: u64,
    message_id: &str,
    body: &[u8],
) -> usize {
    const BEFORE_ID: &[u8] = b"NATS/1.0\r\nNats-Msg-Id: ";
    const AFTER_ID: &[u8] = b"\r\n\r\n";
    let header_len = BEFORE_ID.len() + message_id.len() + AFTER_ID.len();
    let total = header_len + body.len();
    let mut digits = itoa::Buffer::new();
    out.reserve(subject.len() + reply_prefix.len() + 48 + total);
    out.extend_from_slice(b"HPUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(reply_prefix.as_bytes());
    out.extend_from_slice(digits.format(number).as_bytes());
    out.push(b' ');
    out.extend_from_slice(digits.format(header_len).as_bytes());
    out.push(b' ');
    out.extend_from_slice(digits.format(total).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(BEFORE_ID);
    out.extend_from_slice(message_id.as_bytes());
    out.extend_from_slice(AFTER_ID);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    total
}

pub fn subscribe(out: &mut Vec<u8>, subject: &str, sid: u64) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

pub fn unsubscribe(out: &mut Vec<u8>, sid: u64) {
    out.extend_from_slice(format!("UNSUB {sid}\r\n").as_bytes());
}

pub fn ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

pub fn pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn all(input: &[u8]) -> Result<Vec<ServerOp>, WireError> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buf, LIMIT)? {
            ops.push(op);
        }
        assert!(buf.is_empty(), "left over: {:?}", &buf[..]);
        Ok(ops)
    }

    const REPUBLISHED: &[u8] = b"HMSG botd.live.m0.ab 7 103 108\r\nNATS/1.0\r\nNats-Stream: botd-m0\r\nNats-Subject: botd.m0.ab\r\nNats-Sequence: 42\r\nNats-Last-Sequence: 40\r\n\r\nhello\r\n";

    #[test]
    fn a_republished_message_keeps_its_header_block_and_payload() {
        let ops = all(REPUBLISHED).unwrap();
        let [ServerOp::Message(m)] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!(m.sid, 7);
        assert_eq!(&m.subject[..], b"botd.live.m0.ab");
        assert_eq!(status(&m.headers), None);
        assert_eq!(&m.payload[..], b"hello");
        assert_eq!(m.headers.len(), 103);
        assert_eq!(
            header_numbers(
                &m.headers,
                [
                    "Nats-Sequence",
                    "Nats-Last-Sequence",
                    "Nats-Stream",
                    "Nats-Msg-Id"
                ]
            ),
            [Some(42), Some(40), None, None]
        );
    }

    #[test]
    fn every_split_of_the_input_parses_to_the_same_operations() {
        let mut input = Vec::new();
        input.extend_from_slice(b"INFO {\"max_payload\":1048576}\r\nPING\r\n");
        input.extend_from_slice(REPUBLISHED);
        input.extend_from_slice(b"MSG botd.gone.ab 9 reply.x 3\r\nabc\r\n+OK\r\nPONG\r\n");
        input.extend_from_slice(b"-ERR 'Authorization Violation'\r\nMSG a 2 0\r\n\r\n");
        let whole = all(&input).unwrap();
        assert_eq!(whole.len(), 8);
        assert_eq!(whole[6], ServerOp::Err("Authorization Violation".into()));
        for cut in 0..input.len() {
            let mut buf = BytesMut::new();
            let mut ops = Vec::new();
            for part in [&input[..cut], &input[cut..]] {
                buf.extend_from_slice(part);
                while let Some(op) = parse(&mut buf, LIMIT).unwrap() {
                    ops.push(op);
                }
            }
            assert_eq!(ops, whole, "cut at {cut}");
        }
    }

    #[test]
    fn a_message_with_a_reply_subject_and_an_empty_payload() {
        let ops = all(b"HMSG s 3 r 12 12\r\nNATS/1.0\r\n\r\n\r\n").unwrap();
        let [ServerOp::Message(m)] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!((m.sid, m.headers.len(), m.payload.len()), (3, 12, 0));
        assert_eq!(&m.subject[..], b"s");
    }

    #[test]
    fn a_status_is_read_from_the_version_line() {
        assert_eq!(status(b"NATS/1.0 503\r\n\r\n"), Some(503));
        assert_eq!(status(b"NATS/1.0 408 Request Timeout\r\n\r\n"), Some(408));
        assert_eq!(status(b"NATS/1.0\r\nNats-Sequence: 1\r\n\r\n"), None);
        assert_eq!(status(b"NATS/1.0 99999\r\n\r\n"), None);
        assert_eq!(status(b""), None);
    }

    #[test]
    fn malformed_and_oversized_operations_are_errors() {
        let malformed = |op| Err(WireError::Malformed { op });
        assert_eq!(all(b"MSG s x 3\r\nabc\r\n"), malformed("MSG"));
        assert_eq!(all(b"MSG s 1\r\n"), malformed("MSG"));
        assert_eq!(all(b"MSG s 1 r x 3\r\nabc\r\n"), malformed("MSG"));
        assert_eq!(all(b"HMSG s 1 r 1 2 3 4\r\n"), malformed("HMSG"));
        assert_eq!(all(b"HMSG s 1 5 3\r\nabc\r\n"), malformed("HMSG"));
        assert_eq!(all(b"MSG s 1 3\r\nabcd\r\n"), malformed("MSG"));
        assert_eq!(all(b"MSG s 1 -3\r\n"), malformed("MSG"));
        assert_eq!(all(b"MSG s 1 99999999999999999999\r\n"), malformed("MSG"));
        assert_eq!(
            all(format!("MSG s 1 {}\r\n", LIMIT + 1).as_bytes()),
            Err(WireError::TooLarge {
                size: LIMIT + 1,
                limit: LIMIT
            })
        );
        assert_eq!(all(b"HELLO\r\n"), Err(WireError::Unknown("HELLO".into())));
        let long = vec![b'I'; MAX_LINE + 3];
        assert_eq!(all(&long), Err(WireError::LineTooLong));
    }

    /// Found by the fuzz target `nats_wire`: the line was refused when a read ended between
    /// its CR and LF.
    #[test]
    fn a_line_of_the_limit_is_read_whatever_the_cut_before_its_lf() {
        let mut line = b"INFO ".to_vec();
        line.resize(MAX_LINE, b'x');
        line.extend_from_slice(b"\r\n");
        let mut buf = BytesMut::from(&line[..MAX_LINE + 1]);
        assert_eq!(parse(&mut buf, LIMIT), Ok(None));
        buf.extend_from_slice(b"\n");
        assert!(matches!(
            parse(&mut buf, LIMIT),
            Ok(Some(ServerOp::Info(_)))
        ));
        let mut over = BytesMut::from(&line[..MAX_LINE]);
        over.extend_from_slice(b"x");
        assert_eq!(parse(&mut over, LIMIT), Err(WireError::LineTooLong));
    }

    #[test]
    fn an_announced_message_is_waited_for_without_consuming_anything() {
        let mut buf = BytesMut::from(&b"MSG s 1 10\r\nabc"[..]);
        assert_eq!(parse(&mut buf, LIMIT), Ok(None));
        assert_eq!(&buf[..], b"MSG s 1 10\r\nabc");
        assert!(buf.capacity() >= 12 + 10 + 2);
    }

    #[test]
    fn header_numbers_need_an_exact_name_and_digits() {
        let block = b"NATS/1.0\r\nNats-Sequence-X: 1\r\nnats-sequence: 2\r\nNats-Sequence: 3x\r\nNats-Sequence:  4 \r\n\r\n";
        assert_eq!(header_numbers(block, ["Nats-Sequence"]), [Some(4)]);
        let version_only = b"Nats-Sequence: 1\r\n\r\n";
        assert_eq!(header_numbers(version_only, ["Nats-Sequence"]), [None]);
        assert_eq!(
            header_numbers(b"NATS/1.0\r\n\r\n", ["Nats-Sequence"]),
            [None]
        );
        assert_eq!(header_numbers(b"", ["Nats-Sequence"]), [None]);
        let unterminated = b"NATS/1.0\r\nNats-Sequence: 9";
        assert_eq!(header_numbers(unterminated, ["Nats-Sequence"]), [Some(9)]);
    }

    /// A publish as this module frames it is what the server reads: its control line names the
    /// header and total lengths of what follows (checked by reading it back as an `HMSG`).
    #[test]
    fn a_publish_carries_its_message_id_and_reply_subject() {
        let mut out = Vec::new();
        let total = publish_with_id(&mut out, "botd.m1.ab", "_INBOX.x.", 42, "c0ffee", b"body");
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "HPUB botd.m1.ab _INBOX.x.42 33 37\r\nNATS/1.0\r\nNats-Msg-Id: c0ffee\r\n\r\nbody\r\n"
        );
        assert_eq!(total, 37);
        let mut echoed = BytesMut::from(&b"HMSG botd.m1.ab 1 _INBOX.x.42"[..]);
        echoed.extend_from_slice(&out[text.find(" 33 ").unwrap()..]);
        let Some(ServerOp::Message(m)) = parse(&mut echoed, LIMIT).unwrap() else {
            panic!()
        };
        assert_eq!(&m.payload[..], b"body");
        assert!(m.headers.ends_with(b"Nats-Msg-Id: c0ffee\r\n\r\n"));
        assert!(echoed.is_empty());
    }

    #[test]
    fn client_operations_are_framed() {
        let mut out = Vec::new();
        connect(&mut out, "{\"verbose\":false}");
        subscribe(&mut out, "botd.live.m0.ab", 5);
        unsubscribe(&mut out, 5);
        ping(&mut out);
        pong(&mut out);
        assert_eq!(
            out,
            b"CONNECT {\"verbose\":false}\r\nPING\r\nSUB botd.live.m0.ab 5\r\nUNSUB 5\r\nPING\r\nPONG\r\n"
        );
    }
}
