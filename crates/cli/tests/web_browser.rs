//! The web app (`web/`) from `cargo test`: its committed bundle (`web/dist`, which `ordo serve`
//! embeds) matches its source, and it works in a real browser against this build's `ordo`
//! (`web/e2e`: two browser contexts chat, one goes offline, sends 20 messages, reloads and comes
//! back; the server is SIGKILLed mid-conversation). Needs Node.js with npm and Debian's Chromium
//! (`/usr/bin/chromium`, or `CHROMIUM`); skipped with a printed reason without them, except in
//! CI, where `.ci/run` installs them.

use ordo_testkit::node_js;

#[test]
fn the_committed_bundle_matches_its_source() {
    if !node_js::node_or_skip("the_committed_bundle_matches_its_source") {
        return;
    }
    let dir = node_js::repo_root().join("web");
    node_js::npm_ci(&dir);
    node_js::run(&dir, &["run", "check"], &[]);
}

#[test]
fn the_app_keeps_the_promise_in_a_real_browser() {
    let test = "the_app_keeps_the_promise_in_a_real_browser";
    if !node_js::node_or_skip(test) {
        return;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("Chromium is needed in CI for {test} and is not at {chromium}: apt-get install chromium");
        }
        eprintln!(
            "SKIPPED {test}: no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
        );
        return;
    }
    let dir = node_js::repo_root().join("web");
    node_js::npm_ci(&dir);
    node_js::run(
        &dir,
        &["run", "test:browser"],
        &[
            ("ORDO_BIN", env!("CARGO_BIN_EXE_ordo")),
            ("CHROMIUM", &chromium),
        ],
    );
}
