//! Which CAs the `https://` backends trust: the webpki roots, plus the CAs
//! of OpenSSL's `SSL_CERT_FILE` and `SSL_CERT_DIR`, the convention of
//! OpenSSL, curl and weir's own `rediss://` client.
//!
//! The files are read when the first https client is built and again at
//! every reload (SIGHUP, `POST /admin/reload`, a watched config file), so
//! a rotated CA bundle (a renewed private CA, a ConfigMap mounted as files)
//! is trusted without a restart. A reload that reads the same certificates
//! keeps the https clients and their pooled connections; one that reads
//! others gives the https backends new clients, whose connections are
//! verified against them (connections already open are not cut, as nginx's
//! old workers keep theirs). The snapshot rebuilds that health changes
//! cause never read the files.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::pki_types::CertificateDer;

use super::UpstreamError;

/// What https backends trust: the rustls configuration their clients are
/// built with, and the private CAs (`SSL_CERT_FILE`, `SSL_CERT_DIR`) it
/// holds beside the webpki roots, which a reload compares to decide whether
/// anything changed.
pub(crate) struct Trust {
    /// Every private CA certificate, in the order they were read.
    cas: Vec<CertificateDer<'static>>,
    /// The webpki roots plus `cas`, with the `ring` provider.
    pub(super) config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("private_cas", &self.cas.len())
            .finish_non_exhaustive()
    }
}

/// The trust in effect: read when the first https client is built, read
/// again at each reload ([`reread`]). Snapshot builds and reloads touch
/// it, and a request only when its first attempt waits for a slot (is a
/// backend back in a newer snapshot still verified by its client?).
static CURRENT: Mutex<Option<Arc<Trust>>> = Mutex::new(None);

fn current_slot() -> std::sync::MutexGuard<'static, Option<Arc<Trust>>> {
    CURRENT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The trust in effect, read from the process environment the first time
/// an https client needs it. A failure is not kept: the start or reload
/// that needed it fails, and the next one reads again.
pub(crate) fn current() -> Result<Arc<Trust>, UpstreamError> {
    if let Some(trust) = &*current_slot() {
        return Ok(trust.clone());
    }
    let read = Arc::new(Trust::read_logged()?);
    Ok(current_slot().get_or_insert(read).clone())
}

/// Reads `SSL_CERT_FILE` and `SSL_CERT_DIR` again (a reload), so that a
/// rotated CA bundle is trusted without a restart, as nginx re-reads its
/// certificates on reload. Returns whether the trust in effect changed:
/// the same certificates keep it (and the https clients built with it,
/// with their pooled connections); others replace it, and the snapshot
/// built next gives the https backends new clients ([`is_current`]). A
/// file that cannot be trusted is an error and changes nothing.
pub(crate) fn reread() -> Result<bool, UpstreamError> {
    let read = Trust::read_logged()?;
    let mut slot = current_slot();
    match &*slot {
        Some(trust) if trust.cas == read.cas => Ok(false),
        old => {
            let changed = old.is_some();
            *slot = Some(Arc::new(read));
            Ok(changed)
        }
    }
}

/// `weir check`: reads the CAs `config`'s https backends would trust, as a
/// start would, so that a file a start would refuse fails the check too;
/// returns the warnings a start would log (certificates that cannot be
/// CAs). Without an https backend nothing is read, as at start.
pub fn check(config: &crate::Config) -> Result<Vec<String>, UpstreamError> {
    if !needed(config) {
        return Ok(Vec::new());
    }
    Trust::read(&crate::config::process_env).map(|(_, warnings)| warnings)
}

/// Whether `config` has an https backend, the only thing that reads the
/// CAs (at start, at a reload, in `weir check`).
pub(crate) fn needed(config: &crate::Config) -> bool {
    config.backends.iter().any(|b| super::is_https(&b.url))
}

/// Whether a client built with `trust` still trusts what weir does: a
/// snapshot build keeps such a client, and builds another otherwise.
pub(crate) fn is_current(trust: &Arc<Trust>) -> bool {
    current_slot()
        .as_ref()
        .is_some_and(|now| Arc::ptr_eq(now, trust))
}

impl Trust {
    /// The trust for the environment `env` (injected so tests never touch
    /// the process's): the webpki roots, plus the CAs of `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` ([`private_cas`]), so a backend behind a private
    /// CA can be trusted without a config key of its own.
    /// Also returns a warning per source with certificates that cannot be
    /// CAs (and are not trusted).
    fn read(env: &dyn Fn(&str) -> Option<String>) -> Result<(Self, Vec<String>), UpstreamError> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let mut cas = Vec::new();
        let mut warnings = Vec::new();
        for source in private_cas(env)? {
            let (added, ignored) = roots.add_parsable_certificates(source.certs.iter().cloned());
            if added == 0 {
                return Err(source.refused("holds no certificate rustls can use as a CA"));
            }
            if ignored > 0 {
                warnings.push(format!(
                    "{}={}: {ignored} of its certificates cannot be used as a CA and are not trusted",
                    source.var,
                    source.path.display()
                ));
            }
            cas.extend(source.certs);
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // In a canonical order: the same certificates in another order
        // (a bundle rebuilt) are the same trust, not a change.
        cas.sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
        cas.dedup();
        let trust = Self {
            cas,
            config: Arc::new(config),
        };
        Ok((trust, warnings))
    }

