//! docs/openapi.yaml, the machine-readable description of the HTTP API, is kept true to the
//! server in two ways:
//!
//! - [`document_matches_the_routes`] (no tools needed): every route `routes()` in
//!   crates/server/src/http.rs registers, with each of its methods, is in the document and the
//!   document has no other; the document's references resolve, admin operations need the admin
//!   key, request bodies refuse unknown fields, and every status and error code the HTTP code
//!   answers with is described.
//! - [`server_answers_as_documented`]: scripts/openapi-check runs schemathesis (pinned, from
//!   PyPI, in a virtualenv under target/) against this build of `ordo serve`. Where Python, its
//!   venv module or PyPI cannot be had, the test is skipped with the reason printed, except with
//!   `CI=true`, where that fails it.
//!
//! (Its own test binary: the schemathesis run starts its own server and takes some seconds.)

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The exit status scripts/openapi-check uses for "skipped: a tool it needs is missing".
const SKIPPED: i32 = 77;
/// Longer than any sound run (installing schemathesis included); then the check is stopped.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(15 * 60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn document() -> Value {
    serde_norway::from_str(&read("docs/openapi.yaml"))
        .unwrap_or_else(|e| panic!("docs/openapi.yaml is not valid YAML: {e}"))
}

const METHODS: [&str; 8] = [
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];

/// The `(METHOD, path)` pairs `.route("path", get(..).post(..))` calls register in `src`.
fn routes_in(src: &str) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut rest = src;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let args = balanced(rest);
        let path = string_literal(args.trim_start())
            .unwrap_or_else(|| panic!("a .route( without a path literal in http.rs: {args}"));
        let handlers = &args[args.find(',').expect("route(path, handlers)") + 1..];
        let methods = calls_in(handlers)
            .into_iter()
            .filter(|m| METHODS.contains(&m.as_str()))
            .collect::<Vec<_>>();
        assert!(
            !methods.is_empty(),
            "route {path} has no method: {handlers}"
        );
        for m in methods {
            routes.insert((m.to_uppercase(), path.clone()));
        }
    }
    assert!(!routes.is_empty(), "no .route( calls found in http.rs");
    routes
}

/// The text up to the parenthesis that closes the one just opened.
fn balanced(s: &str) -> &str {
    let mut depth = 1;
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &s[..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in http.rs after: {s:.80}")
}

/// A `"..."` literal at the start of `s` (no escapes are needed in paths or codes).
fn string_literal(s: &str) -> Option<String> {
    let s = s.strip_prefix('"')?;
    Some(s[..s.find('"')?].to_string())
}

/// The identifiers followed by `(` in `s`: the functions and methods it calls.
fn calls_in(s: &str) -> Vec<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            if bytes.get(i) == Some(&b'(') {
                out.push(s[start..i].to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The `(METHOD, path)` pairs the document describes.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is a map");
        for key in item.keys() {
            if METHODS.contains(&key.as_str()) {
                ops.insert((key.to_uppercase(), path.clone()));
            } else {
                assert!(
                    ["parameters", "summary", "description", "servers"].contains(&key.as_str()),
                    "{path}: unexpected key {key:?} in a path item"
                );
            }
        }
    }
    ops
}

/// The value `$ref` points at (local references only), followed through further `$ref`s.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references are used: {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("reference {r} resolves to nothing"));
    }
    panic!("a reference loop")
}

/// Every `$ref` anywhere under `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// The status numbers `StatusCode::NAME` constants in `src` stand for.
fn statuses_in(src: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for part in src.split("StatusCode::").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        if name.is_empty() {
            continue; // StatusCode::from_u16 and the like
        }
        let code = match name.as_str() {
            "OK" => 200,
            "CREATED" => 201,
            "NO_CONTENT" => 204,
            "BAD_REQUEST" => 400,
            "UNAUTHORIZED" => 401,
            "NOT_FOUND" => 404,
            "METHOD_NOT_ALLOWED" => 405,
            "CONFLICT" => 409,
            "PAYLOAD_TOO_LARGE" => 413,
            "TOO_MANY_REQUESTS" => 429,
            "INTERNAL_SERVER_ERROR" => 500,
            "SERVICE_UNAVAILABLE" => 503,
            "INSUFFICIENT_STORAGE" => 507,
            other => panic!("http.rs uses StatusCode::{other}: add it to this test's table"),
        };
        out.insert(code);
    }
    out
}

