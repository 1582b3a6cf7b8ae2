//! The DATA decoder (SMTP smuggling defence, dot-stuffing, size limit).
//!
//! Input layout: byte 0 picks the size limit (bit 7 set: 1 MiB, else
//! 4 × (byte & 0x7f), so 0–508 bytes and the limit is often hit); byte 1
//! is the number of split points n (mod 16); the next n bytes are chunk
//! lengths. Everything after that is the DATA stream.
//!
//! Invariants:
//! - no panic;
//! - the result (bytes consumed, outcome, size) does not depend on how the
//!   stream is chunked: all at once, in the fuzzer's chunks, byte by byte;
//! - the message ends exactly at the first CRLF.CRLF, counting the DATA
//!   command's CRLF (so a leading ".CRLF" is an empty message), never at a
//!   bare-LF or bare-CR variant;
//! - the outcome equals a simple reference decoder's: TooBig when the
//!   un-stuffed content exceeds the limit, else BareLineEnding when it holds
//!   a CR or LF that is not part of a CRLF, else Nul when it holds a NUL
//!   byte, else Complete with the un-stuffed content as the bytes handed out;
//! - a complete message holds no bare CR or LF, no NUL, and is within the
//!   limit; the decoder never hands out more than the limit.
#![no_main]

use domauth::smtp::data::{DataDecoder, DataOutcome};
use libfuzzer_sys::fuzz_target;

struct Run {
    consumed: Option<usize>,
    size: usize,
    outcome: DataOutcome,
    body: Vec<u8>,
}

fn run_chunks<'a>(max: usize, chunks: impl Iterator<Item = &'a [u8]>) -> Run {
    let mut d = DataDecoder::new(max);
    let mut body = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        let end = d.feed(chunk, &mut body);
        assert!(body.len() <= max, "handed out {} over the limit {max}", body.len());
        if let Some(used) = end {
            assert!(
                used >= 1 && used <= chunk.len(),
                "used {used} of {}",
                chunk.len()
            );
            return Run {
                consumed: Some(offset + used),
                size: d.size(),
                outcome: d.finish(),
                body,
            };
        }
        offset += chunk.len();
    }
    Run {
        consumed: None,
        size: d.size(),
        outcome: d.finish(),
        body,
    }
}

fn canonical(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

/// Where the message ends: just past the first CRLF.CRLF of CRLF + stream.
fn expected_end(stream: &[u8]) -> Option<usize> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(stream);
    memchr::memmem::find(&framed, b"\r\n.\r\n").map(|p| p + 3)
}

/// Reference for a terminated message: `content` is everything before the
/// final ".CRLF" (empty, or ending in CRLF).
fn reference(content: &[u8], max: usize) -> (DataOutcome, Vec<u8>) {
    let mut body = Vec::new();
    // Lines start at the beginning and after every CRLF; a bare LF or CR
    // does not start a line.
    let mut start = 0;
    loop {
        let end = memchr::memmem::find(&content[start..], b"\r\n").map(|p| start + p);
        let line = &content[start..end.unwrap_or(content.len())];
        let line = line.strip_prefix(b".").unwrap_or(line);
        body.extend_from_slice(line);
        match end {
            Some(e) => {
                body.extend_from_slice(b"\r\n");
                start = e + 2;
                if start == content.len() {
                    break;
                }
            }
            None => break,
        }
    }
    let outcome = if body.len() > max {
        DataOutcome::TooBig
    } else if !canonical(&body) {
        DataOutcome::BareLineEnding
    } else if body.contains(&0) {
        DataOutcome::Nul
    } else {
        DataOutcome::Complete
    };
    (outcome, body)
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let max = if input[0] & 0x80 != 0 {
        1 << 20
    } else {
        4 * (input[0] & 0x7f) as usize
    };
    let n = (input[1] % 16) as usize;
    let Some(splits) = input.get(2..2 + n) else {
        return;
    };
    let stream = &input[2 + n..];

    let whole = run_chunks(max, std::iter::once(stream));

    let mut chunks = Vec::new();
    let mut rest = stream;
    for &len in splits {
        let len = (len as usize).min(rest.len());
        let (a, b) = rest.split_at(len);
        chunks.push(a);
        rest = b;
    }
    chunks.push(rest);
    let chunked = run_chunks(max, chunks.into_iter());
    let bytewise = run_chunks(max, stream.chunks(1));

    for (label, other) in [("chunked", &chunked), ("bytewise", &bytewise)] {
        assert_eq!(whole.consumed, other.consumed, "{label}: consumed");
        assert_eq!(whole.size, other.size, "{label}: size");
        assert_eq!(whole.outcome, other.outcome, "{label}: outcome");
    }

    assert_eq!(whole.consumed, expected_end(stream), "end of message");

    if whole.outcome == DataOutcome::Complete {
        for (label, run) in [("whole", &whole), ("chunked", &chunked), ("bytewise", &bytewise)] {
            let body = &run.body;
            assert!(canonical(body), "{label}: bare CR/LF in a complete body: {body:?}");
            assert!(!body.contains(&0), "{label}: NUL in a complete body");
            assert_eq!(body.len(), run.size, "{label}: size");
        }
        assert_eq!(whole.body, chunked.body, "chunked body");
        assert_eq!(whole.body, bytewise.body, "bytewise body");
    }
    if let Some(end) = whole.consumed {
        // The stream before the final ".CRLF": the DATA command's CRLF
        // stands in front of it.
        let content = &stream[..end - 3];
        let (outcome, body) = reference(content, max);
        assert_eq!(whole.outcome, outcome, "reference decoder");
        if outcome == DataOutcome::Complete {
            assert_eq!(whole.body, body, "reference body");
        }
    }
});
