//! Client-certificate identity: after a TLS handshake that verified a client certificate, the
//! certificate's subject is read once and attached to the connection; the proxy turns it into the
//! `PeerCertificate` fact of every request on that connection.

use async_trait::async_trait;
use caregate_filters::identity::PeerCertificate;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::hash::MessageDigest;
use pingora::tls::nid::Nid;
use pingora::tls::x509::{X509NameRef, X509VerifyResult, X509};
use std::any::Any;
use std::sync::Arc;

pub struct ClientCertCallbacks;

fn entry(name: &X509NameRef, nid: Nid) -> Option<String> {
    let e = name.entries_by_nid(nid).next()?;
    e.data().to_string().ok().filter(|s| !s.contains('\0'))
}

/// `CN=...,O=...,OU=...` in a fixed order, values escaped per RFC 4514 for `,`, `+`, `=`, `\`.
fn subject_string(name: &X509NameRef) -> String {
    let mut parts = Vec::new();
    for (label, nid) in [
        ("CN", Nid::COMMONNAME),
        ("OU", Nid::ORGANIZATIONALUNITNAME),
        ("O", Nid::ORGANIZATIONNAME),
        ("L", Nid::LOCALITYNAME),
        ("ST", Nid::STATEORPROVINCENAME),
        ("C", Nid::COUNTRYNAME),
    ] {
        for e in name.entries_by_nid(nid) {
            if let Ok(v) = e.data().to_string() {
                let mut esc = String::new();
                for ch in v.chars().filter(|c| *c != '\0') {
                    if matches!(ch, ',' | '+' | '=' | '\\' | '"' | ';' | '<' | '>') {
                        esc.push('\\');
                    }
                    esc.push(ch);
                }
                parts.push(format!("{label}={esc}"));
            }
        }
    }
    parts.join(",")
}

#[async_trait]
impl TlsAccept for ClientCertCallbacks {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        // OpenSSL already refused an untrusted certificate during the handshake; check again so
        // that only a verified certificate ever names a caller.
        if tls.verify_result() != X509VerifyResult::OK {
            return None;
        }
        let cert = tls.peer_certificate()?;
        let name = cert.subject_name();
        let sha256 = cert
            .digest(MessageDigest::sha256())
            .ok()
            .map(|d| d.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .unwrap_or_default();
        Some(Arc::new(PeerCertificate {
            subject: subject_string(name),
            common_name: entry(name, Nid::COMMONNAME),
            organization: entry(name, Nid::ORGANIZATIONNAME),
            sha256,
        }))
    }
}

/// A listener's certificate chain, key and client CAs, as read for one config generation:
/// served by [`ListenerTls`] to every new handshake, so a reload that re-reads the files renews
/// them without a restart.
pub struct ListenerCert {
    pub leaf: pingora::tls::x509::X509,
    pub chain: Vec<pingora::tls::x509::X509>,
    pub key: pingora::tls::pkey::PKey<pingora::tls::pkey::Private>,
    /// The CAs client certificates are verified against (mTLS listeners).
    pub client_cas: Option<Vec<pingora::tls::x509::X509>>,
}

/// The PEM certificates of a file (at least one; the first is the leaf of a chain).
pub(crate) fn read_pem_certs(path: &std::path::Path) -> Result<Vec<X509>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    X509::stack_from_pem(&pem)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{}: not a PEM certificate file", path.display()))
}

/// The PEM private key of a file.
pub(crate) fn read_key(
    path: &std::path::Path,
) -> Result<pingora::tls::pkey::PKey<pingora::tls::pkey::Private>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    pingora::tls::pkey::PKey::private_key_from_pem(&pem)
        .map_err(|_| format!("{}: not a PEM private key", path.display()))
}

impl ListenerCert {
    /// Read and check the files: the certificate chain, a key that matches its first
    /// certificate, and the client CA bundle.
    pub fn load(
        what: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<ListenerCert, String> {
        let mut certs = read_pem_certs(cert)
            .map_err(|e| format!("{what}: {e}"))?
            .into_iter();
        let leaf = certs
            .next()
            .ok_or_else(|| format!("{what}: {} holds no certificate", cert.display()))?;
        let key = read_key(key).map_err(|e| format!("{what}: {e}"))?;
        let matches = leaf
            .public_key()
            .map(|p| p.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(format!(
                "{what}: the key does not match the certificate {}",
                cert.display()
            ));
        }
        let client_cas = client_ca
            .map(|p| read_pem_certs(p).map_err(|e| format!("{what}: {e}")))
            .transpose()?;
        Ok(ListenerCert {
            leaf,
            chain: certs.collect(),
            key,
            client_cas,
        })
    }
}

/// The TLS callbacks of a listener: the certificate, key and client CAs of the live config
/// generation for every handshake, and (with client certificates) the verified caller.
pub struct ListenerTls {
    pub live: crate::reload::Live,
    pub index: usize,
    pub client_certs: bool,
}

#[async_trait]
impl TlsAccept for ListenerTls {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let generation = self.live.load();
        let Some(Some(c)) = generation.certs.get(self.index) else {
            return;
        };
        let mut ok = pingora::tls::ext::ssl_use_certificate(ssl, &c.leaf).is_ok()
            && pingora::tls::ext::ssl_use_private_key(ssl, &c.key).is_ok();
        for x in &c.chain {
            ok &= pingora::tls::ext::ssl_add_chain_cert(ssl, x).is_ok();
        }
        if let Some(cas) = &c.client_cas {
            let store = pingora::tls::x509::store::X509StoreBuilder::new().and_then(|mut b| {
                for ca in cas {
                    b.add_cert(ca.clone())?;
                }
                Ok(b.build())
            });
            ok &= store.and_then(|s| ssl.set_verify_cert_store(s)).is_ok();
        }
        if !ok {
            // The certificate set at start stays in place.
            log::warn!("TLS: the reloaded certificate could not be set on a handshake");
        }
    }

    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        if self.client_certs {
            ClientCertCallbacks.handshake_complete_callback(tls).await
        } else {
            None
        }
    }
}
