//! The service on the server host that every workload talks to, through each gateway. The first
//! byte of a connection picks the mode: `E` echo, `U` upload (read to EOF, answer the byte count),
//! `D` download (8-byte little-endian size follows; that many bytes are sent, then EOF).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const CHUNK: usize = 256 * 1024;

pub fn serve(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(handle(s));
        }
    });
}

async fn handle(mut s: TcpStream) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        b'E' => {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = s.write_all(&total.to_le_bytes()).await;
            let _ = s.shutdown().await;
        }
        b'D' => {
            let mut n = [0u8; 8];
            if s.read_exact(&mut n).await.is_err() {
                return;
            }
            let mut left = u64::from_le_bytes(n);
            let buf = vec![0x5au8; CHUNK];
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                if s.write_all(&buf[..k]).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
            let _ = s.shutdown().await;
        }
        _ => {}
    }
}
