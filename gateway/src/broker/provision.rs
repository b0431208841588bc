//! Broker provisioning: a Mosquitto password file (its own PBKDF2-SHA512 format, `$7$`) and an
//! ACL file that binds every device (user name = its EUI) to its own two topics, plus an account
//! for the gateway. Written by `gridsense provision broker --out DIR`.
//!
//! After a change, Mosquitto rereads both files on SIGHUP: `kill -HUP $(pidof mosquitto)` (or
//! `systemctl reload mosquitto`); connected clients keep their sessions.

use std::{fmt::Write as _, fs, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD};
use gridsense_protocol::topic::{Lane, MAX_SHARDS, shard_filter};

pub use crate::config::shard_session_user;

/// Mosquitto 2.0's default PBKDF2 iteration count.
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;

/// One line of a Mosquitto password file for `user` (without the newline).
pub fn password_line(user: &str, password: &str, salt: &[u8; SALT_LEN]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, ITERATIONS, &mut hash);
    format!("{user}:$7${ITERATIONS}${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
}

/// The ACL file: the gateway's account reads every uplink (both lanes of every shard, and
/// version 1's topic) and writes every downlink; each shard-and-lane account
/// ([`shard_session_user`]) reads only that shard's lane, and the `-legacy` account only
/// version 1's topic (one persistent session each: with `use_username_as_clientid` a session
/// is its account's, so a shard's session can move between gateway instances and no other
/// account can take it over); every other user (a device, named by its EUI) writes only its
/// own uplink topics — `gridsense/<shard>/<eui>/up` and `…/urgent` under any shard level, which
/// Mosquitto's patterns cannot check (the gateway does: `wrong_shard`), and version 1's
/// `gridsense/<eui>/up` — and reads only `gridsense/<eui>/down`.
pub fn acl(gateway_user: &str, shards: u16) -> String {
    let mut out = format!(
        "# Written by `gridsense provision broker`. Reload: kill -HUP $(pidof mosquitto)\n\
         user {gateway_user}\n\
         topic read gridsense/+/+/up\n\
         topic read gridsense/+/+/urgent\n\
         topic read gridsense/+/up\n\
         topic write gridsense/+/down\n\
         \n\
         # One account per shard and lane, and one for version 1's topic.\n\
         user {gateway_user}-legacy\n\
         topic read gridsense/+/up\n\
         topic write gridsense/+/down\n"
    );
    for shard in 0..shards.min(MAX_SHARDS) {
        let shard = u8::try_from(shard).unwrap_or(u8::MAX);
        for lane in [Lane::Up, Lane::Urgent] {
            let _ = write!(
                out,
                "user {}\ntopic read {}\ntopic write gridsense/+/down\n",
                shard_session_user(gateway_user, shard, lane),
                shard_filter(shard, lane),
            );
        }
    }
    out.push_str(
        "\n# Devices: user name = EUI (16 lowercase hex digits); the shard level is checked by\n\
         # the gateway (SPEC.md §2).\n\
         pattern write gridsense/+/%u/up\n\
         pattern write gridsense/+/%u/urgent\n\
         pattern write gridsense/%u/up\n\
         pattern read gridsense/%u/down\n",
    );
    out
}

/// What `provision broker` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerFiles {
    /// Device accounts written.
    pub devices: usize,
    /// The gateway's generated password (also in `gateway.credentials`).
    pub gateway_password: String,
}

fn random_salt() -> std::io::Result<[u8; SALT_LEN]> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(salt)
}

/// Writes `passwd`, `acl` and `gateway.credentials` (user:password, mode 0600) into `dir`:
/// the gateway's account, one per shard and lane of `shards` and the legacy one (all with the
/// gateway's password), and the devices'.
pub fn write_broker_files(
    dir: &Path,
    gateway_user: &str,
    shards: u16,
    devices: &[(String, String)],
) -> std::io::Result<BrokerFiles> {
    fs::create_dir_all(dir)?;
    let mut token = [0u8; 18];
    getrandom::fill(&mut token).map_err(|e| std::io::Error::other(e.to_string()))?;
    let gateway_password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
    let mut passwd = String::new();
    let _ = writeln!(passwd, "{}", password_line(gateway_user, &gateway_password, &random_salt()?));
    let legacy = format!("{gateway_user}-legacy");
    let _ = writeln!(passwd, "{}", password_line(&legacy, &gateway_password, &random_salt()?));
    for shard in 0..shards.min(MAX_SHARDS) {
        let shard = u8::try_from(shard).unwrap_or(u8::MAX);
        for lane in [Lane::Up, Lane::Urgent] {
            let user = shard_session_user(gateway_user, shard, lane);
            let _ =
                writeln!(passwd, "{}", password_line(&user, &gateway_password, &random_salt()?));
        }
    }
    for (user, password) in devices {
        let _ = writeln!(passwd, "{}", password_line(user, password, &random_salt()?));
    }
    let write_private = |name: &str, text: &str| -> std::io::Result<()> {
        let path = dir.join(name);
        fs::write(&path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    };
    write_private("passwd", &passwd)?;
    fs::write(dir.join("acl"), acl(gateway_user, shards))?;
    write_private("gateway.credentials", &format!("{gateway_user}:{gateway_password}\n"))?;
    Ok(BrokerFiles { devices: devices.len(), gateway_password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_lines_have_mosquittos_shape() {
        let line = password_line("2102020100000001", "secret", &[1; SALT_LEN]);
        let parts: Vec<&str> = line.split('$').collect();
        assert_eq!(parts[0], "2102020100000001:");
        assert_eq!(parts[1], "7");
        assert_eq!(parts[2], "101");
        assert_eq!(STANDARD.decode(parts[3]).unwrap(), [1; SALT_LEN]);
        assert_eq!(STANDARD.decode(parts[4]).unwrap().len(), 64);
        // Same input, same hash; another salt, another hash.
        assert_eq!(line, password_line("2102020100000001", "secret", &[1; SALT_LEN]));
        assert_ne!(line, password_line("2102020100000001", "secret", &[2; SALT_LEN]));
    }
}
