//! Bearer tokens that can be rotated under a running cluster.
//!
//! A server accepts a *set* of tokens and a client sends one. Both come from
//! a flag (one fixed token) or from a token file, read again every second so
//! that a rotation needs no restart.
//!
//! # The token file
//!
//! One token per line, the one to send first; every line is accepted.
//! Whitespace around a line and blank lines are ignored. A token is 1..=1024
//! visible ASCII characters (it goes into an `Authorization` header). A file
//! that cannot be read, holds no token or holds a malformed one leaves the
//! tokens last loaded in use (and is logged once per change).
//!
//! # Rotation from `A` to `B`
//!
//! Whoever rotates (`kvctl rotate-token`) writes the file three times, and
//! each time waits until every node reports the new file's
//! [`fingerprints`](Tokens::fingerprints) (in its `/v1/cluster` report):
//!
//! 1. `B\nA` would make a node that reloaded first send `B` to a peer that
//!    still knows only `A`, so the first step is `A\nB`: every node accepts
//!    `B` and still sends `A`;
//! 2. `B\nA`: every node sends `B` and still accepts `A` (clients move to
//!    `B` now);
//! 3. `B`: `A` is refused from here on.
//!
//! No request fails at any step, and the overlap (both accepted) lasts from
//! step 1 until every node has reloaded step 3: two reload periods plus the
//! time the rotator gives clients to move.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use subtle::ConstantTimeEq;

/// How often a token file is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The longest token file we read (a few tokens, with room to spare).
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The longest token.
const MAX_TOKEN_BYTES: usize = 1024;

/// Why tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {what} file {path} is over {MAX_FILE_BYTES} bytes")]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("{what}: {problem}")]
    Invalid {
        what: &'static str,
        problem: &'static str,
    },
}

/// Parses a token file's text: the tokens, the one to send first.
pub fn parse(what: &'static str, text: &str) -> Result<Vec<String>, TokenError> {
    let invalid = |problem| TokenError::Invalid { what, problem };
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(invalid("no token (the file or flag is empty)"));
    }
    for t in &tokens {
        if t.len() > MAX_TOKEN_BYTES {
            return Err(invalid("a token is over 1024 bytes"));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "a token holds a character other than visible ASCII",
            ));
        }
    }
    Ok(tokens)
}

/// The file's text, as [`parse`] wants it.
pub fn format(tokens: &[&str]) -> String {
    let mut s = tokens.join("\n");
    s.push('\n');
    s
}

/// A short fingerprint of a token: the first 8 hex digits of its SHA-256.
/// Enough to tell which token a node holds; says nothing useful about it.
pub fn fingerprint(token: &str) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The [`fingerprint`] of each token, in order.
pub fn fingerprints<T: AsRef<str>>(tokens: &[T]) -> Vec<String> {
    tokens.iter().map(|t| fingerprint(t.as_ref())).collect()
}

/// Reads a token file once.
pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<String>, TokenError> {
    parse(what, &read_text(what, path)?)
}

/// The tokens a server accepts and a client sends; cheap to clone (the
/// clones share them), and when read from a file, reloaded from it every
/// [`RELOAD_EVERY`] for as long as a clone lives.
#[derive(Clone)]
pub struct Tokens {
    inner: Arc<Inner>,
}

struct Inner {
    what: &'static str,
    file: Option<PathBuf>,
    state: RwLock<State>,
}

struct State {
    tokens: Arc<Vec<String>>,
    /// The file's text last seen, loaded or not: a bad file is logged once.
    seen: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Tokens")
            .field("what", &self.inner.what)
            .field("file", &self.inner.file)
            .field("fingerprints", &self.fingerprints())
            .finish()
    }
}

impl Tokens {
    /// One token that never changes (a flag, an environment variable).
    pub fn fixed(what: &'static str, token: &str) -> Result<Tokens, TokenError> {
        let tokens = parse(what, token)?;
        if tokens.len() != 1 {
            return Err(TokenError::Invalid {
                what,
                problem: "one token expected, not several lines",
            });
        }
        Ok(Tokens::new(what, None, tokens, None))
    }

