//! Certificates for the node's HTTPS front door.
//!
//! A fresh node has no DNS and no certificate, yet every kit service must answer at its
//! own `https://…{node}.{domain}` URL. So on first start the node makes itself a small
//! CA and, signed by it, one wildcard server certificate covering every guest URL; users
//! trust the CA once (`hearth ca` prints it) and every URL works. Both live in a
//! directory of the node's state and are reused on later starts, so that trust survives
//! restarts. Only the server certificate is ever renewed by hearth: when it is missing,
//! near expiry, or no longer names this node and domain.
//!
//! An operator with a real certificate for their domain names its certificate and key
//! files instead. Those files are owned by something else (certbot, cert-manager, a
//! deploy script) and change under us, so they are re-read when they change without
//! restarting the listener; a broken new file never takes the listener down, the
//! previous certificate keeps being served.
//!
//! Files in the directory (keys 0600, each written to a temporary file and renamed, so a
//! crash leaves the old file or the new one):
//!
//! ```text
//! ca.pem  ca.key            the node CA (ECDSA P-256, 10 years)
//! server.pem  server.key    *.{node}.{domain}, {node}.{domain}, api.{node}.{domain} (1 year)
//! ```

use arc_swap::ArcSwap;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use time::OffsetDateTime;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server.key";

const CA_LIFETIME: time::Duration = time::Duration::days(3650);
const SERVER_LIFETIME: time::Duration = time::Duration::days(365);
/// Renewal margin: a certificate this close to expiry is replaced, giving clients with
/// skewed clocks and long-lived connections room.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// Certificates start a little in the past so a client whose clock runs behind still
/// accepts a certificate made a moment ago.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// What can go wrong with the node's certificates. Messages name the file involved: they
/// reach operators as they are.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no PEM {what} in it: {source}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: {source}")]
    Unusable {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: not a certificate hearth can read: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// The CA certificate is there but its key is not: signing is impossible, and quietly
    /// making a new CA would break every client that trusts the old one.
    #[error("{path} is missing but {cert} exists; restore the key, or remove both to start a new node CA (clients must then trust the new one)")]
    CaKeyMissing { path: PathBuf, cert: PathBuf },
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("{what} {name:?} is not a valid DNS name")]
    BadName { what: &'static str, name: String },
}

impl TlsError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TlsError {
        let path = path.to_path_buf();
        move |source| TlsError::Io { op, path, source }
    }

    fn generate(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
        move |source| TlsError::Generate { what, source }
    }
}

/// An operator's own certificate, replacing the generated server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorCert {
    /// PEM, the server certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// This node's name: the DNS label before the domain in every URL.
    pub node: String,
    pub domain: String,
    /// Where the generated CA and server certificate live, e.g. `<state_dir>/tls`.
    pub dir: PathBuf,
    pub operator: Option<OperatorCert>,
}

/// Where the node CA's certificate is kept in a certificate directory. A free function so
/// the CLI can find it without opening (and possibly generating) anything.
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join(CA_CERT)
}

