//! Builds the example plugin cdylibs (`example-policy-keep-larger`, `example-source-jsonl`)
//! once per test or bench binary, with that binary's profile, so the plugin tests pass on
//! a clean clone. Shared by the engine's dylib test and bench and the daemon's plugin
//! test (included with `#[path]`).

use std::path::PathBuf;
use std::sync::OnceLock;

/// The path of the built example library called `name` (e.g. `example_source_jsonl`).
pub fn example_plugin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // …/target/<profile>/deps/<binary> → …/target/<profile>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
        // A target directory of their own: building only the examples unifies features
        // differently, and a second converge-api rlib beside the workspace's would leave
        // later builds in the same `deps/` (doctests) with two candidates.
        let target_dir = profile_dir.parent().unwrap().join("example-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "example-policy-keep-larger",
            "-p",
            "example-source-jsonl",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo to build the example plugins");
        assert!(status.success(), "building the example plugins failed");
        target_dir.join(profile_dir.file_name().unwrap())
    });
    dir.join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}
