//! Upstream authentication: agent, then identity files, then password.
//!
//! Secrets are asked for once, on the terminal, and kept in memory only so
//! that reconnects never prompt again. They are wiped when dropped:
//! passwords and passphrases are held in [`Zeroizing`] strings, and
//! decrypted keys are ssh-key's `PrivateKey`, whose key material (Ed25519,
//! ECDSA, RSA, DSA) zeroizes itself on drop. No Debug output shows them.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client::{self, AuthResult};
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{MethodKind, MethodSet};
use zeroize::Zeroizing;

use super::UpstreamError;

/// A credential that has worked once and is reused on reconnect.
#[derive(Clone)]
enum Proven {
    /// A key held by the agent.
    Agent(PublicKey),
    /// A decrypted private key, in memory only (wiped on drop by ssh-key),
    /// and the file it came from.
    Key(Arc<PrivateKey>, PathBuf),
    /// A password typed once, wiped on drop.
    Password(Arc<Zeroizing<String>>),
}

/// Names the kind of credential and, for keys, the public fingerprint;
/// never a secret.
impl fmt::Debug for Proven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proven::Agent(k) => write!(f, "Agent({})", super::known_hosts::fingerprint(k)),
            Proven::Key(k, _) => write!(
                f,
                "Key({})",
                super::known_hosts::fingerprint(k.public_key())
            ),
            Proven::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

/// What one authentication has tried so far, for the error if all fail.
#[derive(Default)]
struct Attempts {
    /// Credentials offered, in order ("ssh-agent (2 keys)", key paths, "password").
    tried: Vec<String>,
    /// Encrypted keys we could not unlock (no prompting allowed or possible).
    skipped: Vec<String>,
    /// The methods the server said may continue, after the last failure.
    offered: Option<MethodSet>,
}

/// Authenticates upstream connections for one destination.
pub struct Authenticator {
    /// Upstream login name.
    user: String,
    /// Identity files to try after the agent.
    identities: Vec<PathBuf>,
    /// Whether the user named the identity files (missing ones are errors).
    identities_explicit: bool,
    /// Offer only agent keys that match the identity files.
    identities_only: bool,
    /// The agent socket, if any.
    agent: Option<PathBuf>,
    /// What worked last time; tried first, and alone when prompting is off.
    proven: Mutex<Option<Proven>>,
}

/// Shows the settings and the kind of proven credential, never a secret.
impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proven = self.proven.lock().map(|p| p.clone()).ok().flatten();
        f.debug_struct("Authenticator")
            .field("user", &self.user)
            .field("identities", &self.identities)
            .field("identities_explicit", &self.identities_explicit)
            .field("identities_only", &self.identities_only)
            .field("agent", &self.agent)
            .field("proven", &proven)
            .finish()
    }
}

impl Authenticator {
    /// An authenticator for one hop.
    pub fn new(h: &crate::config::spec::HostSpec) -> Self {
        Authenticator {
            user: h.user.clone(),
            identities: h.identities.clone(),
            identities_explicit: h.identities_explicit,
            identities_only: h.identities_only,
            agent: h.agent.clone(),
            proven: Mutex::new(None),
        }
    }

    /// Whether an agent key may be offered: with IdentitiesOnly, only keys
    /// whose `.pub` sits next to a configured identity file.
    fn agent_key_allowed(&self, key: &PublicKey) -> bool {
        !self.identities_only
            || self.identities.iter().any(|p| {
                let mut pubp = p.clone().into_os_string();
                pubp.push(".pub");
                russh::keys::load_public_key(PathBuf::from(pubp))
                    .is_ok_and(|k| k.key_data() == key.key_data())
            })
    }

    /// The login name used upstream.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The credential that authenticated the last successful
    /// [`authenticate`](Self::authenticate), as the SSH method name
    /// ("publickey" or "password") and what was used, for diagnostics
    /// (`sshshim check`): "ssh-agent key ssh-ed25519 SHA256:…", a key
    /// file's path, or "a typed password". Never the secret itself.
    pub fn proven_method(&self) -> Option<(&'static str, String)> {
        let proven = self.proven.lock().unwrap();
        Some(match proven.as_ref()? {
            Proven::Agent(key) => (
                "publickey",
                format!(
                    "ssh-agent key {} {}",
                    key.algorithm().as_str(),
                    super::known_hosts::fingerprint(key)
                ),
            ),
            Proven::Key(_, path) => ("publickey", path.display().to_string()),
            Proven::Password(_) => ("password", "a typed password".to_owned()),
        })
    }

