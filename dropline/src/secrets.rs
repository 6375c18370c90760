//! The checks every process runs on its secrets before it starts.
//!
//! A secret that was ever written in this repository (an old default, a
//! test value, a manifest's placeholder) is public: whoever read it can
//! mint admin tokens or forge payment webhooks. So is anything short or
//! obviously not random. [`check`] refuses all of them; [`PUBLISHED`] is the
//! one list of the values the repository has published, and a test keeps it
//! complete by scanning the README, the manifests and the scripts.

use crate::config::Problems;

/// A secret setting: a signing key. Its value shows nowhere by accident:
/// `Debug` and the effective-config log say only whether it is set, and
/// clap keeps it out of `--help` (`hide_env_values`). A setting is an
/// `Option<Secret>`, `None` when not given, so [`check_setting`] can say so
/// together with every other problem.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for signing and verifying only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The bytes of a secret setting: empty when it is not set, which
/// [`check_setting`] refuses before anything is signed.
pub fn exposed(setting: &Option<Secret>) -> &[u8] {
    setting.as_ref().map_or(&[], Secret::expose)
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(empty)" } else { "Secret(***)" })
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// Shortest secret accepted: 32 bytes, the HMAC-SHA256 output size.
pub const MIN_SECRET_BYTES: usize = 32;

/// Every secret value this repository has published, now or in its history.
/// None of them may ever sign anything real.
pub const PUBLISHED: &[&str] = &[
    // The ingress', paysim's and dropctl's former built-in defaults.
    "dropline-local-jwt-secret",
    "dropline-local-webhook-secret",
    // The integration tests' former constants.
    "test-jwt-secret-0123456789",
    "test-webhook-secret-0123456789",
    "some-other-secret-entirely",
    "wrong-secret-wrong-secret",
    // The k8s Secret's former and current placeholders.
    "change-me-to-at-least-32-random-bytes",
    "change-me-to-the-provider-signing-secret",
    "REPLACE-with-openssl-rand-hex-32-buyer-jwt",
    "REPLACE-with-openssl-rand-hex-32-admin-jwt",
    "REPLACE-with-the-payment-providers-webhook-secret",
    "REPLACE-with-openssl-rand-hex-32-notify",
    // Random-looking constants that tests once took for valid secrets.
    "9f2c4e7a1b3d5f60817a2c4e6b8d0f1325a7c9e1b3d5f7092a4c6e8b0d2f4a6c",
    "q8J3xZ0vTb6LwYp2Rk9NcHf5Ud1Ae7Gs",
    "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f91",
    "5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d",
    "6b1d3f5a7c9e0b2d4f6a8c1e3b5d7f9a0c2e4b6d8f1a3c5e7b9d0f2a4c6e8b1d",
    "d2c4e6f8a0b1c3d5e7f9a2b4c6d8e0f1a3b5c7d9e2f4a6b8c0d1e3f5a7b9c2d4",
    "3c9a1f0e7b2d4c6a8e0f1b3d5c7a9e2f4b6d8c0a1e3f5b7d9c2a4e6f8b0d1c3e",
];

/// A fresh secret: 244 bits from the OS's generator (two UUIDv4s), as 64
/// hex characters. Tests take theirs from here, never from a constant: a
/// constant in the source is published.
pub fn random() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Fragments that mark a value someone forgot to replace.
const PLACEHOLDER_MARKS: &[&str] =
    &["changeme", "change-me", "change_me", "replace", "placeholder", "secret", "password", "example", "xxx"];

/// Why a secret is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretProblem {
    #[error("is not set")]
    Missing,
    #[error("is a value published in Dropline's repository; generate a new one (openssl rand -hex 32)")]
    Published,
    #[error("looks like a placeholder; set a random value (openssl rand -hex 32)")]
    Placeholder,
    #[error("is shorter than {MIN_SECRET_BYTES} bytes")]
    TooShort,
}

/// Whether `value` may serve as a signing secret.
pub fn check(value: &str) -> Result<(), SecretProblem> {
    if value.is_empty() {
        return Err(SecretProblem::Missing);
    }
    if PUBLISHED.iter().any(|p| p.eq_ignore_ascii_case(value.trim())) {
        return Err(SecretProblem::Published);
    }
    if is_placeholder(value) {
        return Err(SecretProblem::Placeholder);
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(SecretProblem::TooShort);
    }
    Ok(())
}

/// Checks the secret of setting `name`, adding what is wrong to `problems`.
pub fn check_setting(name: &str, setting: &Option<Secret>, problems: &mut Problems) {
    let value = setting.as_ref().map_or("", |s| s.0.as_str());
    if let Err(e) = check(value) {
        problems.add(format!("{name} {e}"));
    }
}

