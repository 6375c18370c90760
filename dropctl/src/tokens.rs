//! The signing secrets dropctl mints tokens with: from the flags or the
//! environment, or else from the local stack's generated secrets file, and
//! checked as the ingress checks them.

use std::path::{Path, PathBuf};

use clap::Args;
use dropline::auth::{Audience, TokenKeys, Tokens};
use dropline::config::{ConfigError, Problems};
use dropline::secrets::{self, Secret};

/// Where `scripts/stack.sh up` keeps the secrets it generated.
pub const LOCAL_SECRETS_FILE: &str = ".dropline/secrets.env";

const JWT_SECRET: &str = "DROPLINE_JWT_SECRET";
const ADMIN_JWT_SECRET: &str = "DROPLINE_ADMIN_JWT_SECRET";

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Buyers' signing secret [default: from --secrets-file].
    #[arg(long, env = JWT_SECRET, hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Admins' signing secret [default: from --secrets-file].
    #[arg(long, env = ADMIN_JWT_SECRET, hide_env_values = true)]
    pub admin_jwt_secret: Option<Secret>,
    /// The issuer the ingress expects (its DROPLINE_JWT_ISSUER).
    #[arg(long, env = "DROPLINE_JWT_ISSUER", default_value = dropline::auth::DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// `KEY=value` lines to take a secret from when it is not set above:
    /// the local stack's generated secrets.
    #[arg(long, env = "DROPLINE_SECRETS_FILE", default_value = LOCAL_SECRETS_FILE)]
    pub secrets_file: PathBuf,
}

impl TokenArgs {
    /// The keys of one audience, its secret checked.
    pub fn keys(&self, audience: Audience) -> Result<TokenKeys, ConfigError> {
        let name = match audience {
            Audience::Buyer => JWT_SECRET,
            Audience::Admin => ADMIN_JWT_SECRET,
        };
        let mut p = Problems::default();
        let secret = self.secret(name, &mut p);
        p.into_result()?;
        Ok(TokenKeys::new(secrets::exposed(&secret), &self.jwt_issuer, audience))
    }

    /// Both kinds of keys, every problem with either reported at once.
    pub fn tokens(&self) -> Result<Tokens, ConfigError> {
        let mut p = Problems::default();
        let buyer = self.secret(JWT_SECRET, &mut p);
        let admin = self.secret(ADMIN_JWT_SECRET, &mut p);
        p.into_result()?;
        Ok(Tokens::new(secrets::exposed(&buyer), secrets::exposed(&admin), &self.jwt_issuer))
    }

    fn secret(&self, name: &str, problems: &mut Problems) -> Option<Secret> {
        let given = if name == JWT_SECRET { &self.jwt_secret } else { &self.admin_jwt_secret };
        let given = given.clone().filter(|s| !s.expose().is_empty());
        let value = given.or_else(|| read_from(&self.secrets_file, name).filter(|v| !v.is_empty()).map(Secret::new));
        if value.is_none() {
            problems.add(format!(
                "{name} is not set, nor in {} (`scripts/stack.sh up` generates it there)",
                self.secrets_file.display()
            ));
        } else {
            secrets::check_setting(name, &value, problems);
        }
        value
    }
}

/// The value of `name` in a file of `KEY=value` lines (shell-compatible,
/// unquoted), if the file and the line exist.
fn read_from(path: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .find(|(k, _)| k.trim_start_matches("export ").trim() == name)
        .map(|(_, v)| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tokens: TokenArgs,
    }

    fn parse(args: &[String]) -> TokenArgs {
        // Only what the test passes: not the environment of whoever runs it.
        let fixed = ["dropctl".to_owned(), "--jwt-issuer=dropline".to_owned()];
        Cli::parse_from(fixed.into_iter().chain(args.iter().cloned())).tokens
    }

    #[test]
    fn secrets_come_from_the_file_when_not_given() {
        let (buyer, admin) = (dropline::secrets::random(), dropline::secrets::random());
        let dir = std::env::temp_dir().join(format!("dropctl-tokens-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets.env");
        std::fs::write(&file, format!("# generated\nDROPLINE_JWT_SECRET={buyer}\nDROPLINE_ADMIN_JWT_SECRET={admin}\n"))
            .unwrap();
        let args = parse(&[
            format!("--secrets-file={}", file.display()),
            format!("--jwt-secret={buyer}"),
            format!("--admin-jwt-secret={}", ""),
        ]);
        let tokens = args.tokens().unwrap();
        let expected = Tokens::new(buyer.as_bytes(), admin.as_bytes(), "dropline");
        assert!(expected.admin.verify(&tokens.admin.mint("ops", 60).unwrap()).is_ok());
        assert!(expected.buyer.verify(&args.keys(Audience::Buyer).unwrap().mint("alice", 60).unwrap()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_and_published_secrets_are_refused_together() {
        let args = parse(&[
            "--secrets-file=/nonexistent/secrets.env".to_owned(),
            "--jwt-secret=dropline-local-jwt-secret".to_owned(),
            "--admin-jwt-secret=".to_owned(),
        ]);
        let e = args.tokens().err().unwrap().0;
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("DROPLINE_JWT_SECRET is a value published"), "{e:?}");
        assert!(e[1].starts_with("DROPLINE_ADMIN_JWT_SECRET is not set, nor in /nonexistent/secrets.env"), "{e:?}");
    }

    #[test]
    fn an_empty_line_in_the_file_is_not_a_secret() {
        let dir = std::env::temp_dir().join(format!("dropctl-tokens-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets.env");
        std::fs::write(&file, "DROPLINE_ADMIN_JWT_SECRET=\n").unwrap();
        let args = parse(&[format!("--secrets-file={}", file.display()), "--admin-jwt-secret=".to_owned()]);
        let e = args.keys(Audience::Admin).err().unwrap().0;
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("DROPLINE_ADMIN_JWT_SECRET is not set, nor in"), "{e:?}");
    }
}
