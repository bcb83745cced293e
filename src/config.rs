//! `converge.toml`: the daemon's configuration (DESIGN §6), read with serde + toml and
//! checked before anything starts.
//!
//! [`Config::load`] parses the file, resolves relative paths against the directory the
//! file is in (so a data dir with its config inside can be moved as a whole), and then
//! [`Config::validate`]s it. Every error names the file and the key or path at fault.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use converge_api::ReplicaId;
use serde::Deserialize;

/// Conflict policies linked into the binary; `folder.conflict_policy` must name one of
/// them unless plugins are configured (a plugin may provide the policy, which the daemon
/// checks once the plugins are loaded).
pub const BUILTIN_POLICIES: &[&str] = converge_policies::BUILT_IN;

/// Transport kinds linked into the binary (`transport.kind`).
pub const TRANSPORT_KINDS: &[&str] = &["tcp"];

/// Default address of the sync transport (`transport.listen`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";

/// Default address of the admin API (`admin.listen`).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7480";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the replica keeps its state: the sled database (`db/`, which holds the event
    /// log and the replica identity) and the admin token. Created if missing.
    pub data_dir: PathBuf,
    /// The folder this replica keeps in sync.
    pub folder: FolderConfig,
    /// How this replica reaches and is reached by its peers.
    #[serde(default)]
    pub transport: TransportConfig,
    /// The replicas this one syncs with; a peer not listed here is refused.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// The admin HTTP API; absent means no admin API.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Read-only copies of the folder's state (local backups).
    #[serde(default)]
    pub mirrors: Vec<MirrorConfig>,
    /// Dynamic-library plugins to load at start.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
}

/// `[folder]`: the synchronized folder.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    /// The folder's path; it must exist and be a directory.
    pub path: PathBuf,
    /// Which conflict policy decides what the folder shows for concurrent writes.
    #[serde(default = "default_policy")]
    pub conflict_policy: String,
}

/// `[transport]`: the sync transport.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// The transport plugin; one of [`TRANSPORT_KINDS`].
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The socket address to accept peers on, like `127.0.0.1:7400`; see
    /// [`TransportConfig::listen_addr`].
    #[serde(default = "default_listen")]
    pub listen: String,
}

/// `[[peers]]`: one replica to sync with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's replica ID, as printed by `converge id`; see [`PeerConfig::replica`].
    pub id: String,
    /// Where to dial it, `host:port`.
    pub address: String,
}

/// `[admin]`: the admin HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The socket address to serve on; see [`AdminConfig::listen_addr`].
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// The file holding the bearer token. Relative to `data_dir` in the file; absolute
    /// once [`Config::load`] has resolved it.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// Which calls need the token.
    #[serde(default)]
    pub auth: AdminAuth,
}

/// Which admin API calls need the bearer token (`admin.auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminAuth {
    /// Only calls that change something (replay, rebuild, pause, …).
    #[default]
    Mutating,
    /// Every call, reads included (`/healthz` excepted).
    All,
}

/// `[[mirrors]]`: a read-only copy of the folder's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// A name for logs, metrics and the subscriber cursor; unique among mirrors.
    pub name: String,
    /// Where the copy is written.
    pub path: PathBuf,
}

/// `[[plugins]]`: one dynamic-library plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The library file (`.so` / `.dylib` / `.dll`).
    pub path: PathBuf,
    /// An opaque string handed to a source plugin at start (e.g. the file it tails).
    #[serde(default)]
    pub config: String,
}

fn default_policy() -> String {
    "lww".to_owned()
}

fn default_kind() -> String {
    "tcp".to_owned()
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}

fn default_token_file() -> PathBuf {
    PathBuf::from("admin.token")
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            kind: default_kind(),
            listen: default_listen(),
        }
    }
}

impl TransportConfig {
    /// `listen` as a socket address; the error names the key `transport.listen`.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        parse_addr("transport.listen", &self.listen)
    }
}

impl AdminConfig {
    /// `listen` as a socket address; the error names the key `admin.listen`.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        parse_addr("admin.listen", &self.listen)
    }
}

