//! Faults around the broker (issue #9): a slow or stalled Kafka, a full
//! Kafka disk, and a broker process out of file descriptors.
//!
//! The Kafka tests run their own Kafka instance (ports 19692-19697, below the
//! ephemeral range) so they can slow it down, fill its disk or restart it
//! without disturbing other tests:
//! - slow Kafka: Kafka on 19692 advertises 19694, where an in-test TCP proxy
//!   forwards bytes immediately, with a delay, or not at all (stall), so every
//!   connection of the broker's Kafka clients goes through the proxy;
//! - full disk: Kafka on 19696 keeps its data on a small tmpfs (needs root
//!   and mount permission; skipped with a message otherwise).
//!
//! The fd test runs the real `broker` binary under `prlimit --nofile` against
//! the shared test Kafka (`LODESTREAM_KAFKA`), MQTT on 19695, metrics 19699.
//!
//! Invariant checked everywhere: a PUBLISH that got a success PUBACK/PUBREC
//! is in Kafka (read back at the end); nothing is acknowledged as success
//! while Kafka cannot take the write.

use crate::common;
use crate::common::kafka_instance::{kafka_local_async, run_dir, StopKafka};
use crate::common::packets::{self, IntoPacket};
use crate::common::raw;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lodestream_mqtt::{Ack, Connect, Packet, Properties, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The tests of this file run one at a time: two extra Kafka JVMs at once
/// would make every timing here meaningless on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `mqtt.receive_maximum` in the slow-Kafka test: also the bound on a
/// connection's QoS 0 writes awaiting Kafka.
const QOS0_BOUND: u16 = 8;

const SLOW_KAFKA_PORT: u16 = 19692;
const PROXY_PORT: u16 = 19694;
const FD_MQTT_PORT: u16 = 19695;
const DISK_KAFKA_PORT: u16 = 19696;
const FD_METRICS_PORT: u16 = 19699;

fn connect_packet(v: ProtocolVersion, id: &str) -> Packet {
    Connect {
        keep_alive: 0,
        ..packets::connect(v, id)
    }
    .packet()
}

fn publish(qos: QoS, id: u16, topic: &str, payload: impl Into<Bytes>) -> Packet {
    packets::publish(topic, qos, Some(id), payload).packet()
}

async fn client(addr: SocketAddr, v: ProtocolVersion, id: &str) -> raw::Raw {
    let mut r = raw::Raw::connect(addr).await;
    r.send(&connect_packet(v, id)).await;
    match r.recv().await {
        Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success => r,
        other => panic!("CONNECT {id}: {other:?}"),
    }
}

/// Payloads of every record in `topic`, read from the Kafka at `bootstrap`.
fn values_in(bootstrap: &str, topic: &str, want: usize) -> Vec<Vec<u8>> {
    common::read_topic_at(bootstrap, topic, want, Duration::from_secs(30))
        .into_iter()
        .filter_map(|r| r.value)
        .collect()
}

// ------------------------------------------------------------- slow Kafka --

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Fast,
    /// Every chunk, in both directions, waits this long before it is forwarded.
    Delay(Duration),
    /// Bytes are read but held until the mode changes (a black hole that
    /// keeps connections open).
    Stall,
    /// Requests reach Kafka; its answers are dropped and the connection
    /// closed: the client cannot know whether its write landed.
    CutAnswers,
}

/// Answers dropped in `Mode::CutAnswers`.
static CUT_ANSWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A TCP proxy in front of Kafka whose speed the test controls.
async fn proxy(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<Mode>) {
    while let Ok((down, _)) = listener.accept().await {
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::join!(pipe(dr, uw, mode.clone(), false), pipe(ur, dw, mode, true));
        });
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    answers: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::CutAnswers if answers => {
                    CUT_ANSWERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    // Dropping both halves resets the client's connection.
                    return;
                }
                Mode::Fast | Mode::CutAnswers => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// A Kafka of its own whose every connection goes through `proxy`; its
