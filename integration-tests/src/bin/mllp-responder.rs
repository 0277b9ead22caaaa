//! A native MLLP peer for load runs and failure tests, built on caregate-hl7.
//!
//! Responder (the backend): `mllp-responder --listen ADDR [--mode aa|ae|ar|silent|close]
//! [--record FILE]` prints `listening <addr>` once bound, then answers every frame of every
//! connection, in order, with an original-mode ACK (MSA-2 = the message's MSH-10): `aa`, `ae`,
//! `ar`; `silent` reads and never answers; `close` closes the connection on each message. An
//! unreadable message gets `AE`. `--record` appends each received MSH-10 as a line, before the
//! answer.
//!
//! Load client (the benchmark's sender): `mllp-responder --load ADDR --connections N --seconds S
//! --message FILE` opens N connections, each sending the message (MSH-10 made unique) and waiting
//! for its ACK, again and again for S seconds, then prints the counts as one JSON line (exit 1 on
//! any connection error). Native: in the load harness it shares a core with the responder, and a
//! Python sender costs several times more CPU per round trip.

use caregate_hl7::{
    build_ack, build_ack_unreadable, encode_frame_into, parse_ack, parse_message, AckCode,
    AckError, AckParams, ErrorCode, MllpDecoder,
};
use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};

const MAX_FRAME: usize = 16 << 20;
const ACK_WAIT: Duration = Duration::from_secs(10);
const CODES: [AckCode; 6] = [
    AckCode::AA,
    AckCode::AE,
    AckCode::AR,
    AckCode::CA,
    AckCode::CE,
    AckCode::CR,
];
const FLAGS: [&str; 7] = [
    "--listen",
    "--mode",
    "--record",
    "--load",
    "--connections",
    "--seconds",
    "--message",
];
static ACK_IDS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
enum Mode {
    Ack(AckCode),
    Silent,
    Close,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(std::env::args().skip(1).collect()).await {
        eprintln!("mllp-responder: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Vec<String>) -> Result<(), String> {
    let mut opts = std::collections::HashMap::new();
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!(
                "unknown argument {flag} (flags: {})",
                FLAGS.join(" ")
            ));
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        opts.insert(flag, value);
    }
    let get = |k: &str| opts.get(k).map(String::as_str);
    let addr = |k: &str| -> Result<SocketAddr, String> {
        get(k)
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("{k}: {e}"))
    };
    let num = |k: &str, default: u64| -> Result<u64, String> {
        get(k).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{k} {v}: {e}"))
        })
    };
    if get("--load").is_some() {
        let message = get("--message").ok_or("--load needs --message FILE")?;
        return load(
            addr("--load")?,
            num("--connections", 8)?,
            num("--seconds", 5)?,
            message,
        )
        .await;
    }
    let mode = match get("--mode").unwrap_or("aa") {
        "aa" => Mode::Ack(AckCode::AA),
        "ae" => Mode::Ack(AckCode::AE),
        "ar" => Mode::Ack(AckCode::AR),
        "silent" => Mode::Silent,
        "close" => Mode::Close,
        m => return Err(format!("--mode {m}: one of aa, ae, ar, silent, close")),
    };
    let record = match get("--record") {
        Some(p) => Some(Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("--record {p}: {e}"))?,
        )),
        None => None,
    };
    let listener = TcpListener::bind(addr("--listen")?)
        .await
        .map_err(|e| format!("--listen: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {local}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let record = record.clone();
                tokio::spawn(async move { serve(stream, mode, record).await });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await, // EMFILE and the like
        }
    }
}

/// One connection: frames in order, each answered (or not) before the next is read.
async fn serve(
    stream: TcpStream,
    mode: Mode,
    record: Option<Arc<std::fs::File>>,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let mut wr = BufWriter::new(wr);
    let mut decoder = MllpDecoder::new(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        for item in decoder.push(&buf[..n]) {
            let reply = match item {
                Ok(frame) => {
                    let parsed = parse_message(&frame).map(|m| m.header());
                    if let (Some(file), Ok(h)) = (&record, &parsed) {
                        (&**file).write_all(format!("{}\n", h.control_id).as_bytes())?;
                    }
                    match mode {
                        Mode::Silent => continue,
                        Mode::Close => return Ok(()),
                        Mode::Ack(code) => ack(parsed, code),
                    }
                }
                // An oversized frame gets an AE; junk and broken framing are skipped.
                Err(caregate_hl7::MllpError::FrameTooLarge { .. })
                    if matches!(mode, Mode::Ack(_)) =>
                {
                    let err = AckError::new(ErrorCode::ApplicationInternalError, "frame too large");
                    let (id, ts) = (ack_id(), timestamp());
                    build_ack_unreadable(
                        &AckParams::new(AckCode::AE, &id, &ts).with_error(&err),
                        "2.5",
                    )
                }
                Err(_) => continue,
            };
            let mut framed = Vec::with_capacity(reply.len() + 3);
            if encode_frame_into(&reply, &mut framed).is_ok() {
                wr.write_all(&framed).await?;
            }
        }
        wr.flush().await?;
    }
}

