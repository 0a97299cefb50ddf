//! Connecting to something that accepts TCP and never answers ends within the connect timeout.

use std::time::{Duration, Instant};

use openmesh_agent::{Agent, ClientConfig, ClientError};
use openmesh_dataplane::pki::Identity;

#[tokio::test]
async fn a_relay_that_never_answers_times_out_within_the_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accepts and holds connections without a byte of TLS.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut cfg = ClientConfig::new(
        addr,
        Vec::new(),
        Identity::generate_self_signed("a").unwrap(),
    );
    cfg.connect_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), Agent::connect(cfg))
        .await
        .expect("connect gave up by itself");
    let took = started.elapsed();
    assert!(matches!(r, Err(ClientError::Timeout)), "{:?}", r.err());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    silent.abort();
}
