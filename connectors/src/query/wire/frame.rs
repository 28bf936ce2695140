//! The frontend message check in front of pgwire's decoder: each message a client sends is
//! framed and its body checked here, the way PostgreSQL's `pq_getmsg*` check it, before pgwire
//! sees any of it.
//!
//! Why: pgwire 0.42 decodes a message's body from the whole read buffer with unchecked
//! `get_u16`/`get_i32` calls. A Parse, Bind or SASL message whose fields run past its declared
//! length panics the connection's task ("advance out of bounds", found by the `wire_messages`
//! fuzz target), and one whose fields end early leaves bytes that are read as the next
//! message. Here every field must fit its message and a message must be used up exactly, so
//! pgwire only ever gets well-framed, complete messages.
//!
//! The module needs only `std` and `thiserror`: the fuzz target (`tests/fuzz`) compiles it by
//! path and feeds pgwire what it passes.

/// PostgreSQL's `CANCEL_REQUEST_CODE` (1234 in the high half, 5678 in the low half).
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The largest startup, cancel or authentication message (pgwire's and PostgreSQL's small-packet
/// limit): nobody unauthenticated makes us hold more than this.
pub const MAX_UNAUTHENTICATED_BYTES: usize = 10_000;
/// A cancel request: length, code, process id, then a key of 4 bytes (protocol 3.0) up to 256
/// (3.2).
const CANCEL_MIN: usize = 16;
const CANCEL_MAX: usize = 12 + 256;
/// SCRAM-SHA-256 is two client messages: SASLInitialResponse and SASLResponse.
const SASL_MESSAGES: u8 = 2;

/// Why a client's message was refused; the connection ends with `08P01` and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below its own size or above what the message type allows.
    #[error("invalid {kind} message length {length} (allowed: {min} to {max} bytes)")]
    Length {
        /// The message, by name.
        kind: &'static str,
        /// The declared length.
        length: i64,
        /// The smallest length allowed.
        min: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// A field runs past the end of its message.
    #[error("insufficient data left in {kind} message (reading {field})")]
    Truncated {
        /// The message, by name.
        kind: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// Bytes are left after the message's last field.
    #[error("invalid {kind} message format: {extra} bytes after the last field")]
    Trailing {
        /// The message, by name.
        kind: &'static str,
        /// How many.
        extra: usize,
    },
    /// A field holds a value the protocol does not allow (a negative length other than -1).
    #[error("invalid {kind} message: {field} is {value}")]
    Value {
        /// The message, by name.
        kind: &'static str,
        /// The field.
        field: &'static str,
        /// What it held.
        value: i64,
    },
    /// A message type the endpoint does not serve, or one sent at the wrong time.
    #[error("unexpected frontend message type 0x{tag:02x} {context}")]
    Unexpected {
        /// The type byte.
        tag: u8,
        /// When it came.
        context: &'static str,
    },
}

impl FrameError {
    /// A short label for metrics: the variant.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Length { .. } => "length",
            Self::Truncated { .. } => "truncated",
            Self::Trailing { .. } => "trailing",
            Self::Value { .. } => "value",
            Self::Unexpected { .. } => "unexpected_type",
        }
    }
}

/// Where the connection is: what the next message may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The startup message or a cancel request (untyped: no type byte).
    Startup,
    /// Inside SCRAM: only password-family messages; `seen` of them so far.
    Authenticating { seen: u8 },
    /// Authenticated: the simple and extended query protocols and COPY.
    Ready,
}

/// Frames a client's byte stream into messages and checks each one; see the module docs.
///
/// [`FrameChecker::check`] looks at the start of the unread bytes: `Ok(Some(n))` when the first
/// `n` bytes are one complete, well-formed message (the checker then expects the one after it),
/// `Ok(None)` when more bytes are needed, and an error for a message no well-behaved client
/// sends.
#[derive(Debug, Clone)]
pub struct FrameChecker {
    phase: Phase,
    max_message_bytes: usize,
}

impl FrameChecker {
    /// A checker for a connection that has finished (or skipped) TLS negotiation: the next
    /// message is the startup message. `max_message_bytes` bounds a message once the client is
    /// authenticated (before, [`MAX_UNAUTHENTICATED_BYTES`] does).
    pub fn new(max_message_bytes: usize) -> Self {
        Self {
            phase: Phase::Startup,
            max_message_bytes: max_message_bytes.max(MAX_UNAUTHENTICATED_BYTES),
        }
    }

