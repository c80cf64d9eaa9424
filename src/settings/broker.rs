//! The settings every subcommand shares: where the broker is and how to reach it (URIs, or a
//! file holding them; TLS material, read and checked at start), the topology profile, the log
//! format; and secrets given in a setting or in a file a setting names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use crate::broker::connect::{BrokerAccess, ClientIdentity, TlsMaterial, split_uris};
use crate::broker::topology::{Topology, TopologyError};
use crate::settings::ConfigError;

/// Listed after each command's own arguments, under a heading of their own.
#[derive(Args, Clone)]
#[command(next_help_heading = "Broker and logging (every command)")]
pub struct GlobalArgs {
    /// Broker URI, credentials included (never logged); several, comma-separated, for the
    /// nodes of a cluster [default: amqp://guest:guest@rabbitmq:5672/%2f].
    #[arg(long, env = "RABBITMQ_URI", hide_env_values = true, global = true)]
    rabbitmq_uri: Option<String>,

    /// A file holding RABBITMQ_URI (a mounted secret); not both.
    #[arg(long, env = "RABBITMQ_URI_FILE", global = true)]
    rabbitmq_uri_file: Option<PathBuf>,

    /// PEM file of CAs to trust for amqps://, besides the public roots.
    #[arg(long, env = "RABBITMQ_TLS_CA_FILE", global = true)]
    rabbitmq_tls_ca_file: Option<PathBuf>,

    /// PEM file of the client certificate (chain) to present over amqps://.
    #[arg(long, env = "RABBITMQ_TLS_CERT_FILE", global = true)]
    rabbitmq_tls_cert_file: Option<PathBuf>,

    /// PEM file of the client certificate's private key.
    #[arg(long, env = "RABBITMQ_TLS_KEY_FILE", global = true)]
    rabbitmq_tls_key_file: Option<PathBuf>,

    /// How long connecting to one node may take before the next is tried.
    #[arg(long, env = "RABBITMQ_CONNECT_TIMEOUT", default_value = "3s", value_parser = crate::settings::parse_duration, global = true)]
    rabbitmq_connect_timeout: Duration,

    /// Topology profile file (see topology/); the built-in default profile when unset.
    #[arg(long, env = "PAYMENT_TOPOLOGY", global = true)]
    pub topology: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl GlobalArgs {
    /// Where the broker is and how to reach it: the URIs (from RABBITMQ_URI or its file),
    /// the TLS files read and checked. Validated here rather than by clap, whose error
    /// messages quote the rejected value (and with it the password).
    ///
    /// # Errors
    /// An error naming the setting, never quoting a URI or a key.
    pub fn broker(&self) -> Result<BrokerAccess, ConfigError> {
        let (uris, setting, flag) = match secret_setting(
            self.rabbitmq_uri.as_deref(),
            self.rabbitmq_uri_file.as_deref(),
            ("RABBITMQ_URI", "rabbitmq-uri"),
            ("RABBITMQ_URI_FILE", "rabbitmq-uri-file"),
        )? {
            Some((value, setting, flag)) => (value, setting, flag),
            None => (DEFAULT_RABBITMQ_URI.to_owned().into(), "RABBITMQ_URI", "rabbitmq-uri"),
        };
        let tls = self.tls_material()?;
        let uris = split_uris(uris.expose_secret());
        BrokerAccess::new(&uris, tls, self.rabbitmq_connect_timeout)
            .map_err(|reason| ConfigError::new(setting, flag, reason))
    }

    fn tls_material(&self) -> Result<TlsMaterial, ConfigError> {
        let ca = match &self.rabbitmq_tls_ca_file {
            None => None,
            Some(path) => {
                let setting = ("RABBITMQ_TLS_CA_FILE", "rabbitmq-tls-ca-file");
                let pem = read_file(path, setting)?;
                certificates(&pem, setting)?;
                Some(String::from_utf8(pem).map_err(|_| {
                    ConfigError::new(setting.0, setting.1, "not a PEM file (not text)")
                })?)
            }
        };
        let client = match (&self.rabbitmq_tls_cert_file, &self.rabbitmq_tls_key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "RABBITMQ_TLS_KEY_FILE",
                    "rabbitmq-tls-key-file",
                    "missing: RABBITMQ_TLS_CERT_FILE needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "RABBITMQ_TLS_CERT_FILE",
                    "rabbitmq-tls-cert-file",
                    "missing: RABBITMQ_TLS_KEY_FILE needs its certificate",
                ));
            }
            (Some(cert), Some(key)) => {
                let cert_setting = ("RABBITMQ_TLS_CERT_FILE", "rabbitmq-tls-cert-file");
                let certificate = read_file(cert, cert_setting)?;
                client_certificate(&certificate, cert_setting)?;
                let key_setting = ("RABBITMQ_TLS_KEY_FILE", "rabbitmq-tls-key-file");
                let key = read_file(key, key_setting)?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
                    ConfigError::new(key_setting.0, key_setting.1, "no PEM private key in it")
                })?;
                let key = String::from_utf8(key).map_err(|_| {
                    ConfigError::new(key_setting.0, key_setting.1, "not a PEM file (not text)")
                })?;
                Some(ClientIdentity { certificate, key: key.into() })
            }
        };
        Ok(TlsMaterial { ca, client })
    }

    /// The topology profile: the file named, or the built-in default.
    ///
    /// # Errors
    /// See [`Topology::load`].
    pub fn load_topology(&self) -> Result<Topology, TopologyError> {
        Topology::load(self.topology.as_deref())
    }
}

