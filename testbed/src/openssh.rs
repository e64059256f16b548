//! Stock OpenSSH sshd as a CMXsafe gateway (the reference build): a Linux user per identity and
//! a `Match User` block each.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::agents::ChildGuard;
use crate::hosts::{GW_DEV_IP, GW_SRV_IP, Hosts, SSH_PORT};
use crate::keys::Key;

/// Linux users (one per identity, as CMXsafe's OpenSSH gateway has them), removed on drop.
pub struct Users(pub Vec<String>);

impl Users {
    pub fn create(names: &[String]) -> Users {
        for n in names {
            let st = Command::new("useradd")
                // "*": no password, but not "locked" (sshd refuses locked accounts even for keys).
                .args([
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--password",
                    "*",
                    n,
                ])
                .status()
                .expect("useradd");
            assert!(st.success(), "useradd {n}");
        }
        Users(names.to_vec())
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for n in &self.0 {
            // sshd's per-session processes run as the user and outlive the listener.
            let _ = Command::new("pkill").args(["-KILL", "-u", n]).status();
            for _ in 0..50 {
                if Command::new("userdel")
                    .arg(n)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Stock OpenSSH sshd in the gateway namespace, configured like a CMXsafe gateway: one Linux user
/// per identity, each with a `Match User` block (PermitListen / PermitOpen, ForceCommand, no TTY).
/// It takes the SSH port and writes the agents' known_hosts.
pub struct OpenSshGateway {
    pub sshd: ChildGuard,
    pub users: Users,
}

impl OpenSshGateway {
    /// `identities`: (user, key, PermitListen, PermitOpen).
    pub async fn start(hosts: &Hosts, identities: &[(&str, &Key, &str, &str)]) -> OpenSshGateway {
        let mut policy = "AllowTcpForwarding yes\nGatewayPorts no\nPermitTTY no\nX11Forwarding no\nAllowAgentForwarding no\n".to_string();
        let mut authorized_keys = Vec::new();
        for (user, key, listen, open) in identities {
            authorized_keys.push((
                user.to_string(),
                format!("restrict,port-forwarding {}\n", key.public()),
            ));
            policy.push_str(&format!(
                "Match User {user}\n    PermitListen {listen}\n    PermitOpen {open}\n    ForceCommand /bin/false\n"
            ));
        }
        let users: Vec<String> = identities.iter().map(|(u, ..)| u.to_string()).collect();
        OpenSshGateway::start_deployment(hosts, &users, &policy, &authorized_keys).await
    }

    /// A deployment as its operator wrote it: Linux `users`, the forwarding `policy` (sshd_config
    /// lines after the testbed's plumbing: sshd takes the first value of a global keyword, so
    /// the plumbing sets none of the policy's) and each user's `authorized_keys` file, written to
    /// `hosts.path("authorized_keys")/<user>`. The config is `hosts.path("sshd_config")`.
    pub async fn start_deployment(
        hosts: &Hosts,
        users: &[String],
        policy: &str,
        authorized_keys: &[(String, String)],
    ) -> OpenSshGateway {
        let users = Users::create(users);
        let host_key = Key::generate(hosts.dir.path(), "sshd_host_key");
        let auth_dir = hosts.path("authorized_keys");
        std::fs::create_dir_all(&auth_dir).unwrap();
        for (user, keys) in authorized_keys {
            std::fs::write(auth_dir.join(user), keys).unwrap();
        }
        let config = hosts.path("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {SSH_PORT}\nListenAddress 0.0.0.0\nHostKey {hk}\nPidFile {dir}/sshd.pid\nAuthorizedKeysFile {auth}/%u\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n\
                 MaxStartups 200\nMaxSessions 10\n{policy}",
                hk = host_key.path.display(),
                dir = hosts.dir.path().display(),
                auth = auth_dir.display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = ChildGuard(
            hosts
                .gw
                .command("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sshd (apt-get install openssh-server)"),
        );
        drop(hosts.gw.connect_retry(&format!("{GW_DEV_IP}:{SSH_PORT}")).await);
        let pubkey = host_key.public();
        std::fs::write(
            hosts.path("known_hosts"),
            format!("[{GW_DEV_IP}]:{SSH_PORT} {pubkey}\n[{GW_SRV_IP}]:{SSH_PORT} {pubkey}\n"),
        )
        .unwrap();
        OpenSshGateway { sshd, users }
    }
}
