//! Plugins loaded at run time from `cdylib`s over converge-api's C [`abi`] (DESIGN §5).
//!
//! [`load`] opens one library, checks its declaration (magic, ABI version, kind, name) and
//! wraps it so the rest of the engine cannot tell it from a built-in: a policy becomes an
//! `Arc<dyn ConflictPolicy>`, a source an `Arc<dyn Source>`. [`PluginRegistry`] loads the
//! config's list, refuses duplicate names and keeps the failures for status.
//!
//! Libraries are never unloaded: a plugin's threads may have thread-local destructors
//! registered from its code, and running them after `dlclose` would jump into unmapped
//! memory. Each opened library is leaked on purpose.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use converge_api::abi::{
    self, Buffer, Emitted, FreeBufferFn, HostCallbacks, PluginDeclaration, PluginKind, ResolveFn,
    SourceStartFn, SourceStopFn,
};
use converge_api::{codec, ConflictPolicy, ContentRef, Head, Key, Op, Resolution};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::error::{LogError, PluginError};
use crate::log::LocalChange;
use crate::plugin::{Source, SourceContext};

/// How many emitted changes a dylib source may have queued before `emit` answers BUSY.
pub const SOURCE_QUEUE: usize = 1024;

/// Most changes appended to the log in one batch from a dylib source.
const SOURCE_BATCH: usize = 256;

/// Why a plugin library was refused. Every variant names the file.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DylibError {
    /// The file could not be opened as a shared library (missing, not a library, wrong
    /// architecture, unresolved dependencies).
    #[error("plugin {path}: cannot load it as a shared library: {reason}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// The library has no `converge_plugin_declaration` symbol: not a converge plugin.
    #[error("plugin {path}: not a converge plugin (no symbol `converge_plugin_declaration`; was it built with `export_plugin!`?): {reason}")]
    MissingSymbol {
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// The declaration does not start with the converge magic number.
    #[error("plugin {path}: wrong magic number {found:#018x} (expected {expected:#018x}); not a converge plugin, or a corrupt one")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The magic found.
        found: u64,
        /// [`abi::MAGIC`].
        expected: u64,
    },
    /// The plugin was built for another ABI version.
    #[error("plugin {path}: built for plugin ABI {found}, this converge speaks {supported}; rebuild it against a matching converge-api")]
    AbiMismatch {
        /// The file.
        path: PathBuf,
        /// The plugin's ABI version.
        found: u32,
        /// [`abi::ABI_VERSION`].
        supported: u32,
    },
    /// The declared kind is unknown, or one this host cannot run.
    #[error("plugin {path}: unsupported plugin kind {kind}")]
    UnsupportedKind {
        /// The file.
        path: PathBuf,
        /// The kind, as a name or a code.
        kind: String,
    },
    /// The plugin failed to initialize or declared itself inconsistently.
    #[error("plugin {path}: init failed: {reason}")]
    Init {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Two plugins declare the same name.
    #[error("plugin {path}: its name {name:?} is already taken by {first}")]
    DuplicateName {
        /// The later file.
        path: PathBuf,
        /// The name.
        name: String,
        /// The file loaded first under that name.
        first: PathBuf,
    },
    /// A folder names a conflict policy no plugin provides.
    #[error(
        "conflict policy {name:?} is neither built in nor provided by a loaded plugin{failures}"
    )]
    NoSuchPolicy {
        /// The name asked for.
        name: String,
        /// The plugins that failed to load, as text (`; failed plugins: …`), if any.
        failures: String,
    },
}

/// A failed call into a plugin.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin returned [`abi::ERROR`].
    #[error("plugin {plugin} failed: {message}")]
    Failed {
        /// The plugin's name.
        plugin: String,
        /// Its message.
        message: String,
    },
    /// The plugin panicked; the panic was caught in the plugin ([`abi::PANIC`]).
    #[error("plugin {plugin} panicked: {message}")]
    Panicked {
        /// The plugin's name.
        plugin: String,
        /// The panic message.
        message: String,
    },
    /// The plugin's answer or status code made no sense.
    #[error("plugin {plugin} answered badly: {message}")]
    BadAnswer {
        /// The plugin's name.
        plugin: String,
        /// What was wrong.
        message: String,
    },
}

