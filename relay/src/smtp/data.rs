//! The DATA phase decoder, sans-IO: bytes in, un-stuffed message bytes out. It keeps no
//! message: decoded bytes go into the caller's buffer, which the caller streams to the
//! queue file, so memory stays bounded whatever the message size.
//!
//! Why not smtp-proto's `DataReceiver`: it does not flag bare CR / bare LF,
//! and that flag is our SMTP-smuggling defence (RFC 5321 §2.3.8: CR and LF
//! occur only as CRLF). The rules here:
//! - the message ends only at `CRLF . CRLF` (the DATA command's own CRLF
//!   counts as the first one, so an empty message is just `.CRLF`);
//! - a leading dot is removed from every line (RFC 5321 §4.5.2);
//! - a bare CR or LF anywhere marks the message as refused, but does not end
//!   it: we keep reading to the real terminator so the stream stays in sync;
//! - a NUL byte anywhere marks the message as refused (RFC 6152 and RFC 5321
//!   §4.5.2 allow none, and `<CRLF>NUL.<CRLF>` ends the message for some
//!   upstreams: another smuggling vector);
//! - past `max_size` bytes no more content is handed out and the message is
//!   marked too big, again reading on to the terminator.

use memchr::{memchr, memchr2};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataOutcome {
    /// Every byte handed out is the message, with canonical CRLF line
    /// endings, un-stuffed.
    Complete,
    TooBig,
    BareLineEnding,
    Nul,
}

pub struct DataDecoder {
    state: State,
    size: usize,
    max_size: usize,
    bare: bool,
    nul: bool,
    too_big: bool,
}

impl DataDecoder {
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
            size: 0,
            max_size,
            bare: false,
            nul: false,
            too_big: false,
        }
    }

    /// Feeds bytes, appending the decoded content to `out`; returns how many
    /// input bytes were consumed when the terminator was reached (the rest
    /// belongs to the next command: pipelining), or `None` when everything
    /// was consumed and more is needed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::InLine => {
                    // Fast path: one copy for the whole run of ordinary lines, that is up
                    // to the first CR or LF that is not a CRLF followed by a line that
                    // starts with something other than a dot (or up to the end of the
                    // input). What stops the run goes through the state machine below.
                    let stop = plain_run_end(input, i);
                    self.push(out, &input[i..stop]);
                    i = stop;
                    if i == input.len() {
                        return None;
                    }
                    if input[i] == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.bare = true;
                        self.push(out, b"\n");
                    }
                    i += 1;
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
                        self.push(out, b"\r\n");
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        self.bare = true;
                        self.push(out, b"\r");
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
                    self.push(out, b"\r");
                    self.state = State::InLine;
                }
            }
        }
        None
    }

    fn push(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.size += bytes.len();
        if !self.nul && memchr(0, bytes).is_some() {
            self.nul = true;
        }
        if self.too_big {
            return;
        }
        if self.size > self.max_size {
            self.too_big = true;
            return;
        }
        out.extend_from_slice(bytes);
    }

    /// Bytes of message content seen so far (also past the limit).
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn finish(&self) -> DataOutcome {
        if self.too_big {
            DataOutcome::TooBig
        } else if self.bare {
            DataOutcome::BareLineEnding
        } else if self.nul {
            DataOutcome::Nul
        } else {
            DataOutcome::Complete
        }
    }
}

