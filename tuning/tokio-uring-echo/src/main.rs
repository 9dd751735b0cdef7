//! A UDP echo server on tokio-uring, the fairest use of it we could write
//! for the loadgen's `echo` load: one socket, `TASKS` tasks each looping
//! `recv_from` → `send_to` with its own buffer (tokio-uring has no batched
//! or multishot receive: one completion per datagram and per send).
//!
//! Usage: tokio-uring-echo ADDR [TASKS]   (e.g. 127.0.0.1:16000 256)

use std::net::SocketAddr;
use std::rc::Rc;

use tokio_uring::buf::BoundedBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = match args.next().map(|a| a.parse()) {
        Some(Ok(a)) => a,
        _ => {
            eprintln!("usage: tokio-uring-echo ADDR [TASKS]");
            std::process::exit(2);
        }
    };
    let tasks: usize = match args.next().map(|t| t.parse()) {
        None => 256,
        Some(Ok(t)) if t > 0 => t,
        Some(_) => {
            eprintln!("TASKS must be a positive number");
            std::process::exit(2);
        }
    };
    tokio_uring::start(async move {
        let socket = match tokio_uring::net::UdpSocket::bind(addr).await {
            Ok(s) => Rc::new(s),
            Err(e) => {
                eprintln!("cannot bind {addr}: {e}");
                std::process::exit(1);
            }
        };
        eprintln!("tokio-uring-echo: listening on {addr} with {tasks} tasks");
        let mut handles = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            let socket = Rc::clone(&socket);
            handles.push(tokio_uring::spawn(async move {
                let mut buf = vec![0u8; 2048];
                loop {
                    let (res, b) = socket.recv_from(buf).await;
                    buf = b;
                    let Ok((n, from)) = res else { continue };
                    // The same buffer goes back out (no copy) and returns.
                    let (res, slice) = socket.send_to(buf.slice(..n), from).await;
                    buf = slice.into_inner();
                    if let Err(e) = res {
                        eprintln!("send to {from}: {e}");
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    });
}