    /// Runs authentication on a fresh connection. With `interactive` false
    /// (reconnects) only the credential proven earlier is used: no prompts.
    pub async fn authenticate<H: client::Handler>(
        &self,
        handle: &mut client::Handle<H>,
        interactive: bool,
    ) -> Result<(), UpstreamError> {
        let mut seen = Attempts::default();
        let proven = self.proven.lock().unwrap().clone();
        if let Some(p) = proven {
            match self.try_proven(handle, &p).await? {
                AuthResult::Success => return Ok(()),
                AuthResult::Failure {
                    remaining_methods, ..
                } => seen.offered = Some(remaining_methods),
            }
            if !interactive {
                // A connection that died during authentication (a reset,
                // or a failure naming no methods) rejected nothing: retry.
                if handle.is_closed() || seen.offered.as_ref().is_none_or(|m| m.is_empty()) {
                    return Err(UpstreamError::Other(
                        "the connection was lost during authentication".into(),
                    ));
                }
                return Err(UpstreamError::AuthRejected {
                    user: self.user.clone(),
                    offered: methods_text(seen.offered.as_ref()),
                    tried: "the credential that worked before".into(),
                });
            }
        }

        let rsa_hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        // The agent, then identity files, then a password.
        if self.try_agent(handle, rsa_hash, &mut seen).await
            || self
                .try_identities(handle, rsa_hash, interactive, &mut seen)
                .await?
            || self.try_password(handle, interactive, &mut seen).await?
        {
            return Ok(());
        }
        let Attempts {
            mut tried,
            skipped,
            offered,
        } = seen;
        tried.extend(skipped);
        Err(UpstreamError::AuthRejected {
            user: self.user.clone(),
            offered: methods_text(offered.as_ref()),
            tried: if tried.is_empty() {
                "nothing (no agent keys, no identity files)".into()
            } else {
                tried.join(", ")
            },
        })
    }

    /// Tries the agent's keys (those allowed by IdentitiesOnly); true when
    /// one was accepted.
    async fn try_agent<H: client::Handler>(
        &self,
        handle: &mut client::Handle<H>,
        rsa_hash: Option<HashAlg>,
        seen: &mut Attempts,
    ) -> bool {
        let Some(mut agent) = connect_agent_at(self.agent.as_deref()).await else {
            return false;
        };
        let mut ids = agent.request_identities().await.unwrap_or_default();
        ids.retain(|id| self.agent_key_allowed(&id.public_key()));
        if !ids.is_empty() {
            seen.tried.push(format!("ssh-agent ({} keys)", ids.len()));
        }
        for id in ids {
            let key = id.public_key().into_owned();
            let hash = if key.algorithm().is_rsa() {
                rsa_hash
            } else {
                None
            };
            match handle
                .authenticate_publickey_with(&self.user, key.clone(), hash, &mut agent)
                .await
            {
                Ok(AuthResult::Success) => {
                    *self.proven.lock().unwrap() = Some(Proven::Agent(key));
                    return true;
                }
                Ok(AuthResult::Failure {
                    remaining_methods, ..
                }) => seen.offered = Some(remaining_methods),
                Err(e) => tracing::debug!("agent signing failed: {e}"),
            }
        }
        false
    }

