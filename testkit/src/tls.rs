//! Certificates made for one test run (rcgen; no key is ever committed): a private CA, a
//! server certificate for `localhost` and 127.0.0.1 signed by it, a client certificate signed
//! by it, and a second, unrelated CA. Written as PEM files into a directory removed on drop.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The PEM files of one test run.
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    /// Generates everything into a fresh directory named after `tag`.
    ///
    /// # Panics
    /// When generation or writing fails.
    pub fn generate(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("pw-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pki directory");
        let ca = authority("payment-worker test CA");
        let other = authority("some other CA");
        write(&dir.join("ca.pem"), &ca.pem());
        write(&dir.join("other-ca.pem"), &other.pem());

        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("server");
        server.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.distinguished_name.push(DnType::CommonName, "localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = server.signed_by(&server_key, &ca).expect("sign the server certificate");
        write(&dir.join("server.pem"), &server.pem());
        write(&dir.join("server-key.pem"), &server_key.serialize_pem());

        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client");
        client.distinguished_name.push(DnType::CommonName, "payment-worker");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client = client.signed_by(&client_key, &ca).expect("sign the client certificate");
        write(&dir.join("client.pem"), &client.pem());
        write(&dir.join("client-key.pem"), &client_key.serialize_pem());
        Self { dir }
    }

    /// A file of this run: `ca.pem`, `other-ca.pem`, `server.pem`, `server-key.pem`,
    /// `client.pem`, `client-key.pem`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The same, as a string for a command line.
    ///
    /// # Panics
    /// When the temporary directory's path is not UTF-8.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().expect("a UTF-8 path").to_owned()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

fn write(path: &Path, pem: &str) {
    std::fs::write(path, pem).expect("write a PEM file");
}
