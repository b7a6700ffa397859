//! Bounds on what the bootstrap loader accepts, checked before the YAML parser does any work that
//! grows faster than the file: its size, how deeply flow collections nest and how many values the
//! aliases expand to. Each refusal names the limit, so the operator knows what to change.

use std::{fmt, io::Read, path::Path};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// The bounds themselves; [`Limits::DEFAULT`] is what the proxy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest file read, in bytes.
    pub max_bytes: u64,
    /// Deepest nesting of `[...]` and `{...}`. The YAML parser's cost grows with the number of
    /// tokens times this depth: 100,000 nested brackets took it 19 s.
    pub max_flow_depth: usize,
    /// Most values (scalars, sequences and mappings) the document may hold once every alias is
    /// replaced by what it refers to. The parser's own budget grows with the file, so a 1 MB file
    /// of aliases could expand to over a gigabyte.
    pub max_values: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_bytes: 16 * 1024 * 1024,
        max_flow_depth: 64,
        max_values: 1_000_000,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the file is larger than the {} limit", mib(*max_bytes))]
    TooLarge { max_bytes: u64 },
    #[error(
        "flow collections nested deeper than {max} levels (line {line}); write deep values in block style"
    )]
    TooDeep { max: usize, line: usize },
    #[error("block collections nested deeper than {max} levels (line {line})")]
    BlockTooDeep { max: usize, line: usize },
    #[error("aliases expand to more than {max} values")]
    TooManyValues { max: usize },
}

fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1024 * 1024) {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

/// Why a file could not be read: the system said no, or it holds more than the limit.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

/// Reads at most `limits.max_bytes` of `path` as UTF-8. The bound holds for what cannot be sized
/// in advance too: a pipe, a character device such as `/dev/zero`, a file still growing.
pub fn read_bounded(path: &Path, limits: &Limits) -> Result<String, ReadError> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limits.max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limits.max_bytes {
        return Err(LimitError::TooLarge {
            max_bytes: limits.max_bytes,
        }
        .into());
    }
    String::from_utf8(bytes).map_err(|e| {
        ReadError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is not UTF-8: {e}"),
        ))
    })
}

/// Checks `text` against the depth and expansion limits, before it is deserialized for real.
/// Without aliases the values are bounded by the file's size, so only a file that has some is
/// walked to count them (a walk costs about as much as a parse).
pub fn check_text(text: &str, limits: &Limits) -> Result<(), CheckError> {
    let scan = scan(text, limits.max_flow_depth)?;
    if scan.aliases {
        count_values(text, limits.max_values)?;
    }
    Ok(())
}

/// What [`scan`] learnt of a text within the depth limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// A `*` outside quoted scalars, comments and block scalars: the text may hold an alias.
    pub aliases: bool,
}

/// [`scan`] for the depth alone.
pub fn check_flow_depth(text: &str, max: usize) -> Result<(), LimitError> {
    scan(text, max).map(|_| ())
}

/// A limit was passed, or the YAML is malformed (found while counting).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("{0}")]
    Yaml(String),
}

/// Where the scanner is, as far as brackets are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between tokens: whitespace is skipped and the next character starts a token.
    Token,
    /// Inside a plain (unquoted) scalar.
    Plain,
    Single,
    Double,
    Comment,
    /// An anchor or alias name (`&a`, `*a`).
    Anchor,
    /// A tag (`!t`, `!<...>`).
    Tag {
        verbatim: bool,
    },
    /// The header of a block scalar (`|`, `>-`, `|2`), up to the end of its line.
    BlockHeader,
}