/// Checks a declaration's header: magic, ABI version and kind. Done before any other field
/// is read, since a declaration of another ABI version may have another layout.
pub fn check_declaration(path: &Path, decl: &PluginDeclaration) -> Result<PluginKind, DylibError> {
    if decl.magic != abi::MAGIC {
        return Err(DylibError::BadMagic {
            path: path.to_owned(),
            found: decl.magic,
            expected: abi::MAGIC,
        });
    }
    if decl.abi_version != abi::ABI_VERSION {
        return Err(DylibError::AbiMismatch {
            path: path.to_owned(),
            found: decl.abi_version,
            supported: abi::ABI_VERSION,
        });
    }
    match PluginKind::from_code(decl.kind) {
        Some(kind @ (PluginKind::Policy | PluginKind::Source)) => Ok(kind),
        Some(PluginKind::Transport) => Err(DylibError::UnsupportedKind {
            path: path.to_owned(),
            kind: "transport (not loadable from a library yet)".into(),
        }),
        None => Err(DylibError::UnsupportedKind {
            path: path.to_owned(),
            kind: format!("code {}", decl.kind),
        }),
    }
}

/// A plugin loaded from a library.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The library file.
    pub path: PathBuf,
    /// The declared name.
    pub name: String,
    /// The declared version.
    pub version: String,
    /// What it does.
    pub role: PluginRole,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kind", &self.kind())
            .finish()
    }
}

/// The role of a loaded plugin, wrapped for the engine.
#[derive(Clone)]
pub enum PluginRole {
    /// A conflict policy.
    Policy(Arc<DylibPolicy>),
    /// A source factory (see [`LoadedPlugin::source`]).
    Source(DylibSourceFactory),
}

impl LoadedPlugin {
    /// The declared kind.
    pub fn kind(&self) -> PluginKind {
        match self.role {
            PluginRole::Policy(_) => PluginKind::Policy,
            PluginRole::Source(_) => PluginKind::Source,
        }
    }

    /// The plugin as the engine's policy, if it is one.
    pub fn policy(&self) -> Option<Arc<dyn ConflictPolicy>> {
        match &self.role {
            PluginRole::Policy(p) => Some(p.clone()),
            PluginRole::Source(_) => None,
        }
    }

    /// The plugin as an engine source, if it is one, with its opaque `config` string (the
    /// `[[plugins]] config` value; empty for none). Each call makes an independent source;
    /// each `run` starts a fresh plugin instance.
    pub fn source(&self, config: impl Into<String>) -> Option<Arc<dyn Source>> {
        match &self.role {
            PluginRole::Source(f) => Some(Arc::new(f.with_config(config))),
            PluginRole::Policy(_) => None,
        }
    }
}

