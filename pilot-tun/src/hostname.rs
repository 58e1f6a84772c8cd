//! This node's name: the machine's hostname or `--name` made into a DNS
//! label, and the next name to ask for when the registry says one is
//! taken (`cache`, `cache-2`, `cache-3`, …).
//!
//! The registry stays strict ([`valid_hostname`]); the node normalizes
//! before it asks, so `--name Build_Box` becomes `build-box` with a notice
//! instead of a refusal.

use pilot_proto::messages::valid_hostname;

/// The longest DNS label.
const MAX_LABEL: usize = 63;
/// How many names a registration tries: the name itself, then `-2` up to
/// this number.
pub const MAX_TRIES: u32 = 16;

/// `raw` as a DNS label: lower case, every character outside a-z, 0-9 and
/// '-' becomes '-', at most 63 characters, no '-' at either end. `None`
/// when nothing usable is left, or the result would read as an overlay
/// address or a node id (names, addresses and node ids share the CLI).
pub fn normalize(raw: &str) -> Option<String> {
    let mapped: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches('-');
    let cut = &trimmed[..trimmed.len().min(MAX_LABEL)];
    let name = cut.trim_end_matches('-').to_string();
    valid_hostname(&name).then_some(name)
}

/// The machine's hostname as a label: its first dot-separated part (the
/// short hostname), normalized. `None` if the host has no usable name.
pub fn from_machine() -> Option<String> {
    // The UTS namespace's hostname, as uname(2) gives it.
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    normalize(h.trim().split('.').next().unwrap_or(""))
}

/// The `n`th name for `base` (n ≥ 2): `base-n`, with `base` cut so the
/// whole stays a label.
pub fn candidate(base: &str, n: u32) -> String {
    let suffix = format!("-{n}");
    let keep = base.len().min(MAX_LABEL - suffix.len());
    // `base` is ASCII (a normalized label), so any cut is a char boundary.
    let stem = base[..keep].trim_end_matches('-');
    format!("{stem}{suffix}")
}

/// Which try `name` is for `base`: 1 for `base` itself, n for
/// `candidate(base, n)`, `None` if it is none of them.
pub fn try_of(base: &str, name: &str) -> Option<u32> {
    if name == base {
        return Some(1);
    }
    (2..=MAX_TRIES).find(|&n| candidate(base, n) == name)
}

/// The name a registration asks for: the one the node holds if it is one
/// of `base`'s tries (so a node that became `cache-2` stays `cache-2`),
/// else `base`; without a base, the name it holds.
pub fn wanted(base: Option<&str>, held: Option<&str>) -> Option<String> {
    match (base, held) {
        (Some(b), Some(h)) if try_of(b, h).is_some() => Some(h.to_string()),
        (Some(b), _) => Some(b.to_string()),
        (None, h) => h.map(str::to_string),
    }
}

/// The registry refused a name because another node holds it (its reason
/// says "taken"; any other refusal is not retried with another name).
pub fn refused_as_taken(why: &str) -> bool {
    why.contains("taken")
}

/// The name to try after `asked` was refused as taken, if tries are left.
pub fn next_try(base: &str, asked: &str) -> Option<String> {
    let n = try_of(base, asked)?;
    (n < MAX_TRIES).then(|| candidate(base, n + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_labels() {
        let cases = [
            ("alpha", Some("alpha")),
            ("hostA", Some("hosta")),
            ("Build_Box 7", Some("build-box-7")),
            ("my.box", Some("my-box")),
            ("--edge--", Some("edge")),
            ("Café", Some("caf")),
            ("ünï", Some("n")),
            ("", None),
            ("---", None),
            ("_", None),
            // Would read as a node id.
            ("140a67f3f7622d9b6c1aea0abb8702a5", None),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw).as_deref(), want, "{raw:?}");
        }
    }

    #[test]
    fn long_names_are_cut_to_a_label_without_a_trailing_dash() {
        let long = "a".repeat(100);
        assert_eq!(normalize(&long).unwrap(), "a".repeat(63));
        let dash_at_63 = format!("{}-{}", "b".repeat(62), "c".repeat(10));
        assert_eq!(normalize(&dash_at_63).unwrap(), "b".repeat(62));
        for raw in ["X", "x y", &"Q".repeat(80), "a.b.c", "-9-"] {
            let n = normalize(raw).unwrap();
            assert!(valid_hostname(&n), "{raw:?} -> {n:?}");
            assert_eq!(normalize(&n).as_deref(), Some(n.as_str()), "idempotent");
        }
    }

    #[test]
    fn tries_count_up_and_stay_labels() {
        assert_eq!(candidate("cache", 2), "cache-2");
        assert_eq!(try_of("cache", "cache"), Some(1));
        assert_eq!(try_of("cache", "cache-3"), Some(3));
        assert_eq!(try_of("cache", "cache-x"), None);
        assert_eq!(try_of("cache", "other"), None);
        assert_eq!(next_try("cache", "cache").as_deref(), Some("cache-2"));
        assert_eq!(next_try("cache", "cache-2").as_deref(), Some("cache-3"));
        let last = candidate("cache", MAX_TRIES);
        assert_eq!(next_try("cache", &last), None, "bounded");
        let long = "d".repeat(63);
        for n in 2..=MAX_TRIES {
            let c = candidate(&long, n);
            assert!(valid_hostname(&c), "{c}");
            assert_eq!(try_of(&long, &c), Some(n));
        }
        // A cut that ends in '-' does not make "x--2".
        let dashy = format!("{}-y", "x".repeat(60));
        assert!(valid_hostname(&candidate(&dashy, 2)));
    }

    #[test]
    fn a_node_keeps_the_try_it_got() {
        assert_eq!(wanted(Some("cache"), None).as_deref(), Some("cache"));
        assert_eq!(
            wanted(Some("cache"), Some("cache-2")).as_deref(),
            Some("cache-2")
        );
        assert_eq!(
            wanted(Some("cache"), Some("other")).as_deref(),
            Some("cache"),
            "a new --name wins over the old name"
        );
        assert_eq!(wanted(None, Some("old")).as_deref(), Some("old"));
        assert_eq!(wanted(None, None), None);
        assert!(refused_as_taken(
            "hostname \"cache\" is taken by another node"
        ));
        assert!(!refused_as_taken("\"x\" is not a valid hostname"));
    }
}
