//! Issue #13 item 2 with real clients: under a rules file that denies one
//! topic with `overlap = "filter"` before an allow-all rule,
//! `mosquitto_sub -t '#'` works, receives the other topics (retained and
//! live) and never the denied topic's messages or retained message; a
//! subscription to the literal denied topic is refused.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const RULES: &str = r##"
[[rule]]
who = "*"
action = "subscribe"
topics = ["test/nosubscribe"]
allow = false
overlap = "filter"

[[rule]]
who = "*"
action = "all"
topics = ["#"]
allow = true
"##;

/// `mosquitto_pub` or `mosquitto_sub` at the broker, one topic, QoS 1.
fn mosquitto(name: &str, port: &str, version: &str, topic: &str) -> Command {
    let mut c = Command::new(name);
    c.kill_on_drop(true);
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-V",
        version,
        "-t",
        topic,
        "-q",
        "1",
    ]);
    c
}

/// A broker with [`RULES`]; the rules file is removed when the guard drops.
async fn broker() -> (common::Broker, RulesFile) {
    let path = std::env::temp_dir().join(format!("{}.toml", common::unique("acl")));
    std::fs::write(&path, RULES).expect("write rules");
    let mut c = common::test_config(&[]);
    c.acl.file = path.display().to_string();
    (common::start_with(c).await, RulesFile(path))
}

struct RulesFile(std::path::PathBuf);

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn mosquitto_pub(port: &str, version: &str, topic: &str, payload: &str, retain: bool) {
    let mut c = mosquitto("mosquitto_pub", port, version, topic);
    c.args(["-m", payload]);
    if retain {
        c.arg("-r");
    }
    let st = c
        .status()
        .await
        .expect("mosquitto_pub installed (apt-get install mosquitto-clients)");
    assert!(st.success(), "mosquitto_pub {topic} failed");
}

/// `mosquitto_sub -t '#'` in 3.1.1 and 5: retained and live messages of
/// other topics arrive, the denied topic's never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_hash_works_and_never_receives_the_denied_topic() {
    let (b, _dir) = broker().await;
    let port = b.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        mosquitto_pub(
            &port,
            version,
            "test/nosubscribe",
            &format!("{version} hidden retained"),
            true,
        )
        .await;
        mosquitto_pub(
            &port,
            version,
            "test/visible",
            &format!("{version} visible retained"),
            true,
        )
        .await;
        let mut sub = mosquitto("mosquitto_sub", &port, version, "#")
            .args(["-v", "-W", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub installed (apt-get install mosquitto-clients)");
        let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
        let mut got = BTreeSet::new();
        let live_visible = format!("test/visible {version} visible live");
        // The retained message proves the subscription is in place; then
        // publish live until the live visible message arrives.
        for _ in 0..40 {
            mosquitto_pub(
                &port,
                version,
                "test/nosubscribe",
                &format!("{version} hidden live"),
                false,
            )
            .await;
            mosquitto_pub(
                &port,
                version,
                "test/visible",
                &format!("{version} visible live"),
                false,
            )
            .await;
            while let Ok(Ok(Some(l))) =
                tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
            {
                got.insert(l);
            }
            if got.contains(&live_visible) {
                break;
            }
        }
        // Anything late for the denied topic would show up now.
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await
        {
            got.insert(l);
        }
        let _ = sub.kill().await;
        assert!(
            got.contains(&format!("test/visible {version} visible retained")),
            "{version}: got {got:?}"
        );
        assert!(got.contains(&live_visible), "{version}: got {got:?}");
        assert!(
            got.iter()
                .all(|l| !l.contains("nosubscribe") && !l.contains("hidden")),
            "{version}: the denied topic was delivered: {got:?}"
        );
    }
}

/// `mosquitto_sub -t test/nosubscribe`: every subscription refused, which
/// mosquitto_sub reports ("All subscription requests were denied.") and
/// exits on (MQTT 5: 0x87; 3.1.1: 0x80).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_to_the_literal_denied_topic_is_refused() {
    let (b, _dir) = broker().await;
    let port = b.port().to_string();
    for version in ["mqttv311", "mqttv5"] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            mosquitto("mosquitto_sub", &port, version, "test/nosubscribe")
                .args(["-W", "10"])
                .output(),
        )
        .await
        .expect("mosquitto_sub exits by itself")
        .expect("mosquitto_sub installed");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("denied"),
            "{version}: status {:?}, stderr {stderr:?}",
            out.status
        );
    }
}