/// Loads the plugin library at `path`.
pub fn load(path: impl AsRef<Path>) -> Result<LoadedPlugin, DylibError> {
    let path = path.as_ref().to_owned();
    // SAFETY: loading a library runs its initializers; converge trusts the plugins its
    // config names, as it trusts its own binary. This is the documented risk of plugins.
    let library = unsafe { libloading::Library::new(&path) }.map_err(|e| DylibError::Open {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // SAFETY: the symbol is declared by the ABI as `extern "C" fn() -> *const
    // PluginDeclaration`; a library exporting the name with another type is not a converge
    // plugin, and the magic check below catches most such accidents.
    let declare = unsafe {
        library.get::<unsafe extern "C" fn() -> *const PluginDeclaration>(abi::DECLARATION_SYMBOL)
    }
    .map(|symbol| *symbol)
    .map_err(|e| DylibError::MissingSymbol {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // Never unloaded (see the module docs): every pointer the library hands out is now
    // valid for the rest of the process.
    std::mem::forget(library);

    // SAFETY: the function comes from the library and takes no arguments; it catches its
    // own panics and answers null on failure.
    let decl = unsafe { declare() };
    if decl.is_null() {
        return Err(DylibError::Init {
            path,
            reason: "the plugin's declaration function returned null (its constructor failed or panicked)".into(),
        });
    }
    // SAFETY: non-null, 'static (the library stays loaded), and only the header fields,
    // whose place never changes across ABI versions, are read before the check.
    let header = unsafe {
        (
            std::ptr::addr_of!((*decl).magic).read(),
            std::ptr::addr_of!((*decl).abi_version).read(),
            std::ptr::addr_of!((*decl).kind).read(),
        )
    };
    let probe = PluginDeclaration {
        magic: header.0,
        abi_version: header.1,
        kind: header.2,
        name: abi::StrRef::new(""),
        version: abi::StrRef::new(""),
        free_buffer: None,
        policy: abi::PolicyFns { resolve: None },
        source: abi::SourceFns {
            start: None,
            stop: None,
        },
    };
    let kind = check_declaration(&path, &probe)?;
    // SAFETY: magic and version match, so the whole struct has this build's layout.
    let decl: &'static PluginDeclaration = unsafe { &*decl };
    let init = |reason: &str| DylibError::Init {
        path: path.clone(),
        reason: reason.to_owned(),
    };
    let text = |s: &abi::StrRef, what: &str| -> Result<String, DylibError> {
        // SAFETY: the declaration's strings point into the (never unloaded) library.
        let bytes = unsafe { s.as_bytes() }.ok_or_else(|| init(&format!("null {what}")))?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| init(&format!("{what} is not UTF-8")))
    };
    let name = text(&decl.name, "name")?;
    let version = text(&decl.version, "version")?;
    if name.is_empty() {
        return Err(init("empty name"));
    }
    let free = decl
        .free_buffer
        .ok_or_else(|| init("no free_buffer function"))?;
    let role = match kind {
        PluginKind::Policy => PluginRole::Policy(Arc::new(DylibPolicy {
            name: name.clone(),
            resolve: decl
                .policy
                .resolve
                .ok_or_else(|| init("a policy without a resolve function"))?,
            free,
            fallbacks: AtomicU64::new(0),
        })),
        PluginKind::Source => PluginRole::Source(DylibSourceFactory {
            name: name.clone(),
            start: decl
                .source
                .start
                .ok_or_else(|| init("a source without a start function"))?,
            stop: decl
                .source
                .stop
                .ok_or_else(|| init("a source without a stop function"))?,
            free,
            config: String::new(),
        }),
        PluginKind::Transport => {
            return Err(DylibError::UnsupportedKind {
                path,
                kind: "transport".into(),
            })
        }
    };
    tracing::info!(plugin = %name, %version, kind = %kind, path = %path.display(), "plugin loaded");
    Ok(LoadedPlugin {
        path,
        name,
        version,
        role,
    })
}

/// Takes a plugin-allocated buffer's bytes and frees it with the plugin's own function.
fn take(buffer: Buffer, free: FreeBufferFn) -> Vec<u8> {
    // SAFETY: the buffer was written by the plugin (or is the empty one we initialized);
    // its bytes are copied before it goes back to the plugin's allocator, once.
    unsafe {
        let bytes = buffer.as_slice().to_vec();
        free(buffer);
        bytes
    }
}

fn call_error(plugin: &str, code: i32, message: Vec<u8>) -> CallError {
    let plugin = plugin.to_owned();
    let message = String::from_utf8_lossy(&message).into_owned();
    match code {
        abi::PANIC => CallError::Panicked { plugin, message },
        abi::ERROR => CallError::Failed { plugin, message },
        other => CallError::BadAnswer {
            plugin,
            message: format!("unknown status code {other}: {message}"),
        },
    }
}

/// A conflict policy from a library. A failing or panicking call is logged and answered
/// with last-write-wins, so replicas still agree and the daemon keeps serving.
pub struct DylibPolicy {
    name: String,
    resolve: ResolveFn,
    free: FreeBufferFn,
    fallbacks: AtomicU64,
}

impl std::fmt::Debug for DylibPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DylibPolicy")
            .field("name", &self.name)
            .field("fallbacks", &self.fallbacks())
            .finish_non_exhaustive()
    }
}

impl DylibPolicy {
    /// Calls the plugin, reporting failures instead of falling back.
    pub fn try_resolve(&self, key: &Key, heads: &[Head]) -> Result<Resolution, CallError> {
        let input = abi::encode_resolve_request(key, heads);
        let mut out = Buffer::EMPTY;
        // SAFETY: `resolve` comes from a checked declaration; the input is alive for the
        // call and `out` is a valid place for the answer.
        let code = unsafe { (self.resolve)(input.as_ptr(), input.len(), &mut out) };
        let bytes = take(out, self.free);
        if code != abi::OK {
            return Err(call_error(&self.name, code, bytes));
        }
        codec::decode(&bytes).map_err(|e| CallError::BadAnswer {
            plugin: self.name.clone(),
            message: format!("decoding the resolution: {e}"),
        })
    }

    /// How many calls failed and fell back to last-write-wins.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }
}

impl ConflictPolicy for DylibPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn resolve(&self, key: &Key, heads: &[Head]) -> Resolution {
        match self.try_resolve(key, heads) {
            Ok(resolution) => resolution,
            Err(e) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(policy = %self.name, %key, "{e}; using last-write-wins");
                Resolution::lww(heads)
            }
        }
    }
}

