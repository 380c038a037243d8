//! The TypeScript SDK's own test suite (`npm test` in `sdk/typescript`), run from `cargo test`
//! against this build's `ordo`: the conformance vectors recorded from the Rust client, and the
//! SDK against a real server (delivery, statuses, server kills, a client crash, failover
//! between URLs, refused tokens, retention gaps, groups). Needs Node.js 20 and npm; skipped
//! with a printed reason without them, except in CI.

use ordo_testkit::node_js;

#[test]
fn typescript_sdk_suite_passes() {
    if !node_js::node_or_skip("typescript_sdk_suite_passes") {
        return;
    }
    let dir = node_js::repo_root().join("sdk/typescript");
    node_js::npm_ci(&dir);
    node_js::run(&dir, &["test"], &[("ORDO_BIN", env!("CARGO_BIN_EXE_ordo"))]);
}