    /// Tries the identity files in order; true when one was accepted. A
    /// missing file is an error only when the user named it.
    async fn try_identities<H: client::Handler>(
        &self,
        handle: &mut client::Handle<H>,
        rsa_hash: Option<HashAlg>,
        interactive: bool,
        seen: &mut Attempts,
    ) -> Result<bool, UpstreamError> {
        for path in &self.identities {
            if !path.exists() {
                if self.identities_explicit {
                    return Err(UpstreamError::BadKey(path.clone(), "no such file".into()));
                }
                continue;
            }
            let key = match load_key(path, interactive)? {
                Some(k) => Arc::new(k),
                None => {
                    // Named in the error, so a rejection explains itself.
                    seen.skipped.push(format!(
                        "{} (passphrase-protected, not unlocked)",
                        path.display()
                    ));
                    continue;
                }
            };
            seen.tried.push(path.display().to_string());
            let hash = if key.algorithm().is_rsa() {
                rsa_hash
            } else {
                None
            };
            let res = handle
                .authenticate_publickey(&self.user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await?;
            match res {
                AuthResult::Success => {
                    *self.proven.lock().unwrap() = Some(Proven::Key(key, path.clone()));
                    return Ok(true);
                }
                AuthResult::Failure {
                    remaining_methods, ..
                } => seen.offered = Some(remaining_methods),
            }
        }
        Ok(false)
    }

    /// Asks for a password and tries it, when the server offers password
    /// authentication and we may prompt; true when it was accepted.
    async fn try_password<H: client::Handler>(
        &self,
        handle: &mut client::Handle<H>,
        interactive: bool,
        seen: &mut Attempts,
    ) -> Result<bool, UpstreamError> {
        let password_offered = seen
            .offered
            .as_ref()
            .is_none_or(|m| m.contains(&MethodKind::Password));
        if !(password_offered && interactive) {
            return Ok(false);
        }
        let Some(pw) = prompt(&format!("{}'s password: ", self.user))? else {
            if seen.tried.is_empty() {
                return Err(UpstreamError::NoTerminal(
                    "the server wants a password".into(),
                ));
            }
            return Ok(false);
        };
        seen.tried.push("password".into());
        // Shared with `proven` below without a copy of the text.
        let pw = Arc::new(pw);
        match handle
            .authenticate_password(&self.user, pw.as_str())
            .await?
        {
            AuthResult::Success => {
                *self.proven.lock().unwrap() = Some(Proven::Password(pw));
                Ok(true)
            }
            AuthResult::Failure {
                remaining_methods, ..
            } => {
                seen.offered = Some(remaining_methods);
                Ok(false)
            }
        }
    }

    /// Replays a credential that worked before.
    async fn try_proven<H: client::Handler>(
        &self,
        handle: &mut client::Handle<H>,
        p: &Proven,
    ) -> Result<AuthResult, UpstreamError> {
        let rsa_hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        Ok(match p {
            Proven::Agent(key) => {
                let Some(mut agent) = connect_agent_at(self.agent.as_deref()).await else {
                    return Err(UpstreamError::Other(
                        "the ssh-agent that authenticated us is gone".into(),
                    ));
                };
                let hash = if key.algorithm().is_rsa() {
                    rsa_hash
                } else {
                    None
                };
                handle
                    .authenticate_publickey_with(&self.user, key.clone(), hash, &mut agent)
                    .await
                    .map_err(|e| UpstreamError::Other(format!("ssh-agent: {e}")))?
            }
            Proven::Key(key, _) => {
                let hash = if key.algorithm().is_rsa() {
                    rsa_hash
                } else {
                    None
                };
                handle
                    .authenticate_publickey(
                        &self.user,
                        PrivateKeyWithHashAlg::new(key.clone(), hash),
                    )
                    .await?
            }
            Proven::Password(pw) => {
                handle
                    .authenticate_password(&self.user, pw.as_str())
                    .await?
            }
        })
    }
}

/// Connects to `$SSH_AUTH_SOCK`, if set and reachable.
pub async fn connect_agent() -> Option<AgentClient<tokio::net::UnixStream>> {
    let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty())?;
    connect_agent_at(Some(std::path::Path::new(&sock))).await
}

/// Connects to the agent at `sock`, if given and reachable.
async fn connect_agent_at(
    sock: Option<&std::path::Path>,
) -> Option<AgentClient<tokio::net::UnixStream>> {
    let sock = sock?;
    match AgentClient::connect_uds(sock).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::debug!("ssh-agent at {sock:?} unreachable: {e}");
            None
        }
    }
}

