//! The server's data directory: what `fl-server init` creates and every other command reads.
//!
//! ```text
//! DIR/server.toml               the configuration (commented)
//! DIR/tls/ca.pem, ca.key        the run's certificate authority (keep ca.key private)
//! DIR/tls/server.pem, .key      the server's certificate for the names and IPs given to init
//! DIR/clients/NAME/             what `issue-client` hands a device: ca.pem, client.pem, client.key
//! DIR/state/                    durable state (see `store`)
//! DIR/metrics.jsonl             one line per committed version
//! DIR/summary.json              written when the run finishes
//! ```

use anyhow::{Context, Result, bail};
use shoal_net::tls::{self, Leaf, PemPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `server.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("server.toml")
    }

    fn tls(&self, file: &str) -> PathBuf {
        self.root.join("tls").join(file)
    }

    /// The admin API's token, created (random, readable by its owner only) the first time it is
    /// asked for: `fl-server init` makes it, and a data directory made before tokens gets one at
    /// its next start.
    pub fn admin_token(&self) -> Result<String> {
        let path = self.tls("admin.token");
        match std::fs::read_to_string(&path) {
            Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_string()),
            Ok(_) => bail!("{} is empty: remove it to have a new token made", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_new(&path, &token, true)?;
        Ok(token)
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls("ca.pem")
    }

    /// The CA and server certificate/key pairs.
    pub fn load_pki(&self) -> Result<(PemPair, PemPair)> {
        let ca = tls::read_pem_pair(&self.ca_cert(), &self.tls("ca.key")).with_context(|| {
            format!(
                "{} is not an fl-server data directory (run `fl-server init`)",
                self.root.display()
            )
        })?;
        let server = tls::read_pem_pair(&self.tls("server.pem"), &self.tls("server.key"))?;
        Ok((ca, server))
    }

    /// The folder of a client's credentials.
    pub fn client_dir(&self, name: &str) -> PathBuf {
        self.root.join("clients").join(name)
    }
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Creates a data directory: a CA, a server certificate for `names` (DNS names and IPs), and a
/// commented configuration listening on `listen` with its admin API on `admin` — with the
/// run-defining tables of `tables` (TOML text, see [`crate::config::with_tables`]) when given.
/// Refuses a directory that already holds one.
pub fn init(
    dir: &DataDir,
    server_name: &str,
    names: &[String],
    listen: SocketAddr,
    admin: SocketAddr,
    tables: Option<&str>,
) -> Result<()> {
    if dir.config().exists() || dir.ca_cert().exists() {
        bail!(
            "{} already holds an fl-server data directory",
            dir.root().display()
        );
    }
    if names.is_empty() {
        bail!("give at least one name or IP address the server is reached at (--san)");
    }
    let template = crate::config::template(listen, admin);
    let config = match tables {
        Some(tables) => crate::config::with_tables(&template, tables)?,
        None => template,
    };
    std::fs::create_dir_all(dir.root().join("tls"))
        .with_context(|| format!("creating {}", dir.root().display()))?;
    std::fs::create_dir_all(dir.root().join("clients"))?;
    let ca = tls::generate_ca(&format!("{server_name} CA"))?;
    let server = tls::issue(
        &ca,
        Leaf::Server {
            name: server_name,
            subject_alt_names: names,
        },
    )?;
    write_new(&dir.ca_cert(), &ca.cert, false)?;
    write_new(&dir.tls("ca.key"), &ca.key, true)?;
    write_new(&dir.tls("server.pem"), &server.cert, false)?;
    write_new(&dir.tls("server.key"), &server.key, true)?;
    write_new(&dir.config(), &config, false)?;
    dir.admin_token()?;
    Ok(())
}

/// Issues a certificate for client `name` into `DIR/clients/NAME/` (with the CA certificate it
/// must trust); returns that folder.
pub fn issue_client(dir: &DataDir, name: &str) -> Result<PathBuf> {
    if !tls::is_valid_name(name) {
        bail!("`{name}` is not a valid client name (letters, digits, `-`, `_`, `.`; at most 64)");
    }
    let (ca, _) = dir.load_pki()?;
    let out = dir.client_dir(name);
    if out.exists() {
        bail!(
            "{} already exists: a client named `{name}` was issued",
            out.display()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let client = tls::issue(&ca, Leaf::Client { name })?;
    write_new(&out.join("ca.pem"), &ca.cert, false)?;
    write_new(&out.join("client.pem"), &client.cert, false)?;
    write_new(&out.join("client.key"), &client.key, true)?;
    Ok(out)
}