/// Finds flow collections nested deeper than `max`, following the YAML tokenizer's rules on
/// where `[`, `{`, `]` and `}` are indicators: not inside quoted scalars, comments or block
/// scalars, and in block context only where a token starts (`key: a[b` is text). The scan is
/// linear and never allocates; what it cannot tell apart it leaves for the parser, which then
/// fails early on the same text.
pub fn scan(text: &str, max: usize) -> Result<Scan, LimitError> {
    let bytes = text.as_bytes();
    let mut found = Scan::default();
    let mut depth = 0usize;
    let mut state = State::Token;
    let mut line = 1usize;
    let mut column = 0usize;
    // Columns of the open block collections, as the YAML tokenizer keeps them: plain scalars
    // continue on lines indented past the innermost, and block scalar content is indented past it.
    let mut indents = Indents::default();
    let mut line_started = false;
    // Column of the first token since the line or the last block indicator began: a `:` after it
    // makes it a key, and the block mapping starts there.
    let mut key_column: Option<usize> = None;
    let mut block_scalar: Option<(isize, Option<usize>)> = None;
    let mut previous_blank = true;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let next = bytes.get(i + 1).copied();
        let blank_next = matches!(next, None | Some(b' ' | b'\t' | b'\r' | b'\n'));
        if c == b'\n' {
            line += 1;
            column = 0;
            previous_blank = true;
            key_column = None;
            line_started = false;
            i += 1;
            state = match state {
                State::Comment | State::Anchor | State::Tag { .. } => State::Token,
                State::BlockHeader => {
                    let (parent, explicit) =
                        block_scalar.take().unwrap_or((indents.current(), None));
                    i = skip_block_scalar(bytes, i, parent, explicit, &mut line);
                    State::Token
                }
                // A plain scalar runs on over lines indented past its entry (in flow context,
                // over any line), blank lines folded in; elsewhere the next line starts afresh.
                State::Plain => {
                    let (text_at, skipped) = next_text_line(bytes, i);
                    let indent = bytes[text_at..]
                        .iter()
                        .take_while(|&&b| matches!(b, b' ' | b'\t'))
                        .count();
                    let rest = &bytes[text_at + indent..];
                    let ends = rest.first().is_none_or(|&b| b == b'#')
                        || (indent == 0 && (rest.starts_with(b"---") || rest.starts_with(b"...")));
                    if !ends && (depth > 0 || indent as isize > indents.current()) {
                        // Jump over the blank lines: each is looked at once.
                        i = text_at;
                        line += skipped;
                        State::Plain
                    } else {
                        State::Token
                    }
                }
                other => other,
            };
            continue;
        }
        match state {
            // The first token of a line closes the block collections indented past it.
            State::Token
                if depth == 0 && !line_started && !matches!(c, b' ' | b'\t' | b'\r' | b'#') =>
            {
                indents.unroll(column);
                line_started = true;
                continue;
            }
            State::Token
                if depth == 0
                    && key_column.is_none()
                    && !matches!(c, b' ' | b'\t' | b'\r' | b'#' | b',' | b']' | b'}')
                    && !(matches!(c, b'-' | b'?' | b':') && blank_next) =>
            {
                // A token starts here: the column a block mapping would start at.
                key_column = Some(column);
                continue;
            }
            State::Token => match c {
                b' ' | b'\t' | b'\r' => {}
                // A document marker; what follows it on the line starts a token.
                b'-' | b'.'
                    if column == 0
                        && (bytes[i..].starts_with(b"---") || bytes[i..].starts_with(b"..."))
                        && matches!(
                            bytes.get(i + 3),
                            None | Some(b' ' | b'\t' | b'\r' | b'\n')
                        ) =>
                {
                    i += 3;
                    column += 3;
                    key_column = None;
                    continue;
                }
                b'#' => state = State::Comment,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return Err(LimitError::TooDeep { max, line });
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b',' => {}
                b'-' | b'?' if blank_next => {
                    if depth == 0 {
                        indents.roll(column, line)?;
                        key_column = None;
                    }
                }
                b':' if blank_next || depth > 0 => {
                    if depth == 0 {
                        indents.roll(key_column.take().unwrap_or(column), line)?;
                    }
                }
                b'&' | b'*' => state = State::Anchor,
                b'!' => {
                    state = State::Tag {
                        verbatim: next == Some(b'<'),
                    }
                }
                b'|' | b'>' if depth == 0 => {
                    block_scalar = Some((indents.current(), None));
                    state = State::BlockHeader;
                }
                b'\'' => {
                    state = State::Single;
                }
                b'"' => {
                    state = State::Double;
                }
                b'%' if column == 0 => state = State::Comment,
                _ => {
                    state = State::Plain;
                }
            },
            State::Plain => {
                let flow_indicator = depth > 0 && matches!(c, b',' | b'[' | b']' | b'{' | b'}');
                if (c == b':' && blank_next) || flow_indicator {
                    // The indicator is handled as the start of the next token.
                    state = State::Token;
                    continue;
                }
                if c == b'#' && previous_blank {
                    state = State::Comment;
                }
            }
            State::Single => {
                if c == b'\'' {
                    if next == Some(b'\'') {
                        i += 1;
                        column += 1;
                    } else {
                        state = State::Token;
                    }
                }
            }
            State::Double => match c {
                // An escaped character is skipped; an escaped line break still ends the line.
                b'\\' if next != Some(b'\n') => {
                    i += 1;
                    column += 1;
                }
                b'"' => state = State::Token,
                _ => {}
            },
            State::Comment => {}
            State::Anchor => {
                if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                    state = State::Token;
                    continue;
                }
            }
            State::Tag { verbatim: true } => {
                if c == b'>' {
                    state = State::Token;
                }
            }
            State::Tag { verbatim: false } => {
                if !(c.is_ascii_alphanumeric() || b"-_;/?:@&=+$.%!~*'()".contains(&c)) {
                    state = State::Token;
                    continue;
                }
            }
            State::BlockHeader => {
                if c.is_ascii_digit()
                    && let Some((_, explicit)) = &mut block_scalar
                {
                    *explicit = Some(usize::from(c - b'0'));
                }
            }
        }
        if c == b'*' && matches!(state, State::Plain | State::Anchor | State::Tag { .. }) {
            found.aliases = true;
        }
        previous_blank = matches!(c, b' ' | b'\t' | b'\r');
        column += 1;
        i += 1;
    }
    Ok(found)
}