impl PeerConfig {
    /// `id` as a replica ID. `index` is the peer's position in the file, for the
    /// error, which names the key `peers[index].id`.
    pub fn replica(&self, index: usize) -> anyhow::Result<ReplicaId> {
        ReplicaId::from_str(&self.id).with_context(|| {
            format!(
                "peers[{index}].id = {:?} is not a replica ID (use what `converge id` prints on that peer)",
                self.id
            )
        })
    }
}

fn parse_addr(key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value.parse().with_context(|| {
        format!("{key} = {value:?} is not a socket address (expected IP:PORT, like 127.0.0.1:7400)")
    })
}

impl Config {
    /// Reads, resolves and validates the file at `path`. Nothing is started; the data dir
    /// is created if it is missing (and checked to be writable).
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let config = Config::parse_file(path)?;
        config
            .validate()
            .with_context(|| format!("invalid config {}", path.display()))?;
        Ok(config)
    }

    /// Reads and parses the file and resolves its relative paths, without validating.
    pub fn parse_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        // toml's own error names the key only in the line it quotes; the path (like
        // `admin.auth` or `peers[1].id`) is tracked alongside to name it plainly.
        let mut config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(&text))
            .map_err(|err| {
                let key = err.path().to_string();
                let err = anyhow::Error::new(err.into_inner());
                match key.as_str() {
                    "." => err,
                    _ => err.context(format!("at key {key}")),
                }
            })
            .with_context(|| format!("reading config {}", path.display()))?;
        let absolute = std::path::absolute(path)
            .with_context(|| format!("resolving the path of config {}", path.display()))?;
        let base = absolute.parent().unwrap_or(Path::new("/"));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Makes every relative path absolute: against `base` (the config file's directory),
    /// except `admin.token_file`, which is relative to `data_dir`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf, base: &Path| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        resolve(&mut self.data_dir, base);
        resolve(&mut self.folder.path, base);
        for mirror in &mut self.mirrors {
            resolve(&mut mirror.path, base);
        }
        for plugin in &mut self.plugins {
            resolve(&mut plugin.path, base);
        }
        let data_dir = self.data_dir.clone();
        if let Some(admin) = &mut self.admin {
            resolve(&mut admin.token_file, &data_dir);
        }
    }

    /// Checks everything that can be checked before start: the folder exists and is a
    /// directory, addresses parse and the admin API has a port of its own, peer IDs parse
    /// and are unique, the transport kind and conflict policy are known, mirror names are
    /// unique and mirror paths overlap neither the folder, the data dir nor each other;
    /// then, only once all that passed, the data dir exists (or is created) and is
    /// writable. Each error names its key or path.
    pub fn validate(&self) -> anyhow::Result<()> {
        let folder = &self.folder.path;
        match std::fs::metadata(folder) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!("folder.path: {} is not a directory", folder.display()),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("folder.path: {} cannot be read", folder.display()))
            }
        }

        let data_dir = &self.data_dir;
        if nesting(data_dir, folder) == Some(Nesting::Same) {
            bail!(
                "data_dir and folder.path are the same directory ({}): keep the data dir elsewhere",
                data_dir.display()
            );
        }

        if !TRANSPORT_KINDS.contains(&self.transport.kind.as_str()) {
            bail!(
                "transport.kind = {:?} is not a known transport (known: {})",
                self.transport.kind,
                TRANSPORT_KINDS.join(", ")
            );
        }
        let transport_listen = self.transport.listen_addr()?;

        let policy = &self.folder.conflict_policy;
        if !BUILTIN_POLICIES.contains(&policy.as_str()) && self.plugins.is_empty() {
            bail!(
                "folder.conflict_policy = {policy:?} is not a known conflict policy (built in: {}; \
                 others come from [[plugins]])",
                BUILTIN_POLICIES.join(", ")
            );
        }

        let mut seen = HashSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let id = peer.replica(i)?;
            if !seen.insert(id) {
                bail!("peers[{i}].id: replica {id} is listed twice");
            }
            check_peer_address(i, &peer.address)?;
        }

        if let Some(admin) = &self.admin {
            let admin_listen = admin.listen_addr()?;
            if clash(admin_listen, transport_listen) {
                bail!(
                    "admin.listen = {:?} and transport.listen = {:?} are the same port: \
                     give the admin API a port of its own",
                    admin.listen,
                    self.transport.listen
                );
            }
        }

        let mut names = HashSet::new();
        for (i, mirror) in self.mirrors.iter().enumerate() {
            if mirror.name.is_empty() {
                bail!("mirrors[{i}].name is empty");
            }
            if !names.insert(mirror.name.as_str()) {
                bail!(
                    "mirrors[{i}].name: mirror {:?} is listed twice",
                    mirror.name
                );
            }
            check_mirror_path(i, &mirror.path, &self.folder.path, &self.data_dir)?;
            for (j, other) in self.mirrors[..i].iter().enumerate() {
                match nesting(&mirror.path, &other.path) {
                    Some(Nesting::Same) => bail!(
                        "mirrors[{i}].path is the same directory as mirrors[{j}].path ({}): \
                         the two would overwrite each other",
                        mirror.path.display()
                    ),
                    Some(Nesting::Inside) => bail!(
                        "mirrors[{i}].path ({}) is inside mirrors[{j}].path ({}): \
                         each would overwrite the other's files",
                        mirror.path.display(),
                        other.path.display()
                    ),
                    Some(Nesting::Contains) => bail!(
                        "mirrors[{i}].path ({}) contains mirrors[{j}].path ({}): \
                         each would overwrite the other's files",
                        mirror.path.display(),
                        other.path.display()
                    ),
                    None => {}
                }
            }
        }

        // Last, once everything else passed: a config refused creates nothing.
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("data_dir: cannot create {}", data_dir.display()))?;
        if !data_dir.is_dir() {
            bail!("data_dir: {} is not a directory", data_dir.display());
        }
        tempfile::Builder::new()
            .prefix(".converge-write-check")
            .tempfile_in(data_dir)
            .with_context(|| format!("data_dir: {} is not writable", data_dir.display()))?;
        Ok(())
    }
}

