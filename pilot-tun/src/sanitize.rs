//! Text from elsewhere made safe to print: notes and hostnames from peers,
//! messages from the registry. A terminal acts on control characters
//! (escape sequences can move the cursor, rewrite earlier lines, set the
//! window title) and bidirectional overrides make text read differently
//! from what it is; both are removed before such text reaches a terminal
//! or a log line. JSON output needs none of this (serde escapes controls).

/// `text` without control characters (C0, DEL, C1, which include every
/// escape sequence introducer), bidirectional controls, zero-width and
/// line-separator characters.
pub fn printable(text: &str) -> String {
    text.chars().filter(|c| !hidden(*c)).collect()
}

fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Bidirectional marks, embeddings, overrides and isolates.
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            // Zero-width characters and the byte-order mark.
            | '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}'
            // Line and paragraph separators (new lines to some terminals).
            | '\u{2028}' | '\u{2029}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_controls_are_removed() {
        // Clear screen, move the cursor, set the title, a fake new line.
        let hostile = "ok\u{1b}[2J\u{1b}[H\u{1b}]0;pwned\u{7}\nroot# \r\u{9b}31m\u{7f}\t!";
        assert_eq!(printable(hostile), "ok[2J[H]0;pwnedroot# 31m!");
        assert!(!printable(hostile).chars().any(char::is_control));
    }

    #[test]
    fn bidi_and_invisible_characters_are_removed() {
        // "approve evil" that displays as something else.
        let hostile = "note \u{202E}evorppa\u{202C} \u{2066}x\u{2069}\u{200B}\u{FEFF}\u{2028}y";
        assert_eq!(printable(hostile), "note evorppa xy");
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        for t in [
            "build agent 7",
            "ci-runner",
            "Grüße, 日本語 ok",
            "10.77.0.5",
        ] {
            assert_eq!(printable(t), t);
        }
    }
}