/// The open block collections' columns (a mapping at its first key, a sequence at its first `-`).
#[derive(Debug, Default)]
struct Indents(Vec<usize>);

impl Indents {
    /// Far past what the deserializer accepts (128 levels), so only a hostile file meets it; it
    /// bounds this scan's memory.
    const MAX: usize = 10_000;

    fn current(&self) -> isize {
        self.0.last().map_or(-1, |&c| c as isize)
    }

    fn roll(&mut self, column: usize, line: usize) -> Result<(), LimitError> {
        if column as isize > self.current() {
            if self.0.len() == Self::MAX {
                return Err(LimitError::BlockTooDeep {
                    max: Self::MAX,
                    line,
                });
            }
            self.0.push(column);
        }
        Ok(())
    }

    fn unroll(&mut self, column: usize) {
        while self.current() > column as isize {
            self.0.pop();
        }
    }
}

/// The start of the first line from `start` on holding more than blanks (or the end), and how many
/// lines were passed on the way.
fn next_text_line(bytes: &[u8], start: usize) -> (usize, usize) {
    let mut at = start;
    let mut skipped = 0;
    loop {
        let blanks = bytes[at..]
            .iter()
            .take_while(|&&b| matches!(b, b' ' | b'\t' | b'\r'))
            .count();
        if bytes.get(at + blanks) == Some(&b'\n') {
            at += blanks + 1;
            skipped += 1;
        } else {
            return (at, skipped);
        }
    }
}

/// Skips the content lines of a block scalar starting at `start` (the line after its header):
/// lines indented at least its content indentation, which is explicit or that of its first
/// non-empty line, and in either case past `parent`. Returns where the next token starts.
fn skip_block_scalar(
    bytes: &[u8],
    start: usize,
    parent: isize,
    explicit: Option<usize>,
    line: &mut usize,
) -> usize {
    // As the YAML parser computes it: an explicit indentation counts from the parent's.
    let mut content: Option<usize> = explicit.map(|e| parent.max(0) as usize + e);
    let mut i = start;
    // Blank lines before the first line of text count towards its indentation too.
    let mut leading = 0;
    while i < bytes.len() {
        let indent = bytes[i..].iter().take_while(|&&b| b == b' ').count();
        let after = i + indent;
        let empty = matches!(bytes.get(after), None | Some(b'\n' | b'\r'));
        if empty {
            leading = leading.max(indent);
        } else {
            // Auto-detected: the first line's, and never less than 1 (nor at the parent's).
            let needed = *content.get_or_insert(indent.max(leading).max(1));
            if (indent as isize) <= parent || indent < needed {
                return i;
            }
        }
        match bytes[i..].iter().position(|&b| b == b'\n') {
            Some(end) => {
                i += end + 1;
                *line += 1;
            }
            None => return bytes.len(),
        }
    }
    i
}