/// bootstrap address (the proxy's) and the switch of the proxy's mode.
async fn kafka_behind_proxy() -> (watch::Sender<Mode>, StopKafka, String) {
    const DIR: &str = "kafka-faults-slow-test";
    // The proxy must serve before Kafka starts: kafka-local checks the admin
    // API, which follows the advertised (proxy) address.
    let listener = TcpListener::bind(("127.0.0.1", PROXY_PORT))
        .await
        .expect("bind proxy port 19694");
    let (mode_tx, mode_rx) = watch::channel(Mode::Fast);
    let upstream: SocketAddr = format!("127.0.0.1:{SLOW_KAFKA_PORT}")
        .parse()
        .expect("addr");
    tokio::spawn(proxy(listener, upstream, mode_rx));

    let adv = vec![("KAFKA_ADVERTISED_PORT", PROXY_PORT.to_string())];
    kafka_local_async(SLOW_KAFKA_PORT, DIR, "stop", vec![]).await;
    assert!(kafka_local_async(SLOW_KAFKA_PORT, DIR, "reset", vec![]).await);
    assert!(
        kafka_local_async(SLOW_KAFKA_PORT, DIR, "start", adv).await,
        "test Kafka behind the proxy did not start"
    );
    let stop = StopKafka(SLOW_KAFKA_PORT, DIR);
    (mode_tx, stop, format!("127.0.0.1:{PROXY_PORT}"))
}

/// Rule 1 across a lost answer: Kafka wrote the batch, the answer never
/// came, and the producer cannot tell. It must send the same batch again
/// (same producer id and sequence numbers, so Kafka keeps one copy), and
/// acknowledge only once an answer says written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_was_lost_is_retried_into_one_record_and_one_puback() {
    let _serial = SERIAL.lock().await;
    let (mode_tx, _stop, bootstrap) = kafka_behind_proxy().await;
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = 20_000;
    let b = common::start_with(c).await;
    let topic = "faults/cut";
    let mut v5 = client(b.addr(), ProtocolVersion::V5, &common::unique("cut-v5")).await;
    v5.send(&publish(QoS::AtLeastOnce, 1, topic, &b"before"[..]))
        .await;
    assert!(is_success(
        &next_ack(&mut v5, Duration::from_secs(15)).await,
        1
    ));

    let cut_before = CUT_ANSWERS.load(std::sync::atomic::Ordering::SeqCst);
    mode_tx.send_replace(Mode::CutAnswers);
    v5.send(&publish(QoS::AtLeastOnce, 2, topic, &b"answer-lost"[..]))
        .await;
    assert_eq!(
        next_ack(&mut v5, Duration::from_secs(2)).await,
        None,
        "no PUBACK while no answer says written"
    );
    let cut = CUT_ANSWERS.load(std::sync::atomic::Ordering::SeqCst) - cut_before;
    assert!(cut > 0, "the proxy dropped Kafka's answers");
    mode_tx.send_replace(Mode::Fast);
    let a = next_ack(&mut v5, Duration::from_secs(20)).await;
    assert!(
        is_success(&a, 2),
        "PUBACK once a resend was answered, got {a:?}"
    );

    let dt = b.default_topic.clone();
    let values = tokio::task::spawn_blocking(move || values_in(&bootstrap, &dt, 3))
        .await
        .expect("reader");
    let copies = values
        .iter()
        .filter(|v| v.as_slice() == b"answer-lost")
        .count();
    assert_eq!(
        copies, 1,
        "written once though sent {cut} times or more: {values:?}"
    );
}

/// Waits for the next acknowledgement-ish packet (PUBACK/PUBREC) or the close.
async fn next_ack(r: &mut raw::Raw, t: Duration) -> Option<Packet> {
    r.recv_within(t).await
}

