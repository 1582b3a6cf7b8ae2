//! Text from outside the process (a client's AUTH user name, EHLO name or
//! addresses, an upstream's reply, a DNS record) on its way into a log
//! field. SPEC §4: no client can start a log line of its own. The log is
//! line-oriented: one raw CR or LF in a field would let a client write
//! `\r\nevent=auth_success login=...` and forge a line, and an ANSI ESC
//! would let it repaint the operator's terminal.
//!
//! Use it at the log site, `login = %Escaped(&login)`, so the rule is visible
//! where the text is logged; the value itself stays unchanged for everything
//! else (a lookup, a reply).

use std::fmt;

/// Displays a string with every control character written as a visible
/// escape: `\r`, `\n`, `\t`, and `\u{1b}`-style for the other C0 and C1
/// controls, DEL, the Unicode line and paragraph separators and the
/// bidirectional overrides (which can make a line read differently from
/// what it holds). A backslash is doubled, so an escape in the log always
/// means the client sent that character, never the backslash sequence.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Characters that never reach a log line as themselves.
fn needs_escape(c: char) -> bool {
    // `is_control` is Unicode's Cc: C0 (U+0000–U+001F), DEL, C1 (U+0080–U+009F).
    c.is_control()
        || c == '\\'
        // LINE SEPARATOR, PARAGRAPH SEPARATOR: line breaks to some viewers.
        || matches!(c, '\u{2028}' | '\u{2029}')
        // Bidirectional embeddings, overrides and isolates (CVE-2021-42574).
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        // Runs of harmless text are written in one piece.
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            f.write_str(&text[start..i])?;
            match c {
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                other => write!(f, "\\u{{{:x}}}", other as u32)?,
            }
            start = i + c.len_utf8();
        }
        f.write_str(&text[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_table() {
        let cases = [
            ("info@acme.test", "info@acme.test"),
            ("", ""),
            ("a\r\nevent=auth_success", "a\\r\\nevent=auth_success"),
            ("tab\there", "tab\\there"),
            ("\u{1b}[31mred\u{1b}[0m", "\\u{1b}[31mred\\u{1b}[0m"),
            ("nul\0", "nul\\u{0}"),
            ("del\u{7f}", "del\\u{7f}"),
            ("c1\u{85}\u{9b}", "c1\\u{85}\\u{9b}"),
            ("ls\u{2028}ps\u{2029}", "ls\\u{2028}ps\\u{2029}"),
            ("rlo\u{202e}x\u{2066}", "rlo\\u{202e}x\\u{2066}"),
            // A literal backslash sequence cannot pass for an escape.
            ("a\\r\\n", "a\\\\r\\\\n"),
            // Printable non-ASCII stays readable.
            ("jörg@bücher.test", "jörg@bücher.test"),
            ("é\r", "é\\r"),
        ];
        for (raw, expect) in cases {
            assert_eq!(Escaped(raw).to_string(), expect, "{raw:?}");
        }
    }

    #[test]
    fn no_control_character_survives() {
        // Every char a client could send in the range that matters, alone
        // and between text, comes out free of control characters.
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let out = Escaped(&all).to_string();
        assert!(!out.chars().any(needs_escape_except_backslash), "{out:?}");
        assert!(!out.contains(['\r', '\n']));
    }

    fn needs_escape_except_backslash(c: char) -> bool {
        c != '\\' && needs_escape(c)
    }

    #[test]
    fn escaping_is_reversible_in_principle() {
        // Distinct inputs give distinct outputs (no two texts look alike in
        // the log): the escapes are prefix-free thanks to the doubled
        // backslash.
        let inputs = ["\\n", "\n", "\\\n", "\n\\", "\\u{b}", "\u{b}"];
        let outputs: std::collections::HashSet<String> =
            inputs.iter().map(|s| Escaped(s).to_string()).collect();
        assert_eq!(outputs.len(), inputs.len(), "{outputs:?}");
    }
}