/// Walks the document as the deserializer will see it, aliases expanded, and stops once it has
/// met more than `max` values. The walk costs at most `max` steps, however large the expansion.
pub fn count_values(text: &str, max: usize) -> Result<(), CheckError> {
    let mut left = max;
    let counted = Counter { left: &mut left }.deserialize(serde_yaml::Deserializer::from_str(text));
    match counted {
        Ok(()) => Ok(()),
        Err(e) if left == 0 && e.to_string().contains(TOO_MANY) => {
            Err(LimitError::TooManyValues { max }.into())
        }
        Err(e) => Err(CheckError::Yaml(e.to_string())),
    }
}

const TOO_MANY: &str = "too many values after alias expansion";

/// Counts the values it is shown, failing once its budget is spent.
struct Counter<'a> {
    left: &'a mut usize,
}

impl Counter<'_> {
    fn take<E: de::Error>(&mut self) -> Result<(), E> {
        if *self.left == 0 {
            return Err(E::custom(TOO_MANY));
        }
        *self.left -= 1;
        Ok(())
    }

    fn deserialize<'de, D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

/// The nested values: a [`Counter`] borrowed for one element.
struct Element<'a, 'b>(&'a mut Counter<'b>);

impl<'de> de::DeserializeSeed<'de> for Element<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(Counter {
            left: &mut *self.0.left,
        })
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<(), E> {
        self.take()
    }
    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.take()
    }
    fn visit_i128<E: de::Error>(mut self, _: i128) -> Result<(), E> {
        self.take()
    }
    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.take()
    }
    fn visit_u128<E: de::Error>(mut self, _: u128) -> Result<(), E> {
        self.take()
    }
    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.take()
    }
    fn visit_str<E: de::Error>(mut self, _: &str) -> Result<(), E> {
        self.take()
    }
    fn visit_bytes<E: de::Error>(mut self, _: &[u8]) -> Result<(), E> {
        self.take()
    }
    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.take()
    }
    fn visit_none<E: de::Error>(mut self) -> Result<(), E> {
        self.take()
    }
    fn visit_some<D: Deserializer<'de>>(mut self, de: D) -> Result<(), D::Error> {
        self.take()?;
        de.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(mut self, de: D) -> Result<(), D::Error> {
        self.take()?;
        de.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq.next_element_seed(Element(&mut self))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key_seed(Element(&mut self))?.is_some() {
            map.next_value_seed(Element(&mut self))?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(mut self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): count the tag and what it holds.
        self.take()?;
        let ((), variant) = data.variant_seed(Element(&mut self))?;
        de::VariantAccess::newtype_variant_seed(variant, Element(&mut self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, max: usize) -> bool {
        check_flow_depth(text, max).is_ok()
    }

    #[test]
    fn nesting_past_the_limit_is_refused_with_its_line() {
        let at = |n: usize| format!("a: 1\nb: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert!(depth_ok(&at(64), 64));
        assert_eq!(
            check_flow_depth(&at(65), 64),
            Err(LimitError::TooDeep { max: 64, line: 2 })
        );
        assert!(!depth_ok(&"{a: ".repeat(65), 64));
        // After a document marker, a token starts.
        assert!(!depth_ok(&format!("--- {}", "[".repeat(5)), 4));
    }

    #[test]
    fn closed_collections_do_not_add_up() {
        let wide = "[a], {b: c}, ".repeat(1000);
        assert!(depth_ok(&format!("x: [{wide}]\n"), 2));
        assert!(depth_ok(&"- [[x]]\n".repeat(1000), 2));
    }

    #[test]
    fn brackets_that_are_text_do_not_count() {
        for text in [
            "a: '[[[['\n",
            "a: \"[[[[\"\n",
            "a: x[[[[\n",
            "a: x # [[[[\n",
            "# [[[[\n",
            "a: |\n  [[[[\n  {{{{\nb: 1\n",
            "- key: >-\n    [[[[\n",
            "a: x\n  [[[[ continued\n",
        ] {
            assert!(depth_ok(text, 2), "{text:?}");
        }
    }

    #[test]
    fn closing_brackets_that_are_text_do_not_hide_depth() {
        for text in [
            // Quoted and commented closers inside a flow collection are text.
            "a: [ ']]]' [ ']]]' [ ']]]' [\n",
            "a: [ \"]\\\"]]\" [ \"]]]\" [ \"]]]\" [\n",
            "a: [ x # ]]]]\n  [ [ [\n",
            "a: ['it''s]]]' [ [ [\n",
            // A quote inside a plain scalar is text and starts nothing.
            "a: [it's, [ ']]]' [ [\n",
            // Anchors, aliases and tags end where the tokenizer ends them.
            "a: [&x [ *x, !t [ !<]]]> [\n",
            // A block scalar's content ends at the first line indented no further than its key.
            "- key: |\n    text\n  other: [[[[\n",
        ] {
            assert!(!depth_ok(text, 3), "{text:?} must count 4 levels");
        }
    }

    /// Cases where an earlier version of the scan saw less nesting than the YAML tokenizer, found
    /// by comparing the two on random text (PyYAML's scanner, set to libyaml's plain-scalar rules).
    #[test]
    fn the_scan_agrees_with_the_tokenizer_on_tricky_text() {
        for (text, depth) in [
            // A top-level block scalar's content is indented at least one space.
            ("|\n[[", 2),
            // A `:` with no key opens a mapping at its own column.
            ("  : y[\"x]{a>-\n''{{{: \n", 3),
            // Blank lines inside a plain scalar do not end it.
            ("[\n    \n  a>-\n\n    \"\n  {: ] ''", 2),
            // Blank lines before a block scalar's text set its indentation too.
            (">-\n>-\n  \n      \n  [it's %\"@a\",y[x][a]: ? ", 2),
            // A line less indented closes the block collections past it.
            (
                "  !t k: |\n>-\n  ##\n  \n       &x *x\"{!<a]>|\ny['}': #...{{@|\n\n\n{b c{",
                2,
            ),
        ] {
            assert!(
                check_flow_depth(text, depth - 1).is_err(),
                "{text:?} must count {depth} levels"
            );
        }
    }

    #[test]
    fn block_nesting_is_bounded_too() {
        let text = "- ".repeat(Indents::MAX + 1);
        assert_eq!(
            check_flow_depth(&text, 64),
            Err(LimitError::BlockTooDeep {
                max: Indents::MAX,
                line: 1
            })
        );
        assert!(check_flow_depth(&"- ".repeat(1000), 64).is_ok());
    }

    #[test]
    fn an_alias_bomb_is_stopped_at_the_budget() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..8 {
            let refs = vec![format!("*a{}", level - 1); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
        }
        let err = count_values(&bomb, 100_000).unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::Limit(LimitError::TooManyValues { max: 100_000 })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn values_are_counted_once_expanded() {
        // A mapping, two keys, a sequence of three scalars, and the alias's three again with
        // their sequence.
        let text = "a: &x [1, 2, 3]\nb: *x\n";
        assert!(count_values(text, 11).is_ok());
        assert!(count_values(text, 10).is_err());
        assert!(count_values("", 1).is_ok());
    }

    #[test]
    fn only_text_with_aliases_is_walked() {
        let seen = |text: &str| scan(text, 64).unwrap().aliases;
        assert!(seen("a: &x 1\nb: *x\n"));
        assert!(seen("a: [*x]\n"));
        assert!(seen("a: b*c\n"));
        assert!(!seen(
            "domains: [\"*\", '*.example.com'] # *\nbody: |\n  *\n"
        ));
    }

    #[test]
    fn malformed_yaml_is_reported_as_such() {
        assert!(matches!(count_values("a: [", 10), Err(CheckError::Yaml(_))));
    }

    #[test]
    fn reading_stops_at_the_size_limit() {
        let limits = Limits {
            max_bytes: 1024,
            ..Limits::DEFAULT
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.yaml");
        std::fs::write(&path, "#".repeat(1024)).unwrap();
        assert_eq!(read_bounded(&path, &limits).unwrap().len(), 1024);
        std::fs::write(&path, "#".repeat(1025)).unwrap();
        assert!(matches!(
            read_bounded(&path, &limits),
            Err(ReadError::Limit(LimitError::TooLarge { max_bytes: 1024 }))
        ));
        assert_eq!(
            LimitError::TooLarge {
                max_bytes: Limits::DEFAULT.max_bytes
            }
            .to_string(),
            "the file is larger than the 16 MiB limit"
        );
    }
}