/// The node's TLS identity: the certificate the listener serves right now, swappable
/// while connections are being accepted.
pub struct NodeTls {
    provider: Arc<CryptoProvider>,
    dir: PathBuf,
    node: String,
    domain: String,
    operator: Option<OperatorCert>,
    current: ArcSwap<CertifiedKey>,
    /// When (unix seconds) the generated certificate is next due for renewal, so the
    /// watcher knows without touching the disk.
    renew_at: AtomicI64,
    /// Serialises reloads, and remembers what the operator's files looked like when last
    /// read, so the watcher reads them only when they change.
    seen: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("dir", &self.dir)
            .field("node", &self.node)
            .field("domain", &self.domain)
            .field("operator", &self.operator)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads or creates the node CA and server certificate, and the operator's certificate
    /// if one is configured. A bad operator file is an error here (rather than later,
    /// where it is only logged) so a misconfiguration is seen at start-up.
    pub fn open(config: TlsConfig) -> Result<Arc<NodeTls>, TlsError> {
        let node = config.node.to_ascii_lowercase();
        let domain = config.domain.to_ascii_lowercase();
        check_label("node name", &node)?;
        if domain.is_empty() || domain.split('.').any(|l| check_label("domain", l).is_err()) {
            return Err(TlsError::BadName {
                what: "domain",
                name: config.domain,
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.dir)
            .map_err(TlsError::io("create", &config.dir))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (generated, not_after) = ensure_generated(&config.dir, &node, &domain, &provider)?;
        let (current, stamp) = match &config.operator {
            Some(op) => {
                let stamp = Stamp::of(op);
                (load_operator(op, &provider)?, Some(stamp))
            }
            None => (generated, None),
        };
        Ok(Arc::new(NodeTls {
            provider,
            dir: config.dir,
            node,
            domain,
            operator: config.operator,
            current: ArcSwap::from_pointee(current),
            renew_at: AtomicI64::new((not_after - RENEW_BEFORE).unix_timestamp()),
            seen: Mutex::new(stamp),
        }))
    }

    /// The node CA's certificate, for users to add to their trust store.
    pub fn ca_path(&self) -> PathBuf {
        ca_path(&self.dir)
    }

    /// The certificate and key being served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Re-reads the operator's certificate files, or, without them, renews the generated
    /// server certificate if it is due. On error the current certificate stays in place.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match &self.operator {
            Some(op) => {
                // Stamped before reading: a change made while reading shows up next poll.
                *seen = Some(Stamp::of(op));
                let loaded = load_operator(op, &self.provider)?;
                self.current.store(Arc::new(loaded));
                tracing::info!("loaded certificate {}", op.cert.display());
            }
            None => {
                let (generated, not_after) =
                    ensure_generated(&self.dir, &self.node, &self.domain, &self.provider)?;
                self.current.store(Arc::new(generated));
                self.renew_at.store(
                    (not_after - RENEW_BEFORE).unix_timestamp(),
                    Ordering::Relaxed,
                );
            }
        }
        Ok(())
    }

    /// Reloads when there is something to reload: the operator's files changed (by
    /// modification time, size or inode, which catches in-place writes and renames and
    /// symlink swaps alike), or the generated certificate is due for renewal.
    fn reload_if_due(&self) {
        let due = match &self.operator {
            Some(op) => {
                let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                let changed = seen.as_ref() != Some(&Stamp::of(op));
                changed
            }
            None => {
                OffsetDateTime::now_utc().unix_timestamp() >= self.renew_at.load(Ordering::Relaxed)
            }
        };
        if !due {
            return;
        }
        if let Err(e) = self.reload() {
            tracing::warn!("keeping the current TLS certificate: {e}");
            if self.operator.is_none() {
                // Whatever failed (a full disk, a missing CA key) will not mend by the
                // next poll; retry hourly rather than warning every few seconds.
                let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
                self.renew_at
                    .store(later.unix_timestamp(), Ordering::Relaxed);
            }
        }
    }

    /// Polls for changed certificate files every `interval` and swaps them in. Polling
    /// (not inotify) because it also sees files replaced through symlinks and on any
    /// filesystem, and a check is a couple of `stat`s. The task ends when the last
    /// `Arc<NodeTls>` is dropped.
    pub fn spawn_reload_on_change(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // the first tick is immediate; open() just loaded everything
            loop {
                ticks.tick().await;
                let Some(tls) = weak.upgrade() else { break };
                // File reads and maybe key generation: off the async workers.
                if let Err(e) = tokio::task::spawn_blocking(move || tls.reload_if_due()).await {
                    tracing::warn!("TLS certificate reload failed: {e}");
                }
            }
        })
    }

    /// The listener's TLS configuration: certificates from this resolver (so reloads apply
    /// to new connections at once), HTTP/2 preferred over HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            // Invariant: ring's default provider has cipher suites for TLS 1.2 and 1.3.
            .expect("ring provider supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// One certificate for every name: routing by host name happens after the handshake.
impl ResolvesServerCert for NodeTls {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What a file looked like when last read; `None` fields for a file that was missing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: Option<(u64, u64, i64, i64, u64)>,
    key: Option<(u64, u64, i64, i64, u64)>,
}

impl Stamp {
    fn of(op: &OperatorCert) -> Stamp {
        // Follows symlinks: swapping a `live/` symlink changes the target's inode.
        let stat = |p: &Path| {
            fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
        };
        Stamp {
            cert: stat(&op.cert),
            key: stat(&op.key),
        }
    }
}

/// DNS label rules, which also keep names safe in certificates: 1-63 of a-z, 0-9, '-',
/// not starting or ending with '-'.
fn check_label(what: &'static str, label: &str) -> Result<(), TlsError> {
    let ok = !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName {
            what,
            name: label.to_string(),
        })
    }
}