fn ack(
    parsed: Result<caregate_hl7::MessageHeader, caregate_hl7::ParseError>,
    code: AckCode,
) -> Vec<u8> {
    let (id, ts) = (ack_id(), timestamp());
    let header = match parsed {
        Ok(h) => h,
        Err(e) => {
            let err = AckError::from_parse_error(&e);
            return build_ack_unreadable(
                &AckParams::new(AckCode::AE, &id, &ts).with_error(&err),
                "2.5",
            );
        }
    };
    let (code, err) = match header.validate() {
        Err(e) => (AckCode::AE, Some(AckError::from_parse_error(&e))),
        Ok(()) if code == AckCode::AA => (code, None),
        Ok(()) => (
            code,
            Some(AckError::new(
                ErrorCode::ApplicationInternalError,
                "mllp-responder test mode",
            )),
        ),
    };
    let mut params = AckParams::new(code, &id, &ts);
    params.error = err.as_ref();
    build_ack(&header, &params)
}

fn ack_id() -> String {
    format!("R{}", ACK_IDS.fetch_add(1, Ordering::Relaxed) + 1)
}

/// Now as an HL7 DTM in UTC, e.g. `20250101120000+0000` (days to civil date: H. Hinnant).
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64 + 719_468, secs % 86_400);
    let (era, doe) = (days.div_euclid(146_097), days.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}+0000",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The load client. The message's MSH-10 is replaced by `<pid>-<connection>-<sequence>`.
async fn load(addr: SocketAddr, connections: u64, seconds: u64, path: &str) -> Result<(), String> {
    let raw = std::fs::read(path).map_err(|e| format!("--message {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw)
        .replace("\r\n", "\r")
        .replace('\n', "\r");
    let msg = format!("{}\r", text.trim_end_matches('\r')).into_bytes();
    parse_message(&msg)
        .map_err(|e| e.to_string())?
        .header()
        .validate()
        .map_err(|e| e.to_string())?;
    let sep = *msg.get(3).ok_or("--message: no MSH")?;
    let msh_end = msg.iter().position(|&b| b == b'\r').unwrap_or(msg.len());
    let seps: Vec<usize> = (0..msh_end).filter(|&i| msg.get(i) == Some(&sep)).collect();
    let start = seps.get(8).ok_or("--message: no MSH-10")? + 1;
    let end = seps.get(9).copied().unwrap_or(msh_end);
    let parts = Arc::new((msg[..start].to_vec(), msg[end..].to_vec()));
    let began = Instant::now();
    let deadline = began + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(sender(addr, c, deadline, parts.clone())))
        .collect();
    let (mut codes, mut unreadable, mut mismatched, mut errors) =
        ([0u64; 6], 0u64, 0u64, Vec::new());
    for t in tasks {
        let (counts, bad, other, err) = t.await.map_err(|e| e.to_string())?;
        codes.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
        unreadable += bad;
        mismatched += other;
        errors.extend(err);
    }
    let elapsed = began.elapsed().as_secs_f64();
    let messages: u64 = codes.iter().sum::<u64>() + unreadable + mismatched;
    let acks: serde_json::Map<String, serde_json::Value> = CODES
        .iter()
        .zip(codes)
        .map(|(c, n)| (c.as_str().to_string(), n.into()))
        .collect();
    let rate = messages as f64 / elapsed;
    let doc = serde_json::json!({
        "connections": connections, "seconds": elapsed, "messages": messages,
        "messages_per_second": rate, "acks": acks,
        "unreadable_acks": unreadable, "mismatched_acks": mismatched, "errors": errors,
    });
    println!("{doc}");
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{} connection(s) failed", errors.len()))
    }
}

type Counts = ([u64; 6], u64, u64, Option<String>);

/// One connection of the load: a message, its ACK, the next message, until the deadline.
async fn sender(
    addr: SocketAddr,
    conn: u64,
    deadline: Instant,
    parts: Arc<(Vec<u8>, Vec<u8>)>,
) -> Counts {
    let mut counts: Counts = ([0; 6], 0, 0, None);
    if let Err(e) = send_loop(addr, conn, deadline, &parts, &mut counts).await {
        counts.3 = Some(format!("connection {conn}: {e}"));
    }
    counts
}

async fn send_loop(
    addr: SocketAddr,
    conn: u64,
    deadline: Instant,
    parts: &(Vec<u8>, Vec<u8>),
    counts: &mut Counts,
) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut decoder, mut frames) = (MllpDecoder::new(MAX_FRAME), VecDeque::new());
    let (mut buf, mut msg, mut framed) = (vec![0u8; 64 * 1024], Vec::new(), Vec::new());
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let id = format!("{:x}-{conn}-{seq}", std::process::id());
        msg.clear();
        msg.extend_from_slice(&parts.0);
        msg.extend_from_slice(id.as_bytes());
        msg.extend_from_slice(&parts.1);
        framed.clear();
        encode_frame_into(&msg, &mut framed).map_err(|e| e.to_string())?;
        stream
            .write_all(&framed)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let reply = loop {
            if let Some(f) = frames.pop_front() {
                break f;
            }
            let read = tokio::time::timeout(ACK_WAIT, stream.read(&mut buf)).await;
            let n = read
                .map_err(|_| format!("no ACK for {id} within {ACK_WAIT:?}"))?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed by the peer before the ACK of {id}"));
            }
            for item in decoder.push(&buf[..n]) {
                frames.push_back(item.map_err(|e| e.to_string())?);
            }
        };
        match parse_ack(&reply) {
            Ok(a) if a.control_id == id => {
                if let Some(i) = CODES.iter().position(|c| *c == a.code) {
                    counts.0[i] += 1;
                }
            }
            Ok(_) => counts.2 += 1,
            Err(_) => counts.1 += 1,
        }
    }
    Ok(())
}
