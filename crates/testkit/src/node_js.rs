//! Running the JavaScript parts of the project (the TypeScript SDK in `sdk/typescript`, the web
//! app in `web/`) from `cargo test`: Node.js and npm are found or the test is skipped (a
//! panic in CI, where they must be there), a package's dependencies are installed with
//! `npm ci` when its lock file changed since the last install, and an npm script is run with
//! its output shown.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

fn answers(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether Node.js and npm are here: `false` (after printing that `test` is skipped) outside
/// CI, a panic in CI.
pub fn node_or_skip(test: &str) -> bool {
    if answers("node") && answers("npm") {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("Node.js 20 and npm are needed in CI for {test}: install them (`apt-get install nodejs npm`)");
    }
    eprintln!("SKIPPED {test}: Node.js and npm are not installed");
    false
}

/// Installs `dir`'s dependencies with `npm ci` unless `node_modules` was installed from the
/// same `package-lock.json` already.
pub fn npm_ci(dir: &Path) {
    // Tests of one binary run on threads: one install at a time.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let lock = std::fs::read(dir.join("package-lock.json"))
        .unwrap_or_else(|e| panic!("{}/package-lock.json: {e}", dir.display()));
    let stamp = dir.join("node_modules/.ordo-installed-lock");
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) {
        return;
    }
    run(dir, &["ci", "--no-audit", "--no-fund"], &[]);
    std::fs::write(&stamp, &lock).expect("the install stamp can be written");
}

/// Runs `npm <args>` in `dir` with `env` added, its output shown; panics if it fails.
pub fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) {
    let mut cmd = Command::new("npm");
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run npm in {}: {e}", dir.display()));
    assert!(
        status.success(),
        "`npm {}` in {} failed ({status}); its output is above",
        args.join(" "),
        dir.display()
    );
}
