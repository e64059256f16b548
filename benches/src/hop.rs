//! The in-gateway hop alone: an ID-sock connected to a Mir-sock on identity addresses, exactly as
//! the gateway makes them (tagged, in the gateway's cgroup), with the sockmap splice or plain
//! loopback TCP. Runs in a child process in a fresh network namespace (the sockmap data plane
//! moves its process into a cgroup), which prints its result as JSON.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use cmx_gateway::dataplane::{DataPlane, SocketRole, SocketTag, TagGuard, UserspaceDataPlane};
use cmx_gateway::ebpf::{SockmapDataPlane, SockmapSettings};
use cmx_gateway::identity::{Registry, RegistryContext};
use cmx_net::route::LocalRoute;
use cmx_net::sockets;
use russh::keys::{Algorithm, PrivateKey};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::{Latency, histogram, record};

#[derive(Debug, Serialize, Deserialize)]
pub struct HopResult {
    pub mode: String,
    /// 64 B RTT with tokio endpoints (the gateway's relays).
    pub rtt: Latency,
    /// 64 B RTT with blocking endpoints: the kernel's share alone (absent in older results).
    #[serde(default)]
    pub kernel_rtt: Option<Latency>,
    pub bulk_mbps: f64,
    /// Every thread on one CPU (the kernel path alone) rather than wherever the scheduler puts
    /// them (cross-CPU wakeups included, as in a running gateway).
    #[serde(default)]
    pub one_cpu: bool,
}

const SRV: Ipv6Addr = Ipv6Addr::new(0xfd63, 0x6d78, 0, 0, 0, 0, 0, 1);
const DEV: Ipv6Addr = Ipv6Addr::new(0xfd63, 0x6d78, 0, 0, 0, 0, 0, 0xd1);

fn registry() -> anyhow::Result<Registry> {
    let key = |n| -> anyhow::Result<String> {
        let k = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)?;
        Ok(format!("{} {n}", k.public_key().to_openssh()?))
    };
    let text = format!(
        "[[identity]]\nname = \"srv\"\nrole = \"server\"\nkeys = [\"{}\"]\naddress = \"{SRV}\"\npermit_listen = [\"1883\"]\n\n\
         [[identity]]\nname = \"dev\"\nrole = \"device\"\nkeys = [\"{}\"]\naddress = \"{DEV}\"\npermit_open = [\"srv:1883\"]\n",
        key("srv")?,
        key("dev")?
    );
    let ctx = RegistryContext {
        prefix: "fd63:6d78::/64".parse()?,
        service_prefix: "dynamic-service-".into(),
    };
    Ok(Registry::parse(&text, Path::new("hop.toml"), ctx)?)
}

/// Runs in the child: measures and returns the result.
pub async fn run(mode: &str, iterations: usize, bulk: u64, one_cpu: bool) -> anyhow::Result<HopResult> {
    let prefix = "fd63:6d78::/64".parse()?;
    let route = LocalRoute::ensure(prefix)?;
    let dp: Arc<dyn DataPlane> = match mode {
        "sockmap" => {
            let cgroup = cmx_gateway::ebpf::cgroup::v2_mount()?
                .join(format!("cmxsafe-bench-hop-{}", std::process::id()));
            let pin_dir = format!("/sys/fs/bpf/cmxsafe-bench-hop-{}", std::process::id()).into();
            Arc::new(
                SockmapDataPlane::load(SockmapSettings {
                    pin_dir,
                    cgroup,
                    prefix,
                    tags_capacity: cmx_gateway::config::DataPlaneSettings::default().tags_capacity,
                })
                .map_err(anyhow::Error::msg)?,
            )
        }
        _ => Arc::new(UserspaceDataPlane::new("benchmark baseline")),
    };
    dp.sync_policy(&registry()?).map_err(anyhow::Error::msg)?;
    let result = measure(&dp, mode, iterations, bulk)
        .await
        .map(|r| HopResult { one_cpu, ..r });
    dp.shutdown();
    route.remove();
    result
}