fn is_placeholder(value: &str) -> bool {
    let lower = value.trim().to_ascii_lowercase();
    let mut distinct = [false; 256];
    for b in lower.bytes() {
        distinct[usize::from(b)] = true;
    }
    let distinct = distinct.iter().filter(|d| **d).count();
    PLACEHOLDER_MARKS.iter().any(|m| lower.contains(m))
        || (lower.starts_with('<') && lower.ends_with('>'))
        || lower.starts_with("${")
        // One character repeated, or a short pattern like "abab…": random
        // bytes in hex or base64 use far more than 4 distinct characters.
        || distinct <= 4
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn a_random_secret_passes() {
        assert_eq!(check(&random()), Ok(()));
        assert_ne!(random(), random());
    }

    #[test]
    fn published_short_and_placeholder_secrets_are_refused() {
        assert_eq!(check(""), Err(SecretProblem::Missing));
        for published in PUBLISHED {
            assert_eq!(check(published), Err(SecretProblem::Published), "{published}");
        }
        assert_eq!(check("DROPLINE-LOCAL-JWT-SECRET"), Err(SecretProblem::Published));
        assert_eq!(check(&random()[..31]), Err(SecretProblem::TooShort));
        for placeholder in [
            "changeme-changeme-changeme-changeme",
            "please-change-me-before-you-deploy-this",
            "my-very-long-jwt-secret-for-production-use",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "<paste-a-random-value-of-32-bytes-here>",
            "REPLACE_ME_WITH_32_RANDOM_BYTES_PLEASE_NOW",
            "${DROPLINE_JWT_SECRET_FROM_THE_VAULT_PLZ}",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "abababababababababababababababababababab",
            "0000000000000000000000000000000000000000",
        ] {
            assert_eq!(check(placeholder), Err(SecretProblem::Placeholder), "{placeholder}");
        }
    }

    #[test]
    fn a_secret_shows_nowhere_by_accident() {
        let value = random();
        let secret = Secret::new(value.clone());
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(serde_json::to_string(&Some(secret.clone())).unwrap(), "\"***\"");
        assert_eq!(serde_json::to_string(&None::<Secret>).unwrap(), "null");
        assert_eq!(serde_json::to_string(&Secret::new("")).unwrap(), "\"\"");
        assert_eq!(format!("{:?}", Secret::new("")), "Secret(empty)");
        assert_eq!(exposed(&Some(secret)), value.as_bytes());
        assert_eq!(exposed(&None), b"");
    }

    #[test]
    fn the_problem_names_the_setting() {
        let mut p = Problems::default();
        check_setting("DROPLINE_JWT_SECRET", &Some(Secret::new("dropline-local-jwt-secret")), &mut p);
        check_setting("DROPLINE_WEBHOOK_SECRET", &Some(Secret::new("short")), &mut p);
        check_setting("DROPLINE_ADMIN_JWT_SECRET", &Some(Secret::new(random())), &mut p);
        check_setting("DROPLINE_OTHER_SECRET", &None, &mut p);
        let message = p.into_result().unwrap_err().to_string();
        assert!(message.contains("DROPLINE_OTHER_SECRET is not set"), "{message}");
        assert!(message.contains("DROPLINE_JWT_SECRET is a value published"), "{message}");
        assert!(message.contains("DROPLINE_WEBHOOK_SECRET is shorter than 32 bytes"), "{message}");
        assert!(!message.contains("DROPLINE_ADMIN_JWT_SECRET"), "{message}");
    }

    /// Every secret-looking value in the files a user reads or deploys from
    /// must be on [`PUBLISHED`], so a value added to the README, a manifest
    /// or a script is refused the day it is published.
    #[test]
    fn every_secret_the_repository_publishes_is_on_the_list() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("README.md"), root.join("Dockerfile")];
        for dir in ["k8s", "scripts", "loadtest", ".ci", "docs", "monitoring"] {
            collect(&root.join(dir), &mut files);
        }
        let mut scanned = 0;
        let mut missing = Vec::new();
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            scanned += 1;
            for value in secret_values(&text) {
                if !PUBLISHED.contains(&value.as_str()) {
                    missing.push(format!("{}: {value}", file.display()));
                }
            }
        }
        assert!(scanned >= 10, "the scan found only {scanned} files under {}", root.display());
        assert!(missing.is_empty(), "published secrets missing from secrets::PUBLISHED:\n{}", missing.join("\n"));
    }

    /// A string literal in the Rust source that would pass as a secret
    /// (32 or more letters and digits, both) is published the moment it is
    /// committed: it must be on [`PUBLISHED`], so no test or example can
    /// hand one out as valid.
    #[test]
    fn every_random_looking_literal_in_the_source_is_on_the_list() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        collect(&root, &mut files);
        let sources: Vec<&PathBuf> = files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")).collect();
        assert!(sources.len() >= 40, "the scan found only {} Rust files", sources.len());
        let mut missing = Vec::new();
        for file in sources {
            let Ok(text) = std::fs::read_to_string(file) else { continue };
            for literal in text.split('"').skip(1).step_by(2) {
                if random_looking(literal) && !PUBLISHED.contains(&literal) {
                    missing.push(format!("{}: {literal}", file.display()));
                }
            }
        }
        assert!(missing.is_empty(), "secret-like literals missing from secrets::PUBLISHED:\n{}", missing.join("\n"));
    }

    fn random_looking(literal: &str) -> bool {
        literal.len() >= MIN_SECRET_BYTES
            && literal.bytes().all(|b| b.is_ascii_alphanumeric())
            && literal.bytes().any(|b| b.is_ascii_digit())
            && literal.bytes().any(|b| b.is_ascii_alphabetic())
    }

    #[test]
    fn the_scan_finds_secrets_in_the_shapes_they_are_written() {
        let text = r#"
  DROPLINE_JWT_SECRET: "yaml-quoted-value-1"
  DROPLINE_WEBHOOK_SECRET: yaml-bare-value-2
export DROPLINE_ADMIN_JWT_SECRET=shell-value-3
dropctl token --jwt-secret=flag-value-4 --webhook-secret 'flag-value-5'
const SECRET = __ENV.DROPLINE_JWT_SECRET || 'js-default-6';
| `DROPLINE_JWT_SECRET` | `readme-table-value-7` |
DROPLINE_JWT_SECRET="$(random_hex)"
echo "DROPLINE_JWT_SECRET=$jwt" >"$STATE_DIR/secrets.env"
the secrets live in .dropline/secrets.env
# The local stack's signing secrets: generated once
"#;
        let found = secret_values(text);
        let expected: Vec<String> = [
            "yaml-quoted-value-1",
            "yaml-bare-value-2",
            "shell-value-3",
            "flag-value-4",
            "flag-value-5",
            "js-default-6",
            "readme-table-value-7",
        ]
        .map(String::from)
        .into();
        assert_eq!(found, expected);
    }

    fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            // k6's reports and builds are generated, not published; the
            // manifest validator's npm packages are installed, not ours;
            // hidden folders are git's and the local stack's state.
            let name = entry.file_name();
            let skipped = name == "reports"
                || name == "target"
                || name == "node_modules"
                || name.to_string_lossy().starts_with('.');
            if path.is_dir() && !skipped {
                collect(&path, files);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }

    /// A name as a YAML or JSON key is written (`DROPLINE_JWT_SECRET:`,
    /// `jwt_secret:`), not a word of prose before a colon ("secrets: ...").
    fn is_key(name: &str) -> bool {
        let name = name.trim_start_matches(['"', '\'']);
        name.contains('_') || name.chars().all(|c| c.is_ascii_uppercase())
    }

    /// Values given to a secret setting on one line: after a name with
    /// "secret" in it, then `=`, `:`, `||` (a default), a space (a flag's
    /// value) or a table's `|` (a backticked value); quoted or bare. Shell
    /// and template references and file names are not values.
    fn secret_values(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in text.lines() {
            let lower = line.to_ascii_lowercase();
            let mut from = 0;
            while let Some(at) = lower[from..].find("secret") {
                let name_start = lower[..from + at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                    .map_or(0, |i| i + 1);
                let end = from
                    + at
                    + lower[from + at..]
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                        .unwrap_or(lower.len() - from - at);
                from = end;
                let is_flag = line[name_start..].starts_with("--");
                let rest = line[end..].trim_start_matches(['"', '\'', '`']).trim_start();
                let (rest, backticked_only) = if let Some(r) = rest.strip_prefix("||") {
                    (r, false)
                } else if let Some(r) = rest.strip_prefix('|') {
                    (r, true)
                } else if let Some(r) = rest.strip_prefix('=') {
                    (r, false)
                } else if let Some(r) = rest.strip_prefix(':').filter(|_| is_key(&line[name_start..end])) {
                    (r, false)
                } else if is_flag && line[end..].starts_with(' ') {
                    (rest, false)
                } else {
                    continue;
                };
                let rest = rest.trim_start();
                if backticked_only && !rest.starts_with('`') {
                    continue;
                }
                let rest = rest.trim_start_matches(['"', '\'', '`']);
                let value: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || "-_.+/=~<>".contains(*c)).collect();
                let is_reference = value.starts_with("__ENV")
                    || value.contains(".env")
                    || value.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                if value.len() >= 8 && value.chars().any(|c| c.is_ascii_alphabetic()) && !is_reference {
                    out.push(value);
                }
            }
        }
        out
    }
}
