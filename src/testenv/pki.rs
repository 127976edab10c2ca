//! A throw-away certificate authority for a local control plane: the apiserver's serving
//! certificate and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::Error;

/// A CA and what it signed, as PEM text ready to be written to files.
pub struct DevPki {
    /// The CA certificate clients trust.
    pub ca_pem: String,
    /// The CA's key, which signs the serving certificate.
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A serving certificate and its private key.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl DevPki {
    /// Creates a fresh CA; nothing is reused between control planes.
    pub fn new() -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis local CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca,
        })
    }

    /// Signs a server certificate for the given DNS names and IP addresses.
    pub fn serving_cert(&self, names: &[&str]) -> Result<ServingCert, Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("localhost"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A key pair for service-account tokens: `(private, public)` PEM. The apiserver signs with
/// the private key and verifies with the public one, which it wants in its own file.
pub fn service_account_keys() -> Result<(String, String), Error> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}