/// Makes [`Source`]s from a source library (one per configured use).
#[derive(Clone)]
pub struct DylibSourceFactory {
    name: String,
    start: SourceStartFn,
    stop: SourceStopFn,
    free: FreeBufferFn,
    config: String,
}

impl std::fmt::Debug for DylibSourceFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DylibSourceFactory")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl DylibSourceFactory {
    /// A source that passes `config` to the plugin's `start`.
    pub fn with_config(&self, config: impl Into<String>) -> DylibSource {
        DylibSource(DylibSourceFactory {
            config: config.into(),
            ..self.clone()
        })
    }
}

/// A source from a library: the plugin's own threads emit through host callbacks into a
/// bounded queue, which this source drains into the log in batches.
#[derive(Debug)]
pub struct DylibSource(DylibSourceFactory);

/// What the host callbacks' context points to.
struct EmitContext {
    plugin: String,
    queue: mpsc::Sender<Emitted>,
}

/// The plugin's instance handle; the plugin's own threads, not ours, use it.
struct Handle(*mut c_void);
// SAFETY: the handle is an opaque token only passed back to the plugin's `stop`, which the
// ABI allows from any thread.
unsafe impl Send for Handle {}

/// The boxed callback context, freed once the plugin has stopped.
struct ContextBox(*mut EmitContext);
// SAFETY: EmitContext is Send + Sync (a String and an mpsc sender).
unsafe impl Send for ContextBox {}

