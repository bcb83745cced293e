//! `converge init` and `converge id`: creating a replica (data dir, identity, admin token,
//! commented config file) and reading its identity back.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use converge_api::ReplicaId;
use converge_framework::log::{EventLog, LogConfig};

use crate::cli::InitArgs;
use crate::config::Config;

/// Name of the config file `init` writes in the data dir.
pub const CONFIG_FILE: &str = "converge.toml";

/// Name of the admin token file in the data dir (the config's default `admin.token_file`).
pub const TOKEN_FILE: &str = "admin.token";

/// The file in the data dir that repeats the replica's ID (the database holds it), for
/// `converge id` while a daemon holds the database's lock.
pub const ID_FILE: &str = "replica.id";

/// What `init` created.
#[derive(Debug)]
pub struct Initialized {
    /// The new (or, for an existing log, the kept) replica identity.
    pub replica: ReplicaId,
    /// The config file written.
    pub config_path: PathBuf,
}

/// Creates the replica described by `args`. Refuses to overwrite an existing config file;
/// an existing event log keeps its identity and an existing token is kept.
pub async fn init(args: &InitArgs) -> anyhow::Result<Initialized> {
    let data_dir = &args.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving data dir {}", data_dir.display()))?;
    let config_path = data_dir.join(CONFIG_FILE);
    if config_path.exists() {
        bail!(
            "{} already exists: remove it or choose another --data-dir",
            config_path.display()
        );
    }
    std::fs::create_dir_all(&args.folder)
        .with_context(|| format!("creating folder {}", args.folder.display()))?;
    let folder = args
        .folder
        .canonicalize()
        .with_context(|| format!("resolving folder {}", args.folder.display()))?;
    let folder_text = folder
        .to_str()
        .with_context(|| format!("folder path {} is not UTF-8", folder.display()))?;

    // Check the text we are about to write exactly as `run` will read it, before any of
    // the replica's state is created.
    let text = config_text(
        folder_text,
        &args.listen.to_string(),
        &args.admin.to_string(),
    );
    let mut config: Config =
        toml::from_str(&text).context("the generated config does not parse")?;
    config.resolve_paths(&data_dir);
    config
        .validate()
        .context("the generated config is invalid")?;

    write_token(&data_dir.join(TOKEN_FILE))?;
    let replica = replica_id(&data_dir).await?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config_path)
        .with_context(|| format!("creating {}", config_path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(Initialized {
        replica,
        config_path,
    })
}

/// The identity of the replica whose state is in `data_dir`: opens (creating it if
/// needed) the event log under `data_dir/db` and closes it again.
pub async fn replica_id(data_dir: &Path) -> anyhow::Result<ReplicaId> {
    let db = data_dir.join("db");
    let log = open_log(&db).await?;
    let replica = log.replica();
    log.close()
        .await
        .with_context(|| format!("closing the event log at {}", db.display()))?;
    let data_dir = data_dir.to_owned();
    tokio::task::spawn_blocking(move || note_id(&data_dir, replica)).await??;
    Ok(replica)
}

/// Writes `replica` to the data dir's [`ID_FILE`] unless it already says so (written
/// aside and renamed into place, so a reader never sees half of it).
pub fn note_id(data_dir: &Path, replica: ReplicaId) -> anyhow::Result<()> {
    let path = data_dir.join(ID_FILE);
    let text = format!("{replica}\n");
    if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let aside = data_dir.join(format!(".{ID_FILE}.new"));
    std::fs::write(&aside, &text)
        .and_then(|()| std::fs::rename(&aside, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Opens (or creates) the event log in `db` on a blocking thread: opening reads the
/// database, and waits a moment for its lock when another handle still holds it.
pub async fn open_log(db: &Path) -> anyhow::Result<EventLog> {
    let path = db.to_owned();
    tokio::task::spawn_blocking(move || EventLog::open(LogConfig::new(&path)))
        .await?
        .with_context(|| {
            format!(
                "opening the event log in {} (is another converge running on it?)",
                db.display()
            )
        })
}

/// The identity of an existing replica: like [`replica_id`], but refuses to create a new
/// event log when `data_dir` holds none.
pub async fn existing_replica_id(data_dir: &Path) -> anyhow::Result<ReplicaId> {
    let db = data_dir.join("db");
    if !db.exists() {
        bail!(
            "no replica in {} (no {}): run `converge init` first",
            data_dir.display(),
            db.display()
        );
    }
    // The ID file first: a running daemon holds the database's lock.
    let noted = std::fs::read_to_string(data_dir.join(ID_FILE));
    if let Some(replica) = noted.ok().and_then(|t| t.trim().parse().ok()) {
        return Ok(replica);
    }
    replica_id(data_dir).await
}

/// Writes a new admin token (32 random bytes, hex) to `path`, readable by the owner only;
/// keeps an existing one.
pub fn write_token(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).context("no randomness for the admin token")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating admin token {}", path.display()))?;
    file.write_all(token.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing admin token {}", path.display()))?;
    Ok(())
}

/// A TOML string literal (quoted and escaped).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The commented config file `init` writes. `data_dir` is `"."`: the file lives in the
/// data dir, and relative paths are resolved against the file's directory.
fn config_text(folder: &str, listen: &str, admin: &str) -> String {
    format!(
        r#"# converge.toml, written by `converge init`. Every key is described in the README's
# "Configuration reference". Relative paths are resolved against this file's directory.

# Where this replica keeps its state: the event log and identity (db/) and the admin token.
data_dir = "."

[folder]
# The folder to keep in sync.
path = {folder}
# What the folder shows when replicas wrote the same file concurrently: "lww" (the last
# writer wins) or "conflict-copy" (the same, with the other writes kept beside it as
# name.sync-conflict-<date>-<replica>.ext); a loaded plugin may provide others.
conflict_policy = "lww"

[transport]
kind = "tcp"
# Where to accept peers. Use 0.0.0.0:PORT to accept connections from other machines.
listen = {listen}

# One [[peers]] table per replica to sync with. The ID is what `converge id` prints
# there; a peer whose ID is not listed here is refused.
# [[peers]]
# id = "aaaaaaa-bbbbbbb-ccccccc-ddddd"
# address = "192.0.2.10:7400"

[admin]
# The admin HTTP API (status, metrics, replay). Keep it on loopback.
listen = {admin}
# The bearer token, relative to data_dir.
token_file = "{TOKEN_FILE}"
# "mutating": calls that change something need the token; "all": reads need it too.
auth = "mutating"

# Read-only copies of the folder's state (local backups):
# [[mirrors]]
# name = "backup"
# path = "/backups/Sync"

# Dynamic-library plugins (conflict policies, sources):
# [[plugins]]
# path = "/usr/local/lib/libmy_policy.so"
"#,
        folder = quoted(folder),
        listen = quoted(listen),
        admin = quoted(admin),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn args(root: &Path) -> InitArgs {
        InitArgs {
            data_dir: root.join("data"),
            folder: root.join("my \"sync\" folder"),
            listen: "127.0.0.1:7400".parse().unwrap(),
            admin: "127.0.0.1:7480".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn init_writes_a_config_that_loads_and_keeps_the_identity() {
        let root = tempfile::tempdir().unwrap();
        let args = args(root.path());
        let done = init(&args).await.unwrap();

        let config = Config::load(&done.config_path).unwrap();
        let data_dir = args.data_dir.canonicalize().unwrap();
        assert_eq!(config.data_dir, data_dir);
        assert_eq!(config.folder.path, args.folder.canonicalize().unwrap());
        let admin = config.admin.unwrap();
        assert_eq!(admin.token_file, data_dir.join(TOKEN_FILE));

        let token = std::fs::read_to_string(&admin.token_file).unwrap();
        assert_eq!(token.trim().len(), 64);
        assert!(token.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&admin.token_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        assert_eq!(replica_id(&config.data_dir).await.unwrap(), done.replica);
    }

    #[tokio::test]
    async fn id_of_a_missing_replica_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let err = existing_replica_id(root.path()).await.unwrap_err();
        assert!(format!("{err:#}").contains("converge init"), "{err:#}");
        assert!(!root.path().join("db").exists());
    }

    #[tokio::test]
    async fn init_refuses_an_admin_api_on_the_transport_port() {
        let root = tempfile::tempdir().unwrap();
        let mut args = args(root.path());
        args.admin = args.listen;
        let err = init(&args).await.unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("admin.listen") && message.contains("transport.listen"),
            "{message}"
        );
        assert!(!args.data_dir.join(CONFIG_FILE).exists());
        assert!(!args.data_dir.join("db").exists());
    }

    #[test]
    fn the_placeholder_peer_id_has_the_shape_of_a_real_one() {
        let text = config_text("/f", "127.0.0.1:7400", "127.0.0.1:7480");
        let placeholder = text
            .lines()
            .find_map(|line| line.strip_prefix("# id = "))
            .unwrap()
            .trim_matches('"');
        let shape = |id: &str| id.split('-').map(str::len).collect::<Vec<_>>();
        assert_eq!(shape(placeholder), shape(&ReplicaId([7; 16]).to_string()));
    }

    #[tokio::test]
    async fn init_refuses_to_overwrite_a_config() {
        let root = tempfile::tempdir().unwrap();
        let args = args(root.path());
        init(&args).await.unwrap();
        let err = init(&args).await.unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }
}