/// The error codes http.rs writes: the second argument of its `error(status, code, ..)` calls
/// (a literal or an `ErrorCode::Name`) and the codes `json_errors` names after a status.
fn error_codes_in(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = src.as_bytes();
    let mut from = 0;
    while let Some(at) = src[from..].find("error(") {
        let start = from + at;
        from = start + "error(".len();
        let standalone =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !standalone || src[..start].ends_with("fn ") {
            continue;
        }
        let args = balanced(&src[from..]);
        let Some(comma) = args.find(',') else {
            continue;
        };
        let second = args[comma + 1..].trim_start();
        if let Some(code) = string_literal(second) {
            out.insert(code);
        } else if let Some(name) = second.strip_prefix("ErrorCode::") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            out.insert(snake_case(&name));
        }
    }
    // json_errors: `StatusCode::X => "code",` and the fallbacks `... => "code",`.
    if let Some(at) = src.find("let code = match status {") {
        let body = balanced_braces(&src[at + "let code = match status {".len()..]);
        for arm in body.split(',') {
            if let Some((_, code)) = arm.split_once("=>") {
                if let Some(code) = string_literal(code.trim()) {
                    out.insert(code);
                }
            }
        }
    }
    out
}

fn balanced_braces(s: &str) -> &str {
    let mut depth = 1;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &s[..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces in http.rs")
}

fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn document_matches_the_routes() {
    let doc = document();
    let http = read("crates/server/src/http.rs");
    let mut problems = Vec::new();

    assert_eq!(doc["openapi"], "3.0.3", "the document is OpenAPI 3.0.3");

    // Routes, both ways.
    let routes = routes_in(&http);
    let documented = documented_operations(&doc);
    for (m, p) in routes.difference(&documented) {
        problems.push(format!(
            "{m} {p} is served (crates/server/src/http.rs) but not in docs/openapi.yaml"
        ));
    }
    for (m, p) in documented.difference(&routes) {
        problems.push(format!(
            "{m} {p} is in docs/openapi.yaml but not served (crates/server/src/http.rs routes())"
        ));
    }

    // References resolve.
    let mut all_refs = Vec::new();
    refs(&doc, &mut all_refs);
    for r in all_refs {
        if r.strip_prefix('#').and_then(|p| doc.pointer(p)).is_none() {
            problems.push(format!("reference {r} resolves to nothing"));
        }
    }

    let error_schema = &doc["components"]["schemas"]["Error"];
    let code_enum: BTreeSet<String> = error_schema["properties"]["error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .expect("Error.error.code has an enum")
        .iter()
        .map(|c| c.as_str().expect("codes are strings").to_string())
        .collect();
    let mut statuses = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let name = format!("{} {path}", method.to_uppercase());
            let security: Vec<&str> = op["security"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(|r| r.as_object())
                        .flat_map(|r| r.keys().map(String::as_str))
                        .collect()
                })
                .unwrap_or_default();
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{name} has no responses"));
            if path.starts_with("/v1/admin/") {
                if security != ["adminKey"] {
                    problems.push(format!(
                        "{name} must need the admin key (security: adminKey)"
                    ));
                }
                if !responses.contains_key("401") {
                    problems.push(format!("{name} must describe 401"));
                }
            }
            if let Some(body) = op.get("requestBody") {
                let schema = resolve(
                    &doc,
                    &resolve(&doc, body)["content"]["application/json"]["schema"],
                );
                if schema["additionalProperties"] != Value::Bool(false) {
                    problems.push(format!(
                        "{name}: the request body schema must say additionalProperties: false"
                    ));
                }
                for status in ["400", "413"] {
                    if !responses.contains_key(status) {
                        problems.push(format!("{name} takes a body, so must describe {status}"));
                    }
                }
            }
            for (status, response) in responses {
                statuses.insert(status.parse::<u16>().expect("numeric statuses"));
                if !status.starts_with('4') && !status.starts_with('5') {
                    continue;
                }
                let schema = &resolve(&doc, response)["content"]["application/json"]["schema"];
                if schema.get("$ref").and_then(Value::as_str) != Some("#/components/schemas/Error")
                {
                    problems.push(format!("{name}: its {status} must be the Error schema"));
                }
            }
        }
    }

    // What the HTTP code answers with is described somewhere; but for 405, the answer to a
    // method no operation has (the document's introduction says it).
    for s in statuses_in(&http) {
        if s != 405 && !statuses.contains(&s) {
            problems.push(format!(
                "http.rs answers with status {s}, which no operation in docs/openapi.yaml describes"
            ));
        }
    }
    for code in error_codes_in(&http) {
        if !code_enum.contains(&code) {
            problems.push(format!(
                "http.rs answers with error code {code:?}, missing from the Error schema's code enum"
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "docs/openapi.yaml and the server disagree:\n  {}",
        problems.join("\n  ")
    );
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

#[test]
fn server_answers_as_documented() {
    // One file for stdout and stderr, through one shared offset, so that neither overwrites
    // the other.
    let out = tempfile::NamedTempFile::new().expect("a temporary file for the output");
    let stdout = out.reopen().expect("reopen the output file");
    let stderr = stdout.try_clone().expect("clone the output file");
    let script = repo().join("scripts/openapi-check");
    let started = Instant::now();
    let spawned = Command::new("bash")
        .arg(&script)
        .args(["--ordo", env!("CARGO_BIN_EXE_ordo")])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if !ci() => {
            eprintln!("SKIPPED: cannot run bash for {}: {e}", script.display());
            return;
        }
        Err(e) => panic!("cannot run bash for {} (CI=true): {e}", script.display()),
    };
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the check") {
            break s;
        }
        if started.elapsed() > SCRIPT_DEADLINE {
            // SIGTERM first, so that the script stops the server it started.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scripts/openapi-check did not finish in {SCRIPT_DEADLINE:?}; its output:\n{}",
                std::fs::read_to_string(out.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(out.path()).unwrap_or_default();
    match status.code() {
        Some(0) => eprintln!("{output}\nopenapi-check passed in {:?}", started.elapsed()),
        Some(SKIPPED) if !ci() => eprintln!("{output}\n(the schemathesis check was skipped)"),
        _ => panic!(
            "scripts/openapi-check failed ({status}) after {:?}: the server does not answer as \
             docs/openapi.yaml says, or the check could not run. Its output:\n{output}",
            started.elapsed()
        ),
    }
}

/// The route reader itself, on the shapes rustfmt gives `routes()`.
#[test]
fn routes_are_read_from_chained_and_wrapped_calls() {
    let src = r#"
        Router::new()
            .route("/a", get(a))
            .route("/b", post(create).get(list))
            .route(
                "/b/{id}",
                get(get_one).patch(update).delete(remove_it),
            )
            .fallback(not_found)
    "#;
    let got: Vec<(String, String)> = routes_in(src).into_iter().collect();
    let want: Vec<(String, String)> = [
        ("DELETE", "/b/{id}"),
        ("GET", "/a"),
        ("GET", "/b"),
        ("GET", "/b/{id}"),
        ("PATCH", "/b/{id}"),
        ("POST", "/b"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(got, want);
    let codes = error_codes_in(
        r#"fn error(status: StatusCode, code: &str) {}
           error(StatusCode::GONE, "gone", "x"); core_error(e); tracing::error!(x);
           error(StatusCode::X, ErrorCode::ShuttingDown.as_str(), "y");
           let code = match status { StatusCode::NOT_FOUND => "not_found", _ => "malformed", };"#,
    );
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        ["gone", "malformed", "not_found", "shutting_down"]
    );
}