    /// Checks the message at the start of `buf`; see the type's docs.
    pub fn check(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        match self.phase {
            Phase::Startup => {
                let Some(length) = read_i32(buf, 0) else {
                    return Ok(None);
                };
                let code = buf
                    .get(4..8)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                let cancel = code == Some(CANCEL_REQUEST_CODE);
                let (kind, min, max) = if cancel {
                    ("cancel request", CANCEL_MIN, CANCEL_MAX)
                } else {
                    // Length, protocol version and at least the closing NUL.
                    ("startup", 9, MAX_UNAUTHENTICATED_BYTES)
                };
                let total = bounded(kind, length, min, max)?;
                if buf.len() < total {
                    return Ok(None);
                }
                if !cancel {
                    startup_body(&buf[8..total])?;
                    self.phase = Phase::Authenticating { seen: 0 };
                }
                Ok(Some(total))
            }
            Phase::Authenticating { seen } => {
                let Some(&tag) = buf.first() else {
                    return Ok(None);
                };
                if tag != b'p' && tag != b'X' {
                    return Err(FrameError::Unexpected {
                        tag,
                        context: "during authentication (expected a SASL response)",
                    });
                }
                let Some(body) = self.typed(buf, tag, MAX_UNAUTHENTICATED_BYTES)? else {
                    return Ok(None);
                };
                if tag == b'X' {
                    empty("Terminate", body)?;
                    return Ok(Some(5));
                }
                if seen == 0 {
                    sasl_initial_response(body)?;
                }
                let seen = seen + 1;
                self.phase = if seen >= SASL_MESSAGES {
                    Phase::Ready
                } else {
                    Phase::Authenticating { seen }
                };
                Ok(Some(5 + body.len()))
            }
            Phase::Ready => {
                let Some(&tag) = buf.first() else {
                    return Ok(None);
                };
                let Some(body) = self.typed(buf, tag, self.max_message_bytes)? else {
                    return Ok(None);
                };
                ready_body(tag, body)?;
                Ok(Some(5 + body.len()))
            }
        }
    }

    /// The body of the typed message at the start of `buf` once it is all there.
    fn typed<'a>(
        &self,
        buf: &'a [u8],
        tag: u8,
        max: usize,
    ) -> Result<Option<&'a [u8]>, FrameError> {
        let Some(length) = read_i32(buf, 1) else {
            return Ok(None);
        };
        let total = 1 + bounded(kind_of(tag), length, 4, max)?;
        Ok(buf.get(5..total))
    }
}

/// The message's name in errors.
fn kind_of(tag: u8) -> &'static str {
    match tag {
        b'p' => "password",
        b'Q' => "Query",
        b'P' => "Parse",
        b'B' => "Bind",
        b'C' => "Close",
        b'D' => "Describe",
        b'E' => "Execute",
        b'H' => "Flush",
        b'S' => "Sync",
        b'X' => "Terminate",
        b'd' => "CopyData",
        b'c' => "CopyDone",
        b'f' => "CopyFail",
        _ => "frontend",
    }
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    let b = buf.get(at..at + 4)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The declared length as a size, when within `min..=max`.
fn bounded(kind: &'static str, length: i32, min: usize, max: usize) -> Result<usize, FrameError> {
    match usize::try_from(length) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(FrameError::Length {
            kind,
            length: i64::from(length),
            min,
            max,
        }),
    }
}

/// Reads fields off a message body, every read bounded by the body.
struct Fields<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(kind: &'static str, body: &'a [u8]) -> Self {
        Self { kind, rest: body }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Truncated {
                kind: self.kind,
                field,
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, field)?[0])
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, FrameError> {
        let b = self.take(4, field)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count: an unsigned 16-bit integer, as PostgreSQL and pgwire both read it.
    fn count(&mut self, field: &'static str) -> Result<usize, FrameError> {
        let b = self.take(2, field)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A NUL-terminated string, the NUL within the body.
    fn cstring(&mut self, field: &'static str) -> Result<&'a [u8], FrameError> {
        let Some(end) = self.rest.iter().position(|&b| b == 0) else {
            return Err(FrameError::Truncated {
                kind: self.kind,
                field,
            });
        };
        let s = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Ok(s)
    }

    /// The body must be used up: pgwire would read what is left as the next message.
    fn finish(self) -> Result<(), FrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing {
                kind: self.kind,
                extra: self.rest.len(),
            })
        }
    }
}

