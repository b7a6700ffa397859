//! Name matching shared by virtual hosts and SNI routes: an exact name, then the longest `*.`
//! suffix, then `*`. Built once per config; a lookup is one hash probe and a short suffix scan.

use std::collections::HashMap;

use super::model::DomainMatch;

#[derive(Debug)]
pub struct DomainTable<T> {
    exact: HashMap<Box<str>, T>,
    /// `(".example.com", value)`, longest suffix first.
    suffixes: Box<[(Box<str>, T)]>,
    any: Option<T>,
}

impl<T: Clone> DomainTable<T> {
    /// The first entry to claim a name keeps it.
    pub fn build(entries: impl IntoIterator<Item = (DomainMatch, T)>) -> Self {
        let mut exact = HashMap::new();
        let mut suffixes: Vec<(Box<str>, T)> = Vec::new();
        let mut any = None;
        for (domain, value) in entries {
            match domain {
                DomainMatch::Exact(n) => {
                    exact.entry(Box::from(&*n)).or_insert(value);
                }
                DomainMatch::Suffix(s) => suffixes.push((Box::from(&*s), value)),
                DomainMatch::Any => {
                    any.get_or_insert(value);
                }
            }
        }
        // Stable: among equal suffixes the first stays first.
        suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        DomainTable {
            exact,
            suffixes: suffixes.into(),
            any,
        }
    }
}

impl<T> DomainTable<T> {
    /// The most specific match for `name` (no port), compared case-insensitively and ignoring a
    /// trailing dot.
    pub fn lookup(&self, name: &str) -> Option<&T> {
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        self.exact
            .get(name)
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(&**suffix))
                    .map(|(_, v)| v)
            })
            .or(self.any.as_ref())
    }

    /// What `*` maps to.
    pub fn any(&self) -> Option<&T> {
        self.any.as_ref()
    }
}
