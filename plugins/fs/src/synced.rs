//! The ignore rules the folder was last in sync with, and the keys a change of them lets
//! in.
//!
//! The folder's store writes nothing the ignore rules exclude (`.convergeignore`, the
//! configured `exclude` paths), and its cursor moves past those keys' events. When the
//! rules change so that such keys are included (a pattern taken out, while the daemon runs
//! or while it is stopped), the log shows them and the folder lacks them. Read as it is,
//! that says the user removed them, and the scan would record their deletes on every
//! replica. Instead, as Syncthing does, they are written into the folder: the keys the
//! rules the folder was last in sync with exclude and the rules in effect include are
//! *admitted* ([`admit`]). Until a synced batch of the store shows them, their absence is
//! the store's to account for, so neither a scan nor the watcher takes them for removed
//! ([`Echo::accounts_for_absence`]), and a file there in a state the log knows (an older
//! version) is the store's to replace, not a local change ([`Echo::awaits_store`]). The
//! store shows them with every batch, and the engine asks it to at once
//! (`Store::more_to_show`). A file at an admitted path that the log does not know is the
//! user's: the store leaves it, and the source records it as a local change.
//!
//! Once every admitted key is shown and synced, the store records the rules in effect as
//! those the folder is in sync with: `<store>.rules` in the state dir, the ignore file's
//! bytes and the configured `exclude` paths ([`RulesRecord`]). A crash before that admits
//! them again at the next start. The source compares the rules at start, before the
//! first scan, and each time it reads them again, before the rescan that follows. The
//! first start with a state dir that holds no record (or one that cannot be read) takes
//! the folder as in sync with the rules in effect.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use converge_api::{EntryKind, Key, Op};
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::rules::Rules;
use crate::scan::Env;
use crate::store::{load_state, save_state};
use crate::FsConfig;

/// Ignore rules as recorded: the ignore file's bytes and the configured `exclude` paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RulesRecord {
    /// The ignore file's bytes (`None`: there was none).
    ignore: Option<Vec<u8>>,
    /// The configured `exclude` paths, as bytes (paths need not be UTF-8).
    exclude: Vec<Vec<u8>>,
}

impl RulesRecord {
    /// The record of `rules`, read with the configured `exclude` paths.
    pub(crate) fn of(rules: &Rules, exclude: &[PathBuf]) -> RulesRecord {
        RulesRecord {
            ignore: rules.text().map(<[u8]>::to_vec),
            exclude: exclude
                .iter()
                .map(|p| p.as_os_str().as_bytes().to_vec())
                .collect(),
        }
    }

    /// The rules this record holds, for the folder at `root`.
    fn rules(&self, root: &Path) -> Rules {
        let exclude: Vec<PathBuf> = self
            .exclude
            .iter()
            .map(|p| PathBuf::from(OsStr::from_bytes(p)))
            .collect();
        Rules::parse(root, &exclude, self.ignore.as_deref())
    }
}

/// Where the folder's store named `store` records the rules the folder is in sync with:
/// `<store>.rules` in the state dir, if there is one (otherwise that is kept in memory).
pub(crate) fn record_path(config: &FsConfig, store: &str) -> Option<PathBuf> {
    let dir = config.state_dir.as_ref()?;
    Some(dir.join(format!("{store}.rules")))
}

/// Records `rules` at `path` as those the folder is in sync with (blocking; replaced
/// atomically, durably).
pub(crate) fn save(path: &Path, rules: &RulesRecord) -> Result<(), FsError> {
    save_state(path, "ignore rules in sync", std::slice::from_ref(rules))
}

/// Compares the rules the source `env` reads with (read with the configured `exclude`
/// paths of `config`) with those the folder was last in sync with, and admits the keys a
/// change lets in (see the module docs; blocking). Called before a scan reads the folder
/// with those rules. Nothing is admitted for a folder no store shows (a source on its
/// own).
pub(crate) fn admit(env: &Env, config: &FsConfig) -> Result<(), FsError> {
    let Some(store) = env.echo.store() else {
        return Ok(());
    };
    let path = record_path(config, &store);
    let now = RulesRecord::of(&env.rules, &config.exclude);
    let synced = match env.echo.synced_rules() {
        Some(synced) => Some(synced),
        None => {
            let loaded = path.as_deref().and_then(|path| {
                match load_state::<RulesRecord>(path, "ignore rules in sync") {
                    Ok(records) => records.into_iter().next(),
                    Err(e) => {
                        tracing::warn!(
                            "{e}; taking the folder as in sync with its ignore rules now"
                        );
                        None
                    }
                }
            });
            if let Some(synced) = &loaded {
                env.echo.set_synced_rules(synced.clone());
            }
            loaded
        }
    };
    let Some(synced) = synced else {
        // No record (the first start, or an earlier version kept none): the folder is
        // taken as in sync with the rules in effect, recorded by the store.
        env.echo.set_synced_rules(now.clone());
        env.echo.admit(HashSet::new(), Some((path, now)));
        return Ok(());
    };
    if synced == now {
        // Back to the rules the folder is in sync with: whatever a change since let in is
        // excluded again.
        env.echo.admit(HashSet::new(), None);
        return Ok(());
    }
    let keys = let_in(env, &synced.rules(env.rules.root()))?;
    if !keys.is_empty() {
        tracing::info!(
            "{} key(s) the ignore rules excluded are included now: written into the folder from the log",
            keys.len()
        );
    }
    env.echo.admit(keys, Some((path, now)));
    Ok(())
}

/// The keys the folder's log shows that the rules `old` exclude and `env`'s rules include
/// (blocking: reads every key's heads).
fn let_in(env: &Env, old: &Rules) -> Result<HashSet<Key>, FsError> {
    let mut keys = HashSet::new();
    for entry in env.log.states() {
        let (key, state) = entry?;
        let Some(shown) = env.resolver.shown(&key, &state.heads) else {
            continue;
        };
        let is_dir = matches!(&shown.op, Op::Put { meta, .. } if meta.kind == EntryKind::Dir);
        let path = env.rules.path_of(&key);
        if old.ignores(&path, is_dir, true) && !env.rules.ignores(&path, is_dir, true) {
            keys.insert(key);
        }
    }
    Ok(keys)
}
