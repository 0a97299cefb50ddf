//! Identities and certificates: agent and relay Ed25519 keys, the development CA, and the agent id
//! carried in a peer's certificate.
//!
//! Every agent, relay and control process is named by its Ed25519 public key. Agents present a
//! certificate for their own key (self-signed in open admission, CA-issued otherwise); relays
//! present a certificate issued by the fleet CA. A relay started without a configured certificate
//! creates a development CA and a relay certificate under its data directory on first start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::wire::{AgentId, RelayId};

/// Errors from creating, loading or reading certificates and keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    /// Certificate or key generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A PEM file held no certificate or key.
    #[error("{0}: no PEM {1} found")]
    Empty(PathBuf, &'static str),
    /// The certificate does not carry an Ed25519 public key.
    #[error("certificate key is not Ed25519")]
    NotEd25519,
    /// The certificate is not valid DER.
    #[error("malformed certificate")]
    Malformed,
    /// The private key is not an Ed25519 PKCS#8 key.
    #[error("private key: {0}")]
    Key(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An Ed25519 key with a certificate for it: what an agent or a relay presents in TLS.
pub struct Identity {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
    public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &AgentId(self.public))
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key_pkcs8: self.key_pkcs8.clone(),
            public: self.public,
        }
    }
}

impl Identity {
    /// A fresh Ed25519 key with a self-signed certificate (open admission).
    pub fn generate_self_signed(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key)?;
        Ok(Self::from_parts(vec![cert.der().clone()], &key))
    }

    /// A self-signed agent identity whose Ed25519 key is derived from `seed`: the same seed
    /// gives the same agent id. For tests that replay schedules; a real agent's key must come
    /// from [`Identity::generate_self_signed`].
    pub fn self_signed_from_seed(common_name: &str, seed: [u8; 32]) -> Result<Self, PkiError> {
        let key = key_from_seed(seed)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.serial_number = Some(serial_from_seed(seed));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key)?;
        Ok(Self::from_parts(vec![cert.der().clone()], &key))
    }

    fn from_parts(chain: Vec<CertificateDer<'static>>, key: &KeyPair) -> Self {
        let mut public = [0u8; 32];
        public.copy_from_slice(key.public_key_raw());
        Identity {
            chain,
            key_pkcs8: key.serialize_der(),
            public,
        }
    }

    /// Loads a certificate chain and its PKCS#8 key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let chain = pem_certs(&cert_pem);
        if chain.is_empty() {
            return Err(PkiError::Empty(cert_path.to_path_buf(), "certificate"));
        }
        let key = KeyPair::from_pem(&key_pem)?;
        let mut id = Self::from_parts(chain, &key);
        id.public = ed25519_key_of(&id.chain[0])?;
        Ok(id)
    }

    /// Writes the chain and the key as PEM (the key file with mode 0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        let mut pem = String::new();
        for c in &self.chain {
            pem.push_str(&to_pem("CERTIFICATE", c));
        }
        write_file(cert_path, pem.as_bytes(), false)?;
        write_file(
            key_path,
            to_pem("PRIVATE KEY", &self.key_pkcs8).as_bytes(),
            true,
        )
    }

    /// Loads the identity from the two files if they exist, else generates a self-signed one and
    /// saves it there.
    pub fn load_or_generate(
        cert_path: &Path,
        key_path: &Path,
        common_name: &str,
    ) -> Result<Self, PkiError> {
        if cert_path.exists() && key_path.exists() {
            return Self::load(cert_path, key_path);
        }
        let id = Self::generate_self_signed(common_name)?;
        id.save(cert_path, key_path)?;
        Ok(id)
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The Ed25519 key pair, for signing (end-to-end contexts, key bundles).
    pub fn signing_key(&self) -> Result<aws_lc_rs::signature::Ed25519KeyPair, PkiError> {
        use aws_lc_rs::signature::Ed25519KeyPair;
        Ed25519KeyPair::from_pkcs8(&self.key_pkcs8)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(&self.key_pkcs8))
            .map_err(|e| PkiError::Key(e.to_string()))
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// This identity as an agent id.
    pub fn agent_id(&self) -> AgentId {
        AgentId(self.public)
    }

    /// This identity as a relay id.
    pub fn relay_id(&self) -> RelayId {
        RelayId(self.public)
    }
}

