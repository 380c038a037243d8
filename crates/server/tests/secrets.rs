//! The token secret is made with a new store and never made anew for an existing one: a server
//! whose data directory holds a store but lost its `secret` refuses to start, naming the file,
//! rather than invalidating every token issued. (A lost admin key is made anew: it signs nothing
//! handed out.)

use ordo_server::{start, Config, ServerError};

fn config(dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.to_path_buf(),
        ..Config::default()
    }
}

async fn start_and_stop(cfg: Config) {
    start(cfg).await.unwrap().shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lost_secret_is_not_made_anew_for_an_existing_store() {
    let dir = tempfile::tempdir().unwrap();
    start_and_stop(config(dir.path())).await;
    let secret = std::fs::read_to_string(dir.path().join("secret")).unwrap();
    assert_eq!(secret.len(), 64, "a new store gets a new secret");
    std::fs::remove_file(dir.path().join("secret")).unwrap();
    match start(config(dir.path())).await {
        Ok(_) => panic!("started without its secret"),
        Err(e @ ServerError::SecretMissing { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("secret") && text.contains("--secret"),
                "{text}"
            );
        }
        Err(e) => panic!("wrong refusal: {e}"),
    }
    assert!(!dir.path().join("secret").exists(), "nothing made anew");
    // Given by flag instead, it starts; and a lost admin key (it signs nothing handed out) is
    // made anew.
    let admin = std::fs::read(dir.path().join("admin.key")).unwrap();
    std::fs::remove_file(dir.path().join("admin.key")).unwrap();
    let given = Config {
        secret: Some(secret.clone()),
        ..config(dir.path())
    };
    start_and_stop(given).await;
    assert_ne!(std::fs::read(dir.path().join("admin.key")).unwrap(), admin);
    // And with the file back, as before.
    std::fs::write(dir.path().join("secret"), &secret).unwrap();
    start_and_stop(config(dir.path())).await;
}