/// Where the run of plain content starting at `from` (inside a line) ends: at the first
/// CR or LF, unless it is a CRLF whose next line is already in `input` and does not start
/// with a dot (then the run goes on past it). Returns `input.len()` when the run reaches
/// the end.
fn plain_run_end(input: &[u8], from: usize) -> usize {
    let mut at = from;
    while let Some(off) = memchr2(b'\r', b'\n', &input[at..]) {
        let p = at + off;
        let crlf_then_plain = input[p] == b'\r'
            && input.get(p + 1) == Some(&b'\n')
            && input.get(p + 2).is_some_and(|&c| c != b'.');
        if !crlf_then_plain {
            return p;
        }
        at = p + 2;
    }
    input.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome with the decoded message (empty unless complete).
    fn decode(input: &[u8], max: usize) -> (Option<usize>, DataOutcome, Vec<u8>) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        let n = d.feed(input, &mut out);
        (n, d.finish(), out)
    }

    /// Feeds one byte at a time: the state machine must not depend on how
    /// the network splits the stream.
    fn decode_bytewise(input: &[u8], max: usize) -> (Option<usize>, DataOutcome, Vec<u8>) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if d.feed(std::slice::from_ref(b), &mut out).is_some() {
                return (Some(i + 1), d.finish(), out);
            }
        }
        (None, d.finish(), out)
    }

    #[test]
    fn table() {
        use DataOutcome::*;
        type Case = (&'static [u8], Option<usize>, DataOutcome, &'static [u8]);
        let cases: Vec<Case> = vec![
            (b".\r\n", Some(3), Complete, b""),
            (b"a\r\n.\r\n", Some(6), Complete, b"a\r\n"),
            (b"a\r\n.\r\nMAIL", Some(6), Complete, b"a\r\n"),
            (b"..a\r\n.\r\n", Some(8), Complete, b".a\r\n"),
            (b"a\r\n..\r\n.\r\n", Some(10), Complete, b"a\r\n.\r\n"),
            (b"a\r\n.b\r\n.\r\n", Some(10), Complete, b"a\r\nb\r\n"),
            (b"a\r\n", None, Complete, b"a\r\n"),
            // The smuggling probes: none of them ends the message, and each
            // marks it as carrying a bare line ending.
            (b"a\n.\n", None, BareLineEnding, b"a\n"),
            (b"a\n.\r\n", None, BareLineEnding, b"a\n.\r\n"),
            (b"a\r\n.\n", None, BareLineEnding, b"a\r\n\n"),
            (b"a\r.\r\n", None, BareLineEnding, b"a\r.\r\n"),
            (b"a\r\n.\rb", None, BareLineEnding, b"a\r\n\rb"),
            (
                b"a\n.\nMAIL FROM:<x>\r\n.\r\n",
                Some(22),
                BareLineEnding,
                b"a\n",
            ),
            (b"a\rb\r\n.\r\n", Some(8), BareLineEnding, b"a\rb\r\n"),
            (b"a\nb\r\n.\r\n", Some(8), BareLineEnding, b"a\nb\r\n"),
            // NUL: `<CRLF>NUL.<CRLF>` ends the message for some upstreams.
            (b"a\r\n\0.\r\nb\r\n.\r\n", Some(13), Nul, b""),
            (b"a\0b\r\n.\r\n", Some(8), Nul, b""),
            (b"\0\r\n.\r\n", Some(6), Nul, b""),
            (b"012345678901234567890\r\n.\r\n", Some(26), TooBig, b""),
        ];
        for (input, consumed, outcome, message) in cases {
            let max = 20;
            let (c, o, out) = decode(input, max);
            let what = String::from_utf8_lossy(input);
            assert_eq!((c, &o), (consumed, &outcome), "{what:?}");
            if o == Complete {
                assert_eq!(out, message, "{what:?}");
            }
            let (c2, o2, out2) = decode_bytewise(input, max);
            assert_eq!((c2, &o2), (consumed, &outcome), "bytewise {what:?}");
            if o2 == Complete {
                assert_eq!(out2, message, "bytewise {what:?}");
            }
        }
    }

    /// The whole-input fast path against the byte-at-a-time state machine, and against
    /// random splits, over many random inputs made of the bytes that matter.
    #[test]
    fn fast_path_agrees_with_the_state_machine() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let alphabet = b"a.\r\n\0";
        for _ in 0..50_000 {
            let len = rng.random_range(0..40);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let whole = decode(&input, 1000);
            let bytewise = decode_bytewise(&input, 1000);
            assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(&input));
            let mut d = DataDecoder::new(1000);
            let mut out = Vec::new();
            let mut at = 0;
            let mut consumed = None;
            while at < input.len() {
                let end = (at + rng.random_range(1..8)).min(input.len());
                if let Some(n) = d.feed(&input[at..end], &mut out) {
                    consumed = Some(at + n);
                    break;
                }
                at = end;
            }
            assert_eq!(
                (consumed, d.finish(), out),
                whole,
                "split {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn oversize_content_is_not_handed_out() {
        let mut d = DataDecoder::new(100);
        let mut out = Vec::new();
        let line = [b'x'; 1000];
        for _ in 0..100 {
            assert_eq!(d.feed(&line, &mut out), None);
        }
        assert!(out.len() <= 100);
        assert_eq!(d.feed(b"\r\n.\r\n", &mut out), Some(5));
        assert_eq!(d.finish(), DataOutcome::TooBig);
        assert_eq!(d.size(), 100_002);
    }
}
