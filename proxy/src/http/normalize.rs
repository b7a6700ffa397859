//! Path normalisation, done once before routing: the path a request is routed on is the path
//! the upstream gets, so no spelling of a path can reach a route another spelling is denied by.
//!
//! As RFC 3986 §6.2.2 and Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action`: percent-encoded unreserved characters are decoded, the
//! hex of other escapes is upper-cased (nothing is decoded twice), dot segments are removed
//! (spelt raw or `%2e`; `..` never climbs above `/`) and runs of slashes merged. Encoded slashes
//! (`%2F`, `%5C`) and raw backslashes are handled per [`EscapedSlashes`]. The query is not part
//! of the path and is kept as sent.

use std::borrow::Cow;

use http::{HeaderValue, Response, StatusCode, Uri, header, uri::PathAndQuery};

use super::{body::ResponseBody, error::ProxyError};

pub use crate::config::model::EscapedSlashes;

/// The normalised path, or why the request is not forwarded with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    /// Route and forward this path (borrowed when the path was already normal).
    Path(Cow<'a, str>),
    /// Send the client to this path ([`EscapedSlashes::Redirect`]).
    Redirect(String),
    /// The path cannot be forwarded safely.
    Invalid(InvalidPath),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("the path holds an encoded slash or a backslash")]
    EscapedSlash,
    #[error("the path holds a '%' that does not start a percent-encoded byte")]
    BadEscape,
}

/// Normalises a path (the part of the request target before any `?`).
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Normalized<'_> {
    if is_normal(path.as_bytes(), slashes) {
        return Normalized::Path(Cow::Borrowed(path));
    }
    let mut saw_slash_escape = false;
    let decoded = match decode(path, slashes, &mut saw_slash_escape) {
        Ok(d) => d,
        Err(e) => return Normalized::Invalid(e),
    };
    let out = remove_dot_segments(&decoded);
    if saw_slash_escape && slashes == EscapedSlashes::Redirect {
        Normalized::Redirect(out)
    } else {
        Normalized::Path(Cow::Owned(out))
    }
}

/// Normalises a request's target in place, before routing. `Ok(Some)` is the answer when the
/// request is redirected rather than routed; a path that cannot be forwarded is an error, so it
/// is logged and counted like any refused request.
pub fn request_target(
    uri: &mut Uri,
    slashes: EscapedSlashes,
) -> Result<Option<Response<ResponseBody>>, ProxyError> {
    // `*` (OPTIONS) and authority-form (CONNECT) targets have no path to normalise.
    if !uri.path().starts_with('/') {
        return Ok(None);
    }
    let path = match normalize(uri.path(), slashes) {
        Normalized::Path(Cow::Borrowed(_)) => return Ok(None),
        Normalized::Path(Cow::Owned(p)) => p,
        Normalized::Redirect(p) => return redirect(&p, uri.query()).map(Some),
        Normalized::Invalid(e) => return Err(ProxyError::InvalidPath(e)),
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = std::mem::take(uri).into_parts();
    // Normalisation only removes characters or writes ones a path already allows.
    parts.path_and_query = Some(
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::InvalidPath(InvalidPath::BadEscape))?,
    );
    *uri = Uri::from_parts(parts).map_err(|_| ProxyError::InvalidPath(InvalidPath::BadEscape))?;
    Ok(None)
}