fn is_success(p: &Option<Packet>, id: u16) -> bool {
    matches!(p, Some(Packet::PubAck(a)) | Some(Packet::PubRec(a)) if a.packet_id == id && a.reason == ReasonCode::Success)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_kafka_delays_acks_and_a_stalled_kafka_never_acks_success_then_recovers() {
    let _serial = SERIAL.lock().await;
    let delivery_timeout = Duration::from_millis(4000);
    let (mode_tx, _stop, bootstrap) = kafka_behind_proxy().await;
    // The QoS 0 burst below goes to a Kafka topic of its own: its records
    // may land late, and the default topic's are counted at the end.
    let q0_topic = common::unique("faults-q0");
    let mut c = common::test_config(&[format!("{q0_topic}:faults/q0/#")]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = delivery_timeout.as_millis() as u32;
    c.mqtt.receive_maximum = QOS0_BOUND;
    let b = common::start_with(c).await;
    let topic = "faults/slow";

    // Fast: the baseline.
    let mut v5 = client(b.addr(), ProtocolVersion::V5, &common::unique("slow-v5")).await;
    let mut acked: Vec<&'static [u8]> = Vec::new();
    let t = Instant::now();
    v5.send(&publish(QoS::AtLeastOnce, 1, topic, &b"fast"[..]))
        .await;
    assert!(is_success(
        &next_ack(&mut v5, Duration::from_secs(10)).await,
        1
    ));
    let fast_ack = t.elapsed();
    acked.push(b"fast");

    // Slow but within the delivery timeout: acknowledged, later.
    mode_tx.send_replace(Mode::Delay(Duration::from_millis(400)));
    let t = Instant::now();
    v5.send(&publish(QoS::AtLeastOnce, 2, topic, &b"slow-qos1"[..]))
        .await;
    let a = next_ack(&mut v5, Duration::from_secs(15)).await;
    let slow_ack = t.elapsed();
    assert!(is_success(&a, 2), "slow Kafka: PUBACK success, got {a:?}");
    assert!(
        slow_ack >= Duration::from_millis(400),
        "the ack waited for Kafka: {slow_ack:?}"
    );
    acked.push(b"slow-qos1");
    let t = Instant::now();
    v5.send(&publish(QoS::ExactlyOnce, 3, topic, &b"slow-qos2"[..]))
        .await;
    let a = next_ack(&mut v5, Duration::from_secs(15)).await;
    let slow_rec = t.elapsed();
    assert!(is_success(&a, 3), "slow Kafka: PUBREC success, got {a:?}");
    v5.send(&Packet::PubRel(Ack::new(3))).await;
    assert!(matches!(v5.recv().await, Some(Packet::PubComp(_))));
    acked.push(b"slow-qos2");

    // Stalled beyond the delivery timeout: never a success. v5 gets 0x80,
    // 3.1.1 (no negative ack) is disconnected.
    let mut v3 = client(b.addr(), ProtocolVersion::V311, &common::unique("slow-v3")).await;
    // A persistent QoS 2 publisher: its failed write may land anyway, so it
    // is disconnected to retransmit (DUP) rather than refused with a PUBREC
    // that would end the flow.
    let eo_id = common::unique("slow-eo");
    let persistent = |clean: bool| {
        Connect {
            clean_start: clean,
            keep_alive: 0,
            properties: Properties {
                session_expiry_interval: Some(300),
                ..Properties::default()
            },
            ..packets::connect(ProtocolVersion::V5, &eo_id)
        }
        .packet()
    };
    let mut eo = raw::Raw::connect(b.addr()).await;
    eo.send(&persistent(true)).await;
    assert!(matches!(eo.recv().await, Some(Packet::ConnAck(_))));
    let mut q0 = client(b.addr(), ProtocolVersion::V311, &common::unique("slow-q0")).await;
    mode_tx.send_replace(Mode::Stall);
    // Bounded: QoS 0 writes awaiting Kafka count against receive_maximum
    // like QoS 1/2 ones; past it the socket is not read, so a PINGREQ
    // behind them is answered only once the writes are over (here: failed
    // at the delivery timeout, counted, nothing acknowledged).
    for i in 0..=QOS0_BOUND {
        let p = packets::publish(
            "faults/q0",
            QoS::AtMostOnce,
            None,
            format!("stalled-qos0-{i}"),
        );
        q0.send(&p.packet()).await;
    }
    q0.send(&Packet::PingReq).await;
    assert_eq!(
        q0.recv_within(Duration::from_secs(1)).await,
        None,
        "past receive_maximum QoS 0 writes awaiting Kafka, the socket is not read"
    );
    eo.send(&publish(
        QoS::ExactlyOnce,
        7,
        topic,
        &b"stalled-qos2-persistent"[..],
    ))
    .await;
    let stall_start = Instant::now();
    v5.send(&publish(QoS::AtLeastOnce, 4, topic, &b"stalled-qos1"[..]))
        .await;
    v5.send(&publish(QoS::ExactlyOnce, 5, topic, &b"stalled-qos2"[..]))
        .await;
    v3.send(&publish(QoS::AtLeastOnce, 1, topic, &b"stalled-v311"[..]))
        .await;
    let limit = delivery_timeout * 4 + Duration::from_secs(10);
    let a4 = next_ack(&mut v5, limit).await;
    let v5_first_answer = stall_start.elapsed();
    let a5 = next_ack(&mut v5, limit).await;
    let v5_second_answer = stall_start.elapsed();
    assert!(
        matches!(&a4, Some(Packet::PubAck(a)) if a.packet_id == 4 && a.reason == ReasonCode::UnspecifiedError),
        "stalled Kafka: v5 PUBACK 0x80, got {a4:?}"
    );
    assert!(
        matches!(&a5, Some(Packet::PubRec(a)) if a.packet_id == 5 && a.reason == ReasonCode::UnspecifiedError),
        "stalled Kafka: v5 PUBREC 0x80, got {a5:?}"
    );
    assert!(
        v5_first_answer >= delivery_timeout - Duration::from_millis(500),
        "no answer before the delivery timeout: {v5_first_answer:?}"
    );
    let v3_answer = next_ack(&mut v3, limit).await;
    let v3_closed = stall_start.elapsed();
    assert_eq!(v3_answer, None, "3.1.1: closed without PUBACK");
    let eo_answer = eo.recv_within(limit).await;
    assert!(
        matches!(&eo_answer, Some(Packet::Disconnect(d)) if d.reason == ReasonCode::UnspecifiedError),
        "persistent QoS 2 publisher: DISCONNECT 0x80, got {eo_answer:?}"
    );
    assert!(eo.closed_within(Duration::from_secs(5)).await);
    assert_eq!(
        q0.recv_within(limit).await,
        Some(Packet::PingResp),
        "once the QoS 0 writes are over the socket is read again"
    );

    // Fast again: the broker recovers by itself; the 3.1.1 client
    // reconnects and retransmits, as it must.
    mode_tx.send_replace(Mode::Fast);
    let recover_start = Instant::now();
    let mut recovered = None;
    for id in 10..40u16 {
        v5.send(&publish(QoS::AtLeastOnce, id, topic, &b"after"[..]))
            .await;
        let a = next_ack(&mut v5, Duration::from_secs(30)).await;
        if is_success(&a, id) {
            recovered = Some(recover_start.elapsed());
            break;
        }
        assert!(
            matches!(&a, Some(Packet::PubAck(x)) if x.packet_id == id && x.reason.is_error()),
            "after the stall: success or an error PUBACK, got {a:?}"
        );
    }
    let recovered = recovered.expect("broker recovered once Kafka was fast again");
    acked.push(b"after");
    let mut v3 = client(b.addr(), ProtocolVersion::V311, &common::unique("slow-v3b")).await;
    v3.send(&publish(QoS::AtLeastOnce, 1, topic, &b"stalled-v311"[..]))
        .await;
    assert!(is_success(
        &next_ack(&mut v3, Duration::from_secs(30)).await,
        1
    ));
    acked.push(b"stalled-v311");
    // [MQTT-4.3.3] the persistent publisher resumes and retransmits: one record.
    let mut eo = raw::Raw::connect(b.addr()).await;
    eo.send(&persistent(false)).await;
    assert!(matches!(eo.recv().await, Some(Packet::ConnAck(a)) if a.session_present));
    let mut dup = publish(QoS::ExactlyOnce, 7, topic, &b"stalled-qos2-persistent"[..]);
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    eo.send(&dup).await;
    let eo_ack = next_ack(&mut eo, Duration::from_secs(30)).await;
    eprintln!("persistent QoS 2 retransmission answered {eo_ack:?}");
    assert!(is_success(&eo_ack, 7));
    eo.send(&Packet::PubRel(Ack::new(7))).await;
    assert!(matches!(eo.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 7));
    acked.push(b"stalled-qos2-persistent");

    let bs = bootstrap.clone();
    let dt = b.default_topic.clone();
    let values = tokio::task::spawn_blocking(move || values_in(&bs, &dt, 10))
        .await
        .expect("reader");
    for m in &acked {
        assert!(
            values.iter().any(|v| v == m),
            "acknowledged {:?} is in Kafka",
            String::from_utf8_lossy(m)
        );
    }
    let late = |p: &[u8]| values.iter().filter(|v| v.as_slice() == p).count();
    assert_eq!(
        late(b"stalled-qos2-persistent"),
        1,
        "[MQTT-4.3.3] a QoS 2 message whose first write failed ambiguously is in Kafka once"
    );
    eprintln!(
        "slow Kafka: fast PUBACK {fast_ack:?}; with 400 ms/chunk: PUBACK {slow_ack:?}, PUBREC {slow_rec:?}; \
         stalled (delivery timeout {delivery_timeout:?}): v5 PUBACK 0x80 after {v5_first_answer:?}, PUBREC 0x80 after {v5_second_answer:?}, \
         3.1.1 closed after {v3_closed:?}; first success after un-stalling {recovered:?}; \
         records in Kafka {} (error-acked ones that landed anyway: stalled-qos1 x{}, stalled-qos2 x{}); \
         persistent QoS 2 retransmission found already written: {}",
        values.len(),
        late(b"stalled-qos1"),
        late(b"stalled-qos2"),
        common::metric(
            &common::scrape(&b).await,
            "lodestream_qos2_duplicates_suppressed_total"
        ),
    );
}

// ---------------------------------------------------------- Kafka disk full --

struct Unmount(String);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_disk_full_gives_no_success_ack_and_acked_messages_survive() {
    let _serial = SERIAL.lock().await;
    const DIR: &str = "kafka-faults-disk-test";
    let data = format!("{}/data", run_dir(DIR));
    kafka_local_async(DISK_KAFKA_PORT, DIR, "stop", vec![]).await;
    let _ = sh("umount", &[&data]);
    let _ = std::fs::remove_dir_all(run_dir(DIR));
    std::fs::create_dir_all(&data).expect("mkdir");
    if !sh("mount", &["-t", "tmpfs", "-o", "size=12m", "tmpfs", &data]) {
        eprintln!(
            "SKIPPED kafka_disk_full…: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)"
        );
        return;
    }
    let _unmount = Unmount(data.clone());
    let env = || vec![("KAFKA_NUM_PARTITIONS", "1".to_string())];
    assert!(
        kafka_local_async(DISK_KAFKA_PORT, DIR, "start", env()).await,
        "test Kafka on tmpfs did not start"
    );
    let _stop = StopKafka(DISK_KAFKA_PORT, DIR);

    let bootstrap = format!("127.0.0.1:{DISK_KAFKA_PORT}");
    let mut c = common::test_config(&[]);
    c.kafka.bootstrap_servers = bootstrap.clone();
    c.kafka.delivery_timeout_ms = 5000;
    c.kafka.topic_partitions = 1;
    let b = common::start_with(c).await;
    let mut r = client(b.addr(), ProtocolVersion::V5, &common::unique("disk")).await;

    // 64 KiB incompressible payloads (lz4), numbered, one at a time, until
    // Kafka stops taking them.
    let mut acked_seqs = Vec::new();
    let mut failure = None;
    let t_fill = Instant::now();
    for seq in 0u32..2000 {
        let mut p = vec![0u8; 64 * 1024];
        rand::Rng::fill(&mut rand::thread_rng(), &mut p[..]);
        p[..4].copy_from_slice(&seq.to_be_bytes());
        let id = (seq % 60_000 + 1) as u16;
        let t = Instant::now();
        r.send(&publish(QoS::AtLeastOnce, id, "faults/disk", p))
            .await;
        let a = next_ack(&mut r, Duration::from_secs(30)).await;
        if is_success(&a, id) {
            acked_seqs.push(seq);
            continue;
        }
        failure = Some((seq, a, t.elapsed()));
        break;
    }
    let (failed_seq, answer, answer_after) = failure.expect("Kafka's 12 MB disk filled up");
    assert!(
        matches!(&answer, Some(Packet::PubAck(a)) if a.reason.is_error()) || answer.is_none(),
        "disk full: an error PUBACK (or nothing), never success; got {answer:?}"
    );
    let fill_time = t_fill.elapsed();
    let answer = match answer {
        Some(Packet::PubAck(a)) => {
            format!("PUBACK {:?} ({:?})", a.reason, a.properties.reason_string)
        }
        other => format!("{other:?}"),
    };

    // Free space and restart Kafka: the broker recovers by itself.
    assert!(sh("mount", &["-o", "remount,size=512m", &data]));
    kafka_local_async(DISK_KAFKA_PORT, DIR, "stop", vec![]).await;
    let restart = Instant::now();
    assert!(
        kafka_local_async(DISK_KAFKA_PORT, DIR, "start", env()).await,
        "Kafka restart"
    );
    let kafka_back = restart.elapsed();
    let mut recovered = None;
    for id in 100..200u16 {
        r.send(&publish(
            QoS::AtLeastOnce,
            id,
            "faults/disk",
            &b"after-disk-full"[..],
        ))
        .await;
        let a = next_ack(&mut r, Duration::from_secs(30)).await;
        if is_success(&a, id) {
            recovered = Some(restart.elapsed());
            break;
        }
        assert!(
            matches!(&a, Some(Packet::PubAck(x)) if x.reason.is_error()),
            "got {a:?}"
        );
    }
    let recovered = recovered.expect("broker wrote again after the disk was freed");

    let dt = b.default_topic.clone();
    let want = acked_seqs.len() + 1;
    let values = tokio::task::spawn_blocking(move || values_in(&bootstrap, &dt, want + 4))
        .await
        .expect("reader");
    let in_kafka: std::collections::HashSet<u32> = values
        .iter()
        .filter(|v| v.len() == 64 * 1024)
        .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        .collect();
    let lost: Vec<_> = acked_seqs
        .iter()
        .filter(|s| !in_kafka.contains(s))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged but missing from Kafka: {lost:?}"
    );
    assert!(values.iter().any(|v| v == b"after-disk-full"));
    eprintln!(
        "disk full: {} x 64 KiB acknowledged in {fill_time:?}; message {failed_seq} answered {answer} after {answer_after:?}; \
         Kafka restart {kafka_back:?}, first success {recovered:?} after the restart began; \
         {} of {} acknowledged found in Kafka",
        acked_seqs.len(),
        acked_seqs.len() - lost.len(),
        acked_seqs.len()
    );
}

// ------------------------------------------------------- out of descriptors --

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP connection that sends CONNECT; `Some` if a CONNACK came within `t`.
async fn try_mqtt(addr: SocketAddr, id: &str, t: Duration) -> Option<raw::Raw> {
    let s = tokio::time::timeout(t, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut r = raw::Raw {
        stream: s,
        buf: Default::default(),
        dec: lodestream_mqtt::Decoder::new(1 << 20),
        version: ProtocolVersion::V311,
    };
    r.send(&connect_packet(ProtocolVersion::V311, id)).await;
    match r.recv_within(t).await {
        Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success => Some(r),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_broker_backs_off_serves_existing_clients_and_recovers() {
    let _serial = SERIAL.lock().await;
    const NOFILE: u32 = 256;
    let addr: SocketAddr = format!("127.0.0.1:{FD_MQTT_PORT}").parse().expect("addr");
    let log_path = format!("{}/broker-fd-test.log", run_dir("faults"));
    std::fs::create_dir_all(run_dir("faults")).expect("mkdir");
    let log = std::fs::File::create(&log_path).expect("log file");
    let topic = common::unique("fd-default");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_broker"))
        .args(["--kafka", &common::kafka(), "--default-topic", &topic])
        .args(["--tcp", &addr.to_string()])
        .args(["--metrics", &format!("127.0.0.1:{FD_METRICS_PORT}")])
        .args(["--node-id", &common::unique("fd")])
        // $SYS off: its retained figures would land in the topic read below.
        .env("LODESTREAM_SYS__INTERVAL_S", "0")
        .env(
            "LODESTREAM_KAFKA__SESSIONS_TOPIC",
            common::unique("fd-sessions"),
        )
        .env(
            "LODESTREAM_KAFKA__RETAINED_TOPIC",
            common::unique("fd-retained"),
        )
        .env("LODESTREAM_KAFKA__NODES_TOPIC", common::unique("fd-nodes"))
        .env("LODESTREAM_KAFKA__TOPIC_PARTITIONS", "1")
        .env("LODESTREAM_LISTENERS__WS", "")
        .env("LODESTREAM_LISTENERS__TLS", "")
        .env("LODESTREAM_LISTENERS__WSS", "")
        .env("LODESTREAM_MQTT__CONNECT_TIMEOUT_S", "5")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("prlimit + broker binary");
    let pid = child.id();
    let mut child = Kill(child);

    let t0 = Instant::now();
    let mut a = loop {
        if let Some(r) = try_mqtt(addr, "fd-a", Duration::from_secs(2)).await {
            break r;
        }
        assert!(
            child.0.try_wait().ok().flatten().is_none(),
            "broker exited; see {log_path}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "broker did not serve; see {log_path}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let baseline = fd_count(pid);
    a.send(&publish(QoS::AtLeastOnce, 1, "fd/a", &b"before"[..]))
        .await;
    assert!(is_success(&a.recv().await, 1));

    // Open connections until one gets no CONNACK.
    let mut held = Vec::new();
    let mut refused_at = None;
    for i in 0..NOFILE as usize {
        match try_mqtt(addr, &format!("fd-{i}"), Duration::from_secs(2)).await {
            Some(r) => held.push(r),
            None => {
                refused_at = Some(i);
                break;
            }
        }
    }
    let accepted = held.len();
    assert!(
        refused_at.is_some(),
        "a connection was refused before {NOFILE}"
    );
    let at_limit = fd_count(pid);

    // While out of descriptors: no busy loop, the process lives, existing
    // clients are served.
    let cpu0 = cpu_ticks(pid);
    let w = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let cpu_share = (cpu_ticks(pid) - cpu0) as f64 / ticks_per_s / w.elapsed().as_secs_f64();
    assert!(child.0.try_wait().ok().flatten().is_none(), "broker alive");
    assert!(
        cpu_share < 0.5,
        "accept loop does not spin: {cpu_share:.2} cores"
    );
    let t = Instant::now();
    a.send(&publish(
        QoS::AtLeastOnce,
        2,
        "fd/a",
        &b"while-exhausted"[..],
    ))
    .await;
    assert!(
        is_success(&a.recv().await, 2),
        "existing client still gets PUBACK"
    );
    let exhausted_ack = t.elapsed();
    assert!(
        try_mqtt(addr, "fd-late", Duration::from_secs(2))
            .await
            .is_none(),
        "no new session while out of descriptors"
    );

    // Clients leave: new ones connect again.
    drop(held);
    let t = Instant::now();
    let mut again = None;
    while t.elapsed() < Duration::from_secs(20) {
        if let Some(r) = try_mqtt(addr, "fd-again", Duration::from_secs(2)).await {
            again = Some(r);
            break;
        }
    }
    let reconnect = t.elapsed();
    let mut again = again.expect("new clients connect once descriptors are free");
    again
        .send(&publish(QoS::AtLeastOnce, 1, "fd/a", &b"after"[..]))
        .await;
    assert!(is_success(&again.recv().await, 1));

    let logs = std::fs::read_to_string(&log_path).unwrap_or_default();
    let warn_lines = logs.lines().filter(|l| l.contains("accept failed")).count();
    assert!(
        warn_lines > 0,
        "a log line names the accept failure; see {log_path}"
    );
    let mut m = TcpStream::connect(("127.0.0.1", FD_METRICS_PORT))
        .await
        .expect("metrics");
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    m.read_to_string(&mut body).await.expect("read");
    let accept_errors = common::metric(
        &body,
        "lodestream_connect_rejected_total{reason=\"accept_error\"}",
    );
    assert!(accept_errors > 0.0, "accept errors counted");

    let values = tokio::task::spawn_blocking(move || values_in(&common::kafka(), &topic, 3))
        .await
        .expect("reader");
    for v in [&b"before"[..], b"while-exhausted", b"after"] {
        assert!(
            values.iter().any(|x| x == v),
            "{} in Kafka",
            String::from_utf8_lossy(v)
        );
    }
    eprintln!(
        "fds: limit {NOFILE}, {baseline} open with one client, {accepted} more clients accepted ({at_limit} fds), \
         then no CONNACK; CPU while exhausted {cpu_share:.3} cores; PUBACK of a connected client {exhausted_ack:?}; \
         new client accepted {reconnect:?} after the others left; {warn_lines} 'accept failed' log lines, \
         accept_error counter {accept_errors}"
    );
}