unsafe extern "C" fn host_emit(ctx: *mut c_void, bytes: *const u8, len: usize) -> i32 {
    let run = || {
        if ctx.is_null() || bytes.is_null() {
            return abi::ERROR;
        }
        // SAFETY: `ctx` is the EmitContext this host boxed in `start`, alive until `stop`
        // returned; the plugin passes `len` readable bytes.
        let (ctx, bytes) = unsafe {
            (
                &*(ctx as *const EmitContext),
                std::slice::from_raw_parts(bytes, len),
            )
        };
        let change: Emitted = match codec::decode(bytes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(plugin = %ctx.plugin, "source emitted a malformed change: {e}");
                return abi::ERROR;
            }
        };
        if let Some(inline) = &change.bytes {
            if inline.len() > abi::MAX_INLINE_BYTES || !matches!(change.op, Op::Put { .. }) {
                tracing::warn!(plugin = %ctx.plugin, key = %change.key, "inline content over {} bytes, or not on a Put", abi::MAX_INLINE_BYTES);
                return abi::ERROR;
            }
        }
        match ctx.queue.try_send(change) {
            Ok(()) => abi::OK,
            Err(mpsc::error::TrySendError::Full(_)) => abi::BUSY,
            Err(mpsc::error::TrySendError::Closed(_)) => abi::ERROR,
        }
    };
    // A panic must not unwind into the plugin's frames.
    std::panic::catch_unwind(run).unwrap_or(abi::ERROR)
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: u32, msg: *const u8, len: usize) {
    let run = || {
        if ctx.is_null() || msg.is_null() {
            return;
        }
        // SAFETY: as in `host_emit`.
        let (ctx, msg) = unsafe {
            (
                &*(ctx as *const EmitContext),
                std::slice::from_raw_parts(msg, len),
            )
        };
        let msg = String::from_utf8_lossy(msg);
        let plugin = &ctx.plugin;
        match level {
            abi::LOG_ERROR => tracing::error!(%plugin, "{msg}"),
            abi::LOG_WARN => tracing::warn!(%plugin, "{msg}"),
            abi::LOG_INFO => tracing::info!(%plugin, "{msg}"),
            _ => tracing::debug!(%plugin, "{msg}"),
        }
    };
    let _ = std::panic::catch_unwind(run);
}

impl DylibSource {
    fn start(&self, queue: mpsc::Sender<Emitted>) -> Result<(Handle, ContextBox), PluginError> {
        let f = &self.0;
        let ctx = Box::into_raw(Box::new(EmitContext {
            plugin: f.name.clone(),
            queue,
        }));
        let callbacks = HostCallbacks {
            ctx: ctx.cast(),
            emit: Some(host_emit),
            log: Some(host_log),
        };
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut out = Buffer::EMPTY;
        // SAFETY: `start` comes from a checked declaration; the callbacks and their
        // context stay valid until `stop` returns; config, handle and out are valid.
        let code = unsafe {
            (f.start)(
                callbacks,
                f.config.as_ptr(),
                f.config.len(),
                &mut handle,
                &mut out,
            )
        };
        let message = take(out, f.free);
        if code != abi::OK {
            // SAFETY: the start failed, so the plugin holds no callbacks any more.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(PluginError::new(
                &f.name,
                call_error(&f.name, code, message),
            ));
        }
        Ok((Handle(handle), ContextBox(ctx)))
    }

    fn stop(&self, handle: Handle, ctx: ContextBox) {
        let f = &self.0;
        let mut out = Buffer::EMPTY;
        // SAFETY: the handle came from `start` and is stopped once.
        let code = unsafe { (f.stop)(handle.0, &mut out) };
        let message = take(out, f.free);
        if code == abi::OK {
            // SAFETY: the plugin stopped and joined its threads: nothing uses the context.
            drop(unsafe { Box::from_raw(ctx.0) });
        } else {
            // Its threads may still hold the callbacks: leak the context rather than free
            // it under them.
            tracing::error!(plugin = %f.name, "{}", call_error(&f.name, code, message));
        }
    }
}

async fn append(ctx: &SourceContext, name: &str, batch: Vec<Emitted>) -> Result<(), PluginError> {
    // Storing the content is file and lock work: off the async runtime.
    let chunks = ctx.chunks().clone();
    let changes = tokio::task::spawn_blocking(move || {
        let mut changes = Vec::with_capacity(batch.len());
        for change in batch {
            let op = match (change.bytes, change.op) {
                (Some(bytes), Op::Put { meta, .. }) => Op::Put {
                    content: Some(ContentRef {
                        root: chunks.put(&bytes)?,
                        size: bytes.len() as u64,
                        depth: 0,
                    }),
                    meta,
                },
                (_, op) => op,
            };
            changes.push(LocalChange::new(change.key, op).made_at(change.made_at_ms));
        }
        Ok::<_, LogError>(changes)
    })
    .await
    .map_err(|_| PluginError::new(name, "storing the records' content panicked"))?
    .map_err(|e| PluginError::new(name, e))?;
    ctx.emit(changes)
        .await
        .map(|_| ())
        .map_err(|e| PluginError::new(name, e))
}