    /// The tokens of a file, read now (an error if it does not load) and
    /// again every [`RELOAD_EVERY`] by a thread that ends with the last clone.
    pub fn watch(what: &'static str, path: &Path) -> Result<Tokens, TokenError> {
        let text = read_text(what, path)?;
        let tokens = parse(what, &text)?;
        let t = Tokens::new(what, Some(path.to_path_buf()), tokens, Some(text));
        let weak = Arc::downgrade(&t.inner);
        std::thread::Builder::new()
            .name(format!("reload {what}"))
            .spawn(move || reload_loop(weak))
            .map_err(|source| TokenError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })?;
        Ok(t)
    }

    fn new(
        what: &'static str,
        file: Option<PathBuf>,
        tokens: Vec<String>,
        seen: Option<String>,
    ) -> Tokens {
        Tokens {
            inner: Arc::new(Inner {
                what,
                file,
                state: RwLock::new(State {
                    tokens: Arc::new(tokens),
                    seen,
                }),
            }),
        }
    }

    fn tokens(&self) -> Arc<Vec<String>> {
        let st = self.inner.state.read().unwrap_or_else(|p| p.into_inner());
        st.tokens.clone()
    }

    /// The token to send (the file's first line).
    pub fn current(&self) -> String {
        // parse() never yields an empty list.
        self.tokens().first().cloned().unwrap_or_default()
    }

    /// Whether `given` is one of the tokens, compared in constant time
    /// (every token is compared, whichever matches).
    pub fn accepts(&self, given: &[u8]) -> bool {
        let tokens = self.tokens();
        let mut ok = subtle::Choice::from(0);
        for t in tokens.iter() {
            ok |= given.ct_eq(t.as_bytes());
        }
        bool::from(ok)
    }

    /// The [`fingerprint`] of every token, in the file's order.
    pub fn fingerprints(&self) -> Vec<String> {
        fingerprints(self.tokens().as_slice())
    }

    /// The file the tokens come from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// Reads the file again now if it changed; what the reload thread does.
    pub fn reload(&self) {
        self.inner.reload();
    }
}

impl Inner {
    fn reload(&self) {
        let Some(path) = &self.file else { return };
        let text = match read_text(self.what, path) {
            Ok(t) => t,
            Err(e) => {
                let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                if st.seen.is_some() {
                    tracing::warn!(what = self.what, error = %e, "the token file does not load; keeping the tokens last loaded");
                    st.seen = None;
                }
                return;
            }
        };
        {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            if st.seen.as_deref() == Some(text.as_str()) {
                return;
            }
        }
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        match parse(self.what, &text) {
            Ok(tokens) => {
                tracing::info!(what = self.what, file = %path.display(), fingerprints = ?fingerprints(&tokens), "token file changed; reloaded");
                st.tokens = Arc::new(tokens);
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "the token file changed but does not load; keeping the tokens last loaded");
            }
        }
        st.seen = Some(text);
    }
}

fn read_text(what: &'static str, path: &Path) -> Result<String, TokenError> {
    let io = |source| TokenError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(TokenError::TooLarge {
            what,
            path: path.to_path_buf(),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

fn reload_loop(weak: Weak<Inner>) {
    loop {
        std::thread::sleep(RELOAD_EVERY);
        let Some(inner) = weak.upgrade() else { return };
        inner.reload();
    }
}

/// What a bearer check compares the given token with: one token, or a
/// rotating set.
pub trait Credential {
    fn accepts(&self, given: &[u8]) -> bool;
}

impl Credential for str {
    fn accepts(&self, given: &[u8]) -> bool {
        bool::from(given.ct_eq(self.as_bytes()))
    }
}

impl Credential for String {
    fn accepts(&self, given: &[u8]) -> bool {
        self.as_str().accepts(given)
    }
}

impl Credential for Tokens {
    fn accepts(&self, given: &[u8]) -> bool {
        Tokens::accepts(self, given)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_lists_tokens_to_send_first_and_all_are_accepted() {
        assert_eq!(parse("t", " new \n\nold\n").unwrap(), ["new", "old"]);
        assert!(parse("t", "\n \n").is_err());
        assert!(parse("t", "has space").is_err());
        assert!(parse("t", "tab\there").is_err());
        assert!(parse("t", &"x".repeat(1025)).is_err());
        assert_eq!(parse("t", &format(&["a", "b"])).unwrap(), ["a", "b"]);
        assert!(Tokens::fixed("t", "a\nb").is_err());
    }

    #[test]
    fn fingerprints_are_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint("abc"), "ba7816bf");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_last_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "a\n").unwrap();
        let t = Tokens::watch("t", &f).unwrap();
        assert!(t.accepts(b"a") && !t.accepts(b"b"));
        std::fs::write(&f, "a\nb\n").unwrap();
        t.reload();
        assert!(t.accepts(b"a") && t.accepts(b"b"));
        assert_eq!(t.current(), "a");
        std::fs::write(&f, "b\n").unwrap();
        t.reload();
        assert!(!t.accepts(b"a") && t.accepts(b"b"));
        assert_eq!(t.fingerprints(), [fingerprint("b")]);
        for bad in ["", "two words\n"] {
            std::fs::write(&f, bad).unwrap();
            t.reload();
            assert_eq!(t.current(), "b", "after {bad:?}");
        }
        std::fs::remove_file(&f).unwrap();
        t.reload();
        assert_eq!(t.current(), "b", "after the file is gone");
        std::fs::write(&f, "c\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while t.current() != "c" {
            assert!(std::time::Instant::now() < deadline, "the thread reloads");
            std::thread::sleep(Duration::from_millis(50));
        }
        let debug = format!("{:?}", Tokens::fixed("t", "secret-token").unwrap());
        assert!(!debug.contains("secret-token"), "{debug}");
    }
}
