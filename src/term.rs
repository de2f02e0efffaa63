//! Text from elsewhere (a server's version string, its error messages,
//! another process's status) made safe to print on a terminal. A ground
//! module: it imports nothing from the crate.
//!
//! Raw control characters could move the cursor, rewrite earlier lines
//! ("ok host key ..."), set the window title or answer back to the
//! terminal; bidirectional overrides could make text read differently
//! from what it is.

/// Whether `c` must not reach a terminal: every control character (C0,
/// DEL, C1, including ESC and CSI) and the bidirectional embedding,
/// override and isolate marks.
fn unsafe_char(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character (newlines and tabs too) replaced by
/// `?`: for one field of a line or table.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if unsafe_char(c) { '?' } else { c })
        .collect()
}

/// [`clean`], keeping newlines and tabs: for whole messages that may span
/// lines.
pub fn clean_lines(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if unsafe_char(c) => '?',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_overrides_are_replaced() {
        let evil = "SSH-2.0-x\x1b[1A\x1b[2K\r  ok    host key SHA256:forged\x1b]0;title\x07\u{9b}2J\u{202e}";
        let c = clean(evil);
        assert!(!c.chars().any(unsafe_char), "{c:?}");
        assert!(c.starts_with("SSH-2.0-x?[1A?[2K?"), "{c:?}");
        assert_eq!(clean("a\nb\tc"), "a?b?c");
        assert_eq!(clean_lines("a\nb\tc\r\x1b"), "a\nb\tc??");
        assert_eq!(clean("plain ütf-8 ✓"), "plain ütf-8 ✓");
    }
}
