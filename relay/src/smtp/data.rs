//! The DATA phase decoder, sans-IO: bytes in, an un-stuffed message out.
//!
//! Why not smtp-proto's `DataReceiver`: it does not flag bare CR / bare LF,
//! and that flag is our SMTP-smuggling defence (RFC 5321 §2.3.8: CR and LF
//! occur only as CRLF). The rules here:
//! - the message ends only at `CRLF . CRLF` (the DATA command's own CRLF
//!   counts as the first one, so an empty message is just `.CRLF`);
//! - a leading dot is removed from every line (RFC 5321 §4.5.2);
//! - a bare CR or LF anywhere marks the message as refused, but does not end
//!   it: we keep reading to the real terminator so the stream stays in sync;
//! - past `max_size` bytes the content is dropped (memory stays bounded) and
//!   the message is marked too big, again reading on to the terminator.

use memchr::memchr2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// Inside a line.
    InLine,
    /// Saw CR inside a line; waiting for LF.
    Cr,
    /// Saw a dot at the start of a line.
    Dot,
    /// Saw `.CR` at the start of a line.
    DotCr,
}

#[derive(Debug, PartialEq, Eq)]
pub enum DataOutcome {
    /// The message, with canonical CRLF line endings, un-stuffed.
    Complete(Vec<u8>),
    TooBig,
    BareLineEnding,
}

pub struct DataDecoder {
    state: State,
    body: Vec<u8>,
    size: usize,
    max_size: usize,
    bare: bool,
    too_big: bool,
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            body: Vec::with_capacity(max_size.min(64 * 1024)),
            size: 0,
            max_size,
            bare: false,
            too_big: false,
        }
    }

    /// Feeds bytes; returns how many were consumed when the terminator was
    /// reached (the rest belongs to the next command: pipelining), or `None`
    /// when everything was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::InLine => {
                    // Fast path: copy the run up to the next CR or LF.
                    let rest = &input[i..];
                    match memchr2(b'\r', b'\n', rest) {
                        None => {
                            self.push(rest);
                            return None;
                        }
                        Some(pos) => {
                            self.push(&rest[..pos]);
                            i += pos;
                            if rest[pos] == b'\r' {
                                self.state = State::Cr;
                            } else {
                                self.bare = true;
                                self.push(b"\n");
                            }
                            i += 1;
                        }
                    }
                }
                State::LineStart => {
                    let b = input[i];
                    if b == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::InLine;
                    }
                }
                State::Cr => {
                    if input[i] == b'\n' {
                        self.push(b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        self.bare = true;
                        self.push(b"\r");
                        self.state = State::InLine;
                    }
                }
                State::Dot => {
                    if input[i] == b'\r' {
                        self.state = State::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: drop it, the line goes on.
                        self.state = State::InLine;
                    }
                }
                State::DotCr => {
                    if input[i] == b'\n' {
                        return Some(i + 1);
                    }
                    // `.CR` then something else: a bare CR on a line that
                    // began with a (stuffed) dot.
                    self.bare = true;
                    self.push(b"\r");
                    self.state = State::InLine;
                }
            }
        }
        None
    }

    fn push(&mut self, bytes: &[u8]) {
        self.size += bytes.len();
        if self.too_big {
            return;
        }
        if self.size > self.max_size {
            self.too_big = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(bytes);
    }

    /// Bytes of message content seen so far (also past the limit).
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn finish(self) -> DataOutcome {
        if self.too_big {
            DataOutcome::TooBig
        } else if self.bare {
            DataOutcome::BareLineEnding
        } else {
            DataOutcome::Complete(self.body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8], max: usize) -> (Option<usize>, DataOutcome) {
        let mut d = DataDecoder::new(max);
        let n = d.feed(input);
        (n, d.finish())
    }

    /// Feeds one byte at a time: the state machine must not depend on how
    /// the network splits the stream.
    fn decode_bytewise(input: &[u8], max: usize) -> (Option<usize>, DataOutcome) {
        let mut d = DataDecoder::new(max);
        for (i, b) in input.iter().enumerate() {
            if d.feed(std::slice::from_ref(b)).is_some() {
                return (Some(i + 1), d.finish());
            }
        }
        (None, d.finish())
    }

    #[test]
    fn table() {
        use DataOutcome::*;
        let ok = |s: &str| Complete(s.as_bytes().to_vec());
        let cases: Vec<(&[u8], Option<usize>, DataOutcome)> = vec![
            (b".\r\n", Some(3), ok("")),
            (b"a\r\n.\r\n", Some(6), ok("a\r\n")),
            (b"a\r\n.\r\nMAIL", Some(6), ok("a\r\n")),
            (b"..a\r\n.\r\n", Some(8), ok(".a\r\n")),
            (b"a\r\n..\r\n.\r\n", Some(10), ok("a\r\n.\r\n")),
            (b"a\r\n.b\r\n.\r\n", Some(10), ok("a\r\nb\r\n")),
            (b"a\r\n", None, ok("a\r\n")),
            // The smuggling probes: none of them ends the message, and each
            // marks it as carrying a bare line ending.
            (b"a\n.\n", None, BareLineEnding),
            (b"a\n.\r\n", None, BareLineEnding),
            (b"a\r\n.\n", None, BareLineEnding),
            (b"a\r.\r\n", None, BareLineEnding),
            (b"a\r\n.\rb", None, BareLineEnding),
            (b"a\n.\nMAIL FROM:<x>\r\n.\r\n", Some(22), BareLineEnding),
            (b"a\rb\r\n.\r\n", Some(8), BareLineEnding),
            (b"a\nb\r\n.\r\n", Some(8), BareLineEnding),
            (b"012345678901234567890\r\n.\r\n", Some(26), TooBig),
        ];
        for (input, consumed, outcome) in cases {
            let max = 20;
            assert_eq!(
                decode(input, max),
                (consumed, outcome),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            let (c2, _) = decode_bytewise(input, max);
            assert_eq!(
                c2,
                consumed,
                "bytewise {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversize_content_is_not_kept() {
        let mut d = DataDecoder::new(100);
        let line = [b'x'; 1000];
        for _ in 0..100 {
            assert_eq!(d.feed(&line), None);
        }
        assert!(d.body.capacity() <= 64 * 1024);
        assert_eq!(d.feed(b"\r\n.\r\n"), Some(5));
        assert_eq!(d.finish(), DataOutcome::TooBig);
    }
}