#[async_trait]
impl Source for DylibSource {
    fn name(&self) -> &str {
        &self.0.name
    }

    async fn run(&self, ctx: SourceContext) -> Result<(), PluginError> {
        let (tx, mut rx) = mpsc::channel(SOURCE_QUEUE);
        let (handle, boxed) = self.start(tx)?;
        let mut shutdown = ctx.clone();
        let mut batch = Vec::with_capacity(SOURCE_BATCH);
        let mut result = Ok(());
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, SOURCE_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    if let Err(e) = append(&ctx, &self.0.name, std::mem::take(&mut batch)).await {
                        result = Err(e);
                        break;
                    }
                }
                _ = shutdown.shutdown() => break,
            }
        }
        // `stop` joins the plugin's threads, which may be sleeping: off the runtime.
        let this = DylibSource(self.0.clone());
        let stopped = tokio::task::spawn_blocking(move || this.stop(handle, boxed)).await;
        if let Err(e) = stopped {
            tracing::error!(plugin = %self.0.name, "stopping the source: {e}");
        }
        // What the plugin emitted before it stopped is still logged.
        rx.close();
        while let Ok(change) = rx.try_recv() {
            batch.push(change);
        }
        if result.is_ok() && !batch.is_empty() {
            result = append(&ctx, &self.0.name, batch).await;
        }
        result
    }
}

/// A plugin that failed to load, for logs and status.
#[derive(Debug)]
pub struct LoadFailure {
    /// The library file.
    pub path: PathBuf,
    /// Why it was refused.
    pub error: DylibError,
}

/// The plugins named by the config: the loaded ones and the failures.
#[derive(Debug, Default)]
pub struct PluginRegistry {
    plugins: Vec<LoadedPlugin>,
    failures: Vec<LoadFailure>,
}

impl PluginRegistry {
    /// Loads every library in `paths`, in order. A failure is logged and kept (see
    /// [`Self::failures`]); the others load anyway. A name already taken is refused.
    pub fn load_all<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> PluginRegistry {
        let mut registry = PluginRegistry::default();
        for path in paths {
            let path = path.as_ref();
            let loaded = load(path).and_then(|plugin| match registry.get(&plugin.name) {
                Some(first) => Err(DylibError::DuplicateName {
                    path: path.to_owned(),
                    name: plugin.name.clone(),
                    first: first.path.clone(),
                }),
                None => Ok(plugin),
            });
            match loaded {
                Ok(plugin) => registry.plugins.push(plugin),
                Err(error) => {
                    tracing::error!("{error}; skipping it");
                    registry.failures.push(LoadFailure {
                        path: path.to_owned(),
                        error,
                    });
                }
            }
        }
        registry
    }

    /// The plugins loaded.
    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    /// The plugins refused.
    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    /// The loaded plugin called `name`.
    pub fn get(&self, name: &str) -> Option<&LoadedPlugin> {
        self.plugins.iter().find(|p| p.name == name)
    }

    /// The policy plugin called `name`; when there is none, an error listing every plugin
    /// that failed to load (one of them may have been meant), so the daemon can refuse to
    /// start naming the file and the reason.
    pub fn require_policy(&self, name: &str) -> Result<Arc<dyn ConflictPolicy>, DylibError> {
        if let Some(policy) = self.get(name).and_then(LoadedPlugin::policy) {
            return Ok(policy);
        }
        let failures = if self.failures.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.failures.iter().map(|f| f.error.to_string()).collect();
            format!("; failed plugins: {}", list.join("; "))
        };
        Err(DylibError::NoSuchPolicy {
            name: name.to_owned(),
            failures,
        })
    }
}
