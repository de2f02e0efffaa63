//! OpenSSH's `%` tokens in path options (`IdentityFile %d/id_%r`), which
//! `ssh -G` prints unexpanded.

use crate::paths::{current_user, home_dir};

use super::HostConfig;

/// Values for OpenSSH `%` tokens in path options.
pub struct TokenContext {
    /// `%d`: local home directory.
    home: String,
    /// `%h`: remote host name.
    host: String,
    /// `%n`: destination as given.
    original_host: String,
    /// `%p`: remote port.
    port: String,
    /// `%r`: remote user.
    remote_user: String,
    /// `%u`: local user.
    local_user: String,
}

impl TokenContext {
    /// Builds the token values from a resolved config.
    pub fn new(original_host: &str, cfg: &HostConfig) -> Self {
        let local_user = current_user();
        Self {
            home: home_dir()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            host: cfg
                .hostname
                .clone()
                .unwrap_or_else(|| original_host.to_lowercase()),
            original_host: original_host.to_string(),
            port: cfg.port.unwrap_or(22).to_string(),
            remote_user: cfg.user.clone().unwrap_or_else(|| local_user.clone()),
            local_user,
        }
    }

    /// Expands %d %h %i %L %l %n %p %r %u %%; unknown tokens are kept as-is.
    pub fn expand(&self, v: &str) -> String {
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(t) = chars.next() else {
                out.push('%');
                break;
            };
            match t {
                '%' => out.push('%'),
                'd' => out.push_str(&self.home),
                'h' => out.push_str(&self.host),
                'n' => out.push_str(&self.original_host),
                'p' => out.push_str(&self.port),
                'r' => out.push_str(&self.remote_user),
                'u' => out.push_str(&self.local_user),
                // SAFETY: getuid has no preconditions and cannot fail.
                'i' => out.push_str(&unsafe { libc::getuid() }.to_string()),
                'l' => out.push_str(&local_hostname()),
                'L' => out.push_str(local_hostname().split('.').next().unwrap_or("")),
                other => {
                    out.push('%');
                    out.push(other);
                }
            }
        }
        out
    }
}

/// The machine's host name, for `%l`.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success
    // when the name fits, and we stop at the first NUL or the buffer end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