/// The broker of the platform's own deployment, as the Go services default to it.
const DEFAULT_RABBITMQ_URI: &str = "amqp://guest:guest@rabbitmq:5672/%2f";

/// A secret given either in a setting or in a file a setting names (Docker and Kubernetes
/// secrets), never both: the value, and the setting it came from. A file's trailing newline
/// is not part of the secret.
///
/// # Errors
/// Both given, a file that cannot be read, or an empty value.
pub fn secret_setting(
    value: Option<&str>,
    file: Option<&Path>,
    (setting, flag): (&'static str, &'static str),
    (file_setting, file_flag): (&'static str, &'static str),
) -> Result<Option<(SecretString, &'static str, &'static str)>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            file_setting,
            file_flag,
            format!("set together with {setting}; set one of them"),
        )),
        (Some(value), None) => Ok(Some((value.to_owned().into(), setting, flag))),
        (None, Some(path)) => {
            let bytes = read_file(path, (file_setting, file_flag))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                ConfigError::new(file_setting, file_flag, "the file is not UTF-8 text")
            })?;
            let value = text.strip_suffix('\n').unwrap_or(&text);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.trim().is_empty() {
                return Err(ConfigError::new(file_setting, file_flag, "the file is empty"));
            }
            Ok(Some((value.to_owned().into(), file_setting, file_flag)))
        }
        (None, None) => Ok(None),
    }
}

/// Reads a file a setting names; the error names the setting and the path.
fn read_file(
    path: &Path,
    (setting, flag): (&'static str, &'static str),
) -> Result<Vec<u8>, ConfigError> {
    crate::read_setting_file(path).map_err(|e| {
        ConfigError::new(setting, flag, format!("cannot read {}: {e}", path.display()))
    })
}

/// Checks that `pem` holds a client certificate rustls will present: the first certificate
/// must be one webpki reads, an X.509 v3 certificate. `openssl x509 -req` without `-extfile`
/// issues v1 ones, which would otherwise fail every handshake with a message that seems to
/// blame the broker's certificate.
fn client_certificate(
    pem: &[u8],
    (setting, flag): (&'static str, &'static str),
) -> Result<(), ConfigError> {
    let first = certificates(pem, (setting, flag))?.swap_remove(0);
    match webpki::EndEntityCert::try_from(&first) {
        Ok(_) => Ok(()),
        Err(webpki::Error::UnsupportedCertVersion) => Err(ConfigError::new(
            setting,
            flag,
            "an X.509 v1 certificate; TLS takes only v3. Re-issue it with extensions, e.g. \
             `openssl x509 -req … -extfile <(printf 'extendedKeyUsage=clientAuth')`",
        )),
        Err(e) => Err(ConfigError::new(setting, flag, format!("not a usable certificate: {e}"))),
    }
}

/// Checks that `pem` holds at least one certificate and nothing unreadable; returns them.
fn certificates(
    pem: &[u8],
    (setting, flag): (&'static str, &'static str),
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(setting, flag, format!("not a PEM file: {e}")))?;
    if certificates.is_empty() {
        return Err(ConfigError::new(setting, flag, "no PEM certificate in it"));
    }
    Ok(certificates)
}