/// Loads a private key, asking for its passphrase on the terminal if needed.
/// `Ok(None)`: encrypted and we may not (or cannot) ask; skipped.
fn load_key(path: &PathBuf, interactive: bool) -> Result<Option<PrivateKey>, UpstreamError> {
    match read_secret_key(path, None) {
        Ok(k) => Ok(Some(k)),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            if !interactive {
                return Ok(None);
            }
            let Some(pass) = prompt(&format!("Enter passphrase for key '{}': ", path.display()))?
            else {
                tracing::warn!(
                    "{} is passphrase-protected and there is no terminal to ask on; skipped \
                     (add it to ssh-agent instead)",
                    path.display()
                );
                return Ok(None);
            };
            read_secret_key(path, Some(&pass)).map(Some).map_err(|e| {
                UpstreamError::BadKey(path.clone(), format!("{e} (wrong passphrase?)"))
            })
        }
        Err(e) => Err(UpstreamError::BadKey(path.clone(), e.to_string())),
    }
}

/// Reads and decodes a private key file. Unlike russh's `load_secret_key`,
/// the file's text (the plain key, when it is not encrypted) is wiped after
/// decoding.
fn read_secret_key(path: &PathBuf, pass: Option<&str>) -> Result<PrivateKey, russh::keys::Error> {
    let text = Zeroizing::new(std::fs::read_to_string(path)?);
    russh::keys::decode_secret_key(&text, pass)
}

/// Asks on the controlling terminal without echo; `Ok(None)` if there is
/// none. The answer is wiped from memory when dropped.
fn prompt(text: &str) -> Result<Option<Zeroizing<String>>, UpstreamError> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_err()
    {
        return Ok(None);
    }
    // rpassword reads into its own zeroizing buffer and hands over this
    // String without a copy; wrapping it at once leaves none behind.
    rpassword::prompt_password(text)
        .map(|p| Some(Zeroizing::new(p)))
        .map_err(|e| UpstreamError::Other(format!("reading from the terminal: {e}")))
}

/// "publickey,password" for an error message.
fn methods_text(m: Option<&MethodSet>) -> String {
    match m {
        None => "unknown".into(),
        Some(m) if m.is_empty() => "none".into(),
        Some(m) => m.iter().map(<&str>::from).collect::<Vec<_>>().join(","),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authenticator for `user` with nothing configured.
    fn authenticator(user: &str) -> Authenticator {
        Authenticator::new(&crate::config::spec::HostSpec {
            host: "h".into(),
            port: 22,
            user: user.into(),
            identities: vec![PathBuf::from("/k/id_ed25519")],
            identities_explicit: false,
            identities_only: false,
            agent: None,
            known_hosts: PathBuf::from("/k/known_hosts"),
            global_known_hosts: Vec::new(),
            accept_new: false,
        })
    }

    #[test]
    fn debug_never_shows_a_password() {
        let a = authenticator("alice");
        let secret = "correct horse battery staple";
        *a.proven.lock().unwrap() = Some(Proven::Password(Arc::new(Zeroizing::new(
            secret.to_string(),
        ))));
        let shown = format!("{a:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains("horse"), "{shown}");
        assert!(shown.contains("alice") && shown.contains("Password(<redacted>)"));
        let pretty = format!("{a:#?}");
        assert!(!pretty.contains("horse"), "{pretty}");
    }

    #[test]
    fn debug_never_shows_a_private_key() {
        let a = authenticator("alice");
        let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
        let pem = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap();
        let body: String = pem.lines().nth(1).unwrap().to_string();
        let secret = key.key_data().ed25519().unwrap().private.to_bytes();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let fp = super::super::known_hosts::fingerprint(key.public_key());
        *a.proven.lock().unwrap() = Some(Proven::Key(Arc::new(key), PathBuf::from("/k")));
        let shown = format!("{a:#?}");
        assert!(shown.contains(&format!("Key({fp})")), "{shown}");
        assert!(!shown.contains(&body), "{shown}");
        assert!(!shown.to_lowercase().contains(&hex), "{shown}");
        assert!(!shown.contains(&format!("{:?}", &secret[..8])), "{shown}");
    }
}
