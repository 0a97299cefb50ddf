//! TLS 1.3 configuration for every OpenMesh link: rustls with the aws-lc-rs provider, TLS 1.3
//! only, X25519MLKEM768 (post-quantum hybrid) preferred and X25519 accepted, AES-256-GCM,
//! AES-128-GCM and ChaCha20-Poly1305, and mutual authentication.
//!
//! Agents always present a certificate for their own Ed25519 key; the relay reads the agent id
//! from it ([`crate::pki::ed25519_key_of`]). In open admission any such certificate is accepted
//! once the handshake signature proves possession of the key; in CA-only admission it must chain
//! to the fleet CA.

pub mod handshake;
pub mod record;
#[cfg(test)]
mod tests;
pub mod transport;

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{aws_lc_rs, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::pki::{ed25519_key_of, Identity};
use crate::policy::AdmissionMode;

/// ALPN protocol id of the agent link.
pub const ALPN: &[u8] = b"openmesh/1";
/// ALPN protocol id of a relay-to-relay link.
pub const LINK_ALPN: &[u8] = b"openmesh-link/1";

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("CA-only admission needs at least one CA certificate")]
    NoCa,
}

/// The crypto provider every link uses.
pub fn provider() -> Arc<CryptoProvider> {
    use aws_lc_rs::cipher_suite::*;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// Server configuration for a relay's agent listener.
pub fn server_config(
    identity: &Identity,
    mode: AdmissionMode,
    ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = match mode {
        AdmissionMode::Open => Arc::new(OpenAgentVerifier {
            algorithms: provider.signature_verification_algorithms,
        }),
        AdmissionMode::CaOnly => {
            if ca.is_empty() {
                return Err(TlsConfigError::NoCa);
            }
            let mut roots = RootCertStore::empty();
            for c in ca {
                roots.add(c.clone())?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?
        }
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Client configuration for an agent: trusts `ca`, presents `identity`.
pub fn client_config(
    identity: &Identity,
    ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.chain.clone(), identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // The agent library runs the record layer itself once the handshake is over
    // (`transport::Transport::into_split`).
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsConfigError> {
    if ca.is_empty() {
        return Err(TlsConfigError::NoCa);
    }
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Server configuration for a relay's link listener: only certificates of the fleet CA that
/// carry the relay role marker ([`crate::pki::RELAY_ROLE_URI`]) complete the handshake; an
/// agent's certificate, even of the same CA, does not.
pub fn link_server_config(
    identity: &Identity,
    fleet_ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots(fleet_ca)?, provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(RelayRole(inner)))
        .with_single_cert(identity.chain.clone(), identity.private_key())?;
    cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
    cfg.send_tls13_tickets = 0;
    // The relay runs the record layer itself once the handshake is over.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Client configuration for dialling another relay's link listener: its certificate must chain
/// to the fleet CA, carry the relay role marker and name the relay dialled
/// ([`crate::pki::relay_link_name`] as the server name).
pub fn link_client_config(
    identity: &Identity,
    fleet_ca: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(fleet_ca)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RelayRole(inner)))
        .with_client_auth_cert(identity.chain.clone(), identity.private_key())?;
    cfg.alpn_protocols = vec![LINK_ALPN.to_vec()];
    cfg.enable_secret_extraction = true;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The signature checks of a verifier wrapper, handed to the wrapped verifier (`self.0`).
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    };
}

/// A verifier that also requires the relay role marker on the end-entity certificate.
#[derive(Debug)]
struct RelayRole<V: ?Sized>(Arc<V>);

fn relay_role(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if crate::pki::has_relay_role(end_entity) {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::InvalidPurpose,
        ))
    }
}

impl<V: ClientCertVerifier + ?Sized> ClientCertVerifier for RelayRole<V> {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.0.verify_client_cert(end_entity, intermediates, now)?;
        relay_role(end_entity)?;
        Ok(ok)
    }

    delegate_signatures!();
}

impl rustls::client::danger::ServerCertVerifier
    for RelayRole<rustls::client::WebPkiServerVerifier>
{
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ok = self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        relay_role(end_entity)?;
        Ok(ok)
    }

    delegate_signatures!();
}

/// Open admission: accepts any certificate carrying an Ed25519 key, provided the TLS 1.3
/// CertificateVerify signature proves the peer holds that key.
#[derive(Debug)]
struct OpenAgentVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for OpenAgentVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        ed25519_key_of(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