    /// [`Trust::read`] from the process environment, its warnings logged.
    fn read_logged() -> Result<Self, UpstreamError> {
        let (trust, warnings) = Self::read(&crate::config::process_env)?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(trust)
    }
}

/// OpenSSL's variable for one PEM bundle of trusted CAs.
const SSL_CERT_FILE: &str = "SSL_CERT_FILE";
/// OpenSSL's variable for directories of PEM files of trusted CAs
/// (`:`-separated).
const SSL_CERT_DIR: &str = "SSL_CERT_DIR";

/// The certificates of one place `SSL_CERT_FILE` or `SSL_CERT_DIR` names,
/// kept with that place so an error can say which to fix.
struct CaSource {
    var: &'static str,
    path: std::path::PathBuf,
    certs: Vec<CertificateDer<'static>>,
}

impl CaSource {
    /// The error saying why this source cannot be trusted.
    fn refused(&self, why: impl Into<String>) -> UpstreamError {
        UpstreamError::TrustedCa {
            var: self.var,
            path: self.path.clone(),
            why: why.into(),
        }
    }
}

/// The PEM certificates of `SSL_CERT_FILE` and of every file in each
/// directory of `SSL_CERT_DIR`, the convention of OpenSSL, curl and the
/// `rediss://` client (an empty value counts as unset). The file must hold
/// one; a directory must hold one among its files (subdirectories,
/// dangling links and files without a certificate are passed over, as
/// `/etc/ssl/certs` has all three). A file that cannot be read, or a
/// certificate section that is not valid PEM, is an error naming the file.
fn private_cas(env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<CaSource>, UpstreamError> {
    let mut sources = Vec::new();
    if let Some(file) = env(SSL_CERT_FILE).filter(|v| !v.is_empty()) {
        let mut source = CaSource {
            var: SSL_CERT_FILE,
            path: file.into(),
            certs: Vec::new(),
        };
        source.certs = pem_certificates(&source.path).map_err(|why| source.refused(why))?;
        if source.certs.is_empty() {
            return Err(source.refused(NO_PEM_CERTIFICATE));
        }
        sources.push(source);
    }
    let dirs = env(SSL_CERT_DIR).unwrap_or_default();
    for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
        let mut source = CaSource {
            var: SSL_CERT_DIR,
            path: dir,
            certs: Vec::new(),
        };
        let files = pem_files(&source.path).map_err(|why| source.refused(why))?;
        for file in files {
            let certs = pem_certificates(&file).map_err(|why| UpstreamError::TrustedCa {
                var: SSL_CERT_DIR,
                path: file.clone(),
                why,
            })?;
            source.certs.extend(certs);
        }
        if source.certs.is_empty() {
            return Err(source
                .refused("no file in it holds a PEM certificate (-----BEGIN CERTIFICATE-----)"));
        }
        // `openssl rehash` links each certificate under its hash beside
        // its own name, so a directory names most of them twice.
        source
            .certs
            .sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
        source.certs.dedup_by(|a, b| a.as_ref() == b.as_ref());
        sources.push(source);
    }
    Ok(sources)
}

/// Why a file (or directory) of CAs is refused when it holds none.
const NO_PEM_CERTIFICATE: &str = "holds no PEM certificate (-----BEGIN CERTIFICATE-----)";

/// The files in `dir`, links followed, in name order.
fn pem_files(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read the directory: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read the directory: {e}"))?
            .path();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(path),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    files.sort_unstable();
    Ok(files)
}

