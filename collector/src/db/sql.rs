//! SQL text shared by both engines: statements are written once, with SQLite's
//! `?` / `?N` placeholders, and rewritten to PostgreSQL's `$N` when prepared there.

/// `sql` with every `?` and `?N` placeholder outside quotes and comments written as
/// PostgreSQL's `$N` (a bare `?` takes the number after the highest one so far, as
/// SQLite numbers it).
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    let mut highest = 0u32;
    while let Some((_, c)) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                // Copy the quoted text as it is; a doubled quote stays inside.
                for (_, q) in chars.by_ref() {
                    out.push(q);
                    if q == c {
                        break;
                    }
                }
            }
            '-' if chars.peek().is_some_and(|(_, n)| *n == '-') => {
                out.push(c);
                for (_, q) in chars.by_ref() {
                    out.push(q);
                    if q == '\n' {
                        break;
                    }
                }
            }
            '?' => {
                let mut digits = String::new();
                while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = if digits.is_empty() {
                    highest + 1
                } else {
                    digits.parse().unwrap_or(highest + 1)
                };
                highest = highest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::to_postgres;

    #[test]
    fn numbered_and_bare_placeholders_become_dollar_numbers() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c = ?2 OR d = ?1"),
            "SELECT a FROM t WHERE b = $1 AND c = $2 OR d = $1"
        );
        assert_eq!(
            to_postgres("INSERT INTO t VALUES (?, ?, ?)"),
            "INSERT INTO t VALUES ($1, $2, $3)"
        );
        assert_eq!(to_postgres("x = ?3 AND y = ?"), "x = $3 AND y = $4");
    }

    #[test]
    fn quoted_text_and_comments_are_left_alone() {
        assert_eq!(
            to_postgres("SELECT '?', \"a?\" FROM t -- why?\nWHERE v = ?"),
            "SELECT '?', \"a?\" FROM t -- why?\nWHERE v = $1"
        );
        assert_eq!(
            to_postgres("SELECT 'it''s ?' WHERE v = ?1"),
            "SELECT 'it''s ?' WHERE v = $1"
        );
    }
}
