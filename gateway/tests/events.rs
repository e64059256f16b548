//! The event stream other components build on (the Kubernetes controller subscribes to it): the
//! gateway runs in-process here, in the gateway namespace, and real OpenSSH agents drive it.

use std::time::Duration;

use cmx_gateway::config::Config;
use cmx_gateway::events::{CloseCause, EventBus, GatewayEvent};
use cmx_gateway::identity::Registry;
use cmx_testbed::*;
use tokio::sync::broadcast::Receiver;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

async fn next(rx: &mut Receiver<GatewayEvent>) -> GatewayEvent {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("no event")
        .expect("event stream closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_forwards_and_pairs_are_announced_in_order() {
    let hosts = Hosts::new();
    let (srv1, dev1, text) = srv1_publishes_dev1_opens(&hosts);
    let config_path = hosts.path("gateway.toml");
    std::fs::write(hosts.path("identities.toml"), &text).unwrap();
    // In-process: the user-space data plane (the sockmap one would move the test process itself
    // into its cgroup).
    std::fs::write(
        &config_path,
        format!("listen = \"0.0.0.0:{SSH_PORT}\"\n[dataplane]\nmode = \"userspace\"\n"),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let registry =
        Registry::load(&config.identities, cmx_gateway::reload::registry_context(&config)).unwrap();

    let events = EventBus::default();
    let mut rx = events.subscribe();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let gateway = hosts.gw.spawn_in(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
            cmx_gateway::serve(config, registry, listener, stop, events).await
        })
    });
    // Wait for the host key, then pin it.
    let key_path = hosts.path("ssh_host_ed25519_key.pub");
    for _ in 0..200 {
        if key_path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let host_key = std::fs::read_to_string(&key_path).unwrap();
    std::fs::write(
        hosts.path("known_hosts"),
        format!("[{GW_DEV_IP}]:{SSH_PORT} {host_key}[{GW_SRV_IP}]:{SSH_PORT} {host_key}"),
    )
    .unwrap();

    assert!(
        matches!(next(&mut rx).await, GatewayEvent::Ready { listen: Some(_), admin: None, dataplane } if dataplane == "userspace"),
        "the first event says the gateway is ready, and with which data plane"
    );

    let _echo = Echo::serve(hosts.srv.listen("127.0.0.1:5001"));
    let server = SshAgent::start(&hosts, &hosts.srv, "srv1", &srv1, &["-R", "1883:127.0.0.1:5001"]);
    let srv_session = match next(&mut rx).await {
        GatewayEvent::SessionOpened {
            session, identity, ..
        } if identity == "srv1" => session,
        e => panic!("expected srv1's session, got {e:?}"),
    };
    assert_eq!(
        next(&mut rx).await,
        GatewayEvent::ForwardAdded {
            session: srv_session,
            identity: "srv1".into(),
            addr: "fd63:6d78::1".parse().unwrap(),
            port: 1883
        }
    );

    let _device = SshAgent::start(
        &hosts,
        &hosts.dev,
        "dev1",
        &dev1,
        &["-L", "127.0.0.1:11883:srv1:1883"],
    );
    assert!(
        matches!(next(&mut rx).await, GatewayEvent::SessionOpened { identity, .. } if identity == "dev1")
    );
    assert_eq!(
        exchange(hosts.dev.connect_retry("127.0.0.1:11883").await, b"hello").await,
        b"hello"
    );
    let conn = match next(&mut rx).await {
        GatewayEvent::PairOpened {
            conn_id,
            device,
            target,
        } => {
            assert_eq!(device, "dev1");
            assert_eq!(target, "srv1 [fd63:6d78::1]:1883");
            conn_id
        }
        e => panic!("expected a pair, got {e:?}"),
    };
    assert_eq!(
        next(&mut rx).await,
        GatewayEvent::PairClosed {
            conn_id: conn,
            device: "dev1".into(),
            bytes_to_target: 5,
            bytes_from_target: 5
        }
    );

    // The server's session ends: its forward goes with it.
    drop(server);
    assert!(
        matches!(next(&mut rx).await, GatewayEvent::ForwardRemoved { session, port: 1883, .. } if session == srv_session)
    );
    assert_eq!(
        next(&mut rx).await,
        GatewayEvent::SessionClosed {
            session: srv_session,
            identity: "srv1".into(),
            cause: CloseCause::PeerClosed,
        }
    );

    shutdown.cancel();
    let result = tokio::task::spawn_blocking(move || gateway.join())
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    // The shutdown is announced: draining first (dev1's session then ends), stopped last.
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(e);
    }
    assert_eq!(rest.first(), Some(&GatewayEvent::Draining), "{rest:?}");
    assert_eq!(rest.last(), Some(&GatewayEvent::Stopped), "{rest:?}");
}