/// The `CERTIFICATE` sections of the PEM file at `path` (other sections
/// and text between them are passed over).
fn pem_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/redis-tls/NAME: a test CA and a certificate it signed
    /// for 127.0.0.1 (the `https://` backend test in tests/process.rs uses
    /// them too).
    fn fixture(name: &str) -> String {
        format!(
            "{}/tests/fixtures/redis-tls/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    /// An environment holding only `vars`.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// The error message for `vars`, which must fail.
    fn refused(vars: &[(&str, &str)]) -> String {
        match Trust::read(&env_of(vars)) {
            Ok(_) => panic!("{vars:?} was trusted"),
            Err(e) => e.to_string(),
        }
    }

    /// How many CAs beside the webpki roots `vars` trusts.
    fn private_ca_count(vars: &[(&str, &str)]) -> usize {
        let sources = private_cas(&env_of(vars)).unwrap();
        sources.iter().map(|s| s.certs.len()).sum()
    }

    /// Reading the same CAs again keeps the trust in effect, so a reload
    /// that changes nothing keeps the https clients and their connections.
    #[test]
    fn a_reread_of_the_same_cas_keeps_the_trust_in_effect() {
        let first = current().unwrap();
        assert!(is_current(&first));
        assert!(!reread().unwrap(), "the same CAs are no change");
        assert!(is_current(&first));
        assert!(Arc::ptr_eq(&first, &current().unwrap()));
        let other = Arc::new(Trust::read(&env_of(&[])).unwrap().0);
        assert!(!is_current(&other), "only the trust in effect is current");
    }

    /// A certificate in the bundle that cannot be a CA is passed over with
    /// a warning that the caller shows (a start logs it, `weir check`
    /// prints it; it used to be logged before `weir check` had a log).
    #[test]
    fn a_certificate_that_cannot_be_a_ca_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        let mut text = std::fs::read_to_string(fixture("ca.pem")).unwrap();
        text.push_str("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        std::fs::write(&bundle, text).unwrap();
        let path = bundle.to_str().unwrap();
        let (trust, warnings) = Trust::read(&env_of(&[("SSL_CERT_FILE", path)])).unwrap();
        assert_eq!(trust.cas.len(), 2);
        assert_eq!(
            warnings,
            [format!(
                "SSL_CERT_FILE={path}: 1 of its certificates cannot be used as a CA and are not trusted"
            )]
        );
        let (_, none) = Trust::read(&env_of(&[("SSL_CERT_FILE", &fixture("ca.pem"))])).unwrap();
        assert!(none.is_empty(), "{none:?}");
    }

    #[test]
    fn without_ssl_cert_file_or_dir_only_the_webpki_roots_are_trusted() {
        assert_eq!(private_ca_count(&[]), 0);
        assert_eq!(
            private_ca_count(&[("SSL_CERT_FILE", ""), ("SSL_CERT_DIR", "")]),
            0
        );
        assert!(Trust::read(&env_of(&[])).is_ok());
    }

    #[test]
    fn ssl_cert_file_and_every_file_in_ssl_cert_dir_are_trusted() {
        let ca = fixture("ca.pem");
        assert_eq!(private_ca_count(&[("SSL_CERT_FILE", &ca)]), 1);
        assert!(Trust::read(&env_of(&[("SSL_CERT_FILE", &ca)])).is_ok());
        // A directory as /etc/ssl/certs has it: the CA under its name and
        // a hash link, a subdirectory, a file without a certificate and a
        // dangling link, all passed over but the one CA (counted once).
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&ca, dir.path().join("weir-test-ca.pem")).unwrap();
        std::os::unix::fs::symlink("weir-test-ca.pem", dir.path().join("1a2b3c4d.0")).unwrap();
        std::os::unix::fs::symlink("gone.pem", dir.path().join("5e6f7a8b.0")).unwrap();
        std::fs::create_dir(dir.path().join("java")).unwrap();
        std::fs::write(dir.path().join("README"), "not a certificate\n").unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(private_ca_count(&[("SSL_CERT_DIR", path)]), 1);
        // Several directories, `:`-separated, as OpenSSL takes them.
        let other = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("server.pem"), other.path().join("leaf.pem")).unwrap();
        let both = format!("{path}:{}", other.path().display());
        assert_eq!(private_ca_count(&[("SSL_CERT_DIR", &both)]), 2);
        assert_eq!(
            private_ca_count(&[("SSL_CERT_FILE", &ca), ("SSL_CERT_DIR", &both)]),
            3,
            "the file and the directories are read each for itself"
        );
        assert!(Trust::read(&env_of(&[("SSL_CERT_DIR", &both)])).is_ok());
    }

    #[test]
    fn a_ca_file_or_dir_that_cannot_be_trusted_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let missing = missing.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", missing)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_FILE={missing}: cannot read it")),
            "{e}"
        );
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "no certificate here\n").unwrap();
        let text = text.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", text)]);
        assert_eq!(
            e,
            format!("SSL_CERT_FILE={text}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        );
        // A key is not a certificate.
        let key = fixture("server-key.pem");
        let e = refused(&[("SSL_CERT_FILE", &key)]);
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let broken = broken.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", broken)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_FILE={broken}: not valid PEM")),
            "{e}"
        );
        // Valid PEM around bytes that are no certificate.
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let junk = junk.to_str().unwrap();
        let e = refused(&[("SSL_CERT_FILE", junk)]);
        assert!(
            e.starts_with(&format!(
                "SSL_CERT_FILE={junk}: holds no certificate rustls"
            )),
            "{e}"
        );
        // A directory: missing, without a certificate, or with a broken file
        // (named, not its directory).
        let e = refused(&[("SSL_CERT_DIR", missing)]);
        assert!(
            e.starts_with(&format!(
                "SSL_CERT_DIR={missing}: cannot read the directory"
            )),
            "{e}"
        );
        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("README"), "nothing\n").unwrap();
        let empty = empty.path().to_str().unwrap();
        let e = refused(&[("SSL_CERT_DIR", empty)]);
        assert!(
            e.starts_with(&format!("SSL_CERT_DIR={empty}: no file in it holds")),
            "{e}"
        );
        let e = refused(&[("SSL_CERT_DIR", dir.path().to_str().unwrap())]);
        assert!(
            e.starts_with(&format!("SSL_CERT_DIR={broken}: not valid PEM")),
            "{e}"
        );
    }
}
