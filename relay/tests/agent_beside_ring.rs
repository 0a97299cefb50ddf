//! An application that uses rustls with the ring provider (as HTTP or NATS clients may) and the
//! agent library in one process: the library needs no process-default crypto provider, and
//! never installs or changes one.

mod common;

use common::Relay;
use openmesh_agent::{Agent, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_on_rustls_with_ring_runs_agents_beside_it() {
    let relay = Relay::start(&["--cores", "1"], None);
    // Both providers are compiled in and none is the default yet: rustls would not know which
    // to pick for `ClientConfig::builder()`, yet the agent connects.
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    let mut b = Agent::connect(relay.config("ring-b")).await.unwrap();
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_none(),
        "the agent set no process default"
    );

    // The application makes ring the process default and builds its own TLS config with it.
    rustls::crypto::ring::default_provider()
        .install_default()
        .unwrap();
    let app_tls = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    assert!(format!("{:?}", app_tls.crypto_provider().secure_random).contains("Ring"));

    let a = Agent::connect(relay.config("ring-a")).await.unwrap();
    let env = a.envelope_to(b.id()).build(b"beside ring").unwrap();
    assert_eq!(
        a.send(&env).await.unwrap().outcome().await,
        Outcome::Accepted
    );
    let got = b.recv().await.unwrap();
    assert_eq!(&got.payload()[..], b"beside ring");
    b.ack(&got).await.unwrap();

    let default = rustls::crypto::CryptoProvider::get_default().unwrap();
    assert!(
        format!("{:?}", default.secure_random).contains("Ring"),
        "the process default is still the application's: {:?}",
        default.secure_random
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}