/// The names the generated server certificate carries, sorted.
fn server_names(node: &str, domain: &str) -> Vec<String> {
    let mut names = vec![
        format!("*.{node}.{domain}"),
        format!("{node}.{domain}"),
        // Covered by the wildcard too; named so the API host never depends on wildcard
        // matching in a client.
        format!("api.{node}.{domain}"),
    ];
    if domain == "localhost" {
        names.push("localhost".to_string());
    }
    names.sort();
    names
}

/// The node CA, read back from disk to sign with.
struct Ca {
    der: CertificateDer<'static>,
    key: KeyPair,
    not_after: OffsetDateTime,
}

/// Makes sure the CA and a current server certificate exist in `dir`; returns the server
/// certificate with its key, and its expiry.
fn ensure_generated(
    dir: &Path,
    node: &str,
    domain: &str,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, OffsetDateTime), TlsError> {
    let ca = load_or_create_ca(dir, node)?;
    let names = server_names(node, domain);
    let host = format!("{node}.{domain}");
    match check_server(dir, &ca, &names, &host, provider) {
        Ok(found) => return Ok(found),
        Err(why) => tracing::info!("making a new server certificate: {why}"),
    }
    create_server(dir, &ca, &names, &host, provider)
}

fn load_or_create_ca(dir: &Path, node: &str) -> Result<Ca, TlsError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let pem = match fs::read(&cert_path) {
        Ok(pem) => pem,
        // The certificate is written last, so without it there is no CA (at most a key
        // left by a crash, which is overwritten).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return create_ca(dir, node),
        Err(e) => return Err(TlsError::io("read", &cert_path)(e)),
    };
    let der = CertificateDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        path: cert_path.clone(),
        what: "certificate",
        source,
    })?;
    let key_pem = match fs::read_to_string(&key_path) {
        Ok(key) => key,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TlsError::CaKeyMissing {
                path: key_path,
                cert: cert_path,
            })
        }
        Err(e) => return Err(TlsError::io("read", &key_path)(e)),
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Parse {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let parsed = Parsed::from_der(&cert_path, &der)?;
    if parsed.spki != key.subject_public_key_info() {
        return Err(TlsError::Parse {
            path: key_path,
            reason: format!("does not belong to {}", cert_path.display()),
        });
    }
    if parsed.not_after - RENEW_BEFORE <= OffsetDateTime::now_utc() {
        // Clients have to trust a new CA soon either way, and a server certificate signed
        // by this one could no longer live past the renewal margin (it would be renewed
        // on every check).
        tracing::warn!(
            "node CA {} expires on {}; making a new one, clients must trust it again",
            cert_path.display(),
            parsed.not_after
        );
        return create_ca(dir, node);
    }
    Ok(Ca {
        der,
        key,
        not_after: parsed.not_after,
    })
}

fn create_ca(dir: &Path, node: &str) -> Result<Ca, TlsError> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::generate("CA key"))?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("hearth node CA {node}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(TlsError::generate("CA certificate"))?;
    write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    tracing::info!("created node CA {}", dir.join(CA_CERT).display());
    Ok(Ca {
        der: cert.der().clone(),
        key,
        not_after: params.not_after,
    })
}