/// Connects a fresh ID-sock (tagged with `conn_id`) to the Mir-sock: one forwarding pair. The
/// guard keeps the ID-sock's tag; drop it only after the pair is done.
async fn pair(
    dp: &Arc<dyn DataPlane>,
    listener: &tokio::net::TcpListener,
    conn_id: u64,
) -> anyhow::Result<(TcpStream, TcpStream, TagGuard)> {
    let tag = SocketTag {
        conn_id,
        role: SocketRole::IdSock,
        identity: DEV,
    };
    let (socket, _, guard) = sockets::identity_socket(DEV, None, |s| dp.tag(s, tag)).context("ID-sock")?;
    let target = SocketAddr::V6(SocketAddrV6::new(SRV, 1883, 0, 0));
    let (client, accepted) = tokio::join!(socket.connect(target), listener.accept());
    let (client, (server, _)) = (client?, accepted?);
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server, guard))
}

async fn measure(
    dp: &Arc<dyn DataPlane>,
    mode: &str,
    iterations: usize,
    bulk: u64,
) -> anyhow::Result<HopResult> {
    let listen_tag = SocketTag {
        conn_id: 1,
        role: SocketRole::MirListener,
        identity: SRV,
    };
    let (listener, _lt) =
        sockets::mirror_listener(SRV, 1883, |s| dp.tag(s, listen_tag)).context("Mir-sock")?;

    let (client, server, _tag) = pair(dp, &listener, 2).await?;
    let rtt = tokio_rtt(client, server, iterations).await?;
    let (client, server, _tag) = pair(dp, &listener, 3).await?;
    let (client, server) = (client.into_std()?, server.into_std()?);
    let kernel_rtt = tokio::task::spawn_blocking(move || blocking_rtt(client, server, iterations)).await??;
    let (client, server, _tag) = pair(dp, &listener, 4).await?;
    let bulk_mbps = tokio_bulk(client, server, bulk).await?;
    Ok(HopResult {
        mode: mode.to_string(),
        rtt,
        kernel_rtt: Some(kernel_rtt),
        bulk_mbps,
        one_cpu: false,
    })
}

/// 64 B ping-pong with tokio on both ends, as the gateway's relays see the hop: an echo task on
/// the Mir side, the measuring task on the ID side (wakeups cross the runtime's threads).
async fn tokio_rtt(
    mut client: TcpStream,
    mut server: TcpStream,
    iterations: usize,
) -> anyhow::Result<Latency> {
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            if server.read_exact(&mut buf).await.is_err() || server.write_all(&buf).await.is_err() {
                break;
            }
        }
        server
    });
    let msg = [1u8; 64];
    let mut back = [0u8; 64];
    let mut h = histogram();
    for i in 0..iterations + iterations / 10 {
        let t = Instant::now();
        client.write_all(&msg).await?;
        client.read_exact(&mut back).await?;
        if i >= iterations / 10 {
            record(&mut h, t.elapsed());
        }
    }
    drop(client);
    let mut server = echo.await?;
    let _ = server.shutdown().await;
    Ok(Latency::from(&h))
}

/// The same ping-pong with blocking sockets on two OS threads: the kernel's share of the hop
/// without any runtime's scheduling (what the FACTS.md prototype measured).
fn blocking_rtt(
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    iterations: usize,
) -> anyhow::Result<Latency> {
    use std::io::{Read, Write};
    client.set_nonblocking(false)?;
    server.set_nonblocking(false)?;
    let echo = std::thread::spawn(move || {
        let mut server = server;
        let mut buf = [0u8; 64];
        while server.read_exact(&mut buf).is_ok() && server.write_all(&buf).is_ok() {}
    });
    let mut client = client;
    let msg = [1u8; 64];
    let mut back = [0u8; 64];
    let mut h = histogram();
    for i in 0..iterations + iterations / 10 {
        let t = Instant::now();
        client.write_all(&msg)?;
        client.read_exact(&mut back)?;
        if i >= iterations / 10 {
            record(&mut h, t.elapsed());
        }
    }
    client.shutdown(std::net::Shutdown::Both)?;
    drop(client);
    echo.join()
        .map_err(|_| anyhow::anyhow!("hop echo thread panicked"))?;
    Ok(Latency::from(&h))
}

/// Bulk one way on a fresh pair: MB/s.
async fn tokio_bulk(mut client: TcpStream, mut server: TcpStream, bulk: u64) -> anyhow::Result<f64> {
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while let Ok(n) = server.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let chunk = vec![9u8; 256 * 1024];
    let t = Instant::now();
    let mut left = bulk;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        client.write_all(&chunk[..k]).await?;
        left -= k as u64;
    }
    client.shutdown().await?;
    let got = reader.await?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(got == bulk, "hop bulk: {got} of {bulk} bytes arrived");
    Ok(bulk as f64 / secs / 1e6)
}