/// A 307 to the normalised path on the same host (a relative `Location`, RFC 9110 §10.2.2).
fn redirect(path: &str, query: Option<&str>) -> Result<Response<ResponseBody>, ProxyError> {
    let location = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let location = HeaderValue::try_from(location)
        .map_err(|_| ProxyError::InvalidPath(InvalidPath::BadEscape))?;
    let mut resp = Response::new(ResponseBody::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    resp.headers_mut().insert(header::LOCATION, location);
    Ok(resp)
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte a `%XY` at `i` encodes.
fn escape_at(path: &[u8], i: usize) -> Option<u8> {
    let hi = hex(*path.get(i + 1)?)?;
    let lo = hex(*path.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

/// Whether `normalize` would return the path unchanged: one scan, no allocation, so the common
/// case costs a pass over the bytes.
fn is_normal(path: &[u8], slashes: EscapedSlashes) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let keep = slashes == EscapedSlashes::KeepUnchanged;
    let mut i = 0;
    // Start of the current segment (just after its '/').
    let mut seg = 1;
    while i < path.len() {
        match path[i] {
            b'/' => {
                if i > 0 {
                    let s = &path[seg..i];
                    if s.is_empty() || s == b"." || s == b".." {
                        return false;
                    }
                }
                seg = i + 1;
            }
            b'%' => {
                let Some(v) = escape_at(path, i) else {
                    return false;
                };
                let lower_hex = path[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
                let slash = v == b'/' || v == b'\\';
                if lower_hex || is_unreserved(v) || (slash && !keep) {
                    return false;
                }
                i += 2;
            }
            b'\\' if !keep => return false,
            _ => {}
        }
        i += 1;
    }
    let last = &path[seg.min(path.len())..];
    last != b"." && last != b".."
}

/// Decodes unreserved escapes, upper-cases the others and applies the escaped-slash action.
/// Decoded bytes are never looked at again as part of an escape.
fn decode(
    path: &str,
    slashes: EscapedSlashes,
    saw_slash_escape: &mut bool,
) -> Result<String, InvalidPath> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    let keep = slashes == EscapedSlashes::KeepUnchanged;
    let mut slash = || {
        if slashes == EscapedSlashes::Reject {
            return Err(InvalidPath::EscapedSlash);
        }
        *saw_slash_escape = true;
        Ok('/')
    };
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let v = escape_at(bytes, i).ok_or(InvalidPath::BadEscape)?;
                if is_unreserved(v) {
                    out.push(char::from(v));
                } else if (v == b'/' || v == b'\\') && !keep {
                    out.push(slash()?);
                } else {
                    out.push('%');
                    out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
            }
            b'\\' if !keep => {
                out.push(slash()?);
                i += 1;
            }
            _ => {
                // Copy the run up to the next byte that needs a decision. Both ends sit on
                // ASCII bytes (or the end), so the slice is on character boundaries.
                let end = bytes[i + 1..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\')
                    .map_or(bytes.len(), |n| i + 1 + n);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on a path that starts with `/`, with empty segments dropped (merged
/// slashes). A path that ended in `/`, `/.` or `/..` keeps a trailing slash. Written as a stack
/// on the output itself: `..` truncates to the previous `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut trailing = false;
    for s in path.split('/').skip(1) {
        trailing = matches!(s, "" | "." | "..");
        match s {
            "" | "." => {}
            ".." => out.truncate(out.rfind('/').unwrap_or(0)),
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use EscapedSlashes::*;

    fn path(p: &str, slashes: EscapedSlashes) -> Normalized<'_> {
        normalize(p, slashes)
    }

    fn ok(p: &str) -> Normalized<'static> {
        Normalized::Path(Cow::Owned(p.to_owned()))
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a",
            "/a/",
            "/a/b.c/..d/.e/",
            "/%2F%20",
            "/~user/a-b_c",
            "/caf%C3%A9",
            "/a%25",
        ] {
            let slashes = if p.contains("%2F") {
                KeepUnchanged
            } else {
                Reject
            };
            assert!(
                matches!(normalize(p, slashes), Normalized::Path(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, &str)] = &[
            ("", "/"),
            ("a/b", "/a/b"),
            ("//", "/"),
            ("/a//b", "/a/b"),
            ("///a///", "/a/"),
            ("/a/./b", "/a/b"),
            ("/a/.", "/a/"),
            ("/.", "/"),
            ("/a/b/..", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("/a/../../../b", "/b"),
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/public/%2e/admin", "/public/admin"),
            ("/public/%61dmin", "/public/admin"),
            ("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~"),
            ("/%3f%3F%2b", "/%3F%3F%2B"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            // Decoded once: %25 stays a literal '%', so %252e is never a dot.
            ("/a/%252e%252e/b", "/a/%252e%252e/b"),
            ("/a/%25%32%65", "/a/%252e"),
            ("/...", "/..."),
            ("/a..b/..c", "/a..b/..c"),
            ("/é/./x", "/é/x"),
        ];
        for (input, want) in cases {
            assert_eq!(path(input, Reject), ok(want), "{input}");
        }
    }

    #[test]
    fn escaped_slashes_follow_the_action() {
        for p in [
            "/public/admin%2f",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/..%2fadmin",
        ] {
            assert_eq!(
                path(p, Reject),
                Normalized::Invalid(InvalidPath::EscapedSlash),
                "{p}"
            );
        }
        assert_eq!(path("/public/..%2fadmin", UnescapeAndForward), ok("/admin"));
        assert_eq!(path("/a%5C..\\b", UnescapeAndForward), ok("/b"));
        assert_eq!(
            path("/public/admin%2F", UnescapeAndForward),
            ok("/public/admin/")
        );
        assert_eq!(
            path("/public/..%2fadmin", Redirect),
            Normalized::Redirect("/admin".into())
        );
        assert_eq!(path("/x/../a//b", Redirect), ok("/a/b"));
        assert_eq!(
            path("/public/..%2fadmin", KeepUnchanged),
            ok("/public/..%2Fadmin")
        );
        assert_eq!(path("/a\\..\\b/./c", KeepUnchanged), ok("/a\\..\\b/c"));
    }

    #[test]
    fn a_percent_that_starts_no_escape_is_invalid() {
        for p in ["/%", "/a%2", "/%zz", "/%%41", "/%g0"] {
            for slashes in [Reject, Redirect, UnescapeAndForward, KeepUnchanged] {
                assert_eq!(
                    path(p, slashes),
                    Normalized::Invalid(InvalidPath::BadEscape),
                    "{p} {slashes:?}"
                );
            }
        }
    }

    #[test]
    fn request_targets_keep_the_query_and_the_authority() {
        let mut uri: Uri = "http://h.test:8080/a/../b?x=/../y&z=%2f".parse().unwrap();
        assert!(request_target(&mut uri, Reject).unwrap().is_none());
        assert_eq!(uri.to_string(), "http://h.test:8080/b?x=/../y&z=%2f");

        let mut uri: Uri = "*".parse().unwrap();
        assert!(request_target(&mut uri, Reject).unwrap().is_none());
        assert_eq!(uri.to_string(), "*");

        let mut uri: Uri = "/p/..%2fq?k=1".parse().unwrap();
        let resp = request_target(&mut uri, Redirect)
            .unwrap()
            .expect("redirect");
        assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(resp.headers()[header::LOCATION], "/q?k=1");

        let err = request_target(&mut uri, Reject).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.reason(), "invalid-path");
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        /// Paths built from the pieces that matter, so dot segments, escapes and slashes meet
        /// often.
        fn piece() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "/", "//", ".", "..", "a", "b", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%61",
                "%25", "%7e", "%c3%a9", "~", "-", "é", "%3f", ".a", "a.",
            ])
        }

        fn any_path() -> impl Strategy<Value = String> {
            prop::collection::vec(piece(), 0..16).prop_map(|v| v.concat())
        }

        fn action() -> impl Strategy<Value = EscapedSlashes> {
            prop::sample::select(vec![
                EscapedSlashes::Reject,
                EscapedSlashes::Redirect,
                EscapedSlashes::UnescapeAndForward,
                EscapedSlashes::KeepUnchanged,
            ])
        }

        fn check(p: &str, slashes: EscapedSlashes) -> Result<(), TestCaseError> {
            let out = match normalize(p, slashes) {
                Normalized::Path(out) => out.into_owned(),
                Normalized::Redirect(out) => out,
                Normalized::Invalid(_) => return Ok(()),
            };
            prop_assert!(out.starts_with('/'), "{p:?} -> {out:?}");
            prop_assert!(!out.contains("//"), "{p:?} -> {out:?}");
            for seg in out.split('/') {
                prop_assert!(seg != "." && seg != "..", "{p:?} -> {out:?}");
            }
            // Idempotent, and a second pass neither redirects nor copies.
            let again = normalize(&out, slashes);
            prop_assert!(
                matches!(&again, Normalized::Path(Cow::Borrowed(b)) if *b == out),
                "{:?} -> {:?} -> {:?}",
                p,
                out,
                again
            );
            Ok(())
        }

        /// What a path resolves to, whether it is forwarded or redirected to.
        fn resolved(p: &str, slashes: EscapedSlashes) -> Result<(bool, String), InvalidPath> {
            match normalize(p, slashes) {
                Normalized::Path(out) => Ok((false, out.into_owned())),
                Normalized::Redirect(out) => Ok((true, out)),
                Normalized::Invalid(e) => Err(e),
            }
        }

        /// RFC 3986 §5.2.4 read literally, for paths of plain segments: a stack of segments
        /// where `..` pops (nothing, at the root) and empty and `.` segments are dropped; a path
        /// ending in an empty, `.` or `..` segment ends in `/`.
        fn stack_model(p: &str) -> String {
            let mut stack: Vec<&str> = Vec::new();
            let segs: Vec<&str> = p.split('/').skip(1).collect();
            for s in &segs {
                match *s {
                    "" | "." => {}
                    ".." => {
                        stack.pop();
                    }
                    s => stack.push(s),
                }
            }
            let mut out: String = stack.iter().map(|s| format!("/{s}")).collect();
            if out.is_empty() || segs.last().is_some_and(|s| matches!(*s, "" | "." | "..")) {
                out.push('/');
            }
            out
        }

        proptest! {
            #[test]
            fn normalised_paths_are_normal(p in any_path(), slashes in action()) {
                check(&p, slashes)?;
            }

            /// `..` never climbs above `/`: leading `..` segments, however spelt, are no-ops.
            #[test]
            fn dot_dot_never_climbs_above_the_root(
                p in any_path(),
                up in prop::sample::select(vec!["/..", "/%2e%2e", "/.%2E", "/a/../..", "/../.."]),
                slashes in action(),
            ) {
                let rooted = format!("/{p}");
                prop_assert_eq!(
                    resolved(&format!("{up}{rooted}"), slashes),
                    resolved(&rooted, slashes),
                    "{}{}",
                    up,
                    rooted
                );
            }

            #[test]
            fn plain_segments_resolve_as_the_rfc_stack(
                segs in prop::collection::vec(
                    prop::sample::select(vec!["", ".", "..", "a", "b", "..a", "..."]),
                    0..10,
                ),
            ) {
                let p: String = segs.iter().map(|s| format!("/{s}")).collect();
                let p = if p.is_empty() { "/".to_owned() } else { p };
                prop_assert_eq!(
                    resolved(&p, EscapedSlashes::Reject),
                    Ok((false, stack_model(&p))),
                    "{}",
                    p
                );
            }

            #[test]
            fn any_text_is_handled(p in any::<String>(), slashes in action()) {
                check(&p, slashes)?;
            }
        }
    }
}