/// A certificate authority that issues relay and agent certificates.
pub struct CertAuthority {
    /// The CA certificate.
    pub cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// A new self-signed Ed25519 CA.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        Self::with_key(KeyPair::generate_for(&PKCS_ED25519)?, common_name, None)
    }

    /// A CA whose key (and certificate's serial number) derive from `seed`: the same seed
    /// gives the same certificates, byte for byte. For tests that replay schedules.
    pub fn from_seed(common_name: &str, seed: [u8; 32]) -> Result<Self, PkiError> {
        Self::with_key(
            key_from_seed(seed)?,
            common_name,
            Some(serial_from_seed(seed)),
        )
    }

    fn with_key(
        key: KeyPair,
        common_name: &str,
        serial: Option<rcgen::SerialNumber>,
    ) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.serial_number = serial;
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA from its certificate and key PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let cert = pem_certs(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::Empty(cert_path.to_path_buf(), "certificate"))?;
        Ok(CertAuthority {
            cert,
            cert_pem,
            key: KeyPair::from_pem(&key_pem)?,
        })
    }

    /// Writes the CA certificate and key as PEM.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem.as_bytes(), false)?;
        write_file(key_path, self.key.serialize_pem().as_bytes(), true)
    }

    /// Issues a server certificate for a relay, valid for the given DNS names and IP addresses.
    pub fn issue_relay(&self, common_name: &str, names: &[String]) -> Result<Identity, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        self.issue(
            key,
            common_name,
            Vec::new(),
            names,
            &[ExtendedKeyUsagePurpose::ServerAuth],
            None,
        )
    }

    /// Issues a fleet relay's certificate: client and server usage (relays dial each other and
    /// are dialled), the relay role marker ([`RELAY_ROLE_URI`]) and the name links dial it by
    /// ([`relay_link_name`]), plus `names` (DNS names or IP addresses).
    pub fn issue_fleet_relay(
        &self,
        common_name: &str,
        names: &[String],
    ) -> Result<Identity, PkiError> {
        self.fleet_relay(
            KeyPair::generate_for(&PKCS_ED25519)?,
            common_name,
            names,
            None,
        )
    }

    fn fleet_relay(
        &self,
        key: KeyPair,
        common_name: &str,
        names: &[String],
        seed: Option<[u8; 32]>,
    ) -> Result<Identity, PkiError> {
        let id = RelayId(
            key.public_key_raw()
                .try_into()
                .map_err(|_| PkiError::NotEd25519)?,
        );
        let marks = vec![
            SanType::URI(RELAY_ROLE_URI.try_into()?),
            SanType::DnsName(relay_link_name(&id).try_into()?),
        ];
        self.issue(
            key,
            common_name,
            marks,
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            seed.map(serial_from_seed),
        )
    }

    /// [`CertAuthority::issue_fleet_relay`] for a key derived from `seed`: the same seed gives
    /// the same relay id. For tests that replay schedules.
    pub fn issue_fleet_relay_from_seed(
        &self,
        common_name: &str,
        names: &[String],
        seed: [u8; 32],
    ) -> Result<Identity, PkiError> {
        self.fleet_relay(key_from_seed(seed)?, common_name, names, Some(seed))
    }

    /// Issues a client certificate for an agent key (CA-only admission).
    pub fn issue_agent(&self, common_name: &str) -> Result<Identity, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        self.issue(
            key,
            common_name,
            Vec::new(),
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            None,
        )
    }

    /// A certificate for `key` signed by this CA: subject alternative names `sans`, then
    /// `names` (DNS names or IP addresses), with `usages`.
    fn issue(
        &self,
        key: KeyPair,
        common_name: &str,
        mut sans: Vec<SanType>,
        names: &[String],
        usages: &[ExtendedKeyUsagePurpose],
        serial: Option<rcgen::SerialNumber>,
    ) -> Result<Identity, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name);
        params.serial_number = serial;
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            });
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = usages.to_vec();
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity::from_parts(
            vec![cert.der().clone(), self.cert.clone()],
            &key,
        ))
    }
}

/// File locations of a development PKI under a data directory.
#[derive(Clone, Debug)]
pub struct DevPkiPaths {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub relay_cert: PathBuf,
    pub relay_key: PathBuf,
}