/// The startup body after the protocol version: `key\0value\0` pairs, then one NUL, last.
fn startup_body(params: &[u8]) -> Result<(), FrameError> {
    let mut f = Fields::new("startup", params);
    loop {
        let key = f.cstring("parameter name")?;
        if key.is_empty() {
            return f.finish();
        }
        f.cstring("parameter value")?;
    }
}

/// SASLInitialResponse: mechanism name, then a length (-1 for none) and that many bytes.
fn sasl_initial_response(body: &[u8]) -> Result<(), FrameError> {
    let mut f = Fields::new("SASLInitialResponse", body);
    f.cstring("mechanism")?;
    let n = f.i32("response length")?;
    if n != -1 {
        let n = usize::try_from(n).map_err(|_| FrameError::Value {
            kind: "SASLInitialResponse",
            field: "response length",
            value: i64::from(n),
        })?;
        f.take(n, "response")?;
    }
    f.finish()
}

fn empty(kind: &'static str, body: &[u8]) -> Result<(), FrameError> {
    Fields::new(kind, body).finish()
}

/// The body of a message sent once authenticated.
fn ready_body(tag: u8, body: &[u8]) -> Result<(), FrameError> {
    let kind = kind_of(tag);
    let mut f = Fields::new(kind, body);
    match tag {
        b'Q' | b'f' => {
            f.cstring(if tag == b'Q' {
                "query"
            } else {
                "error message"
            })?;
        }
        b'P' => {
            f.cstring("statement name")?;
            f.cstring("query")?;
            let n = f.count("parameter type count")?;
            f.take(4 * n, "parameter types")?;
        }
        b'B' => {
            f.cstring("portal name")?;
            f.cstring("statement name")?;
            let n = f.count("parameter format count")?;
            f.take(2 * n, "parameter formats")?;
            let n = f.count("parameter count")?;
            for _ in 0..n {
                let len = f.i32("parameter length")?;
                if len != -1 {
                    let len = usize::try_from(len).map_err(|_| FrameError::Value {
                        kind,
                        field: "parameter length",
                        value: i64::from(len),
                    })?;
                    f.take(len, "parameter value")?;
                }
            }
            let n = f.count("result format count")?;
            f.take(2 * n, "result formats")?;
        }
        b'C' | b'D' => {
            f.u8("target type")?;
            f.cstring("name")?;
        }
        b'E' => {
            f.cstring("portal name")?;
            f.i32("row limit")?;
        }
        b'H' | b'S' | b'X' | b'c' => {}
        // Raw bytes: COPY data, and password-family messages (pgwire keeps them raw).
        b'd' | b'p' => return Ok(()),
        _ => {
            return Err(FrameError::Unexpected {
                tag,
                context: "(not served by this endpoint)",
            })
        }
    }
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup() -> Vec<u8> {
        let body = b"\x00\x03\x00\x00user\x00alice\x00database\x00db\x00\x00";
        let mut m = (body.len() as i32 + 4).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    fn sasl_initial() -> Vec<u8> {
        let mut body = b"SCRAM-SHA-256\x00".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"n,,");
        typed(b'p', &body)
    }

    /// A checker past startup and SCRAM.
    fn ready() -> FrameChecker {
        let mut c = FrameChecker::new(1 << 20);
        let s = startup();
        assert_eq!(c.check(&s), Ok(Some(s.len())));
        let i = sasl_initial();
        assert_eq!(c.check(&i), Ok(Some(i.len())));
        let r = typed(b'p', b"c=biws,r=nonce,p=proof");
        assert_eq!(c.check(&r), Ok(Some(r.len())));
        c
    }

    #[test]
    fn a_session_passes_message_by_message() {
        let mut c = ready();
        let mut parse = b"s1\x00SELECT $1\x00".to_vec();
        parse.extend_from_slice(&1i16.to_be_bytes());
        parse.extend_from_slice(&25u32.to_be_bytes());
        let mut bind = b"\x00s1\x00".to_vec();
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&2i16.to_be_bytes());
        bind.extend_from_slice(&2i32.to_be_bytes());
        bind.extend_from_slice(b"42");
        bind.extend_from_slice(&(-1i32).to_be_bytes());
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        let mut execute = b"\x00".to_vec();
        execute.extend_from_slice(&0i32.to_be_bytes());
        for m in [
            typed(b'Q', b"SELECT 1\x00"),
            typed(b'P', &parse),
            typed(b'B', &bind),
            typed(b'D', b"P\x00"),
            typed(b'E', &execute),
            typed(b'S', b""),
            typed(b'C', b"Ss1\x00"),
            typed(b'X', b""),
        ] {
            assert_eq!(c.check(&m), Ok(Some(m.len())), "{m:?}");
            // Any prefix asks for more bytes.
            for cut in 0..m.len() {
                assert_eq!(c.clone().check(&m[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn the_fuzzers_parse_is_refused_not_read_past() {
        // A Parse claiming one parameter type with no room for it: pgwire read the next
        // message's bytes for it, or panicked at the end of the buffer.
        let mut body = b"\x00SELECT 1\x00".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        let mut stream = typed(b'P', &body);
        stream.extend_from_slice(&typed(b'S', b""));
        let e = ready().check(&stream).unwrap_err();
        assert_eq!(
            e,
            FrameError::Truncated {
                kind: "Parse",
                field: "parameter types"
            }
        );
        assert_eq!(
            e.to_string(),
            "insufficient data left in Parse message (reading parameter types)"
        );
    }

    #[test]
    fn fields_past_the_end_bytes_left_over_and_bad_values_are_refused() {
        let cases: &[(u8, &[u8], &str)] = &[
            (b'Q', b"SELECT 1", "truncated"),
            (b'Q', b"SELECT 1\x00junk", "trailing"),
            (
                b'B',
                b"\x00s\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00",
                "value",
            ),
            (
                b'B',
                b"\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00",
                "truncated",
            ),
            (b'P', b"\x00q\x00\xff\xff", "truncated"),
            (b'E', b"\x00\x00\x00", "truncated"),
            (b'D', b"", "truncated"),
            (b'S', b"x", "trailing"),
            (b'F', b"", "unexpected_type"),
        ];
        for (tag, body, reason) in cases {
            let e = ready().check(&typed(*tag, body)).unwrap_err();
            assert_eq!(e.reason(), *reason, "{} {body:?}: {e}", *tag as char);
        }
    }

    #[test]
    fn lengths_are_bounded_before_any_byte_is_buffered() {
        let mut c = ready();
        // Only the header has arrived, yet a declared 2 GiB is refused now, not buffered.
        let e = c.check(b"Q\x7f\xff\xff\xff").unwrap_err();
        assert_eq!(e.reason(), "length");
        assert_eq!(
            ready().check(b"Q\x00\x00\x00\x03").unwrap_err().reason(),
            "length"
        );
        assert_eq!(
            ready().check(b"Q\xff\xff\xff\xff").unwrap_err().reason(),
            "length"
        );
        // Before authentication, the small limit holds whatever the configured one.
        let mut c = FrameChecker::new(1 << 30);
        let big = (MAX_UNAUTHENTICATED_BYTES as i32 + 1).to_be_bytes();
        assert_eq!(c.check(&big).unwrap_err().reason(), "length");
    }

    #[test]
    fn authentication_takes_sasl_messages_only_and_checks_the_first() {
        let mut c = FrameChecker::new(1 << 20);
        c.check(&startup()).unwrap();
        let e = c.clone().check(&typed(b'Q', b"SELECT 1\x00")).unwrap_err();
        assert_eq!(e.reason(), "unexpected_type");
        // The mechanism with no length field after it: pgwire's get_i32 panicked here.
        let e = c
            .clone()
            .check(&typed(b'p', b"SCRAM-SHA-256\x00"))
            .unwrap_err();
        assert_eq!(e.reason(), "truncated");
        let mut body = b"SCRAM-SHA-256\x00".to_vec();
        body.extend_from_slice(&(-2i32).to_be_bytes());
        assert_eq!(
            c.clone().check(&typed(b'p', &body)).unwrap_err().reason(),
            "value"
        );
        assert!(c.check(&sasl_initial()).unwrap().is_some());
    }

    #[test]
    fn startup_and_cancel_are_framed() {
        let mut cancel = 16i32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        cancel.extend_from_slice(&[0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(FrameChecker::new(0).check(&cancel), Ok(Some(16)));
        // A cancel too short for its key.
        let mut short = 12i32.to_be_bytes().to_vec();
        short.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        short.extend_from_slice(&[0, 0, 0, 7]);
        assert_eq!(
            FrameChecker::new(0).check(&short).unwrap_err().reason(),
            "length"
        );
        // A startup whose last parameter has no terminator, or bytes after the closing NUL.
        for body in [
            &b"\x00\x03\x00\x00user\x00alice"[..],
            b"\x00\x03\x00\x00\x00x",
        ] {
            let mut m = (body.len() as i32 + 4).to_be_bytes().to_vec();
            m.extend_from_slice(body);
            assert!(FrameChecker::new(0).check(&m).is_err(), "{body:?}");
        }
    }
}