/// Whether two listen addresses cannot both be bound: the same port (not 0, which picks
/// a free one) on the same address, or on any address and one of its own.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `host:port` with a numeric port; the host is resolved only when dialing.
fn check_peer_address(index: usize, address: &str) -> anyhow::Result<()> {
    let valid = match address.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    };
    if !valid {
        bail!("peers[{index}].address = {address:?} is not HOST:PORT (like 127.0.0.1:7401)");
    }
    Ok(())
}

/// Refuses a mirror (`mirrors[index].path`) that overlaps the folder or the data dir: one
/// inside the folder would be synced again, into itself, without end; one holding the
/// folder would write over it; one at, inside or around the data dir would write over the
/// database and the config.
fn check_mirror_path(
    index: usize,
    mirror: &Path,
    folder: &Path,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let (m, f, d) = (mirror.display(), folder.display(), data_dir.display());
    match nesting(mirror, folder) {
        Some(Nesting::Same) => bail!("mirrors[{index}].path is the folder itself ({m})"),
        Some(Nesting::Inside) => bail!(
            "mirrors[{index}].path ({m}) is inside folder.path ({f}): the folder would sync the \
             mirror's files into the mirror again, without end"
        ),
        Some(Nesting::Contains) => bail!(
            "mirrors[{index}].path ({m}) contains folder.path ({f}): the mirror would overwrite \
             the folder"
        ),
        None => {}
    }
    if nesting(mirror, data_dir).is_some() {
        bail!(
            "mirrors[{index}].path ({m}) is, is inside or contains data_dir ({d}): the mirror \
             would write among the replica's own files (its database, config and temporary \
             files); keep mirrors outside data_dir"
        );
    }
    Ok(())
}

/// How one directory lies relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nesting {
    /// Both are the same directory.
    Same,
    /// The first is below the second.
    Inside,
    /// The second is below the first.
    Contains,
}