/// The existing server certificate if it is still good; otherwise why not.
fn check_server(
    dir: &Path,
    ca: &Ca,
    names: &[String],
    host: &str,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, OffsetDateTime), String> {
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    if !cert_path.exists() {
        return Err(format!("{} does not exist", cert_path.display()));
    }
    let certified = load_pair(&cert_path, &key_path, provider).map_err(|e| e.to_string())?;
    let der = &certified.cert[0]; // load_pair refuses an empty chain
    let parsed = Parsed::from_der(&cert_path, der).map_err(|e| e.to_string())?;
    if parsed.names != names {
        return Err(format!(
            "it names {:?}, this node needs {names:?}",
            parsed.names
        ));
    }
    if parsed.not_after - RENEW_BEFORE <= OffsetDateTime::now_utc() {
        return Err(format!("it expires on {}", parsed.not_after));
    }
    verify_chain(&ca.der, der, host, provider)
        .map_err(|e| format!("it is not signed by the node CA: {e}"))?;
    Ok((certified, parsed.not_after))
}

fn create_server(
    dir: &Path,
    ca: &Ca,
    names: &[String],
    host: &str,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, OffsetDateTime), TlsError> {
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::generate("server key"))?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(TlsError::generate("server certificate"))?;
    let now = OffsetDateTime::now_utc();
    params.distinguished_name = rcgen::DistinguishedName::new();
    // Clients match the SANs; the CN is for people reading the certificate.
    params.distinguished_name.push(DnType::CommonName, host);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    // A certificate outliving its CA would be rejected for the CA's sake anyway.
    params.not_after = (now + SERVER_LIFETIME).min(ca.not_after);
    params.serial_number = Some(random_serial());
    let issuer = Issuer::from_ca_cert_der(&ca.der, &ca.key)
        .map_err(TlsError::generate("server certificate (reading the CA)"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(TlsError::generate("server certificate"))?;

    let key_path = dir.join(SERVER_KEY);
    let cert_path = dir.join(SERVER_CERT);
    // Key first, certificate second: a crash in between leaves a pair that does not match,
    // which the next start detects and replaces.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        "created server certificate {} for {}",
        cert_path.display(),
        names.join(", ")
    );
    let certified = CertifiedKey::from_der(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        provider,
    )
    .map_err(|source| TlsError::Unusable {
        path: key_path,
        source,
    })?;
    Ok((certified, params.not_after))
}

/// Reads an operator's certificate, warning early if it is close to expiry: nothing
/// renews it but its owner.
fn load_operator(op: &OperatorCert, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certified = load_pair(&op.cert, &op.key, provider)?;
    let parsed = Parsed::from_der(&op.cert, &certified.cert[0])?; // load_pair: never empty
    if parsed.not_after - RENEW_BEFORE <= OffsetDateTime::now_utc() {
        tracing::warn!(
            "certificate {} expires on {}",
            op.cert.display(),
            parsed.not_after
        );
    }
    Ok(certified)
}

/// A certificate chain and its private key, checked to belong together.
fn load_pair(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let pem = fs::read(cert_path).map_err(TlsError::io("read", cert_path))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: "certificate",
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_path_buf(),
            what: "certificate",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let pem = fs::read(key_path).map_err(TlsError::io("read", key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
        path: key_path.to_path_buf(),
        what: "private key",
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Unusable {
        path: key_path.to_path_buf(),
        source,
    })
}

/// What hearth needs to know about a certificate.
struct Parsed {
    /// DNS names from the subject alternative names, lower-cased and sorted.
    names: Vec<String>,
    not_after: OffsetDateTime,
    spki: Vec<u8>,
}

impl Parsed {
    fn from_der(path: &Path, der: &CertificateDer<'_>) -> Result<Parsed, TlsError> {
        let bad = |reason: String| TlsError::Parse {
            path: path.to_path_buf(),
            reason,
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(e.to_string()))?;
        let mut names: Vec<String> = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(bad(e.to_string())),
        };
        names.sort();
        Ok(Parsed {
            names,
            not_after: cert.validity().not_after.to_datetime(),
            spki: cert.public_key().raw.to_vec(),
        })
    }
}

/// Checks, as a client would, that `cert` chains to `ca` and is valid for `name` now.
fn verify_chain(
    ca: &CertificateDer<'_>,
    cert: &CertificateDer<'_>,
    name: &str,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone().into_owned())?;
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider.clone()))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name = ServerName::try_from(name.to_string())
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now())?;
    Ok(())
}

