//! Temporary unlock tokens: verified offline with the CA, bound to one agent and one
//! device (its hash, or its serial with its vid:pid — never a serial alone), single
//! use, and only valid in their time window. An accepted token is kept in
//! `unlocks/active/` until it expires, so an agent restarted inside the window keeps
//! the unlock (it used to be lost).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use weilan_config::signing::{Role, Verifier};
use weilan_config::wire::{self, Purpose, SignedMessage, UnlockToken};

/// Checks signature (collector certificate of the Weilan CA), addressee and window.
pub fn verify(
    verifier: &Verifier,
    msg: &SignedMessage,
    agent_id: &str,
) -> Result<UnlockToken, String> {
    verifier
        .verify(msg, Purpose::Unlock, Role::Collector)
        .map_err(|e| format!("signature: {e}"))?;
    let token: UnlockToken = wire::decode("an unlock token", msg.body.as_bytes(), 64 * 1024)
        .map_err(|e| e.to_string())?;
    if token.agent_id != agent_id {
        return Err(format!(
            "token is for agent `{}`, this is `{agent_id}`",
            token.agent_id
        ));
    }
    if token.device_hash.is_none() && token.serial.is_none() {
        return Err("token names no device".into());
    }
    if token.device_hash.is_none() && token.vid_pid.is_none() {
        return Err(
            "a serial alone is not a device's identity (a clone with another vid:pid would be unlocked): the token must name its vid:pid or its hash".into(),
        );
    }
    if !matches!(token.mode.as_str(), "allow" | "read-only") {
        return Err(format!("mode `{}` is not allow or read-only", token.mode));
    }
    if token.not_after <= jiff::Timestamp::now() {
        return Err(format!("token expired at {}", token.not_after));
    }
    if token.not_after <= token.not_before {
        return Err("empty time window".into());
    }
    Ok(token)
}

/// Where the agent keeps tokens: `incoming/` (dropped by `weilan-agent unlock`) and
/// `used` (ids never accepted again).
#[derive(Debug, Clone)]
pub struct UnlockStore {
    pub dir: PathBuf,
}

impl UnlockStore {
    pub fn new(state_dir: &Path) -> Self {
        UnlockStore {
            dir: state_dir.join("unlocks"),
        }
    }

    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }

    /// Drops a verified token file for the running agent to pick up.
    pub fn drop_token(&self, msg: &SignedMessage, token_id: &str) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(self.incoming())?;
        let safe: String = token_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let path = self.incoming().join(format!("{safe}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(msg).map_err(std::io::Error::other)?,
        )?;
        Ok(path)
    }

    /// Takes every dropped token (the files are removed).
    pub fn take_incoming(&self) -> Vec<SignedMessage> {
        let Ok(entries) = std::fs::read_dir(self.incoming()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            match std::fs::read(&path)
                .ok()
                .and_then(|b| wire::decode_signed(&b, 64 * 1024).ok())
            {
                Some(m) => out.push(m),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable unlock token file discarded")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        out
    }

    fn active_dir(&self) -> PathBuf {
        self.dir.join("active")
    }

    fn active_path(&self, token_id: &str) -> PathBuf {
        let safe: String = token_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        self.active_dir().join(format!("{safe}.json"))
    }

    /// Keeps an accepted token (synced) until it expires.
    pub fn save_active(&self, msg: &SignedMessage, token_id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.active_dir())?;
        let bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
        crate::state::replace_file(&self.active_path(token_id), &bytes, 0o600)
    }

    pub fn remove_active(&self, token_id: &str) {
        let _ = std::fs::remove_file(self.active_path(token_id));
    }

    /// The tokens accepted before and not yet expired (or removed).
    pub fn active(&self) -> Vec<SignedMessage> {
        let Ok(entries) = std::fs::read_dir(self.active_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| wire::decode_signed(&b, 64 * 1024).ok())
            .collect()
    }

    pub fn used(&self) -> HashSet<String> {
        std::fs::read_to_string(self.dir.join("used"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Remembers a token id durably before the token takes effect.
    pub fn mark_used(&self, token_id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("used"))?;
        writeln!(f, "{token_id}")?;
        f.sync_all()
    }
}
