//! The SSH front door before authentication: any byte stream a stranger sends to port 22
//! (version line, KEXINIT, key exchange, the first encrypted packets) goes into an in-process
//! gateway session, exactly as `cmx-gateway` runs one. The session must end (with an error or
//! not) once the stranger stops sending, and never panic; it must never count as authenticated.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cmx_gateway::config::Config;
use cmx_gateway::dataplane::UserspaceDataPlane;
use cmx_gateway::events::EventBus;
use cmx_gateway::gateway::Gateway;
use cmx_gateway::identity::Registry;
use cmx_gateway::session::SessionHandler;
use libfuzzer_sys::fuzz_target;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long a session may take to notice the end of its input. Generous: a session that is
/// still running after it is a hang, which the fuzzer should report.
const END_WITHIN: Duration = Duration::from_secs(10);

struct Door {
    runtime: tokio::runtime::Runtime,
    gateway: Arc<Gateway>,
    ssh: Arc<russh::server::Config>,
}

fn door() -> &'static Door {
    static DOOR: OnceLock<Door> = OnceLock::new();
    DOOR.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let config = Config::default();
        let registry = Registry::parse(
            "[[identity]]\nname = \"devc\"\nrole = \"device\"\naddress = \"fd63:6d78::c\"\nkeys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIqBtbvqnhlIJyaSxYU3+pFT/n7cr2bF8V6o2P2xfY3E fuzz\"]\n",
            Path::new("fuzz.toml"),
            cmx_gateway::reload::registry_context(&config),
        )
        .expect("the fixture registry is valid");
        let host_key = PrivateKey::from(Ed25519Keypair::from_seed(&[3; 32]));
        let ssh = Arc::new(cmx_gateway::server::ssh_config(&config, host_key));
        let gateway = runtime.block_on(async {
            Gateway::new(
                config,
                registry,
                Arc::new(UserspaceDataPlane::new("fuzzing")),
                EventBus::default(),
                CancellationToken::new(),
            )
        });
        Door { runtime, gateway, ssh }
    })
}

fuzz_target!(|data: &[u8]| {
    let door = door();
    let peer: SocketAddr = "192.0.2.7:40000".parse().expect("a valid address");
    door.runtime.block_on(async {
        let (mut stranger, server_side) = tokio::io::duplex(64 * 1024);
        let (authenticated_tx, mut authenticated) = tokio::sync::oneshot::channel();
        let handler = SessionHandler::new(
            door.gateway.clone(),
            door.gateway.next_session_id(),
            peer,
            authenticated_tx,
        );
        let session = tokio::spawn(async move {
            if let Ok(running) = russh::server::run_stream(door.ssh.clone(), server_side, handler).await {
                let _ = running.await;
            }
        });
        let (mut from_gateway, mut to_gateway) = tokio::io::split(&mut stranger);
        let send = async {
            let _ = to_gateway.write_all(data).await;
            let _ = to_gateway.shutdown().await;
        };
        let drain = async {
            let mut sink = Vec::new();
            let _ = from_gateway.read_to_end(&mut sink).await;
        };
        let ended = tokio::time::timeout(END_WITHIN, async {
            tokio::join!(send, drain);
            session.await
        })
        .await;
        assert!(
            ended.is_ok(),
            "the session did not end within {END_WITHIN:?} of its input's end"
        );
        assert!(
            !matches!(authenticated.try_recv(), Ok(())),
            "a stranger without a key was authenticated"
        );
    });
});