/// How `a` lies relative to `b`, compared by their [`resolved`] forms; `None` when apart.
fn nesting(a: &Path, b: &Path) -> Option<Nesting> {
    let (a, b) = (resolved(a), resolved(b));
    if a == b {
        Some(Nesting::Same)
    } else if a.starts_with(&b) {
        Some(Nesting::Inside)
    } else if b.starts_with(&a) {
        Some(Nesting::Contains)
    } else {
        None
    }
}

/// `path` with symlinks and `..` resolved as far as it exists: its longest existing
/// ancestor canonicalized, the rest appended as written. So a directory not created yet (a
/// mirror, the data dir) compares right with one reached through a symlink.
fn resolved(path: &Path) -> PathBuf {
    let path = normalize(path);
    let mut rest = Vec::new();
    let mut existing = path.as_path();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest.iter().rev().fold(canonical, |p, name| p.join(name));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return path,
        }
    }
}

/// Removes `.` components and folds `..` lexically, so resolved paths read cleanly in
/// messages.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A temporary directory holding `folder/` and a config file with `text`.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("folder")).unwrap();
            Fixture { dir }
        }

        fn load(&self, text: &str) -> anyhow::Result<Config> {
            let path = self.dir.path().join("converge.toml");
            std::fs::write(&path, text).unwrap();
            Config::load(&path)
        }
    }

    fn peer_id() -> String {
        ReplicaId([7; 16]).to_string()
    }

    /// Loads `text` and checks that it fails with a message containing every one of
    /// `expected` (the message is the whole error chain).
    fn check_err(text: &str, expected: &[&str]) {
        let fixture = Fixture::new();
        let err = fixture.load(text).expect_err("config should be rejected");
        let message = format!("{err:#}");
        for want in expected {
            assert!(
                message.contains(want),
                "error {message:?} does not mention {want:?}"
            );
        }
        assert!(
            message.contains("converge.toml"),
            "error {message:?} names no file"
        );
    }

    const MINIMAL: &str = "data_dir = \"data\"\n[folder]\npath = \"folder\"\n";

    #[test]
    fn minimal_config_gets_defaults_and_absolute_paths() {
        let fixture = Fixture::new();
        let config = fixture.load(MINIMAL).unwrap();
        let base = fixture.dir.path();
        assert_eq!(config.data_dir, base.join("data"));
        assert!(config.data_dir.is_dir(), "data_dir is created");
        assert_eq!(config.folder.path, base.join("folder"));
        assert_eq!(config.folder.conflict_policy, "lww");
        assert_eq!(config.transport, TransportConfig::default());
        assert!(config.peers.is_empty() && config.admin.is_none());
    }

    #[test]
    fn full_config_loads() {
        let fixture = Fixture::new();
        let text = format!(
            "{MINIMAL}[transport]\nkind = \"tcp\"\nlisten = \"0.0.0.0:7401\"\n\
             [[peers]]\nid = \"{}\"\naddress = \"localhost:7402\"\n\
             [admin]\nlisten = \"127.0.0.1:7481\"\nauth = \"all\"\n\
             [[mirrors]]\nname = \"backup\"\npath = \"../backup\"\n\
             [[plugins]]\npath = \"libp.so\"\n",
            peer_id()
        );
        let config = fixture.load(&text).unwrap();
        let base = fixture.dir.path();
        assert_eq!(config.transport.listen_addr().unwrap().port(), 7401);
        assert_eq!(config.peers[0].replica(0).unwrap(), ReplicaId([7; 16]));
        let admin = config.admin.unwrap();
        assert_eq!(admin.auth, AdminAuth::All);
        assert_eq!(admin.token_file, base.join("data/admin.token"));
        assert_eq!(
            config.mirrors[0].path,
            base.parent().unwrap().join("backup")
        );
        assert_eq!(config.plugins[0].path, base.join("libp.so"));
    }

    #[test]
    fn unknown_key_is_named() {
        check_err(
            &format!("colour = \"blue\"\n{MINIMAL}"),
            &["colour", "line 1", "data_dir"],
        );
        check_err(
            &format!("{MINIMAL}colour = \"blue\"\n"),
            &["colour", "line 4", "conflict_policy"],
        );
        check_err(
            &format!("{MINIMAL}[transport]\nport = 1\n"),
            &["port", "listen"],
        );
    }

    #[test]
    fn wrong_type_is_named() {
        check_err(
            &format!("{MINIMAL}[transport]\nlisten = 7400\n"),
            &["listen", "expected a string"],
        );
        check_err("data_dir = \"d\"\nfolder = \"f\"\n", &["folder"]);
        // The whole key path, not only the quoted line (`auth = 1`, `id = 5`).
        check_err(
            &format!("{MINIMAL}[admin]\nauth = 1\n"),
            &["at key admin.auth"],
        );
        check_err(
            &format!("{MINIMAL}[[peers]]\nid = 5\naddress = \"h:1\"\n"),
            &["at key peers[0].id", "expected a string"],
        );
    }

    #[test]
    fn missing_key_is_named() {
        check_err("[folder]\npath = \"folder\"\n", &["data_dir"]);
    }

    #[test]
    fn missing_folder_names_the_path() {
        check_err(
            "data_dir = \"data\"\n[folder]\npath = \"nowhere\"\n",
            &["folder.path", "nowhere"],
        );
    }

    #[test]
    fn folder_that_is_a_file_names_the_path() {
        let fixture = Fixture::new();
        std::fs::write(fixture.dir.path().join("afile"), b"x").unwrap();
        let err = fixture
            .load("data_dir = \"data\"\n[folder]\npath = \"afile\"\n")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("afile is not a directory"),
            "{err:#}"
        );
    }

    #[test]
    fn uncreatable_data_dir_names_the_path() {
        let fixture = Fixture::new();
        std::fs::write(fixture.dir.path().join("blocker"), b"x").unwrap();
        let err = fixture
            .load("data_dir = \"blocker/data\"\n[folder]\npath = \"folder\"\n")
            .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("data_dir") && message.contains("blocker/data"),
            "{message}"
        );
    }

    #[test]
    fn bad_peer_id_names_its_index() {
        let text = format!(
            "{MINIMAL}[[peers]]\nid = \"{}\"\naddress = \"127.0.0.1:1\"\n\
             [[peers]]\nid = \"REPLACE-ME\"\naddress = \"127.0.0.1:2\"\n",
            peer_id()
        );
        check_err(&text, &["peers[1].id", "REPLACE-ME"]);
    }

    #[test]
    fn duplicate_peer_is_named() {
        let text = format!(
            "{MINIMAL}[[peers]]\nid = \"{0}\"\naddress = \"127.0.0.1:1\"\n\
             [[peers]]\nid = \"{0}\"\naddress = \"127.0.0.1:2\"\n",
            peer_id()
        );
        check_err(&text, &["peers[1].id", "twice"]);
    }

    #[test]
    fn bad_peer_address_is_named() {
        let text = format!(
            "{MINIMAL}[[peers]]\nid = \"{}\"\naddress = \"host\"\n",
            peer_id()
        );
        check_err(&text, &["peers[0].address"]);
    }

    #[test]
    fn bad_listen_is_named() {
        check_err(
            &format!("{MINIMAL}[transport]\nlisten = \"localhost\"\n"),
            &["transport.listen", "localhost"],
        );
        check_err(
            &format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1\"\n"),
            &["admin.listen"],
        );
    }

    #[test]
    fn admin_on_the_transport_port_is_named() {
        for (transport, admin) in [
            ("127.0.0.1:7400", "127.0.0.1:7400"),
            ("0.0.0.0:7400", "127.0.0.1:7400"),
        ] {
            check_err(
                &format!(
                    "{MINIMAL}[transport]\nlisten = \"{transport}\"\n[admin]\nlisten = \"{admin}\"\n"
                ),
                &["admin.listen", "transport.listen", "same port"],
            );
        }
        let fixture = Fixture::new();
        let apart = format!(
            "{MINIMAL}[transport]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        );
        fixture.load(&apart).unwrap();
    }

    #[test]
    fn bad_kind_lists_the_known_ones() {
        check_err(
            &format!("{MINIMAL}[transport]\nkind = \"quic\"\n"),
            &["transport.kind", "quic", "tcp"],
        );
    }

    #[test]
    fn unknown_policy_lists_the_known_ones() {
        check_err(
            "data_dir = \"data\"\n[folder]\npath = \"folder\"\nconflict_policy = \"newest\"\n",
            &["folder.conflict_policy", "newest", "lww"],
        );
    }

    #[test]
    fn a_refused_config_creates_no_data_dir() {
        let fixture = Fixture::new();
        let bad_peer = format!("{MINIMAL}[[peers]]\nid = \"x\"\naddress = \"127.0.0.1:1\"\n");
        let bad_policy = MINIMAL.replace(
            "path = \"folder\"",
            "path = \"folder\"\nconflict_policy = \"x\"",
        );
        for text in [bad_peer, bad_policy] {
            fixture.load(&text).unwrap_err();
            assert!(!fixture.dir.path().join("data").exists(), "{text}");
        }
    }

    #[test]
    fn bad_auth_is_named() {
        check_err(
            &format!("{MINIMAL}[admin]\nauth = \"none\"\n"),
            &["auth", "mutating"],
        );
    }

    #[test]
    fn duplicate_mirror_is_named() {
        check_err(
            &format!(
                "{MINIMAL}[[mirrors]]\nname = \"m\"\npath = \"a\"\n[[mirrors]]\nname = \"m\"\npath = \"b\"\n"
            ),
            &["mirrors[1].name"],
        );
    }

    /// `mirrors` (TOML tables) appended to [`MINIMAL`].
    fn with_mirrors(paths: &[&str]) -> String {
        let mut text = MINIMAL.to_owned();
        for (i, path) in paths.iter().enumerate() {
            text.push_str(&format!(
                "[[mirrors]]\nname = \"m{i}\"\npath = \"{path}\"\n"
            ));
        }
        text
    }

    #[test]
    fn mirror_overlapping_the_folder_the_data_dir_or_another_mirror_is_refused() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["folder"], &["mirrors[0].path", "the folder itself"]),
            (
                &["folder/backup"],
                &["mirrors[0].path", "inside folder.path", "without end"],
            ),
            (&["."], &["mirrors[0].path", "contains folder.path"]),
            (&["data"], &["mirrors[0].path", "data_dir", "database"]),
            (
                &["data/backup"],
                &["mirrors[0].path", "data_dir", "database"],
            ),
            (
                &["a", "./a/"],
                &["mirrors[1].path", "same directory as mirrors[0].path"],
            ),
            (
                &["a", "a/b"],
                &["mirrors[1].path", "inside mirrors[0].path"],
            ),
            (
                &["x", "a/b", "a"],
                &["mirrors[2].path", "contains mirrors[1].path"],
            ),
        ];
        for (paths, expected) in cases {
            check_err(&with_mirrors(paths), expected);
        }
        check_err(
            "data_dir = \"state/data\"\n[folder]\npath = \"folder\"\n\
             [[mirrors]]\nname = \"m\"\npath = \"state\"\n",
            &["mirrors[0].path", "data_dir", "database"],
        );
    }

    #[cfg(unix)]
    #[test]
    fn mirror_inside_the_folder_through_a_symlink_is_refused() {
        let fixture = Fixture::new();
        std::os::unix::fs::symlink("folder", fixture.dir.path().join("link")).unwrap();
        let err = fixture.load(&with_mirrors(&["link/backup"])).unwrap_err();
        assert!(format!("{err:#}").contains("mirrors[0].path"), "{err:#}");
        assert!(format!("{err:#}").contains("inside folder.path"), "{err:#}");
    }

    #[test]
    fn mirrors_apart_from_everything_load() {
        let fixture = Fixture::new();
        let config = fixture.load(&with_mirrors(&["a", "b", "ab"])).unwrap();
        assert_eq!(config.mirrors.len(), 3);
    }
}
