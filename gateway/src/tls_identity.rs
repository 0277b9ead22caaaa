//! Client-certificate identity: after a TLS handshake that verified a client certificate, the
//! certificate's subject is read once and attached to the connection; the proxy turns it into the
//! `PeerCertificate` fact of every request on that connection.

use async_trait::async_trait;
use caregate_filters::identity::PeerCertificate;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::hash::MessageDigest;
use pingora::tls::nid::Nid;
use pingora::tls::x509::{X509NameRef, X509VerifyResult};
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
