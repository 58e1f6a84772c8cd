//! Reading a program's TOML config file and turning every problem in it
//! into one sentence that names the file, the line and the key.
//!
//! The programs define their own file types (`serde(deny_unknown_fields)`,
//! one key per flag) and apply them under their flags; this module reads
//! the file, runs the deserializer, and locates errors, including those
//! the programs find later in a value they check themselves
//! ([`ConfigFile::bad_value`]).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (a missing default file is not an
    /// error; a missing `--config` file is).
    #[error("cannot read the config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the sentence; not a separate cause, so it is said once).
        error: std::io::Error,
    },
    /// A key that no flag has.
    #[error("{path}:{line}: unknown key `{key}` ({known})")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The key as written.
        key: String,
        /// The keys there are.
        known: String,
    },
    /// A value of the wrong type, or one its key does not accept.
    #[error("{path}:{line}: `{key}`: {problem}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The key.
        key: String,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// Not TOML at all.
    #[error("{path}:{line}: not valid TOML: {problem}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's words.
        problem: String,
    },
}

/// A config file that was read and parsed.
#[derive(Debug)]
pub struct ConfigFile<T> {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text (for locating values checked later).
    pub text: String,
    /// The parsed values.
    pub values: T,
}

/// Reads and parses the config file at `path`. `explicit` says it was
/// named with `--config`: then a missing file is an error; the default
/// file may be missing (`Ok(None)`).
pub fn load<T: DeserializeOwned>(
    path: &Path,
    explicit: bool,
) -> Result<Option<ConfigFile<T>>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(None),
        Err(error) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    parse(path, text).map(Some)
}

/// Parses `text` as the config file at `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: String) -> Result<ConfigFile<T>, ConfigError> {
    match toml::from_str::<T>(&text) {
        Ok(values) => Ok(ConfigFile {
            path: path.to_path_buf(),
            text,
            values,
        }),
        Err(e) => Err(locate(path, &text, &e)),
    }
}

impl<T> ConfigFile<T> {
    /// The error for a value the program refused after parsing: `span` is
    /// the value's place (from a `toml::Spanned`), `problem` says what is
    /// expected.
    pub fn bad_value(
        &self,
        key: &str,
        span: Range<usize>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::BadValue {
            path: self.path.clone(),
            line: line_of(&self.text, span.start),
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

/// 1-based line of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// An annotated example file with every commented-out `# key = value`
/// line made live: what the programs' tests parse, to check that the
/// example names only real keys with valid values.
pub fn uncomment_example(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys a (live) config text sets, in order.
pub fn keys_of(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_string()))
        .filter(|k| !k.starts_with('#'))
        .collect()
}

/// The key of the `key = value` line around byte `offset`, if there is one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty()).then(|| key.to_string())
}

/// The first `` `quoted` `` word of a message.
fn first_quoted(msg: &str) -> Option<&str> {
    let (_, rest) = msg.split_once('`')?;
    Some(rest.split_once('`')?.0)
}

/// A deserializer error as one of ours, with its line and key.
fn locate(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let offset = e.span().map_or(0, |s| s.start);
    let line = line_of(text, offset);
    let msg = e.message().trim().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let key = first_quoted(rest).unwrap_or("?").to_string();
        let known = match rest.split_once(", expected ") {
            Some((_, list)) => format!("expected {list}"),
            None => "this file takes no keys".to_string(),
        };
        return ConfigError::UnknownKey {
            path: path.to_path_buf(),
            line,
            key,
            known,
        };
    }
    match key_at(text, offset) {
        Some(key) if e.span().is_some() => ConfigError::BadValue {
            path: path.to_path_buf(),
            line,
            key,
            problem: msg,
        },
        _ => ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            problem: msg,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Sample {
        listen: Option<String>,
        relay_mbps: Option<u32>,
        flag: Option<bool>,
    }

    fn err(text: &str) -> String {
        parse::<Sample>(Path::new("/etc/x.toml"), text.to_string())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_file_parses() {
        let f = parse::<Sample>(
            Path::new("x"),
            "# comment\nlisten = \"0.0.0.0:1\"\nrelay-mbps = 5\n".into(),
        )
        .unwrap();
        assert_eq!(
            f.values,
            Sample {
                listen: Some("0.0.0.0:1".into()),
                relay_mbps: Some(5),
                flag: None
            }
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e = err("listen = \"a\"\n\nrelay_mbps = 5\n");
        assert!(
            e.starts_with("/etc/x.toml:3: unknown key `relay_mbps`"),
            "{e}"
        );
        assert!(e.contains("relay-mbps"), "the known keys are listed: {e}");
        let e = err("[server]\nlisten = \"a\"\n");
        assert!(e.contains(":1: unknown key `server`"), "{e}");
    }

    #[test]
    fn a_bad_value_names_key_line_and_what_is_expected() {
        let e = err("flag = true\nrelay-mbps = \"fast\"\n");
        assert!(e.starts_with("/etc/x.toml:2: `relay-mbps`: "), "{e}");
        assert!(e.contains("u32"), "says what is expected: {e}");
        let e = err("flag = 1\n");
        assert!(e.contains(":1: `flag`:") && e.contains("bool"), "{e}");
    }

    #[test]
    fn broken_toml_names_the_line() {
        let e = err("listen = \"a\"\nflag = \n");
        assert!(e.starts_with("/etc/x.toml:2: "), "{e}");
    }

    #[test]
    fn a_missing_default_file_is_fine_a_missing_chosen_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        assert!(load::<Sample>(&p, false).unwrap().is_none());
        let e = load::<Sample>(&p, true).unwrap_err().to_string();
        assert!(e.contains("none.toml") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn values_checked_later_are_located_too() {
        let text = "flag = true\nlisten = \"nowhere\"\n";
        #[derive(Deserialize)]
        struct S {
            #[allow(dead_code)]
            flag: bool,
            listen: toml::Spanned<String>,
        }
        let f = parse::<S>(Path::new("c.toml"), text.into()).unwrap();
        let e = f.values.listen.span();
        let msg = f
            .bad_value("listen", e, "expected an IP address and port")
            .to_string();
        assert_eq!(msg, "c.toml:2: `listen`: expected an IP address and port");
    }
}