impl DevPkiPaths {
    /// The paths under `data_dir/tls/`.
    pub fn under(data_dir: &Path) -> Self {
        let d = data_dir.join("tls");
        DevPkiPaths {
            ca_cert: d.join("dev-ca.pem"),
            ca_key: d.join("dev-ca-key.pem"),
            relay_cert: d.join("relay.pem"),
            relay_key: d.join("relay-key.pem"),
        }
    }
}

/// Loads the development CA and relay identity, creating them when absent. Returns the relay
/// identity and whether anything was created.
pub fn dev_pki(paths: &DevPkiPaths) -> Result<(Identity, bool), PkiError> {
    if paths.relay_cert.exists() && paths.relay_key.exists() && paths.ca_cert.exists() {
        return Ok((Identity::load(&paths.relay_cert, &paths.relay_key)?, false));
    }
    let ca = if paths.ca_cert.exists() && paths.ca_key.exists() {
        CertAuthority::load(&paths.ca_cert, &paths.ca_key)?
    } else {
        let ca = CertAuthority::generate("OpenMesh development CA")?;
        ca.save(&paths.ca_cert, &paths.ca_key)?;
        ca
    };
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
    let relay = ca.issue_relay("openmesh-relay", &names)?;
    relay.save(&paths.relay_cert, &paths.relay_key)?;
    Ok((relay, true))
}

/// The raw Ed25519 public key in a certificate: the agent or relay id it names.
pub fn ed25519_key_of(cert: &CertificateDer<'_>) -> Result<[u8; 32], PkiError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| PkiError::Malformed)?;
    let spki = parsed.public_key();
    // id-Ed25519, RFC 8410
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return Err(PkiError::NotEd25519);
    }
    let raw: &[u8] = &spki.subject_public_key.data;
    raw.try_into().map_err(|_| PkiError::NotEd25519)
}

/// The subject alternative name (URI) that marks a certificate as a fleet relay's: the link
/// listener admits only certificates of the fleet CA that carry it.
pub const RELAY_ROLE_URI: &str = "urn:openmesh:role:relay";

/// An Ed25519 key pair whose private key is `seed` (PKCS#8 v1, RFC 8410: a fixed prefix, the
/// seed).
fn key_from_seed(seed: [u8; 32]) -> Result<KeyPair, PkiError> {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der);
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519)?)
}

/// A certificate serial number from `seed`: eight bytes, positive, never zero.
fn serial_from_seed(seed: [u8; 32]) -> rcgen::SerialNumber {
    let mut b = [0u8; 8];
    b.copy_from_slice(&seed[..8]);
    b[0] = (b[0] & 0x7f) | 0x40;
    rcgen::SerialNumber::from_slice(&b)
}

/// The DNS name a relay's link certificate carries and other relays dial it by: its id in hex,
/// split into two labels (a label holds at most 63 characters), under `relay.openmesh`.
pub fn relay_link_name(id: &RelayId) -> String {
    let hex = id.to_hex();
    format!("{}.{}.relay.openmesh", &hex[..32], &hex[32..])
}

/// Whether `cert` carries the relay role marker.
pub fn has_relay_role(cert: &CertificateDer<'_>) -> bool {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == RELAY_ROLE_URI))
}

/// Reads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    let certs = pem_certs(&pem);
    if certs.is_empty() {
        return Err(PkiError::Empty(path.to_path_buf(), "certificate"));
    }
    Ok(certs)
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), PkiError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_relay_cert_names_its_key_and_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("om-pki-{}", std::process::id()));
        let paths = DevPkiPaths::under(&dir);
        let (relay, created) = dev_pki(&paths).unwrap();
        assert!(created);
        assert_eq!(ed25519_key_of(&relay.chain[0]).unwrap(), relay.public_key());
        let (again, created) = dev_pki(&paths).unwrap();
        assert!(!created);
        assert_eq!(again.public_key(), relay.public_key());
        assert_eq!(load_certs(&paths.ca_cert).unwrap().len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn self_signed_agent_id_is_its_public_key() {
        let a = Identity::generate_self_signed("a").unwrap();
        let b = Identity::generate_self_signed("b").unwrap();
        assert_ne!(a.agent_id(), b.agent_id());
        assert_eq!(ed25519_key_of(&a.chain[0]).unwrap(), a.public_key());
    }
}
