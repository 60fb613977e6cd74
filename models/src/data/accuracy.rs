//! Exact-match scoring of generated answers: the last number in the generated text must equal
//! the expected answer (numerically), or, for non-numeric answers, the trimmed texts must match.

/// Whether `generated` answers `expected`.
pub fn score(expected: &str, generated: &str) -> bool {
    let expected = expected.trim();
    match parse_number(expected) {
        Some(want) => last_number(generated).is_some_and(|got| got == want),
        None => generated.trim() == expected,
    }
}

/// A whole string as a number: optional sign, digits (optionally grouped by commas), optional
/// decimal part.
fn parse_number(text: &str) -> Option<f64> {
    let cleaned: String = text.replace(',', "").replace('\u{2212}', "-");
    let body = cleaned.strip_prefix(['-', '+']).unwrap_or(&cleaned);
    if body.is_empty() || !body.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    cleaned.parse().ok()
}

/// The last number in `text`: a run of digits with thousands commas and a decimal part, with a
/// leading minus when the minus is not a binary operator (not right after a digit).
fn last_number(text: &str) -> Option<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut end = chars.len();
    while end > 0 && !chars[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = chars[start - 1];
        let inner_separator = (c == ',' || c == '.')
            && start >= 2
            && chars[start - 2].is_ascii_digit()
            && chars[start].is_ascii_digit();
        if c.is_ascii_digit() || inner_separator {
            start -= 1;
        } else {
            break;
        }
    }
    let negative = start > 0
        && matches!(chars[start - 1], '-' | '\u{2212}')
        && (start < 2 || !chars[start - 2].is_ascii_alphanumeric());
    let digits: String = chars[start..end].iter().filter(|&&c| c != ',').collect();
    let value: f64 = digits.parse().ok()?;
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::score;

    #[test]
    fn last_integer_decides() {
        assert!(score("-2", "-2"));
        assert!(score("-2", "The answer is -2."));
        assert!(score("3", "81 + -78 = 3"));
        assert!(score("2", "5-3 = 2"));
        assert!(!score("-3", "5-3"));
        assert!(score("1234", "It is 1,234 apples."));
        assert!(score("16", " 16\n"));
        assert!(score("5", "5.0"));
        assert!(!score("61", "61 and then 62"));
        assert!(!score("7", "no number here"));
        assert!(!score("-2", "2"));
    }

    #[test]
    fn non_numeric_answers_match_exactly() {
        assert!(score("Paris", " Paris\n"));
        assert!(!score("Paris", "paris is the capital"));
    }
}