/// Serial numbers must be unique per CA; 16 random bytes (high bit clear so it stays a
/// positive DER integer) make collisions a non-issue without keeping a counter.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// Writes `contents` to a temporary file beside `path` and renames it over `path`, so
/// readers (and a restart after a crash) see the old file or the new one, never half.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(TlsError::io("create", &tmp))?;
    // `mode` above applies only to a new file; a leftover temporary may be wider.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(TlsError::io("chmod", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(TlsError::io("write", &tmp))?;
    fs::rename(&tmp, path).map_err(TlsError::io("rename into place", path))?;
    // The rename itself must reach the disk before we rely on the new file.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(TlsError::io("sync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(dir: &Path, node: &str) -> TlsConfig {
        TlsConfig {
            node: node.to_string(),
            domain: "localhost".to_string(),
            dir: dir.to_path_buf(),
            operator: None,
        }
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    fn ca_der(dir: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(ca_path(dir)).unwrap()
    }

    fn verifies(tls: &NodeTls, name: &str) -> bool {
        let current = tls.current();
        verify_chain(&ca_der(&tls.dir), &current.cert[0], name, &provider()).is_ok()
    }

    /// A self-signed certificate standing in for an operator's, written as they would be.
    fn write_operator_cert(dir: &Path, name: &str) -> (OperatorCert, CertificateDer<'static>) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let op = OperatorCert {
            cert: dir.join("op.pem"),
            key: dir.join("op.key"),
        };
        write_atomic(&op.key, signing_key.serialize_pem().as_bytes(), 0o600).unwrap();
        write_atomic(&op.cert, cert.pem().as_bytes(), 0o644).unwrap();
        (op, cert.der().clone())
    }

    #[test]
    fn generates_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        let read = |f: &str| fs::read(dir.path().join(f)).unwrap();
        let (ca, server) = (read(CA_CERT), read(SERVER_CERT));
        assert_eq!(tls.ca_path(), dir.path().join("ca.pem"));
        for key in [CA_KEY, SERVER_KEY] {
            let mode = fs::metadata(dir.path().join(key)).unwrap().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        drop(tls);

        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        assert_eq!(read(CA_CERT), ca);
        assert_eq!(read(SERVER_CERT), server);
        assert_eq!(
            tls.current().cert[0],
            CertificateDer::from_pem_slice(&server).unwrap()
        );
    }

    #[test]
    fn server_cert_names_the_node_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        for good in [
            "foo-bar-terminal-1.node1.localhost",
            "api.node1.localhost",
            "node1.localhost",
            "localhost",
        ] {
            assert!(verifies(&tls, good), "{good}");
        }
        for bad in [
            "x.othernode.localhost",
            "a.b.node1.localhost",
            "node1.example.com",
        ] {
            assert!(!verifies(&tls, bad), "{bad}");
        }
        let der = fs::read(dir.path().join(SERVER_CERT)).unwrap();
        let parsed = Parsed::from_der(
            Path::new("server.pem"),
            &CertificateDer::from_pem_slice(&der).unwrap(),
        )
        .unwrap();
        assert_eq!(
            parsed.names,
            [
                "*.node1.localhost",
                "api.node1.localhost",
                "localhost",
                "node1.localhost"
            ]
        );
        let days = (parsed.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((360..=366).contains(&days), "{days}");
    }

    #[test]
    fn other_domains_get_no_localhost_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), "Node1");
        cfg.domain = "Example.COM".to_string();
        let tls = NodeTls::open(cfg).unwrap();
        assert!(verifies(&tls, "p-c-http-8080.node1.example.com"));
        assert!(!verifies(&tls, "localhost"));
    }

    #[test]
    fn a_renamed_node_gets_a_new_server_cert_under_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        let ca = fs::read(dir.path().join(CA_CERT)).unwrap();
        let tls = NodeTls::open(config(dir.path(), "node2")).unwrap();
        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), ca);
        assert!(verifies(&tls, "api.node2.localhost"));
        assert!(!verifies(&tls, "api.node1.localhost"));
    }

    #[test]
    fn missing_mismatched_or_expiring_server_certs_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let server = || fs::read(dir.path().join(SERVER_CERT)).unwrap();
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        let ca = fs::read(dir.path().join(CA_CERT)).unwrap();

        // Missing.
        let before = server();
        fs::remove_file(dir.path().join(SERVER_CERT)).unwrap();
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        assert_ne!(server(), before);

        // A key that is not the certificate's (a crash between the two writes).
        let before = server();
        let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        write_atomic(
            &dir.path().join(SERVER_KEY),
            other.serialize_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        assert_ne!(server(), before);
        assert!(tls.current().keys_match().is_ok());

        // Right names, but expiring in ten days; a control with 100 days is kept.
        let ca_key =
            KeyPair::from_pem(&fs::read_to_string(dir.path().join(CA_KEY)).unwrap()).unwrap();
        plant_server_cert(dir.path(), &ca_der(dir.path()), &ca_key, 100);
        assert!(why_replaced(dir.path()).is_none());
        let planted = plant_server_cert(dir.path(), &ca_der(dir.path()), &ca_key, 10);
        let why = why_replaced(dir.path()).unwrap();
        assert!(why.contains("expires"), "{why}");
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        assert_ne!(server(), planted.into_bytes());

        // Right names, plenty of time, but signed by some other CA.
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut other = CertificateParams::default();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = other.self_signed(&other_key).unwrap();
        let planted = plant_server_cert(dir.path(), other.der(), &other_key, 300);
        let why = why_replaced(dir.path()).unwrap();
        assert!(why.contains("not signed by the node CA"), "{why}");
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        assert_ne!(server(), planted.into_bytes());
        assert!(why_replaced(dir.path()).is_none());

        assert_eq!(fs::read(dir.path().join(CA_CERT)).unwrap(), ca);
    }

    /// Writes a server certificate with node1's names where hearth keeps its own, signed
    /// by `ca` and valid for `days`; returns its PEM.
    fn plant_server_cert(
        dir: &Path,
        ca: &CertificateDer<'_>,
        ca_key: &KeyPair,
        days: i64,
    ) -> String {
        let issuer = Issuer::from_ca_cert_der(ca, ca_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(server_names("node1", "localhost")).unwrap();
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(days);
        let pem = params.signed_by(&key, &issuer).unwrap().pem();
        write_atomic(&dir.join(SERVER_KEY), key.serialize_pem().as_bytes(), 0o600).unwrap();
        write_atomic(&dir.join(SERVER_CERT), pem.as_bytes(), 0o644).unwrap();
        pem
    }

    /// Why `open` would replace node1's server certificate, or `None` if it keeps it.
    fn why_replaced(dir: &Path) -> Option<String> {
        let ca = load_or_create_ca(dir, "node1").unwrap();
        let names = server_names("node1", "localhost");
        check_server(dir, &ca, &names, "node1.localhost", &provider()).err()
    }

    #[test]
    fn a_running_node_renews_its_generated_cert_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        let first = tls.current().cert[0].clone();
        tls.reload_if_due();
        assert_eq!(tls.current().cert[0], first, "not due: nothing changes");

        let ca_key =
            KeyPair::from_pem(&fs::read_to_string(dir.path().join(CA_KEY)).unwrap()).unwrap();
        let planted = plant_server_cert(dir.path(), &ca_der(dir.path()), &ca_key, 10);
        tls.renew_at.store(0, Ordering::Relaxed);
        tls.reload_if_due();
        let renewed = tls.current().cert[0].clone();
        assert_ne!(renewed, first);
        assert_ne!(
            renewed,
            CertificateDer::from_pem_slice(planted.as_bytes()).unwrap()
        );
        assert!(verifies(&tls, "api.node1.localhost"));
        assert!(tls.renew_at.load(Ordering::Relaxed) > OffsetDateTime::now_utc().unix_timestamp());
    }

    #[test]
    fn a_ca_without_its_key_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        NodeTls::open(config(dir.path(), "node1")).unwrap();
        fs::remove_file(dir.path().join(CA_KEY)).unwrap();
        let err = NodeTls::open(config(dir.path(), "node1")).unwrap_err();
        assert!(matches!(err, TlsError::CaKeyMissing { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (node, domain) in [
            ("", "localhost"),
            ("a.b", "localhost"),
            ("-a", "localhost"),
            ("n", ""),
            ("n", "exa mple.com"),
            ("n", "a..b"),
        ] {
            let mut cfg = config(dir.path(), node);
            cfg.domain = domain.to_string();
            let err = NodeTls::open(cfg).unwrap_err();
            assert!(
                matches!(err, TlsError::BadName { .. }),
                "{node} {domain}: {err}"
            );
        }
    }

    #[test]
    fn operator_cert_replaces_the_generated_one_and_reload_swaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let ops = tempfile::tempdir().unwrap();
        let (op, first) = write_operator_cert(ops.path(), "node1.example.com");
        let mut cfg = config(dir.path(), "node1");
        cfg.operator = Some(op.clone());
        let tls = NodeTls::open(cfg).unwrap();
        assert_eq!(tls.current().cert[0], first);
        assert!(tls.ca_path().exists(), "the node CA exists either way");

        let (_, second) = write_operator_cert(ops.path(), "node1.example.com");
        tls.reload().unwrap();
        assert_eq!(tls.current().cert[0], second);
    }

    #[test]
    fn a_corrupt_operator_file_keeps_the_old_cert() {
        let dir = tempfile::tempdir().unwrap();
        let ops = tempfile::tempdir().unwrap();
        let (op, first) = write_operator_cert(ops.path(), "node1.example.com");
        let mut cfg = config(dir.path(), "node1");
        cfg.operator = Some(op.clone());
        let tls = NodeTls::open(cfg.clone()).unwrap();

        fs::write(&op.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
        let err = tls.reload().unwrap_err();
        assert!(err.to_string().contains("op.pem"), "{err}");
        assert_eq!(tls.current().cert[0], first);

        // A valid certificate with someone else's key.
        let (_, _) = write_operator_cert(ops.path(), "node1.example.com");
        let stranger = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        fs::write(&op.key, stranger.serialize_pem()).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Unusable { .. })));
        assert_eq!(tls.current().cert[0], first);

        // At start-up the same mistake is an error.
        assert!(NodeTls::open(cfg).is_err());
    }

    #[tokio::test]
    async fn the_watcher_swaps_changed_files_and_skips_broken_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ops = tempfile::tempdir().unwrap();
        let (op, _) = write_operator_cert(ops.path(), "node1.example.com");
        let mut cfg = config(dir.path(), "node1");
        cfg.operator = Some(op.clone());
        let tls = NodeTls::open(cfg).unwrap();
        let watcher = tls.spawn_reload_on_change(Duration::from_millis(10));

        let (_, second) = write_operator_cert(ops.path(), "node1.example.com");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tls.current().cert[0] != second {
            assert!(tokio::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        fs::write(&op.cert, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tls.current().cert[0], second);

        drop(tls);
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("the watcher ends with its NodeTls")
            .unwrap();
    }

    #[tokio::test]
    async fn handshake_negotiates_h2() {
        let dir = tempfile::tempdir().unwrap();
        let tls = NodeTls::open(config(dir.path(), "node1")).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());

        let mut roots = RootCertStore::empty();
        roots.add(ca_der(dir.path())).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));

        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut stream = acceptor.accept(server_io).await.unwrap();
            let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            let sni = stream.get_ref().1.server_name().map(str::to_string);
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(b"pong").await.unwrap();
            stream.shutdown().await.unwrap();
            (alpn, sni, buf)
        });
        let name = ServerName::try_from("foo-bar-terminal-1.node1.localhost").unwrap();
        let mut stream = connector.connect(name, client_io).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        stream.write_all(b"ping").await.unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");

        let (alpn, sni, got) = server.await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(sni.as_deref(), Some("foo-bar-terminal-1.node1.localhost"));
        assert_eq!(&got, b"ping");
    }
}
