//! Bearer tokens of the HTTP API: roles, the tokens file format, minting, and the check of a
//! presented token. Only SHA-256 hashes of tokens are ever stored or configured; a presented
//! token is hashed and compared with every configured hash in constant time. Knows nothing of
//! HTTP (see `http::access`) or of where the entries come from (see `settings`).
//!
//! A tokens file holds one entry a line, `NAME:ROLE:sha256:HEX`, with `#` comments and blank
//! lines ignored; `segmenter token new` prints such a line. The same entries can be given in the
//! config (`http.tokens`) or the environment (`SEGMENTER__HTTP__TOKENS`, comma-separated).

use std::fmt;

use sha2::{Digest, Sha256};

/// What a token may do. `Admin` implies `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reading routes: segments, members, customers, explain, preview.
    Read,
    /// Erasure and every other route that changes something.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// Whether a token with this role may use a route that needs `needed`.
    pub fn grants(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured token: its name (for logs), role and the SHA-256 of the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    pub hash: [u8; 32],
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not secret, but it has no business in debug output either.
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl TokenEntry {
    /// Parses `NAME:ROLE:sha256:HEX`; the error says what is wrong in plain words.
    pub fn parse(line: &str) -> Result<TokenEntry, String> {
        let mut parts = line.trim().splitn(4, ':');
        let (Some(name), Some(role_text), Some(algorithm), Some(hex)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(
                "expected NAME:ROLE:sha256:HEX (the line `segmenter token new` prints)".into(),
            );
        };
        if !valid_name(name) {
            return Err(format!(
                "token name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
            ));
        }
        let role = Role::parse(role_text).ok_or_else(|| {
            format!("token {name:?}: role {role_text:?} is not \"read\" or \"admin\"")
        })?;
        if algorithm != "sha256" {
            return Err(format!(
                "token {name:?}: hash {algorithm:?} is not supported (use sha256)"
            ));
        }
        let hash = decode_hex32(hex).ok_or_else(|| {
            format!("token {name:?}: the hash must be 64 hex digits (SHA-256), not a token")
        })?;
        Ok(TokenEntry {
            name: name.to_string(),
            role,
            hash,
        })
    }

    /// The `NAME:ROLE:sha256:HEX` line of this entry.
    pub fn line(&self) -> String {
        format!(
            "{}:{}:sha256:{}",
            self.name,
            self.role,
            encode_hex(&self.hash)
        )
    }
}

/// Whether `name` is a usable token name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parses a tokens file: every bad line reported as `(line number, reason)`.
pub fn parse_file(text: &str) -> Result<Vec<TokenEntry>, Vec<(usize, String)>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (idx, line) in text.lines().enumerate() {
        let content = line.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        match TokenEntry::parse(content) {
            Ok(entry) => entries.push(entry),
            Err(reason) => errors.push((idx + 1, reason)),
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

/// The configured tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

/// The caller a presented token identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Tokens {
    pub fn new(entries: Vec<TokenEntry>) -> Tokens {
        Tokens { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// The caller `token` identifies, if any. Every entry is compared, each in constant time,
    /// so the time taken does not tell which entry (or how much of a hash) matched.
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let presented = sha256(token);
        let mut found = None;
        for entry in &self.entries {
            if constant_time_eq(&presented, &entry.hash) && found.is_none() {
                found = Some(Caller {
                    name: entry.name.clone(),
                    role: entry.role,
                });
            }
        }
        found
    }
}

/// The SHA-256 of a token's UTF-8 text.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two hashes without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// Prefix of every minted token, so a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "sgt_";

/// A new token (`sgt_` + 32 random bytes from the OS, hex) and its entry.
pub fn mint(name: &str, role: Role) -> Result<(String, TokenEntry), String> {
    if !valid_name(name) {
        return Err(format!(
            "token name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        ));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|error| format!("no randomness from the OS: {error}"))?;
    let token = format!("{TOKEN_PREFIX}{}", encode_hex(&secret));
    let entry = TokenEntry {
        name: name.to_string(),
        role,
        hash: sha256(&token),
    };
    Ok((token, entry))
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_against_its_line_and_nothing_else() {
        let (token, entry) = mint("ops", Role::Admin).expect("mint");
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        let line = entry.line();
        assert!(line.starts_with("ops:admin:sha256:"), "{line}");
        assert!(
            !line.contains(&token[TOKEN_PREFIX.len()..]),
            "the line holds the token"
        );
        let tokens = Tokens::new(vec![TokenEntry::parse(&line).expect("parses")]);
        let caller = tokens.verify(&token).expect("verifies");
        assert_eq!((caller.name.as_str(), caller.role), ("ops", Role::Admin));
        assert_eq!(tokens.verify(&format!("{token}x")), None);
        assert_eq!(tokens.verify(""), None);
        let (other, _) = mint("ops", Role::Admin).expect("mint");
        assert_ne!(token, other, "two mints give two tokens");
        assert_eq!(tokens.verify(&other), None);
    }

    #[test]
    fn admin_implies_read_but_not_the_reverse() {
        assert!(Role::Admin.grants(Role::Read));
        assert!(Role::Admin.grants(Role::Admin));
        assert!(Role::Read.grants(Role::Read));
        assert!(!Role::Read.grants(Role::Admin));
    }

    #[test]
    fn a_file_reports_every_bad_line_with_its_number() {
        let (_, good) = mint("ci", Role::Read).expect("mint");
        let text = format!(
            "# comment\n\n{}\nops:root:sha256:{}\nnot a line\nx:read:md5:00\n{}:read:sha256:{}\n",
            good.line(),
            "0".repeat(64),
            "bad name",
            "0".repeat(64)
        );
        let errors = parse_file(&text).expect_err("bad lines");
        let lines: Vec<usize> = errors.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, vec![4, 5, 6, 7], "{errors:?}");
        assert!(errors[0].1.contains("\"root\""), "{errors:?}");
        assert_eq!(
            parse_file(&format!("{}\n", good.line())).map(|e| e.len()),
            Ok(1)
        );
    }

    #[test]
    fn a_token_pasted_where_the_hash_belongs_is_refused() {
        let (token, _) = mint("ops", Role::Read).expect("mint");
        let error = TokenEntry::parse(&format!("ops:read:sha256:{token}")).expect_err("refused");
        assert!(error.contains("64 hex digits"), "{error}");
    }

    #[test]
    fn debug_output_shows_no_hash() {
        let (_, entry) = mint("ops", Role::Read).expect("mint");
        let debug = format!("{entry:?}");
        assert!(!debug.contains(&encode_hex(&entry.hash)), "{debug}");
    }
}
