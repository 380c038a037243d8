//! The web chat app (`web/` in the repository), served at `/` unless the server is started
//! with `--no-web` (`web = false`).
//!
//! Its built files are embedded in the binary, so a server needs nothing beside it: `web/dist/`
//! is committed, built by `npm run build` in `web/` (and `npm run check` there says whether it
//! is up to date with the sources). Every answer carries `cache-control: no-cache`: a browser
//! may keep a copy but asks again each time, so a new server's app is picked up at once.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &[u8] = include_bytes!("../../../web/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../../../web/dist/assets/app.js");
const APP_CSS: &[u8] = include_bytes!("../../../web/dist/assets/app.css");
/// The service worker that lets the page reload while the server cannot be reached. At the
/// root, so that its scope is the whole app.
const SW_JS: &[u8] = include_bytes!("../../../web/dist/sw.js");

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The app's routes (added to the HTTP API's when the app is served).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file(INDEX_HTML, HTML) }))
        .route("/index.html", get(|| async { file(INDEX_HTML, HTML) }))
        .route("/assets/app.js", get(|| async { file(APP_JS, JAVASCRIPT) }))
        .route("/assets/app.css", get(|| async { file(APP_CSS, CSS) }))
        .route("/sw.js", get(|| async { file(SW_JS, JAVASCRIPT) }))
}

fn file(body: &'static [u8], content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // No other site may frame the app (its token is in the page's storage), and the
            // page loads code from this server only; it may connect to any server, since a
            // user may sign in to another.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; connect-src *; img-src 'self' data:; \
                     frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
                ),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads the script and the stylesheet by the paths served here (the build's
    /// file names are fixed in web/vite.config.ts; a hashed name would load nothing).
    #[test]
    fn the_page_names_the_files_served() {
        let page = std::str::from_utf8(INDEX_HTML).expect("the page is UTF-8");
        assert!(page.contains(r#"src="/assets/app.js""#), "{page}");
        assert!(page.contains(r#"href="/assets/app.css""#), "{page}");
        let script = std::str::from_utf8(APP_JS).expect("the script is UTF-8");
        assert!(
            script.contains("/sw.js"),
            "the app registers the service worker"
        );
        assert!(!APP_CSS.is_empty() && !SW_JS.is_empty());
    }
}
